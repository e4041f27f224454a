//! The client's configuration and counters as plain records.

use std::sync::atomic::Ordering;
use std::time::Duration;

use pipit_client::{Backoff, Config};

/// How the client behaves. Get the defaults from [`default_config`] and
/// change what the app needs.
#[derive(Debug, Clone, uniffi::Record)]
pub struct ClientConfig {
    /// `host:port` of the server.
    pub server: String,
    /// Invite code, used only when registering.
    pub invite: String,
    /// Device name, used only when registering.
    pub device_name: String,
    /// Keepalive interval to propose, seconds; 0 = the server's default.
    pub keepalive_secs: u32,
    /// How long to wait for any byte after a keepalive before reconnecting.
    pub response_timeout_ms: u64,
    /// Time allowed to connect and log in.
    pub connect_timeout_ms: u64,
    /// Upper bound of the first reconnect delay.
    pub backoff_initial_ms: u64,
    /// Largest reconnect delay.
    pub backoff_max_ms: u64,
    /// Accept a server key different from the pinned one (off: a changed
    /// key stops the client).
    pub accept_server_key_change: bool,
    /// Events buffered for the app before the client stops reading the
    /// network.
    pub event_buffer: u32,
    /// End-to-end encryption (Olm and Megolm): on by default; off sends
    /// payloads as they are (tests, bots).
    pub encryption: bool,
    /// 32 bytes from the platform keystore that encrypt the end-to-end
    /// state in the storage directory; `None`: a key derived from the
    /// device's private key (only as safe as the directory itself).
    pub pickle_key: Option<Vec<u8>>,
}

/// The library's defaults for `server` (`host:port`).
#[uniffi::export]
pub fn default_config(server: String) -> ClientConfig {
    let c = Config::new(server);
    ClientConfig {
        server: c.server,
        invite: c.invite,
        device_name: c.device_name,
        keepalive_secs: c.keepalive_secs,
        response_timeout_ms: millis(c.response_timeout),
        connect_timeout_ms: millis(c.connect_timeout),
        backoff_initial_ms: millis(c.backoff.initial),
        backoff_max_ms: millis(c.backoff.max),
        accept_server_key_change: c.accept_server_key_change,
        event_buffer: u32::try_from(c.event_buffer).unwrap_or(u32::MAX),
        encryption: matches!(c.encryption, pipit_client::Encryption::On),
        pickle_key: None,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

impl TryFrom<ClientConfig> for Config {
    type Error = crate::PipitError;

    fn try_from(c: ClientConfig) -> Result<Self, crate::PipitError> {
        let mut config = Config::new(c.server);
        config.invite = c.invite;
        config.device_name = c.device_name;
        config.keepalive_secs = c.keepalive_secs;
        config.response_timeout = Duration::from_millis(c.response_timeout_ms);
        config.connect_timeout = Duration::from_millis(c.connect_timeout_ms);
        config.backoff = Backoff {
            initial: Duration::from_millis(c.backoff_initial_ms),
            max: Duration::from_millis(c.backoff_max_ms),
        };
        config.accept_server_key_change = c.accept_server_key_change;
        config.event_buffer = c.event_buffer as usize;
        config.encryption = if c.encryption { pipit_client::Encryption::On } else { pipit_client::Encryption::Off };
        if let Some(k) = c.pickle_key {
            let k: [u8; 32] = k.try_into().map_err(|k: Vec<u8>| crate::PipitError::InvalidArgument {
                reason: format!("pickle_key: 32 bytes, not {}", k.len()),
            })?;
            config.pickle_key = Some(pipit_client::PickleKey(k));
        }
        Ok(config)
    }
}

/// Counters, for diagnostics.
#[derive(Debug, Clone, uniffi::Record)]
pub struct Stats {
    /// Successful logins after the first.
    pub reconnects: u64,
    /// Deliveries dropped as already processed.
    pub duplicates_dropped: u64,
    /// Deliveries handed to the app.
    pub received: u64,
    /// Sends confirmed durable.
    pub sent: u64,
    /// Sends transmitted again after a reconnect.
    pub resent: u64,
}

impl From<&pipit_client::Stats> for Stats {
    fn from(s: &pipit_client::Stats) -> Self {
        Stats {
            reconnects: s.reconnects.load(Ordering::Relaxed),
            duplicates_dropped: s.duplicates_dropped.load(Ordering::Relaxed),
            received: s.received.load(Ordering::Relaxed),
            sent: s.sent.load(Ordering::Relaxed),
            resent: s.resent.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_round_trips_through_the_record() {
        let c: Config = default_config("127.0.0.1:5222".into()).try_into().unwrap();
        let d = Config::new("127.0.0.1:5222");
        assert_eq!(
            (c.server, c.keepalive_secs, c.response_timeout, c.connect_timeout, c.event_buffer),
            (d.server, d.keepalive_secs, d.response_timeout, d.connect_timeout, d.event_buffer)
        );
        assert_eq!((c.backoff.initial, c.backoff.max), (d.backoff.initial, d.backoff.max));
    }
}
