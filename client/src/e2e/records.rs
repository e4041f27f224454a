//! The records the end-to-end layer keeps in the store (encrypted by the
//! vault): the Olm account, peers' devices, sessions, groups, stashed
//! messages.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use vodozemac::megolm::{GroupSessionPickle, InboundGroupSessionPickle};
use vodozemac::olm::{AccountPickle, SessionPickle};

use super::{Addr, DeviceIdentity};

#[derive(Serialize, Deserialize)]
pub(super) struct AccountRecord {
    pub(super) pickle: AccountPickle,
    /// The identity is on the server.
    pub(super) published: bool,
    /// A new signed prekey waits to be uploaded.
    pub(super) fallback_due: bool,
    /// When the current signed prekey was made.
    pub(super) fallback_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct PeerDevice {
    /// The identity this device trusts for it.
    pub(super) identity: Option<DeviceIdentity>,
    /// A different identity it showed, waiting for the app to accept it.
    pub(super) offered: Option<DeviceIdentity>,
    /// The server had no keys for it when last asked.
    pub(super) keyless_at: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct PeerRecord {
    pub(super) devices: BTreeMap<u32, PeerDevice>,
}

#[derive(Serialize, Deserialize, Default)]
pub(super) struct SessionsRecord {
    pub(super) sessions: Vec<SessionPickle>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct OutboundRecord {
    pub(super) pickle: GroupSessionPickle,
    /// Its session id (raw), so it need not be unpickled to be named.
    pub(super) session: Vec<u8>,
    /// The group version it was made for.
    pub(super) version: u64,
    pub(super) messages: u32,
    pub(super) created: u64,
    /// Devices that have its key (their sends were stored).
    pub(super) shared: BTreeSet<Addr>,
}

#[derive(Serialize, Deserialize)]
pub(super) struct InboundRecord {
    pub(super) pickle: InboundGroupSessionPickle,
    /// The device that shared it: only its messages may use it.
    pub(super) sender: Addr,
    /// Message indexes read under it, each with the group sequence number
    /// it came as (a redelivery has the same one, a replay another); at
    /// most [`SEEN_MAX`], the oldest forgotten first.
    #[serde(default)]
    pub(super) seen: BTreeMap<u32, u64>,
}

/// Indexes remembered per inbound session: an honest sender starts a new
/// session long before (`MEGOLM_MAX_MESSAGES`).
pub(super) const SEEN_MAX: usize = 1_024;

/// A message waiting to be sealed: `pb::Send`, base64.
#[derive(Serialize, Deserialize)]
pub(super) struct Stashed {
    pub(super) send: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(super) struct GroupRecord {
    pub(super) members: Vec<u64>,
    pub(super) version: u64,
}
