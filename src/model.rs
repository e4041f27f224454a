//! The bottom layer: ids, time and a rate limit for log lines, shared by
//! every layer above and depending on none of them.

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

/// A gate for a log line about something a peer can make happen often
/// (a protocol violation, a throttled source, a full disk): it opens at
/// most once per period, and says how many times it stayed shut since, so
/// an attack or a failing disk costs a line per period, not a line per
/// event. Counting every event is the metrics' job.
#[derive(Debug)]
pub struct LogGate {
    period_ms: u64,
    /// Milliseconds since [`epoch`] when the gate last opened, plus one
    /// (0: never).
    last: std::sync::atomic::AtomicU64,
    suppressed: std::sync::atomic::AtomicU64,
}

fn epoch() -> std::time::Instant {
    static EPOCH: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(std::time::Instant::now)
}

impl LogGate {
    /// A gate that opens at most once every `period_ms` milliseconds.
    pub const fn new(period_ms: u64) -> Self {
        Self { period_ms, last: std::sync::atomic::AtomicU64::new(0), suppressed: std::sync::atomic::AtomicU64::new(0) }
    }

    /// `Some(suppressed)` when a line may be written now, with the number
    /// of events since the last line that wrote none; `None` otherwise.
    pub fn open(&self) -> Option<u64> {
        use std::sync::atomic::Ordering;
        let now = epoch().elapsed().as_millis() as u64 + 1;
        let last = self.last.load(Ordering::Relaxed);
        if last != 0 && now < last + self.period_ms {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        // One winner per period among racing threads.
        if self.last.compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed).is_err() {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return None;
        }
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_gate_opens_once_per_period_and_counts_the_rest() {
        let g = LogGate::new(60_000);
        assert_eq!(g.open(), Some(0));
        for _ in 0..5 {
            assert_eq!(g.open(), None);
        }
        let g = LogGate::new(0);
        assert_eq!(g.open(), Some(0));
        assert_eq!(g.open(), Some(0));
    }
}
