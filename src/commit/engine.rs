//! The engine's two threads: `pipit-storage` applies rounds and releases
//! their effects, `pipit-sync` writes and syncs them. While round N is
//! being synced, round N+1 is applied over what N wrote (the overlays'
//! pending layer); it is sealed and handed over the moment N's write is
//! over, and only then are N's effects released. So a round never waits
//! for more than the one sync in front of it, and the disk never waits
//! for a round to be applied.
//!
//! Rules kept:
//! - an operation's `finish` runs only after its own round's write
//!   returned (synced), and rounds finish in the order they were applied;
//! - if round N's write fails, round N+1 (applied over values that were
//!   never written) is dropped unwritten: N is retried (a full disk) or
//!   answered as failed, and only then is N+1 applied again and written.

use std::cell::{Cell, RefCell};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Semaphore;

use super::op::{
    BoxedOp, EngineConfig, Health, Operation, Outcome, StorageState, FULL_RETRY, SPACE_CHECK, STATE_FULL, STATE_LOW,
    STATE_OK,
};
use crate::model::LogGate;
use crate::store::{Settle, Staged, StorageError, Store, Txn, TxnState};

type Queue<C> = crossbeam_channel::Receiver<BoxedOp<C>>;

/// Starts both threads; the returned handle ends once both have.
pub(super) fn start<C: Send + 'static>(
    store: Arc<Store>,
    ctx: C,
    cfg: EngineConfig,
    queue: Queue<C>,
    room: Arc<Semaphore>,
    health: Arc<Health>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    // One round in flight at a time: the sync thread holds at most one.
    let (jobs, to_write) = crossbeam_channel::bounded::<Staged>(1);
    let (written, done) = crossbeam_channel::bounded::<Written>(1);
    let syncer = {
        let store = store.clone();
        std::thread::Builder::new().name("pipit-sync".into()).spawn(move || {
            for staged in to_write {
                let started = Instant::now();
                let result = store.write_staged(&staged, cfg.sync);
                if written.send(Written { result, staged, took: started.elapsed() }).is_err() {
                    break;
                }
            }
        })?
    };
    let flight = Flight { jobs, done, outstanding: Cell::new(false), written: RefCell::new(None) };
    let engine = Engine { store, ctx, cfg, state: TxnState::default(), room, health, space_checked: None, flight };
    std::thread::Builder::new().name("pipit-storage".into()).spawn(move || {
        engine.run(queue);
        // The engine is gone, and with it the sync thread's queue.
        let _ = syncer.join();
    })
}

/// What the sync thread says about one round.
struct Written {
    result: Result<usize, StorageError>,
    /// The round's arena, given back for reuse.
    staged: Staged,
    took: Duration,
}

/// The writing side as the storage thread sees it. Shared (cells) because
/// the open round's transaction waits on it while the engine also does.
struct Flight {
    jobs: crossbeam_channel::Sender<Staged>,
    done: crossbeam_channel::Receiver<Written>,
    /// A round was handed over and its result not yet received.
    outstanding: Cell<bool>,
    /// The result received for the round in flight, until the engine
    /// concludes that round.
    written: RefCell<Option<Written>>,
}

impl Flight {
    fn send(&self, staged: Staged) {
        debug_assert!(!self.outstanding.get(), "one round in flight at a time");
        self.outstanding.set(true);
        self.jobs.send(staged).expect("the sync thread lives as long as the engine");
    }

    /// Records the result of the round in flight; whether it was written.
    fn accept(&self, w: Result<Written, crossbeam_channel::RecvError>) -> bool {
        let w = w.expect("the sync thread answers every round");
        self.outstanding.set(false);
        let ok = w.result.is_ok();
        *self.written.borrow_mut() = Some(w);
        ok
    }

    fn failed(&self) -> bool {
        self.written.borrow().as_ref().is_some_and(|w| w.result.is_err())
    }
}

impl Settle for Flight {
    fn settle(&self) -> Option<bool> {
        self.outstanding.get().then(|| self.accept(self.done.recv()))
    }
}

/// A round handed to the sync thread and not yet answered.
struct Round<C> {
    ops: Vec<BoxedOp<C>>,
    /// Each operation's own failure, from its last `apply`.
    failed: Vec<Option<StorageError>>,
    /// When it was first handed over (a full disk is waited for up to
    /// `full_wait` from here).
    since: Instant,
}

/// How building a round ended.
enum Built {
    /// Applied and sealed: hand it over.
    Sealed(Staged, Vec<Option<StorageError>>),
    /// The round in flight failed; this one, applied over it, was dropped
    /// and is applied again once that one is answered.
    Dropped,
}

struct Engine<C> {
    store: Arc<Store>,
    ctx: C,
    cfg: EngineConfig,
    state: TxnState,
    room: Arc<Semaphore>,
    health: Arc<Health>,
    space_checked: Option<Instant>,
    flight: Flight,
}

/// Storage errors a peer or a failing disk can cause every round: one line
/// per 10 s, with the count of those not written.
static STORAGE_LOG: LogGate = LogGate::new(10_000);

impl<C: 'static> Engine<C> {
    fn run(mut self, queue: Queue<C>) {
        let mut in_flight: Option<Round<C>> = None;
        let mut next: Vec<BoxedOp<C>> = Vec::with_capacity(self.cfg.max_batch);
        loop {
            self.check_space();
            if next.is_empty() {
                if in_flight.is_some() {
                    // Idle while a round is written: take what arrives, or
                    // answer the round as soon as its write is over.
                    crossbeam_channel::select! {
                        recv(self.flight.done) -> w => {
                            let ok = self.flight.accept(w);
                            self.state.settle(ok);
                            self.conclude(in_flight.take().expect("checked"));
                            continue;
                        }
                        recv(queue) -> op => match op {
                            Ok(op) => {
                                self.room.add_permits(1);
                                next.push(op);
                            }
                            Err(_) => {
                                // Every handle is gone: answer the last round.
                                let ok = self.flight.accept(self.flight.done.recv());
                                self.state.settle(ok);
                                self.conclude(in_flight.take().expect("checked"));
                                break;
                            }
                        }
                    }
                } else {
                    // Idle or not, the free space is looked at every
                    // SPACE_CHECK: a server that refuses sends while low
                    // must notice when room comes back even though nothing
                    // arrives.
                    match queue.recv_timeout(SPACE_CHECK) {
                        Ok(op) => {
                            self.room.add_permits(1);
                            next.push(op);
                        }
                        Err(crossbeam_channel::RecvTimeoutError::Timeout) => continue,
                        Err(crossbeam_channel::RecvTimeoutError::Disconnected) => break,
                    }
                }
            }
            match self.build(&mut next, Some(&queue)) {
                Built::Sealed(staged, failed) => {
                    self.flight.send(staged);
                    let ops = std::mem::replace(&mut next, Vec::with_capacity(self.cfg.max_batch));
                    let before = in_flight.replace(Round { ops, failed, since: Instant::now() });
                    // The round before was written (else this one would
                    // have been dropped): its effects now, after this
                    // round's write has started.
                    if let Some(round) = before {
                        self.conclude(round);
                    }
                }
                Built::Dropped => self.conclude(in_flight.take().expect("only a round in flight fails under another")),
            }
        }
        debug_assert!(in_flight.is_none());
        tracing::debug!("storage writer stopped");
    }

    /// Applies `ops` to a new round, then, with `queue`, whatever else is
    /// queued or arrives while the round before is being written (up to
    /// `max_batch`); seals it once that write is over.
    fn build(&mut self, ops: &mut Vec<BoxedOp<C>>, queue: Option<&Queue<C>>) -> Built {
        let Engine { store, ctx, cfg, state, room, flight, .. } = self;
        let flight = &*flight;
        let mut failed = Vec::with_capacity(ops.len());
        let mut txn = Txn::begin_over(store, state, flight);
        let mut taken = 0;
        loop {
            while failed.len() < ops.len() {
                let i = failed.len();
                failed.push(apply(&mut *ops[i], ctx, &mut txn));
            }
            // Seal the moment the round before is written: the disk should
            // not wait for this one to grow.
            if flight.outstanding.get() {
                if let Ok(w) = flight.done.try_recv() {
                    txn.pending_written(flight.accept(Ok(w)));
                    break;
                }
            }
            let Some(queue) = queue.filter(|_| ops.len() < cfg.max_batch) else {
                break;
            };
            if let Ok(op) = queue.try_recv() {
                taken += 1;
                ops.push(op);
                continue;
            }
            if !flight.outstanding.get() {
                break;
            }
            crossbeam_channel::select! {
                recv(flight.done) -> w => {
                    txn.pending_written(flight.accept(w));
                    break;
                }
                recv(queue) -> op => match op {
                    Ok(op) => {
                        taken += 1;
                        ops.push(op);
                    }
                    Err(_) => break,
                }
            }
        }
        room.add_permits(taken);
        txn.settle_now();
        if flight.failed() {
            txn.abandon();
            return Built::Dropped;
        }
        Built::Sealed(txn.seal(), failed)
    }

    /// Answers a round whose write is over (its result in `flight`): a
    /// round that failed for want of space is first written again, every
    /// `FULL_RETRY`, until it is written or `full_wait` has passed. Nothing
    /// else is in flight when a round failed.
    fn conclude(&mut self, mut round: Round<C>) {
        let mut result = self.receive();
        while matches!(&result, Err(e) if e.is_full()) && round.since.elapsed() < self.cfg.full_wait {
            // Keep the round: RocksDB resumes by itself once there is
            // room, and the same operations commit then.
            self.health.set(STATE_FULL);
            std::thread::sleep(FULL_RETRY);
            self.space_checked = None;
            self.check_space();
            match self.build(&mut round.ops, None) {
                Built::Sealed(staged, failed) => {
                    round.failed = failed;
                    self.flight.send(staged);
                    let ok = self.flight.accept(self.flight.done.recv());
                    self.state.settle(ok);
                    result = self.receive();
                }
                Built::Dropped => unreachable!("nothing is in flight while a round is retried"),
            }
        }
        metrics::histogram!("pipit_group_commit_ops").record(round.ops.len() as f64);
        if result.is_ok() && self.health.get() == StorageState::Full {
            self.space_checked = None;
            self.health.set(STATE_OK);
            self.check_space();
        }
        for (op, own) in round.ops.drain(..).zip(round.failed) {
            let outcome = match (&own, &result) {
                (Some(e), _) | (None, Err(e)) => Outcome::Failed(e),
                (None, Ok(_)) => Outcome::Durable,
            };
            op.finish(&mut self.ctx, outcome);
        }
    }

    /// Takes the result of the round just written.
    fn receive(&mut self) -> Result<usize, StorageError> {
        let w = self.flight.written.borrow_mut().take().expect("a round is concluded after its write");
        metrics::histogram!("pipit_group_commit_seconds").record(w.took.as_secs_f64());
        self.state.recycle(w.staged);
        if let Err(e) = &w.result {
            metrics::counter!("pipit_storage_errors_total").increment(1);
            if let Some(suppressed) = STORAGE_LOG.open() {
                tracing::error!(error = %e, suppressed, "group commit failed");
            }
        }
        w.result
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
        self.health.free.store(free, std::sync::atomic::Ordering::Relaxed);
        metrics::gauge!("pipit_storage_free_bytes").set(free as f64);
        if self.health.get() != StorageState::Full {
            self.health.set(if free < self.cfg.reserve_bytes { STATE_LOW } else { STATE_OK });
        }
    }
}

/// Applies one operation: kept whole, or dropped whole with its error.
fn apply<C: 'static>(op: &mut dyn Operation<C>, ctx: &mut C, txn: &mut Txn<'_>) -> Option<StorageError> {
    match op.apply(ctx, txn) {
        Ok(()) => {
            txn.op_commit();
            None
        }
        Err(e) => {
            txn.op_rollback();
            metrics::counter!("pipit_storage_errors_total").increment(1);
            if let Some(suppressed) = STORAGE_LOG.open() {
                tracing::error!(error = %e, suppressed, "an operation failed and was dropped from its round");
            }
            Some(e)
        }
    }
}
