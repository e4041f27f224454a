//! The `[storage]` table of the configuration file: how the group-commit
//! engine batches, syncs and guards the disk. [`StorageSettings::engine`]
//! turns it into the engine's [`EngineConfig`].

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::EngineConfig;

/// The `[storage]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StorageSettings {
    /// Most operations in one group commit.
    pub max_batch: usize,
    /// Operations that may wait for the storage writer. When it is full,
    /// sends are refused with `UNAVAILABLE` (the client retries) and
    /// connections stop reading until acks and receipts fit.
    pub queue: usize,
    /// Fsync every commit (never disable outside benchmarks of the rest).
    pub sync_writes: bool,
    /// MiB of free disk below which new sends and registrations are
    /// refused (`UNAVAILABLE`, retry later), so the database never fills
    /// the disk and a restart always has room to open it. At least
    /// [`MIN_RESERVE_MB`] in a configuration file; there is no "no
    /// reserve" (see [`StorageSettings::check_reserve`]).
    pub reserve_mb: u64,
    /// Seconds a commit waits for a full disk to have room again before
    /// the requests in it are answered `UNAVAILABLE` (retry later).
    pub full_wait_secs: u64,
}

/// The smallest reserve: what a restart needs to open the database. On
/// open RocksDB replays its write-ahead log into a memtable and flushes it
/// to a table file (up to a memtable, 64 MiB), then writes a new log, a
/// new MANIFEST and OPTIONS file (KiBs); and after a full disk it resumes
/// writing only once a memtable's worth is free. With less, a server whose
/// disk filled could neither recover nor restart until the disk grew.
pub const MIN_RESERVE_MB: u64 = (crate::store::WRITE_BUFFER_BYTES >> 20) as u64;

impl Default for StorageSettings {
    fn default() -> Self {
        Self { max_batch: 4_096, queue: 65_536, sync_writes: true, reserve_mb: 256, full_wait_secs: 30 }
    }
}

impl StorageSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: &str| Err(format!("[storage] {m}"));
        if self.max_batch == 0 || self.queue == 0 {
            return bad("max_batch and queue must be positive");
        }
        if self.full_wait_secs == 0 {
            return bad("full_wait_secs must be positive");
        }
        Ok(())
    }

    /// The reserve is at least [`MIN_RESERVE_MB`]. Checked on every
    /// configuration the server reads (the binary's startup); a program
    /// that embeds the server and builds its settings itself may set 0,
    /// as the test that lets the database meet a full disk does.
    pub fn check_reserve(&self) -> Result<(), String> {
        if self.reserve_mb < MIN_RESERVE_MB {
            return Err(format!(
                "[storage] reserve_mb = {} is below the minimum of {MIN_RESERVE_MB}: a restart needs that much free \
                 disk to open the database (RocksDB flushes its log, up to a {MIN_RESERVE_MB} MiB memtable, and \
                 resumes after a full disk only with that much free); 0 (no reserve) is no longer allowed",
                self.reserve_mb
            ));
        }
        Ok(())
    }

    /// What the engine runs with.
    pub fn engine(&self) -> EngineConfig {
        EngineConfig {
            max_batch: self.max_batch,
            capacity: self.queue,
            sync: self.sync_writes,
            reserve_bytes: self.reserve_mb.saturating_mul(1 << 20),
            full_wait: Duration::from_secs(self.full_wait_secs),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_reserve_is_at_least_what_a_restart_needs() {
        assert_eq!(MIN_RESERVE_MB, 64);
        StorageSettings { reserve_mb: 64, ..StorageSettings::default() }.check_reserve().unwrap();
        for below in [0, 10, 63] {
            let err = StorageSettings { reserve_mb: below, ..StorageSettings::default() }.check_reserve().unwrap_err();
            assert!(err.contains(&format!("[storage] reserve_mb = {below} is below the minimum of 64")), "{err}");
        }
        assert_eq!(StorageSettings::default().engine().reserve_bytes, 256 << 20);
    }
}
