//! The group-commit engine: one thread that takes the operations every
//! shard queued, applies them to one [`Txn`], writes the round as one
//! synced `WriteBatch`, and only then lets each operation release its
//! effects (answers, pushes to connections).
//!
//! It knows no message kinds: an operation is anything implementing
//! [`Operation`] over the context `C` its layer gives the engine. Each
//! operation is all or nothing: one that fails part way is dropped from
//! the round without touching the others.
//!
//! The queue is bounded. [`Writer::try_submit`] refuses when it is full
//! (for work a client can retry); [`Writer::submit`] waits for room, so a
//! caller that must not lose what it submits pushes back on its own input
//! instead.
//!
//! A full disk is not an operation's fault, and it passes. The engine
//! watches the free space: below the configured reserve it reports
//! [`StorageState::Low`] (callers refuse new work, so a restart always
//! finds room to open the database). A round whose commit fails because
//! the disk is full is kept, not failed: the engine reports
//! [`StorageState::Full`] and commits the same operations again every
//! second, until RocksDB's error handler has resumed writes (it does so by
//! itself once there is room) or `full_wait` has passed; only then are
//! they answered, and only those left waiting that long are failed (with
//! a storage-full error that callers turn into "retry later"). Nothing
//! acknowledged is lost either way: an operation is answered only after
//! its round is durable or definitely not written.

pub mod settings;

use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::model::LogGate;
use crate::store::{StorageError, Store, Txn, TxnState};

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
    /// failed for want of space is applied again once there is room. Each
    /// run starts from the state the previous one left untouched.
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

const STATE_OK: u8 = 0;
const STATE_LOW: u8 = 1;
const STATE_FULL: u8 = 2;

/// The engine's view of its storage, shared with every [`Writer`] handle.
#[derive(Debug, Default)]
struct Health {
    state: AtomicU8,
    free: AtomicU64,
}

impl Health {
    fn get(&self) -> StorageState {
        match self.state.load(Ordering::Acquire) {
            STATE_OK => StorageState::Ok,
            STATE_LOW => StorageState::Low,
            _ => StorageState::Full,
        }
    }

    fn set(&self, s: u8) {
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
const SPACE_CHECK: Duration = Duration::from_millis(250);
/// How often a round that failed for want of space is tried again.
const FULL_RETRY: Duration = Duration::from_secs(1);

/// Why an operation was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// The queue is full: retry later.
    #[error("storage queue full")]
    Full,
    /// The writer has stopped.
    #[error("storage writer stopped")]
    Stopped,
    /// Storage takes no new work: free space is below the reserve, or
    /// the disk is full. Retry later.
    #[error("storage has no room for new work")]
    NoRoom,
}

type BoxedOp<C> = Box<dyn Operation<C>>;

/// An operation [`Writer::try_submit`] did not queue, given back.
pub struct Refused<C> {
    /// Why.
    pub reason: SubmitError,
    /// The operation, untouched.
    pub op: BoxedOp<C>,
}

impl<C> std::fmt::Debug for Refused<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Refused").field("reason", &self.reason).finish_non_exhaustive()
    }
}

/// A handle for queueing operations; clone freely. The writer thread
/// stops once every handle is gone and the queue is drained.
pub struct Writer<C> {
    tx: crossbeam_channel::Sender<BoxedOp<C>>,
    /// Free places in the queue: taken by a submitter, returned by the
    /// writer when it takes the operation off the queue.
    room: Arc<Semaphore>,
    health: Arc<Health>,
}

impl<C> Clone for Writer<C> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), room: self.room.clone(), health: self.health.clone() }
    }
}

impl<C: Send + 'static> Writer<C> {
    /// Starts the writer thread over `store` with `ctx`.
    pub fn start(store: Arc<Store>, ctx: C, cfg: EngineConfig) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let room = Arc::new(Semaphore::new(cfg.capacity));
        let health = Arc::new(Health::default());
        let engine = Engine {
            store,
            ctx,
            cfg,
            state: TxnState::default(),
            room: room.clone(),
            health: health.clone(),
            space_checked: None,
        };
        let handle = std::thread::Builder::new().name("pipit-storage".into()).spawn(move || engine.run(rx))?;
        Ok((Self { tx, room, health }, handle))
    }

    /// Whether storage takes new work now.
    pub fn storage(&self) -> StorageState {
        self.health.get()
    }

    /// [`Writer::try_submit`] for work that grows the database: refused
    /// with [`SubmitError::NoRoom`] unless storage is [`StorageState::Ok`].
    pub fn try_submit_new(&self, op: BoxedOp<C>) -> Result<(), Refused<C>> {
        if self.health.get() != StorageState::Ok {
            return Err(Refused { reason: SubmitError::NoRoom, op });
        }
        self.try_submit(op)
    }

    /// Free bytes on the database's file system, as last measured.
    pub fn free_bytes(&self) -> u64 {
        self.health.free.load(Ordering::Relaxed)
    }

    /// Queues `op` if there is room, without waiting; gives it back if not.
    pub fn try_submit(&self, op: BoxedOp<C>) -> Result<(), Refused<C>> {
        match self.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(tokio::sync::TryAcquireError::NoPermits) => return Err(Refused { reason: SubmitError::Full, op }),
            Err(tokio::sync::TryAcquireError::Closed) => return Err(Refused { reason: SubmitError::Stopped, op }),
        }
        self.tx.send(op).map_err(|e| Refused { reason: SubmitError::Stopped, op: e.0 })
    }

    /// Queues `op`, waiting for room.
    pub async fn submit(&self, op: BoxedOp<C>) -> Result<(), SubmitError> {
        let permit = self.room.acquire().await.map_err(|_| SubmitError::Stopped)?;
        permit.forget();
        self.tx.send(op).map_err(|_| SubmitError::Stopped)
    }

    /// Waits until there is room for one operation (without taking it):
    /// for a caller that stopped reading its input while the queue was
    /// full.
    pub async fn room(&self) {
        if let Ok(p) = self.room.acquire().await {
            drop(p);
        }
    }

    /// [`Writer::submit`] for threads outside any async runtime; gives up
    /// after `timeout`.
    pub fn submit_blocking(&self, op: BoxedOp<C>, timeout: Duration) -> Result<(), SubmitError> {
        let deadline = Instant::now() + timeout;
        loop {
            match self.room.try_acquire() {
                Ok(p) => {
                    p.forget();
                    return self.tx.send(op).map_err(|_| SubmitError::Stopped);
                }
                Err(tokio::sync::TryAcquireError::Closed) => return Err(SubmitError::Stopped),
                Err(tokio::sync::TryAcquireError::NoPermits) if Instant::now() >= deadline => {
                    return Err(SubmitError::Full)
                }
                Err(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Waits until everything queued so far is durable (or failed).
    pub async fn barrier(&self) -> Result<(), SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(Box::new(Barrier(Some(Box::new(move || {
            let _ = tx.send(());
        })))))
        .await?;
        rx.await.map_err(|_| SubmitError::Stopped)
    }

    /// [`Writer::barrier`] for threads outside any async runtime.
    pub fn barrier_blocking(&self, timeout: Duration) -> Result<(), SubmitError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.submit_blocking(
            Box::new(Barrier(Some(Box::new(move || {
                let _ = tx.send(());
            })))),
            timeout,
        )?;
        rx.recv_timeout(timeout).map_err(|_| SubmitError::Stopped)
    }

    /// Operations waiting in the queue.
    pub fn queued(&self) -> usize {
        self.tx.len()
    }
}

/// Runs a closure once everything queued before it is durable.
struct Barrier(Option<Box<dyn FnOnce() + Send>>);

impl<C> Operation<C> for Barrier {
    fn apply(&mut self, _: &mut C, _: &mut Txn<'_>) -> Result<(), StorageError> {
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut C, _: Outcome<'_>) {
        if let Some(f) = self.0.take() {
            f();
        }
    }
}

struct Engine<C> {
    store: Arc<Store>,
    ctx: C,
    cfg: EngineConfig,
    state: TxnState,
    room: Arc<Semaphore>,
    health: Arc<Health>,
    space_checked: Option<Instant>,
}

/// Storage errors a peer or a failing disk can cause every round: one line
/// per 10 s, with the count of those not written.
static STORAGE_LOG: LogGate = LogGate::new(10_000);

impl<C: 'static> Engine<C> {
    fn run(mut self, rx: crossbeam_channel::Receiver<BoxedOp<C>>) {
        let mut ops = Vec::with_capacity(self.cfg.max_batch);
        loop {
            self.check_space();
            // Idle or not, the free space is looked at every SPACE_CHECK:
            // a server that refuses sends while low must notice when room
            // comes back even though nothing arrives.
            let first = match rx.recv_timeout(SPACE_CHECK) {
                Ok(op) => op,
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
            };
            ops.push(first);
            while ops.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.room.add_permits(ops.len());
            self.round(&mut ops);
        }
        tracing::debug!("storage writer stopped");
    }

    /// Measures the free space (at most every [`SPACE_CHECK`]) and moves
    /// between Ok and Low; Full is left only by a commit that succeeds.
    fn check_space(&mut self) {
        if self.space_checked.is_some_and(|t| t.elapsed() < SPACE_CHECK) {
            return;
        }
        self.space_checked = Some(Instant::now());
        let Ok(free) = self.store.free_bytes() else {
            return;
        };
        self.health.free.store(free, Ordering::Relaxed);
        metrics::gauge!("pipit_storage_free_bytes").set(free as f64);
        if self.health.get() != StorageState::Full {
            self.health.set(if free < self.cfg.reserve_bytes { STATE_LOW } else { STATE_OK });
        }
    }

    fn round(&mut self, ops: &mut Vec<BoxedOp<C>>) {
        let n = ops.len();
        let waiting_since = Instant::now();
        let (failed, result) = loop {
            let (failed, result) = self.attempt(ops);
            match &result {
                Err(e) if e.is_full() && waiting_since.elapsed() < self.cfg.full_wait => {
                    // Keep the round: RocksDB resumes by itself once there
                    // is room, and the same operations commit then.
                    self.health.set(STATE_FULL);
                    std::thread::sleep(FULL_RETRY);
                    self.space_checked = None;
                    self.check_space();
                }
                _ => break (failed, result),
            }
        };
        metrics::histogram!("pipit_group_commit_ops").record(n as f64);
        if result.is_ok() && self.health.get() == StorageState::Full {
            self.space_checked = None;
            self.health.set(STATE_OK);
            self.check_space();
        }
        for (op, own) in ops.drain(..).zip(failed) {
            let outcome = match (&own, &result) {
                (Some(e), _) | (None, Err(e)) => Outcome::Failed(e),
                (None, Ok(_)) => Outcome::Durable,
            };
            op.finish(&mut self.ctx, outcome);
        }
    }

    /// Applies every operation of the round to a fresh transaction and
    /// commits it: each operation's own error, and the commit's result.
    fn attempt(&mut self, ops: &mut [BoxedOp<C>]) -> (Vec<Option<StorageError>>, Result<usize, StorageError>) {
        let mut failed: Vec<Option<StorageError>> = Vec::with_capacity(ops.len());
        let mut txn = Txn::begin(&self.store, &mut self.state);
        for op in ops.iter_mut() {
            match op.apply(&mut self.ctx, &mut txn) {
                Ok(()) => {
                    txn.op_commit();
                    failed.push(None);
                }
                Err(e) => {
                    txn.op_rollback();
                    metrics::counter!("pipit_storage_errors_total").increment(1);
                    if let Some(suppressed) = STORAGE_LOG.open() {
                        tracing::error!(error = %e, suppressed, "an operation failed and was dropped from its round");
                    }
                    failed.push(Some(e));
                }
            }
        }
        let started = Instant::now();
        let result = txn.commit(self.cfg.sync);
        metrics::histogram!("pipit_group_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            metrics::counter!("pipit_storage_errors_total").increment(1);
            if let Some(suppressed) = STORAGE_LOG.open() {
                tracing::error!(error = %e, suppressed, "group commit failed");
            }
        }
        (failed, result)
    }
}
