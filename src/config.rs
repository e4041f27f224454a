//! Server configuration: a TOML file, overridable by command-line flags,
//! with defaults that start a working server with nothing else installed.
//!
//! A few keys at the top (where to listen, where the data lives, how many
//! shards, where metrics go) and then one table per owner: `[net]`,
//! `[storage]`, `[accounts]`, `[messages]`, `[groups]`, `[presence]`,
//! `[typing]`, `[push]`, `[keys]` and `[cluster]`. Each table's type lives
//! in the layer that uses it, which checks its own ranges; this module
//! only gathers them. The flat keys of the previous release are still
//! read for one release (`flat`), each with a warning naming its new
//! place.

mod flat;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use self::flat::Deprecated;
pub use crate::commit::settings::StorageSettings;
pub use crate::net::settings::NetSettings;
pub use crate::route::cluster::ClusterConfig;
pub use crate::service::settings::{
    AccountSettings, GroupSettings, KeySettings, MessageSettings, PresenceSettings, PushSettings, Registration,
    TypingSettings,
};

/// Everything `pipit serve` can be told.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// `[net]`: connections, their timeouts and windows, admission.
    pub net: NetSettings,
    /// `[storage]`: the group-commit writer and the disk reserve.
    pub storage: StorageSettings,
    /// `[accounts]`: who may register.
    pub accounts: AccountSettings,
    /// `[messages]`: expiry of undelivered messages.
    pub messages: MessageSettings,
    /// `[groups]`: group size, fan-out and group receipts.
    pub groups: GroupSettings,
    /// `[presence]`: online status and last seen.
    pub presence: PresenceSettings,
    /// `[typing]`: typing notices.
    pub typing: TypingSettings,
    /// `[push]`: wake-ups for devices without a connection.
    pub push: PushSettings,
    /// `[keys]`: the end-to-end key directory.
    pub keys: KeySettings,
    /// `[cluster]`: several nodes; absent: a single node, no etcd.
    pub cluster: Option<ClusterConfig>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5222".parse().expect("valid literal"),
            data_dir: PathBuf::from("pipit-data"),
            shards: 0,
            metrics_listen: None,
            net: NetSettings::default(),
            storage: StorageSettings::default(),
            accounts: AccountSettings::default(),
            messages: MessageSettings::default(),
            groups: GroupSettings::default(),
            presence: PresenceSettings::default(),
            typing: TypingSettings::default(),
            push: PushSettings::default(),
            keys: KeySettings::default(),
            cluster: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    // The cause is part of the message, not a `source`: an error chain
    // printed whole (`{:#}`) would say it twice.
    /// The file could not be read.
    #[error("cannot read {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {error}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        error: toml::de::Error,
    },
    /// A setting is given both as an old flat key and in its table.
    #[error("config: `{old}` and `{new}` are the same setting; give it once, as `{new}`")]
    BothWays {
        /// The flat key.
        old: &'static str,
        /// Its table and name now (`[net] delivery_window`).
        new: String,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

/// A file read: the configuration, and the flat keys it still used.
#[derive(Debug)]
pub struct Parsed {
    /// The configuration, checked.
    pub config: Config,
    /// Flat keys moved to their tables, for the operator to be told.
    pub deprecated: Vec<Deprecated>,
}

impl Config {
    /// Reads a TOML file (missing keys take their defaults) and logs a
    /// warning for each flat key it still uses.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read { path: path.into(), error })?;
        let parsed = Self::parse(&text, path)?;
        for d in &parsed.deprecated {
            tracing::warn!("{d}");
        }
        Ok(parsed.config)
    }

    /// Reads the text of a TOML file; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Parsed, ConfigError> {
        let parse_error = |error| ConfigError::Parse { path: path.into(), error };
        let mut doc: toml::Table = toml::from_str(text).map_err(parse_error)?;
        let deprecated = flat::lift(&mut doc)?;
        // From the text when nothing moved, so that an error points at
        // its line.
        let config: Config =
            if deprecated.is_empty() { toml::from_str(text) } else { doc.try_into() }.map_err(parse_error)?;
        config.validate()?;
        // What a restart needs, whatever the file says (`pipit::start`
        // alone lets an embedding test run with no reserve).
        config.storage.check_reserve().map_err(ConfigError::Invalid)?;
        Ok(Parsed { config, deprecated })
    }

    /// Checks ranges that serde cannot, table by table.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let checks = [
            self.net.validate(),
            self.storage.validate(),
            self.messages.validate(),
            self.groups.validate(),
            self.presence.validate(),
            self.typing.validate(),
            self.push.validate(),
            self.keys.validate(),
            self.cluster.as_ref().map_or(Ok(()), ClusterConfig::validate),
        ];
        checks.into_iter().collect::<Result<(), String>>().map_err(ConfigError::Invalid)
    }

    /// Shards to run: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }
}

#[cfg(test)]
mod tests;
