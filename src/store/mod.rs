//! Durable state in RocksDB: the only module that names the engine.
//!
//! One column family per kind of data, each in its own file with its key
//! layout, its value codec, its reads ([`Store`] methods, for any thread
//! but a shard's async code) and its writes ([`Txn`] methods, for the
//! group-commit writer only). Keys are big-endian so iteration order is the
//! order we mean.
//!
//! | file | family | key | value |
//! |---|---|---|---|
//! | `accounts` | `accounts` | account | `pb::DeviceList`: the account's devices |
//! | `device_keys` | `keys` | device static key (32) | account (8) device (4) |
//! | `inbox` | `inbox` | account device inbox-id | packet of one Deliver/Receipt/Expired/GroupInfo, or `00` + `GroupRef` |
//! | `dedup` | `dedup` | account device client-id | seq (8) time (8) [digest (8)] |
//! | `counters` | `counters` | tagged key | next value (8) |
//! | `invites` | `invites` | code | expiry time (8) |
//! | `groups` | `groups` | group | `GroupRecord`: name, version, members |
//! | `groups` | `group_members` | account group | empty |
//! | `group_bodies` | `group_bodies` | group seq [account device] | packet of one Deliver/GroupInfo [or a device's ciphertext] |
//! | `fanout` | `fanout` | group seq | `FanoutJob`: cursor and progress |
//! | `group_receipts` | `group_receipts` | `r`/`d` group seq | counts (37) / empty (dirty index) |
//! | `last_seen` | `last_seen` | account | time (8) |
//! | `privacy` | `privacy` | account | `pb::PrivacySet` (absent: defaults) |
//! | `push_tokens` | `push_tokens` | account device | platform (1) registered (8) token |
//! | `e2e_keys` | `e2e_keys` | account device | identity, signed prekey, stock bounds |
//! | `e2e_keys` | `one_time_keys` | account device slot | key id (4) key (32) |
//! | `group_creates` | `group_creates` | account device create-id | time (8) digest (8) `pb::GroupInfo` |
//! | `queued_receipts` | `queued_receipts` | account device kind group peer-or-seq | inbox id (8) |
//!
//! Writes go through a [`Txn`]: each operation's writes are staged and
//! either kept whole or dropped whole, and one round of operations becomes
//! one synced `WriteBatch` (see `crate::commit`).

pub mod accounts;
pub mod counters;
pub mod dedup;
pub mod device_keys;
pub mod e2e_keys;
pub mod fanout;
pub mod group_bodies;
pub mod group_creates;
pub mod group_receipts;
pub mod groups;
pub mod inbox;
pub mod invites;
pub mod last_seen;
pub mod outbound;
mod overlay;
pub mod privacy;
pub mod push_tokens;
pub mod queued_receipts;
mod schema;
mod txn;

use std::path::Path;
use std::sync::Arc;

use rocksdb::{ColumnFamilyDescriptor, Options, DB};

pub use schema::Table;
pub use txn::{Settle, Staged, Txn, TxnState};

/// Storage failed; the operation had no effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Db(rocksdb::Error),
    /// The disk is full. RocksDB stops taking writes until its error
    /// handler has found room again (it needs a write buffer's worth,
    /// [`WRITE_BUFFER_BYTES`], free) and resumed by itself; until then
    /// every write fails with this.
    #[error("storage full: {0}")]
    Full(rocksdb::Error),
    /// A stored value does not decode: corruption or a bug.
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
    /// The writer thread is gone (shutting down).
    #[error("storage writer stopped")]
    Stopped,
}

impl From<rocksdb::Error> for StorageError {
    fn from(e: rocksdb::Error) -> Self {
        // RocksDB reports ENOSPC as an IO error whose text says so (its
        // status subcode is not exposed through the C API).
        let text = e.as_ref();
        if text.contains("No space left on device") || text.contains("Space limit") {
            StorageError::Full(e)
        } else {
            StorageError::Db(e)
        }
    }
}

impl StorageError {
    /// Whether this is the disk being full (the write may succeed once
    /// there is room again).
    pub fn is_full(&self) -> bool {
        matches!(self, StorageError::Full(_))
    }
}

/// RocksDB's memtable size (its default, which every family keeps), which
/// is also the free space its error handler waits for before it resumes
/// writes after the disk was full.
pub const WRITE_BUFFER_BYTES: usize = 64 << 20;

/// The database. Reads may happen on any thread that may block (never a
/// shard's async code: it uses `spawn_blocking`); writes go through the
/// group-commit writer's [`Txn`].
pub struct Store {
    db: DB,
    /// Where the database lives, for its free space.
    dir: std::path::PathBuf,
    /// Runs before each batch write: tests hold or fail a chosen write.
    #[cfg(test)]
    write_hook: std::sync::Mutex<Option<testing::WriteHook>>,
}

impl Store {
    /// Opens (creating if needed) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Payloads are end-to-end encrypted and do not compress.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Most point lookups on the send path are for keys that do not
        // exist (a dedup record for a new message): bloom filters answer
        // those without touching table files.
        let cache = rocksdb::Cache::new_lru_cache(64 << 20);
        let cfs = Table::ALL.iter().map(|t| {
            let mut block = rocksdb::BlockBasedOptions::default();
            block.set_bloom_filter(10.0, false);
            block.set_block_cache(&cache);
            block.set_cache_index_and_filter_blocks(true);
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::None);
            o.set_block_based_table_factory(&block);
            ColumnFamilyDescriptor::new(t.name(), o)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Arc::new(Self {
            db,
            dir: dir.to_path_buf(),
            #[cfg(test)]
            write_hook: std::sync::Mutex::new(None),
        }))
    }

    /// Bytes an unprivileged writer may still use on the database's file
    /// system.
    pub fn free_bytes(&self) -> std::io::Result<u64> {
        let st = rustix::fs::statvfs(&self.dir)?;
        Ok(st.f_bavail.saturating_mul(st.f_frsize))
    }

    fn cf(&self, t: Table) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(t.name()).expect("column families are created at open")
    }

    /// A point read.
    fn get(&self, t: Table, key: &[u8]) -> Result<Option<rocksdb::DBPinnableSlice<'_>>, StorageError> {
        Ok(self.db.get_pinned_cf(self.cf(t), key)?)
    }

    /// Iterates `t` from `start` (inclusive; empty: the first key) forward.
    fn scan_from<'a>(&'a self, t: Table, start: &[u8]) -> rocksdb::DBIteratorWithThreadMode<'a, DB> {
        let mode = if start.is_empty() {
            rocksdb::IteratorMode::Start
        } else {
            rocksdb::IteratorMode::From(start, rocksdb::Direction::Forward)
        };
        self.db.iterator_cf(self.cf(t), mode)
    }

    /// Keys in `t`, as RocksDB estimates it (cheap: no scan).
    fn estimate_keys(&self, t: Table) -> u64 {
        self.db.property_int_value_cf(self.cf(t), "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }
}

/// What a table holds, counted by [`Store::table_usage`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TableUsage {
    /// Keys counted.
    pub keys: u64,
    /// Bytes of those keys.
    pub key_bytes: u64,
    /// Bytes of their values.
    pub value_bytes: u64,
    /// The scan reached the end (else it stopped at the cap).
    pub complete: bool,
    /// RocksDB's own estimate of the table's live data (SST files; what
    /// still sits in the memtable is not in it).
    pub estimated_live_bytes: u64,
}

impl Store {
    /// Counts the keys and bytes of `t`, reading at most `cap` keys: an
    /// exact figure for diagnostics and benchmarks, not for a hot path.
    pub fn table_usage(&self, t: Table, cap: u64) -> Result<TableUsage, StorageError> {
        let mut u = TableUsage { complete: true, ..Default::default() };
        for item in self.scan_from(t, &[]) {
            let (k, v) = item?;
            if u.keys >= cap {
                u.complete = false;
                break;
            }
            u.keys += 1;
            u.key_bytes += k.len() as u64;
            u.value_bytes += v.len() as u64;
        }
        u.estimated_live_bytes =
            self.db.property_int_value_cf(self.cf(t), "rocksdb.estimate-live-data-size").ok().flatten().unwrap_or(0);
        Ok(u)
    }
}

/// Reads a big-endian u64 value.
fn be_u64(v: &[u8], table: &'static str) -> Result<u64, StorageError> {
    v.try_into().map(u64::from_be_bytes).map_err(|_| StorageError::Corrupt(table))
}

/// A device's 12-byte key prefix: account, device.
pub(crate) fn addr_key(a: crate::model::DeviceAddr) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..8].copy_from_slice(&a.account.to_be_bytes());
    k[8..].copy_from_slice(&a.device.to_be_bytes());
    k
}

/// The device a key starts with.
pub(crate) fn addr_from_key(k: &[u8]) -> Option<crate::model::DeviceAddr> {
    Some(crate::model::DeviceAddr {
        account: u64::from_be_bytes(k.get(..8)?.try_into().ok()?),
        device: u32::from_be_bytes(k.get(8..12)?.try_into().ok()?),
    })
}

#[cfg(test)]
pub(crate) mod testing {
    //! Test-only access below the typed tables, to plant what a bug or a
    //! failing disk would leave behind.
    use super::*;

    /// Called before each batch write; an error fails that write (nothing
    /// of it is written), as a failing disk would.
    pub(crate) type WriteHook = Box<dyn FnMut() -> Result<(), StorageError> + Send>;

    impl Store {
        /// Writes raw bytes under `key` in `t`, bypassing the writer.
        pub(crate) fn put_raw(&self, t: Table, key: &[u8], value: &[u8]) {
            self.db.put_cf(self.cf(t), key, value).unwrap();
        }

        /// Runs `hook` before every batch write from now on.
        pub(crate) fn set_write_hook(&self, hook: WriteHook) {
            *self.write_hook.lock().unwrap() = Some(hook);
        }

        pub(super) fn write_hook(&self) -> Result<(), StorageError> {
            match self.write_hook.lock().unwrap().as_mut() {
                Some(h) => h(),
                None => Ok(()),
            }
        }
    }
}
