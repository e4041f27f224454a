//! A write transaction: one round of the group-commit writer.
//!
//! Each operation's writes are staged in an arena and its overlay entries
//! recorded with undo information; [`Txn::op_commit`] keeps them and
//! [`Txn::op_rollback`] drops them, so an operation that fails half way
//! (a read error, a corrupt record) leaves nothing behind. At the end of
//! the round everything kept becomes one `WriteBatch`, written with a
//! synced WAL when asked: one fsync for every operation of the round.

use std::sync::Arc;

use pipit_protocol::message::pb;
use pipit_protocol::PublicKey;
use rocksdb::{WriteBatch, WriteOptions};

use super::counters::Counter;
use super::dedup::DedupRecord;
use super::e2e_keys::{KeyRecord, OneTimeKey};
use super::group_receipts::GroupCounts;
use super::groups::GroupRecord;
use super::inbox::GroupRef;
use super::overlay::Overlay;
use super::push_tokens::PushRecord;
use super::{StorageError, Store, Table};
use crate::model::DeviceAddr;

/// Committed values the writer keeps in memory, per table.
const COUNTER_CACHE_MAX: usize = 1 << 20;
const ACCOUNT_CACHE_MAX: usize = 1 << 18;
/// A 1,024-member record is about 12 KB.
const GROUP_CACHE_MAX: usize = 1 << 12;
/// Counts of recent group messages: hot while members ack and read them.
const GROUP_COUNTS_CACHE_MAX: usize = 1 << 16;

/// What the writer keeps between rounds: the staging arena and each
/// table's overlay. Owned by the writer thread alone.
pub struct TxnState {
    /// Staged writes of this round: `[table][kind][key len u32][key]
    /// [value len u32][value]` records. Reused across rounds.
    arena: Vec<u8>,
    /// Where the current operation's records begin.
    op_start: usize,
    writes: usize,
    op_writes: usize,
    pub(super) counters: Overlay<Counter, u64>,
    pub(super) accounts: Overlay<u64, Arc<pb::DeviceList>>,
    pub(super) device_keys: Overlay<PublicKey, DeviceAddr>,
    pub(super) dedup: Overlay<(DeviceAddr, u64), DedupRecord>,
    pub(super) invites: Overlay<Vec<u8>, u64>,
    pub(super) groups: Overlay<u64, Arc<GroupRecord>>,
    pub(super) group_counts: Overlay<(u64, u64), GroupCounts>,
    /// Group references written or taken this round, so that one taken
    /// twice in a round drops its body's count once.
    pub(super) inbox_refs: Overlay<(DeviceAddr, u64), GroupRef>,
    pub(super) push_tokens: Overlay<DeviceAddr, PushRecord>,
    pub(super) e2e_keys: Overlay<DeviceAddr, Arc<KeyRecord>>,
    pub(super) one_time_keys: Overlay<(DeviceAddr, u64), OneTimeKey>,
}

impl Default for TxnState {
    fn default() -> Self {
        Self {
            arena: Vec::new(),
            op_start: 0,
            writes: 0,
            op_writes: 0,
            counters: Overlay::new(COUNTER_CACHE_MAX),
            accounts: Overlay::new(ACCOUNT_CACHE_MAX),
            device_keys: Overlay::new(0),
            dedup: Overlay::new(0),
            invites: Overlay::new(0),
            groups: Overlay::new(GROUP_CACHE_MAX),
            group_counts: Overlay::new(GROUP_COUNTS_CACHE_MAX),
            inbox_refs: Overlay::new(0),
            push_tokens: Overlay::new(0),
            e2e_keys: Overlay::new(0),
            one_time_keys: Overlay::new(0),
        }
    }
}

impl TxnState {
    fn overlays_op_commit(&mut self) {
        self.counters.op_commit();
        self.accounts.op_commit();
        self.device_keys.op_commit();
        self.dedup.op_commit();
        self.invites.op_commit();
        self.groups.op_commit();
        self.group_counts.op_commit();
        self.inbox_refs.op_commit();
        self.push_tokens.op_commit();
        self.e2e_keys.op_commit();
        self.one_time_keys.op_commit();
    }

    fn overlays_op_rollback(&mut self) {
        self.counters.op_rollback();
        self.accounts.op_rollback();
        self.device_keys.op_rollback();
        self.dedup.op_rollback();
        self.invites.op_rollback();
        self.groups.op_rollback();
        self.group_counts.op_rollback();
        self.inbox_refs.op_rollback();
        self.push_tokens.op_rollback();
        self.e2e_keys.op_rollback();
        self.one_time_keys.op_rollback();
    }

    fn overlays_round_done(&mut self, ok: bool) {
        self.counters.round_done(ok);
        self.accounts.round_done(ok);
        self.device_keys.round_done(ok);
        self.dedup.round_done(ok);
        self.invites.round_done(ok);
        self.groups.round_done(ok);
        self.group_counts.round_done(ok);
        self.inbox_refs.round_done(ok);
        self.push_tokens.round_done(ok);
        self.e2e_keys.round_done(ok);
        self.one_time_keys.round_done(ok);
    }
}

const PUT: u8 = 1;
const DELETE: u8 = 2;
/// Deletes every key from `key` (inclusive) to `value` (exclusive): one
/// range tombstone, however many keys it covers.
const DELETE_RANGE: u8 = 3;

/// One round's transaction. Table files add typed methods to it.
pub struct Txn<'a> {
    pub(super) store: &'a Store,
    pub(super) state: &'a mut TxnState,
}

impl<'a> Txn<'a> {
    /// Starts a round over `state` (left empty by the previous round).
    pub fn begin(store: &'a Store, state: &'a mut TxnState) -> Self {
        debug_assert!(state.arena.is_empty());
        state.op_start = 0;
        state.writes = 0;
        state.op_writes = 0;
        Self { store, state }
    }

    /// The store, for reads the overlays do not cover (scans).
    pub fn store(&self) -> &Store {
        self.store
    }

    pub(super) fn put(&mut self, t: Table, key: &[u8], value: &[u8]) {
        self.stage(t, PUT, key, value);
    }

    /// [`Txn::put`] with a value of `len` bytes that `encode` appends,
    /// written straight into the staging arena.
    pub(super) fn put_with(&mut self, t: Table, key: &[u8], len: usize, encode: impl FnOnce(&mut Vec<u8>)) {
        let a = &mut self.state.arena;
        a.reserve(10 + key.len() + len);
        a.push(t.as_u8());
        a.push(PUT);
        a.extend_from_slice(&(key.len() as u32).to_le_bytes());
        a.extend_from_slice(key);
        a.extend_from_slice(&(len as u32).to_le_bytes());
        let start = a.len();
        encode(a);
        assert_eq!(a.len() - start, len, "an encoder wrote the length it announced");
        self.state.op_writes += 1;
    }

    pub(super) fn delete(&mut self, t: Table, key: &[u8]) {
        self.stage(t, DELETE, key, &[]);
    }

    /// Deletes every key of `t` in `from..to`.
    pub(super) fn delete_range(&mut self, t: Table, from: &[u8], to: &[u8]) {
        self.stage(t, DELETE_RANGE, from, to);
    }

    fn stage(&mut self, t: Table, kind: u8, key: &[u8], value: &[u8]) {
        let a = &mut self.state.arena;
        a.reserve(10 + key.len() + value.len());
        a.push(t.as_u8());
        a.push(kind);
        a.extend_from_slice(&(key.len() as u32).to_le_bytes());
        a.extend_from_slice(key);
        a.extend_from_slice(&(value.len() as u32).to_le_bytes());
        a.extend_from_slice(value);
        self.state.op_writes += 1;
    }

    /// Keeps everything the current operation wrote.
    pub fn op_commit(&mut self) {
        self.state.op_start = self.state.arena.len();
        self.state.writes += self.state.op_writes;
        self.state.op_writes = 0;
        self.state.overlays_op_commit();
    }

    /// Drops everything the current operation wrote, as if it never ran.
    pub fn op_rollback(&mut self) {
        self.state.arena.truncate(self.state.op_start);
        self.state.op_writes = 0;
        self.state.overlays_op_rollback();
    }

    /// Writes were kept in this round.
    pub fn is_empty(&self) -> bool {
        self.state.writes == 0
    }

    /// Writes everything kept as one batch; with `sync`, returns only once
    /// the WAL is on disk. Consumes the round.
    pub fn commit(self, sync: bool) -> Result<usize, StorageError> {
        debug_assert_eq!(self.state.op_writes, 0, "an operation was neither kept nor dropped");
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        let result = self.write(&opts);
        self.state.arena.clear();
        self.state.op_start = 0;
        self.state.overlays_round_done(result.is_ok());
        result
    }

    fn write(&self, opts: &WriteOptions) -> Result<usize, StorageError> {
        let n = self.state.writes;
        if n == 0 {
            return Ok(0);
        }
        let mut batch = WriteBatch::with_capacity_bytes(self.state.arena.len() + 16 * n);
        let mut rest = &self.state.arena[..];
        while !rest.is_empty() {
            let table = Table::from_u8(rest[0]).expect("staged by this module");
            let kind = rest[1];
            let (key, r) = take(&rest[2..]);
            let (value, r) = take(r);
            rest = r;
            let cf = self.store.cf(table);
            match kind {
                PUT => batch.put_cf(cf, key, value),
                DELETE_RANGE => batch.delete_range_cf(cf, key, value),
                _ => batch.delete_cf(cf, key),
            }
        }
        self.store.db.write_opt(batch, opts)?;
        Ok(n)
    }
}

fn take(b: &[u8]) -> (&[u8], &[u8]) {
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    (&b[4..4 + len], &b[4 + len..])
}
