//! Server configuration: a TOML file, overridable by command-line flags,
//! with defaults that start a working server with nothing else installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Who may create an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone whose device completes a handshake.
    #[default]
    Open,
    /// Only with an invite code issued by `pipit admin invite`.
    Invite,
}

/// Everything `pipit serve` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the chat protocol listens on.
    pub listen: SocketAddr,
    /// Where RocksDB, the server key and the admin socket live.
    pub data_dir: PathBuf,
    /// Shards (threads, each with its own listener); 0 = one per core.
    pub shards: usize,
    /// Prometheus metrics address; unset: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Registration policy.
    pub registration: Registration,
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// Seconds a handshake may take.
    pub handshake_timeout_secs: u64,
    /// Keepalive bounds (seconds) the server grants within.
    pub keepalive_min_secs: u32,
    /// See `keepalive_min_secs`.
    pub keepalive_max_secs: u32,
    /// Interval granted to clients that propose none.
    pub keepalive_default_secs: u32,
    /// Unacknowledged deliveries per connection (the 2G backpressure).
    pub delivery_window: u32,
    /// Sends a connection may have waiting for durability before the
    /// server stops reading from it.
    pub max_pending_sends: usize,
    /// Seconds an undelivered message waits before it expires (30 days).
    pub message_ttl_secs: u64,
    /// Seconds between expiry sweeps.
    pub expiry_sweep_secs: u64,
    /// Most operations in one group commit.
    pub max_batch: usize,
    /// Seconds SIGTERM waits for connections to drain.
    pub shutdown_grace_secs: u64,
    /// Seconds TCP_USER_TIMEOUT allows unacknowledged data to linger.
    pub tcp_user_timeout_secs: u64,
    /// Seconds a write to a client may make no progress before the server
    /// drops it (a peer that stopped reading).
    pub write_timeout_secs: u64,
    /// Operations that may wait for the storage writer. When it is full,
    /// sends are refused with `UNAVAILABLE` (the client retries) and
    /// connections stop reading until acks and receipts fit.
    pub storage_queue: usize,
    /// Fsync every commit (never disable outside benchmarks of the rest).
    pub sync_writes: bool,
    /// A device whose stock of one-time prekeys falls below this is told.
    pub one_time_keys_low: u32,
    /// Key bundles one account may fetch at once.
    pub keys_fetch_burst: u32,
    /// Key bundles one account may fetch per minute after its burst.
    pub keys_fetch_per_minute: u32,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5222".parse().expect("valid literal"),
            data_dir: PathBuf::from("pipit-data"),
            shards: 0,
            metrics_listen: None,
            registration: Registration::Open,
            max_connections: 1_000_000,
            handshake_timeout_secs: 10,
            keepalive_min_secs: pipit_protocol::limits::MIN_KEEPALIVE_SECS,
            keepalive_max_secs: pipit_protocol::limits::MAX_KEEPALIVE_SECS,
            keepalive_default_secs: pipit_protocol::limits::DEFAULT_KEEPALIVE_SECS,
            delivery_window: 64,
            max_pending_sends: 256,
            message_ttl_secs: 30 * 86_400,
            expiry_sweep_secs: 3_600,
            max_batch: 4_096,
            shutdown_grace_secs: 10,
            tcp_user_timeout_secs: 120,
            write_timeout_secs: 120,
            storage_queue: 65_536,
            sync_writes: true,
            one_time_keys_low: 16,
            keys_fetch_burst: 2_048,
            keys_fetch_per_minute: 600,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.keepalive_min_secs == 0 || self.keepalive_min_secs > self.keepalive_max_secs {
            return bad("keepalive_min_secs must be at least 1 and at most keepalive_max_secs");
        }
        if self.delivery_window == 0 || self.delivery_window > 10_000 {
            return bad("delivery_window must be between 1 and 10000");
        }
        if self.max_batch == 0 || self.max_pending_sends == 0 || self.max_connections == 0 {
            return bad("max_batch, max_pending_sends and max_connections must be positive");
        }
        if self.message_ttl_secs == 0 || self.expiry_sweep_secs == 0 {
            return bad("message_ttl_secs and expiry_sweep_secs must be positive");
        }
        if self.handshake_timeout_secs == 0 || self.write_timeout_secs == 0 {
            return bad("handshake_timeout_secs and write_timeout_secs must be positive");
        }
        if self.storage_queue == 0 {
            return bad("storage_queue must be positive");
        }
        if self.one_time_keys_low as usize > pipit_protocol::limits::MAX_ONE_TIME_PREKEYS {
            return bad("one_time_keys_low must be at most 200 (the most a device holds)");
        }
        if self.keys_fetch_burst == 0 || self.keys_fetch_per_minute == 0 {
            return bad("keys_fetch_burst and keys_fetch_per_minute must be positive");
        }
        Ok(())
    }

    /// Shards to run: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_errors() {
        let example = include_str!("../systemd/pipit.toml");
        let cfg: Config = toml::from_str(example).unwrap();
        cfg.validate().unwrap();
        assert!(toml::from_str::<Config>("lisen = \"1.2.3.4:5\"").is_err());
        let bad: Config = toml::from_str("delivery_window = 0").unwrap();
        assert!(bad.validate().is_err());
    }
}
