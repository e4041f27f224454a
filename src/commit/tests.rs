//! The pipeline's ordering rule, against a real RocksDB in a temporary
//! directory. A hook before each batch write holds a chosen round's write
//! (so the next round is provably applied while it is in flight) and can
//! fail it, as a failing disk would, writing nothing of it.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::*;
use crate::store::counters::Counter;

const C: Counter = Counter::NextGroup;
const WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Event {
    /// The sync thread is about to write its `n`th round.
    Write(usize),
    /// Operation `id` was answered: `Some(value)` durable, `None` failed;
    /// with the counter's value in the database at that moment.
    Finish { id: u32, value: Option<u64>, in_db: u64 },
}

struct Ctx {
    store: Arc<Store>,
    log: Arc<Mutex<Vec<Event>>>,
    /// (id, value) each time an operation is applied.
    applied: mpsc::Sender<(u32, u64)>,
}

/// Takes the counter's next value, as a send takes a sequence number.
struct Take {
    id: u32,
    value: u64,
}

impl Operation<Ctx> for Take {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.value = txn.next(C)?;
        ctx.applied.send((self.id, self.value)).unwrap();
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        let value = matches!(outcome, Outcome::Durable).then_some(self.value);
        let in_db = ctx.store.counter(C).unwrap();
        ctx.log.lock().unwrap().push(Event::Finish { id: self.id, value, in_db });
    }
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<Store>,
    log: Arc<Mutex<Vec<Event>>>,
    applied: mpsc::Receiver<(u32, u64)>,
    /// Releases the held write.
    release: mpsc::Sender<()>,
    writer: Option<Writer<Ctx>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// A writer whose `hold`th write waits for `release` and then fails if
/// `fail`.
fn setup(hold: usize, fail: bool) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let log = Arc::new(Mutex::new(Vec::new()));
    let (release, gate) = mpsc::channel::<()>();
    let gate = Mutex::new(gate);
    let writes = AtomicUsize::new(0);
    let hook_log = log.clone();
    store.set_write_hook(Box::new(move || {
        let n = writes.fetch_add(1, Ordering::SeqCst);
        hook_log.lock().unwrap().push(Event::Write(n));
        if n == hold {
            gate.lock().unwrap().recv_timeout(WAIT).expect("the test releases the held write");
            if fail {
                return Err(StorageError::Corrupt("injected write failure"));
            }
        }
        Ok(())
    }));
    let (tx, applied) = mpsc::channel();
    let ctx = Ctx { store: store.clone(), log: log.clone(), applied: tx };
    let cfg = EngineConfig { max_batch: 64, capacity: 64, sync: true, reserve_bytes: 0, full_wait: Duration::ZERO };
    let (writer, thread) = Writer::start(store.clone(), ctx, cfg).unwrap();
    Setup { _dir: dir, store, log, applied, release, writer: Some(writer), thread: Some(thread) }
}

impl Setup {
    fn submit(&self, id: u32) {
        self.writer.as_ref().unwrap().submit_blocking(Box::new(Take { id, value: 0 }), WAIT).unwrap();
    }

    /// Waits until the sync thread has started writing round `n`: the
    /// round is sealed, so what is submitted next goes into a new round
    /// (submitted before, it could still join round `n`).
    fn wait_write(&self, n: usize) {
        let deadline = std::time::Instant::now() + WAIT;
        while !self.log.lock().unwrap().contains(&Event::Write(n)) {
            assert!(std::time::Instant::now() < deadline, "round {n} is never written");
            std::thread::sleep(Duration::from_millis(1));
        }
    }

    fn wait_applied(&self, id: u32) -> u64 {
        loop {
            let (got, value) = self.applied.recv_timeout(WAIT).expect("the operation is applied");
            if got == id {
                return value;
            }
        }
    }

    /// Stops the writer (it answers everything first) and returns the log.
    fn stop(mut self) -> Vec<Event> {
        self.writer = None;
        self.thread.take().unwrap().join().unwrap();
        self.log.lock().unwrap().clone()
    }
}

fn finishes(log: &[Event]) -> Vec<(u32, Option<u64>, u64)> {
    log.iter()
        .filter_map(|e| match *e {
            Event::Finish { id, value, in_db } => Some((id, value, in_db)),
            Event::Write(_) => None,
        })
        .collect()
}

fn position(log: &[Event], e: impl Fn(&Event) -> bool) -> usize {
    log.iter().position(e).expect("the event happened")
}

#[test]
fn the_next_round_is_applied_during_a_sync_and_answered_only_after_its_own() {
    let s = setup(0, false);
    let first = s.store.counter(C).unwrap();
    s.submit(0);
    assert_eq!(s.wait_applied(0), first);
    s.wait_write(0);
    // Round 0's write is held. These are applied meanwhile, over what
    // round 0 wrote (the counter it advanced), and nothing is answered.
    s.submit(1);
    s.submit(2);
    assert_eq!(s.wait_applied(1), first + 1);
    assert_eq!(s.wait_applied(2), first + 2);
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(*s.log.lock().unwrap(), vec![Event::Write(0)], "nothing answered before round 0 is written");
    s.release.send(()).unwrap();
    let store = s.store.clone();
    let log = s.stop();
    let done = finishes(&log);
    assert_eq!(
        done.iter().map(|&(id, value, _)| (id, value)).collect::<Vec<_>>(),
        vec![(0, Some(first)), (1, Some(first + 1)), (2, Some(first + 2))],
        "every operation answered, in order: {log:?}"
    );
    for &(id, value, in_db) in &done {
        assert!(in_db > value.unwrap(), "operation {id} answered before its write was in the database: {log:?}");
    }
    // Round 1 (operations 1 and 2) was written after round 0, and
    // answered after round 0 was.
    let finish_0 = position(&log, |e| matches!(e, Event::Finish { id: 0, .. }));
    let write_1 = position(&log, |e| *e == Event::Write(1));
    let finish_1 = position(&log, |e| matches!(e, Event::Finish { id: 1, .. }));
    assert!(finish_0 < finish_1 && write_1 < finish_1, "{log:?}");
    assert_eq!(store.counter(C).unwrap(), first + 3);
}

#[test]
fn a_failed_write_fails_its_round_and_the_round_applied_over_it_is_applied_again() {
    let s = setup(0, true);
    let first = s.store.counter(C).unwrap();
    s.submit(0);
    s.wait_applied(0);
    s.wait_write(0);
    s.submit(1);
    s.submit(2);
    // Applied over round 0's values, which will never be written.
    assert_eq!(s.wait_applied(1), first + 1);
    assert_eq!(s.wait_applied(2), first + 2);
    s.release.send(()).unwrap();
    // Applied again, over what is really there.
    assert_eq!(s.wait_applied(1), first);
    assert_eq!(s.wait_applied(2), first + 1);
    let store = s.store.clone();
    let log = s.stop();
    let done = finishes(&log);
    assert_eq!(
        done.iter().map(|&(id, value, _)| (id, value)).collect::<Vec<_>>(),
        vec![(0, None), (1, Some(first)), (2, Some(first + 1))],
        "round 0 failed, the next answered with what it wrote after: {log:?}"
    );
    for &(id, value, in_db) in &done {
        if let Some(v) = value {
            assert!(in_db > v, "operation {id} answered before its write was in the database: {log:?}");
        }
    }
    assert_eq!(store.counter(C).unwrap(), first + 2, "only what was answered durable is in the database");
}

#[test]
fn a_failed_write_with_nothing_applied_over_it_is_answered_at_once_and_the_next_round_goes_on() {
    let s = setup(0, true);
    let first = s.store.counter(C).unwrap();
    s.submit(0);
    s.wait_applied(0);
    s.release.send(()).unwrap();
    // Operation 0 is answered (failed) without any other operation
    // arriving to push the engine along.
    let deadline = std::time::Instant::now() + WAIT;
    while finishes(&s.log.lock().unwrap()).is_empty() {
        assert!(std::time::Instant::now() < deadline, "the failed round was never answered");
        std::thread::sleep(Duration::from_millis(5));
    }
    s.submit(1);
    let log = s.stop();
    let done = finishes(&log);
    assert_eq!(
        done.iter().map(|&(id, value, _)| (id, value)).collect::<Vec<_>>(),
        vec![(0, None), (1, Some(first))],
        "{log:?}"
    );
}
