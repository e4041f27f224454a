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

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

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
    fn finish(self: Box<Self>, ctx: &mut C, outcome: Outcome<'_>);
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
}

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
}

impl<C> Clone for Writer<C> {
    fn clone(&self) -> Self {
        Self { tx: self.tx.clone(), room: self.room.clone() }
    }
}

impl<C: Send + 'static> Writer<C> {
    /// Starts the writer thread over `store` with `ctx`.
    pub fn start(store: Arc<Store>, ctx: C, cfg: EngineConfig) -> std::io::Result<(Self, std::thread::JoinHandle<()>)> {
        let (tx, rx) = crossbeam_channel::unbounded();
        let room = Arc::new(Semaphore::new(cfg.capacity));
        let engine = Engine { store, ctx, cfg, state: TxnState::default(), room: room.clone() };
        let handle = std::thread::Builder::new().name("pipit-storage".into()).spawn(move || engine.run(rx))?;
        Ok((Self { tx, room }, handle))
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
}

impl<C: 'static> Engine<C> {
    fn run(mut self, rx: crossbeam_channel::Receiver<BoxedOp<C>>) {
        let mut ops = Vec::with_capacity(self.cfg.max_batch);
        while let Ok(first) = rx.recv() {
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

    fn round(&mut self, ops: &mut Vec<BoxedOp<C>>) {
        let n = ops.len();
        let mut failed: Vec<Option<StorageError>> = Vec::with_capacity(n);
        let mut txn = Txn::begin(&self.store, &mut self.state);
        for op in ops.iter_mut() {
            match op.apply(&mut self.ctx, &mut txn) {
                Ok(()) => {
                    txn.op_commit();
                    failed.push(None);
                }
                Err(e) => {
                    txn.op_rollback();
                    tracing::error!(error = %e, "an operation failed and was dropped from its round");
                    metrics::counter!("pipit_storage_errors_total").increment(1);
                    failed.push(Some(e));
                }
            }
        }
        let started = Instant::now();
        let result = txn.commit(self.cfg.sync);
        metrics::histogram!("pipit_group_commit_ops").record(n as f64);
        metrics::histogram!("pipit_group_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = &result {
            tracing::error!(error = %e, "group commit failed");
            metrics::counter!("pipit_storage_errors_total").increment(1);
        }
        for (op, own) in ops.drain(..).zip(failed) {
            let outcome = match (&own, &result) {
                (Some(e), _) | (None, Err(e)) => Outcome::Failed(e),
                (None, Ok(_)) => Outcome::Durable,
            };
            op.finish(&mut self.ctx, outcome);
        }
    }
}
