//! What the engine and its handles share: an operation and its outcome,
//! the engine's settings, and its view of the storage's health.

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::time::Duration;

use crate::store::{StorageError, Txn};

/// Whether an operation's writes are durable.
#[derive(Debug)]
pub enum Outcome<'a> {
    /// Committed (and synced, when the writer syncs).
    Durable,
    /// Not written: the operation failed, or the round's commit did.
    Failed(&'a StorageError),
}

/// A unit of work for the writer.
pub trait Operation<C>: Send + 'static {
    /// Stages the operation's writes in `txn`. An error drops every write
    /// it staged, and only those.
    fn apply(&mut self, ctx: &mut C, txn: &mut Txn<'_>) -> Result<(), StorageError>;

    /// Called once the round is over, with whether this operation's writes
    /// are durable: answer callers and push to connections here, never in
    /// `apply`.
    ///
    /// `apply` may run more than once before `finish`: a round whose commit
    /// failed for want of space is applied again once there is room, and
    /// a round applied while the one before it was being written is
    /// applied again if that write failed. Each run starts from the state
    /// the previous one left untouched.
    ///
    /// `finish` is called in the order the operations were applied, round
    /// after round, and only once the operation's own round is written
    /// (and synced): never before an earlier round's.
    fn finish(self: Box<Self>, ctx: &mut C, outcome: Outcome<'_>);
}

/// Whether storage takes new work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum StorageState {
    /// Writing normally.
    Ok,
    /// Free space is below the reserve: refuse new work that grows the
    /// database (sends, registrations); acks and receipts still go on.
    Low,
    /// A commit failed because the disk is full: nothing is written until
    /// RocksDB resumes.
    Full,
}

pub(super) const STATE_OK: u8 = 0;
pub(super) const STATE_LOW: u8 = 1;
pub(super) const STATE_FULL: u8 = 2;

/// The engine's view of its storage, shared with every writer handle.
#[derive(Debug, Default)]
pub(super) struct Health {
    state: AtomicU8,
    pub(super) free: AtomicU64,
}

impl Health {
    pub(super) fn get(&self) -> StorageState {
        match self.state.load(Ordering::Acquire) {
            STATE_OK => StorageState::Ok,
            STATE_LOW => StorageState::Low,
            _ => StorageState::Full,
        }
    }

    pub(super) fn set(&self, s: u8) {
        let before = self.state.swap(s, Ordering::AcqRel);
        if before == s {
            return;
        }
        metrics::gauge!("pipit_storage_full").set(f64::from(u8::from(s == STATE_FULL)));
        metrics::gauge!("pipit_storage_low").set(f64::from(u8::from(s == STATE_LOW)));
        let free = self.free.load(Ordering::Relaxed);
        match s {
            STATE_OK => tracing::info!(free_bytes = free, "storage has room again: taking new sends"),
            STATE_LOW => {
                tracing::warn!(free_bytes = free, "storage low: free space is below the reserve; refusing new sends")
            }
            _ => tracing::error!(free_bytes = free, "storage full: commits wait until RocksDB resumes writes"),
        }
    }
}

/// Engine settings.
#[derive(Debug, Clone, Copy)]
pub struct EngineConfig {
    /// Most operations in one round.
    pub max_batch: usize,
    /// Most operations waiting in the queue.
    pub capacity: usize,
    /// Sync the WAL on every commit.
    pub sync: bool,
    /// Free bytes below which storage reports [`StorageState::Low`].
    pub reserve_bytes: u64,
    /// Longest a round waits for a full disk to have room again before its
    /// operations are failed.
    pub full_wait: Duration,
}

/// How often the engine looks at the free space, busy or idle.
pub(super) const SPACE_CHECK: Duration = Duration::from_millis(250);
/// How often a round that failed for want of space is tried again.
pub(super) const FULL_RETRY: Duration = Duration::from_secs(1);

pub(super) type BoxedOp<C> = Box<dyn Operation<C>>;
