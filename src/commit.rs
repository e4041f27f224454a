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
//!
//! The engine is pipelined: while one round is being written and synced
//! (on a second thread, `pipit-sync`), the next is applied over what that
//! round wrote, so a sender whose next message arrives during a sync does
//! not wait for a whole extra one. The rule stays: an operation's effects
//! are released only once its own round is synced, and in round order. If
//! a write fails, the round applied over it is dropped and applied again
//! after the failed one has been retried or answered, so no answer ever
//! rests on a write that did not happen.

mod engine;
mod op;
pub mod settings;
#[cfg(test)]
mod tests;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use crate::store::{StorageError, Store, Txn};
use op::{BoxedOp, Health};
pub use op::{EngineConfig, Operation, Outcome, StorageState};

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
        let handle = engine::start(store, ctx, cfg, rx, room.clone(), health.clone())?;
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
