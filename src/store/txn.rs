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
use super::group_creates::CreateRecord;
use super::group_receipts::GroupCounts;
use super::groups::GroupRecord;
use super::inbox::GroupRef;
use super::overlay::Overlay;
use super::push_tokens::PushRecord;
use super::queued_receipts::ReceiptSlot;
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
    /// The other arena: the one a sealed round's write gives back.
    spare: Vec<u8>,
    /// A sealed round is being written: its values are the overlays'
    /// `pending` layer until [`TxnState::settle`].
    in_flight: bool,
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
    pub(super) group_creates: Overlay<(DeviceAddr, u64), CreateRecord>,
    pub(super) queued_receipts: Overlay<(DeviceAddr, ReceiptSlot), u64>,
}

impl Default for TxnState {
    fn default() -> Self {
        Self {
            arena: Vec::new(),
            spare: Vec::new(),
            in_flight: false,
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
            group_creates: Overlay::new(0),
            queued_receipts: Overlay::new(super::queued_receipts::CACHE_MAX),
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
        self.group_creates.op_commit();
        self.queued_receipts.op_commit();
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
        self.group_creates.op_rollback();
        self.queued_receipts.op_rollback();
    }

    fn overlays_seal(&mut self) {
        self.counters.seal();
        self.accounts.seal();
        self.device_keys.seal();
        self.dedup.seal();
        self.invites.seal();
        self.groups.seal();
        self.group_counts.seal();
        self.inbox_refs.seal();
        self.push_tokens.seal();
        self.e2e_keys.seal();
        self.one_time_keys.seal();
        self.group_creates.seal();
        self.queued_receipts.seal();
    }

    fn overlays_pending_done(&mut self, ok: bool) {
        self.counters.pending_done(ok);
        self.accounts.pending_done(ok);
        self.device_keys.pending_done(ok);
        self.dedup.pending_done(ok);
        self.invites.pending_done(ok);
        self.groups.pending_done(ok);
        self.group_counts.pending_done(ok);
        self.inbox_refs.pending_done(ok);
        self.push_tokens.pending_done(ok);
        self.e2e_keys.pending_done(ok);
        self.one_time_keys.pending_done(ok);
        self.group_creates.pending_done(ok);
        self.queued_receipts.pending_done(ok);
    }

    fn overlays_abandon(&mut self) {
        self.counters.abandon();
        self.accounts.abandon();
        self.device_keys.abandon();
        self.dedup.abandon();
        self.invites.abandon();
        self.groups.abandon();
        self.group_counts.abandon();
        self.inbox_refs.abandon();
        self.push_tokens.abandon();
        self.e2e_keys.abandon();
        self.one_time_keys.abandon();
        self.group_creates.abandon();
        self.queued_receipts.abandon();
    }

    /// The sealed round's write is over: durable (`ok`), or not written.
    /// After a failure, the round applied meanwhile must be abandoned
    /// ([`Txn::abandon`]) and applied again: it read values that were
    /// never written. Does nothing when no round is in flight.
    pub fn settle(&mut self, ok: bool) {
        if std::mem::take(&mut self.in_flight) {
            self.overlays_pending_done(ok);
        }
    }

    /// Whether a sealed round's write has not been settled yet.
    pub fn in_flight(&self) -> bool {
        self.in_flight
    }

    /// Takes back the arena of a written round, for reuse.
    pub fn recycle(&mut self, mut staged: Staged) {
        staged.arena.clear();
        if staged.arena.capacity() > self.spare.capacity() {
            self.spare = staged.arena;
        }
    }
}

/// Waits for the write of the round in flight: what a round does before a
/// read its overlays cannot answer.
pub trait Settle {
    /// Blocks until the round in flight, if any, is written; `Some(ok)`
    /// the first time (whether it was), `None` if there is nothing to wait
    /// for.
    fn settle(&self) -> Option<bool>;
}

/// A sealed round: its writes, ready for [`Store::write_staged`] on any
/// thread.
#[derive(Debug)]
pub struct Staged {
    arena: Vec<u8>,
    writes: usize,
}

impl Staged {
    /// Writes in the round.
    pub fn writes(&self) -> usize {
        self.writes
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
    /// Waits for the round in flight (none: nothing is ever in flight).
    settle: Option<&'a dyn Settle>,
}

impl<'a> Txn<'a> {
    /// Starts a round over `state` (left empty by the previous round),
    /// with no round in flight.
    pub fn begin(store: &'a Store, state: &'a mut TxnState) -> Self {
        debug_assert!(!state.in_flight, "a round in flight needs begin_over");
        Self::open(store, state, None)
    }

    /// Starts a round while the sealed one may still be in flight:
    /// `settle` waits for its write.
    pub fn begin_over(store: &'a Store, state: &'a mut TxnState, settle: &'a dyn Settle) -> Self {
        Self::open(store, state, Some(settle))
    }

    fn open(store: &'a Store, state: &'a mut TxnState, settle: Option<&'a dyn Settle>) -> Self {
        debug_assert!(state.arena.is_empty());
        state.op_start = 0;
        state.writes = 0;
        state.op_writes = 0;
        Self { store, state, settle }
    }

    /// The store, for reads the overlays do not cover (scans, tables
    /// without an overlay): waits first until the round in flight is
    /// written, so what it wrote is there.
    pub fn store(&mut self) -> &'a Store {
        self.settle_now();
        self.store
    }

    /// Waits until the round in flight, if any, is written (see
    /// [`TxnState::settle`] for what a failed write means).
    pub fn settle_now(&mut self) {
        if let Some(ok) = self.settle.and_then(|s| s.settle()) {
            self.state.settle(ok);
        }
    }

    /// The round in flight was written (`ok`) or not, learned by the
    /// caller rather than through [`Settle`].
    pub fn pending_written(&mut self, ok: bool) {
        self.state.settle(ok);
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

    /// Ends the round: its writes leave as a [`Staged`] batch for
    /// [`Store::write_staged`], and its values stay readable until
    /// [`TxnState::settle`] says how the write went. The round in flight
    /// before it must be settled first.
    pub fn seal(mut self) -> Staged {
        self.seal_inner()
    }

    fn seal_inner(&mut self) -> Staged {
        debug_assert_eq!(self.state.op_writes, 0, "an operation was neither kept nor dropped");
        assert!(!self.state.in_flight, "the round in flight is settled before the next is sealed");
        let spare = std::mem::take(&mut self.state.spare);
        let arena = std::mem::replace(&mut self.state.arena, spare);
        let staged = Staged { arena, writes: self.state.writes };
        self.state.op_start = 0;
        self.state.writes = 0;
        self.state.overlays_seal();
        self.state.in_flight = true;
        staged
    }

    /// Drops everything this round staged, as if none of its operations
    /// had run: for a round applied over one whose write then failed.
    pub fn abandon(self) {
        self.state.arena.clear();
        self.state.op_start = 0;
        self.state.writes = 0;
        self.state.op_writes = 0;
        self.state.overlays_abandon();
    }

    /// Seals the round and writes it here and now: with `sync`, returns
    /// only once the WAL is on disk.
    pub fn commit(mut self, sync: bool) -> Result<usize, StorageError> {
        let staged = self.seal_inner();
        let result = self.store.write_staged(&staged, sync);
        self.state.recycle(staged);
        self.state.settle(result.is_ok());
        result
    }
}

impl Store {
    /// Writes a sealed round as one batch; with `sync`, returns only once
    /// the WAL is on disk. RocksDB makes the batch readable only after
    /// that, so no other reader sees a write before it is durable.
    pub fn write_staged(&self, staged: &Staged, sync: bool) -> Result<usize, StorageError> {
        #[cfg(test)]
        self.write_hook()?;
        let n = staged.writes;
        if n == 0 {
            return Ok(0);
        }
        let mut opts = WriteOptions::default();
        opts.set_sync(sync);
        let mut batch = WriteBatch::with_capacity_bytes(staged.arena.len() + 16 * n);
        let mut rest = &staged.arena[..];
        while !rest.is_empty() {
            let table = Table::from_u8(rest[0]).expect("staged by this module");
            let kind = rest[1];
            let (key, r) = take(&rest[2..]);
            let (value, r) = take(r);
            rest = r;
            let cf = self.cf(table);
            match kind {
                PUT => batch.put_cf(cf, key, value),
                DELETE_RANGE => batch.delete_range_cf(cf, key, value),
                _ => batch.delete_cf(cf, key),
            }
        }
        self.db.write_opt(batch, &opts)?;
        Ok(n)
    }
}

fn take(b: &[u8]) -> (&[u8], &[u8]) {
    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
    (&b[4..4 + len], &b[4 + len..])
}
