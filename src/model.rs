//! The bottom layer: ids and time, shared by every layer above and
//! depending on none of them.

use std::time::{SystemTime, UNIX_EPOCH};

/// One device of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceAddr {
    /// Account id, from 1.
    pub account: u64,
    /// Device number within the account, from 0.
    pub device: u32,
}

impl DeviceAddr {
    /// A device address.
    pub fn new(account: u64, device: u32) -> Self {
        Self { account, device }
    }
}

impl std::fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.device)
    }
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}
