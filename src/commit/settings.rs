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
    /// the disk and a restart always has room to open it. At least 64
    /// (RocksDB resumes after a full disk only with a memtable's worth
    /// free); 0 = no reserve.
    pub reserve_mb: u64,
    /// Seconds a commit waits for a full disk to have room again before
    /// the requests in it are answered `UNAVAILABLE` (retry later).
    pub full_wait_secs: u64,
}

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
        if self.reserve_mb != 0 && self.reserve_mb < 64 {
            return bad("reserve_mb must be 0 or at least 64 (RocksDB needs 64 MiB free to resume)");
        }
        if self.full_wait_secs == 0 {
            return bad("full_wait_secs must be positive");
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
    fn the_reserve_is_none_or_room_for_rocksdb_to_resume() {
        StorageSettings { reserve_mb: 0, ..StorageSettings::default() }.validate().unwrap();
        let err = StorageSettings { reserve_mb: 10, ..StorageSettings::default() }.validate().unwrap_err();
        assert!(err.contains("[storage] reserve_mb"), "{err}");
        assert_eq!(StorageSettings::default().engine().reserve_bytes, 256 << 20);
    }
}
