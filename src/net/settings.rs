//! The `[net]` table of the configuration file: connections, their
//! timeouts and windows, the memory they may hold, handshake admission.
//!
//! Kept in the operator's units (seconds, MiB, integers) and checked
//! here; [`NetSettings::config`] turns it into the [`NetConfig`] the
//! connections run with.

use std::time::Duration;

use pipit_protocol::limits;
use serde::{Deserialize, Serialize};

use super::admission::AdmissionConfig;
use super::NetConfig;

/// The `[net]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NetSettings {
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// Seconds a handshake may take, all steps together.
    pub handshake_timeout_secs: u64,
    /// Milliseconds a handshake may wait for the peer's next bytes: for
    /// the first after accept, and between any two while a handshake
    /// message is due. A peer that stalls gives its slot back this soon.
    pub handshake_idle_timeout_ms: u64,
    /// Milliseconds one handshake message may take to arrive whole, from
    /// the moment the server waits for it (accept, or its own reply sent).
    pub handshake_step_timeout_ms: u64,
    /// Shortest keepalive interval (seconds) the server grants.
    pub keepalive_min_secs: u32,
    /// Longest keepalive interval (seconds) the server grants.
    pub keepalive_max_secs: u32,
    /// Interval granted to clients that propose none.
    pub keepalive_default_secs: u32,
    /// Unacknowledged deliveries per connection (the 2G backpressure).
    pub delivery_window: u32,
    /// Sends a connection may have waiting for durability before the
    /// server stops reading from it.
    pub max_pending_sends: usize,
    /// Seconds SIGTERM waits for connections to drain.
    pub shutdown_grace_secs: u64,
    /// Seconds TCP_USER_TIMEOUT allows unacknowledged data to linger.
    pub tcp_user_timeout_secs: u64,
    /// Seconds a write to a client may make no progress before the server
    /// drops it (a peer that stopped reading).
    pub write_timeout_secs: u64,
    /// Memory budget in MiB for what peers make the server hold in
    /// transient buffers (read buffers and partial frames, sends waiting
    /// for storage, outbound buffers, mailboxes); 0 = an eighth of the
    /// machine's memory. Over it, the heaviest connections stop reading.
    pub memory_budget_mb: u64,
    /// Bytes of sends one connection may have waiting for storage before
    /// the server stops reading from it.
    pub max_pending_send_bytes: usize,
    /// Bytes of sends all connections together may have waiting for
    /// storage; over it, connections with more than a frame's worth
    /// waiting stop reading. Every new send waits behind what is queued,
    /// so this bounds the latency a flood of large sends adds for
    /// everyone else.
    pub max_queued_send_bytes: usize,
    /// Seconds a frame may take from its first byte to its last before the
    /// connection is closed.
    pub partial_frame_timeout_secs: u64,
    /// Handshakes in progress at once; while all are taken, new
    /// connections wait in the kernel's backlog.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address (IPv6: per
    /// /64); more are refused. 0 = a 32nd of `max_handshakes` (at least
    /// 8), so that a few addresses cannot take every slot.
    pub max_handshakes_per_source: usize,
    /// New connections per second per source address (IPv6: per /64);
    /// 0 = no limit.
    pub handshake_rate_per_source: u32,
    /// New connections a source may open at once before its rate applies.
    pub handshake_burst_per_source: u32,
    /// Threads for handshake cryptography (below the shards' priority);
    /// 0 = one per shard.
    pub handshake_threads: usize,
}

impl Default for NetSettings {
    fn default() -> Self {
        Self {
            max_connections: 1_000_000,
            handshake_timeout_secs: 10,
            handshake_idle_timeout_ms: 2_000,
            handshake_step_timeout_ms: 5_000,
            keepalive_min_secs: limits::MIN_KEEPALIVE_SECS,
            keepalive_max_secs: limits::MAX_KEEPALIVE_SECS,
            keepalive_default_secs: limits::DEFAULT_KEEPALIVE_SECS,
            delivery_window: 64,
            max_pending_sends: 256,
            shutdown_grace_secs: 10,
            tcp_user_timeout_secs: 120,
            write_timeout_secs: 120,
            memory_budget_mb: 0,
            max_pending_send_bytes: 1 << 20,
            max_queued_send_bytes: 4 << 20,
            partial_frame_timeout_secs: 30,
            max_handshakes: 4_096,
            max_handshakes_per_source: 0,
            handshake_rate_per_source: 100,
            handshake_burst_per_source: 400,
            handshake_threads: 0,
        }
    }
}

impl NetSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: &str| Err(format!("[net] {m}"));
        if self.keepalive_min_secs == 0 || self.keepalive_min_secs > self.keepalive_max_secs {
            return bad("keepalive_min_secs must be at least 1 and at most keepalive_max_secs");
        }
        if self.delivery_window == 0 || self.delivery_window > 10_000 {
            return bad("delivery_window must be between 1 and 10000");
        }
        if self.max_pending_sends == 0 || self.max_connections == 0 {
            return bad("max_pending_sends and max_connections must be positive");
        }
        if self.handshake_timeout_secs == 0 || self.write_timeout_secs == 0 {
            return bad("handshake_timeout_secs and write_timeout_secs must be positive");
        }
        if self.max_pending_send_bytes < limits::MAX_PACKET_LEN || self.max_queued_send_bytes < limits::MAX_PACKET_LEN {
            return bad("max_pending_send_bytes and max_queued_send_bytes must be at least one packet (65519)");
        }
        if self.partial_frame_timeout_secs == 0 || self.max_handshakes == 0 {
            return bad("partial_frame_timeout_secs and max_handshakes must be positive");
        }
        if self.handshake_idle_timeout_ms == 0 || self.handshake_step_timeout_ms == 0 {
            return bad("handshake_idle_timeout_ms and handshake_step_timeout_ms must be positive");
        }
        Ok(())
    }

    /// What the connections run with, on a server of `shards` shards.
    pub fn config(&self, shards: usize) -> NetConfig {
        NetConfig {
            max_connections: self.max_connections,
            handshake_timeout: Duration::from_secs(self.handshake_timeout_secs),
            handshake_idle_timeout: Duration::from_millis(self.handshake_idle_timeout_ms),
            handshake_step_timeout: Duration::from_millis(self.handshake_step_timeout_ms),
            keepalive_min_secs: self.keepalive_min_secs,
            keepalive_max_secs: self.keepalive_max_secs,
            keepalive_default_secs: self.keepalive_default_secs,
            delivery_window: self.delivery_window as usize,
            max_pending_sends: self.max_pending_sends,
            write_timeout: Duration::from_secs(self.write_timeout_secs),
            tcp_user_timeout: Duration::from_secs(self.tcp_user_timeout_secs),
            shutdown_grace: self.shutdown_grace(),
            max_pending_send_bytes: self.max_pending_send_bytes,
            max_queued_send_bytes: self.max_queued_send_bytes,
            partial_frame_timeout: Duration::from_secs(self.partial_frame_timeout_secs),
            admission: AdmissionConfig {
                max_handshakes: self.max_handshakes,
                max_per_source: self.handshakes_per_source(),
                rate_per_source: f64::from(self.handshake_rate_per_source),
                burst_per_source: f64::from(self.handshake_burst_per_source),
                threads: if self.handshake_threads > 0 { self.handshake_threads } else { shards },
            },
        }
    }

    /// Handshakes one source may have in progress.
    pub fn handshakes_per_source(&self) -> usize {
        match self.max_handshakes_per_source {
            0 => (self.max_handshakes / 32).max(8),
            n => n,
        }
        .min(self.max_handshakes)
    }

    /// How long SIGTERM waits for connections to drain.
    pub fn shutdown_grace(&self) -> Duration {
        Duration::from_secs(self.shutdown_grace_secs)
    }

    /// The memory budget in bytes: the configured one, or an eighth of the
    /// machine's memory (at least 64 MiB).
    pub fn memory_budget_bytes(&self) -> usize {
        if self.memory_budget_mb > 0 {
            return (self.memory_budget_mb as usize).saturating_mul(1 << 20);
        }
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
                line.split_whitespace().nth(1)?.parse::<usize>().ok()
            })
            .map_or(4 << 30, |kib| kib.saturating_mul(1024));
        (total / 8).max(64 << 20)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handshake_threads_default_to_one_per_shard() {
        let s = NetSettings::default();
        assert_eq!(s.config(3).admission.threads, 3);
        let s = NetSettings { handshake_threads: 2, ..NetSettings::default() };
        assert_eq!(s.config(3).admission.threads, 2);
    }

    #[test]
    fn a_source_gets_a_32nd_of_the_handshake_slots_by_default() {
        let s = NetSettings::default();
        assert_eq!(s.config(1).admission.max_per_source, 128);
        let s = NetSettings { max_handshakes: 16, ..NetSettings::default() };
        assert_eq!(s.config(1).admission.max_per_source, 8);
        let s = NetSettings { max_handshakes: 4, ..NetSettings::default() };
        assert_eq!(s.config(1).admission.max_per_source, 4);
        let s = NetSettings { max_handshakes_per_source: 500, ..NetSettings::default() };
        assert_eq!(s.config(1).admission.max_per_source, 500);
    }

    #[test]
    fn out_of_range_values_are_refused_by_their_name() {
        let s = NetSettings { delivery_window: 0, ..NetSettings::default() };
        assert!(s.validate().unwrap_err().contains("[net] delivery_window"));
        let s = NetSettings { max_queued_send_bytes: 1_000, ..NetSettings::default() };
        assert!(s.validate().unwrap_err().contains("max_queued_send_bytes"));
        NetSettings::default().validate().unwrap();
    }
}
