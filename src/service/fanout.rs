//! The fan-out: from a group entry's durable job to an inbox entry for
//! every member device, after "sent" was answered.
//!
//! A driver thread finds each group's running job (the lowest seq of the
//! group still in `fanout`) and submits a [`StepOp`] for it to the same
//! group-commit writer as everything else. A step walks at most
//! `batch` member accounts from the job's cursor, writes a small reference
//! entry (`GroupRef`) into each receiving device's inbox, and moves the
//! cursor, all in one commit: after a crash the next step starts exactly
//! where the last commit stopped, so no member is skipped and none is
//! written twice. The driver keeps at most `concurrency` steps in flight
//! and one job per group, so memory stays bounded whatever the group size
//! and however many group sends wait; jobs of one group run in seq order,
//! which is what keeps every member's view of the group in one order.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tokio_util::sync::CancellationToken;

use super::inbox::Pushes;
use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome};
use crate::model::DeviceAddr;
use crate::store::counters::Counter;
use crate::store::fanout::Backlog;
use crate::store::inbox::{resolve, GroupRef};
use crate::store::{StorageError, Store, Txn};

/// Milliseconds since the Unix epoch (fan-out lag survives restarts).
pub(crate) fn now_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What operations and the driver share: the wake-up and the throttle.
pub(crate) struct Shared {
    wake_tx: crossbeam_channel::Sender<()>,
    wake_rx: crossbeam_channel::Receiver<()>,
    /// Pause between the driver's rounds, in milliseconds.
    step_delay_ms: AtomicU64,
}

impl Shared {
    pub(crate) fn new(step_delay: Duration) -> Arc<Self> {
        // One pending wake-up is enough: the driver scans for every job.
        let (wake_tx, wake_rx) = crossbeam_channel::bounded(1);
        Arc::new(Self { wake_tx, wake_rx, step_delay_ms: AtomicU64::new(step_delay.as_millis() as u64) })
    }

    /// A job was committed: start on it if idle.
    pub(crate) fn wake(&self) {
        let _ = self.wake_tx.try_send(());
    }
}

/// The fan-out, for the network layer, admin and tests.
#[derive(Clone)]
pub struct Fanout {
    shared: Arc<Shared>,
    store: Arc<Store>,
}

impl Fanout {
    pub(crate) fn new(shared: Arc<Shared>, store: Arc<Store>) -> Self {
        Self { shared, store }
    }

    /// Sets the pause between fan-out rounds. A tuning knob (it leaves the
    /// writer more room for 1:1 traffic while a large fan-out runs) and a
    /// test hook (a slow fan-out shows that "sent" does not wait for it).
    pub fn set_step_delay(&self, d: Duration) {
        self.shared.step_delay_ms.store(d.as_millis() as u64, Ordering::Relaxed);
        self.shared.wake();
    }

    /// Fan-out still to do, for `group` or every group (reads at most
    /// `scan_limit` jobs).
    pub async fn backlog(&self, group: Option<u64>, scan_limit: usize) -> Result<Backlog, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.fanout_backlog(group, scan_limit)).await
    }

    /// [`Fanout::backlog`] for threads that may block.
    pub fn backlog_blocking(&self, scan_limit: usize) -> Result<Backlog, StorageError> {
        self.store.fanout_backlog(None, scan_limit)
    }
}

/// How the driver runs.
#[derive(Debug, Clone, Copy)]
pub struct FanoutConfig {
    /// Member accounts one step walks (each has up to 16 devices).
    pub batch: usize,
    /// Groups fanned out at once: steps in flight.
    pub concurrency: usize,
}

/// What one step did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Step {
    /// Inbox entries written.
    pub entries: u64,
    /// The job is done.
    pub finished: bool,
    /// For a finished job: milliseconds from its commit to this one.
    pub lag_ms: u64,
}

/// One bounded step of the job of entry `seq` of `group`.
pub(crate) struct StepOp {
    group: u64,
    seq: u64,
    batch: usize,
    step: Step,
    pushes: Pushes,
    done: Option<crossbeam_channel::Sender<Option<Step>>>,
}

impl StepOp {
    pub(crate) fn new(group: u64, seq: u64, batch: usize, done: crossbeam_channel::Sender<Option<Step>>) -> Self {
        Self { group, seq, batch, step: Step::default(), pushes: Pushes::default(), done: Some(done) }
    }
}

impl Operation<Ctx> for StepOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        self.step = step(txn, self.group, self.seq, self.batch.max(1), &mut self.pushes)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        let result = match outcome {
            Outcome::Durable => {
                metrics::counter!("pipit_fanout_entries_total").increment(self.step.entries);
                if self.step.finished {
                    metrics::counter!("pipit_fanout_jobs_total").increment(1);
                    metrics::histogram!("pipit_fanout_lag_seconds").record(self.step.lag_ms as f64 / 1000.0);
                }
                std::mem::take(&mut self.pushes).release(&*ctx.deliveries);
                Some(self.step)
            }
            Outcome::Failed(_) => None,
        };
        if let Some(tx) = self.done.take() {
            let _ = tx.send(result);
        }
    }
}

/// Walks up to `batch` member accounts of the job from its cursor.
fn step(txn: &mut Txn<'_>, group: u64, seq: u64, batch: usize, pushes: &mut Pushes) -> Result<Step, StorageError> {
    let mut out = Step::default();
    let Some(mut job) = txn.store().fanout_job(group, seq)? else {
        // Done by an earlier step whose answer was lost.
        out.finished = true;
        return Ok(out);
    };
    let Some(g) = txn.group(group)? else {
        return Err(StorageError::Corrupt("fan-out job of a group that does not exist"));
    };
    let Some(body) = txn.store().group_body(group, seq)? else {
        return Err(StorageError::Corrupt("fan-out job without its body"));
    };
    let sender = DeviceAddr::new(job.from, job.from_device);
    let members = &g.members;
    let mut i = members.partition_point(|m| m.account < job.cursor);
    let mut walked = 0;
    while i < members.len() && walked < batch {
        let account = members[i].account;
        let end = i + members[i..].iter().take_while(|m| m.account == account).count();
        let receives = members[i..end].iter().any(|m| super::groups::receives(m, seq, job.notice));
        i = end;
        walked += 1;
        if !receives {
            continue;
        }
        let Some(devices) = txn.account(account)? else {
            continue;
        };
        if account != job.from {
            job.recipients += 1;
        }
        for d in &devices.devices {
            let addr = DeviceAddr::new(account, d.device);
            // The sender's own device has the message; its other devices
            // get a copy. A change notice goes to every device.
            if !job.notice && addr == sender {
                continue;
            }
            let device_payload = if job.extras > 0 {
                txn.take_group_extra(group, seq, addr)?.unwrap_or_default()
            } else {
                bytes::Bytes::new()
            };
            let r = GroupRef { group, seq, time: job.time, from: job.from, notice: job.notice, device_payload };
            let id = txn.next(Counter::InboxNext(addr))?;
            txn.put_inbox_ref(addr, id, &r);
            if job.notice {
                // A notice carries the member list (up to 1,024 accounts):
                // too big to copy into every online member's mailbox. The
                // connection reads it from storage instead.
                pushes.nudge(addr);
            } else {
                pushes.add(addr, id, resolve(body.clone(), &r, id));
            }
            out.entries += 1;
        }
    }
    job.remaining = job.remaining.saturating_sub(walked as u64);
    job.entries += out.entries;
    if out.entries > 0 {
        txn.add_group_body_refs(group, seq, out.entries)?;
    }
    if i < members.len() {
        job.cursor = members[i].account;
        txn.put_fanout_job(group, seq, &job);
        return Ok(out);
    }
    // The last member is reached.
    out.finished = true;
    out.lag_ms = now_ms().saturating_sub(job.created_ms);
    txn.delete_fanout_job(group, seq);
    txn.release_group_body(group, seq)?;
    if job.extras > 0 {
        txn.delete_group_extras(group, seq)?;
    }
    // Memberships that ended at or before `seq` have had every entry they
    // should get: forget them.
    if g.members.iter().any(|m| m.left != 0 && m.left <= seq) {
        let mut g = (*g).clone();
        g.members.retain(|m| m.left == 0 || m.left > seq);
        txn.put_group(g);
    }
    if !job.notice {
        super::group_receipts::fanned_out(txn, group, seq, job.recipients)?;
    }
    Ok(out)
}

/// Starts the driver thread; it stops with `stop`. Jobs left unfinished
/// stay durable and the next start resumes them.
pub fn spawn_driver(
    writer: Writer,
    store: Arc<Store>,
    fanout: &Fanout,
    cfg: FanoutConfig,
    stop: CancellationToken,
) -> std::io::Result<()> {
    let shared = fanout.shared.clone();
    std::thread::Builder::new().name("pipit-fanout".into()).spawn(move || {
        let mut after = 0;
        let (tx, rx) = crossbeam_channel::unbounded();
        while !stop.is_cancelled() {
            let heads = match store.fanout_heads(after, cfg.concurrency.max(1)) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(error = %e, "fan-out: reading jobs failed");
                    pause(&stop, Duration::from_secs(1));
                    continue;
                }
            };
            if heads.is_empty() {
                let _ = shared.wake_rx.recv_timeout(Duration::from_millis(500));
                continue;
            }
            throttle(&shared, &stop);
            let mut submitted = 0;
            for &(group, seq) in &heads {
                let op = Box::new(StepOp::new(group, seq, cfg.batch, tx.clone()));
                if writer.submit_blocking(op, Duration::from_secs(60)).is_err() {
                    break;
                }
                submitted += 1;
            }
            // Every step's answer before the next round: a second step of
            // a job must never be queued while its first may still run, or
            // both would start from the same cursor.
            let mut failed = false;
            let mut answered = 0;
            while answered < submitted {
                match rx.recv_timeout(Duration::from_secs(1)) {
                    Ok(Some(_)) => answered += 1,
                    Ok(None) => {
                        answered += 1;
                        failed = true;
                    }
                    Err(_) if stop.is_cancelled() => return,
                    Err(_) => {}
                }
            }
            if submitted < heads.len() {
                // The writer is stopping.
                return;
            }
            if failed {
                // Logged by the writer; try again, but not in a hot loop.
                pause(&stop, Duration::from_secs(1));
            }
            after = heads.last().map_or(0, |(g, _)| *g);
        }
    })?;
    Ok(())
}

/// Waits out the configured pause between rounds; a pause shortened
/// meanwhile (or `stop`) ends it early.
fn throttle(shared: &Shared, stop: &CancellationToken) {
    let started = Instant::now();
    while !stop.is_cancelled() {
        let delay = Duration::from_millis(shared.step_delay_ms.load(Ordering::Relaxed));
        let elapsed = started.elapsed();
        if elapsed >= delay {
            return;
        }
        std::thread::sleep((delay - elapsed).min(Duration::from_millis(20)));
    }
}

/// Sleeps up to `d`, waking early on `stop`.
fn pause(stop: &CancellationToken, d: Duration) {
    let deadline = Instant::now() + d;
    while !stop.is_cancelled() {
        let now = Instant::now();
        if now >= deadline {
            return;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use pipit_protocol::message::pb;
    use pipit_protocol::Message;

    use super::*;
    use crate::config::Registration;
    use crate::service::groups::Change;
    use crate::service::messaging::SendFailure;
    use crate::service::testing::{setup, Setup};

    /// The group entries (seq, kind) in a device's inbox, in inbox order.
    fn group_entries(s: &Setup, d: DeviceAddr) -> Vec<(u64, &'static str)> {
        s.store
            .inbox_after(d, 0, 1_000)
            .unwrap()
            .into_iter()
            .filter_map(|(_, m)| match m {
                Message::Deliver(d) if d.group != 0 => Some((d.seq, "message")),
                Message::GroupInfo(g) => Some((g.seq, "notice")),
                _ => None,
            })
            .collect()
    }

    fn ids(s: &Setup, d: DeviceAddr) -> Vec<u64> {
        s.store.inbox_after(d, 0, 1_000).unwrap().into_iter().map(|(id, _)| id).collect()
    }

    #[test]
    fn a_group_message_is_stored_once_and_its_body_goes_with_the_last_reference() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let c = s.register(3, "").unwrap();
        let b2 = s.link(b.account, 4);
        let a2 = s.link(a.account, 5);
        let info = s.create_group(a, &[b.account, c.account]).unwrap();
        assert_eq!((info.group, info.version, info.seq), (1, 1, 1));
        assert_eq!(info.members, vec![a.account, b.account, c.account]);
        assert_eq!(info.admins, vec![a.account]);
        s.fan_out(128);
        for d in [a, a2, b, b2, c] {
            assert_eq!(group_entries(&s, d), vec![(1, "notice")], "{d}");
        }

        let sent = s.group_send(a, 1, info.group).unwrap();
        assert_eq!(sent.seq, 2);
        // Durable and answered before any member has it.
        assert_eq!(s.store.fanout_backlog(None, 10).unwrap().jobs, 1);
        assert_eq!(group_entries(&s, b), vec![(1, "notice")]);
        assert_eq!(s.group_send(a, 1, info.group).unwrap(), sent, "a retry gets the original answer");
        assert_eq!(s.store.fanout_backlog(None, 10).unwrap().jobs, 1, "and no second job");

        // One member account per step: the cursor moves, nobody twice.
        let mut steps = Vec::new();
        loop {
            let step = s.step(info.group, 2, 1);
            steps.push(step.entries);
            if step.finished {
                break;
            }
        }
        assert_eq!(steps, vec![1, 2, 1], "a's other device, b's two devices, then c");
        for d in [a2, b, b2, c] {
            assert_eq!(group_entries(&s, d), vec![(1, "notice"), (2, "message")], "{d}");
        }
        assert_eq!(group_entries(&s, a), vec![(1, "notice")], "the sending device has its message");
        let Message::Deliver(got) = &s.store.inbox_after(c, 1, 10).unwrap()[0].1 else { panic!() };
        assert_eq!((got.from, got.from_device, got.group, &got.payload[..]), (a.account, 0, 1, &b"hello group"[..]));
        assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 4);
        let stats = s.store.group_body_stats(Some(1)).unwrap();
        assert_eq!((stats.messages, stats.notices), (1, 1));

        // Acks drop the count once per entry, however often they come.
        let last = |d| *ids(&s, d).last().unwrap();
        s.ack(b, &[last(b)]);
        s.ack(b, &[last(b)]);
        assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 3);
        for d in [a2, b2, c] {
            s.ack(d, &ids(&s, d));
        }
        assert_eq!(s.store.group_body_stats(Some(1)).unwrap().messages, 0, "the last ack deleted the body");
        assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 0);
    }

    #[test]
    fn who_gets_what_is_decided_by_seq_not_by_when_the_fan_out_runs() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let c = s.register(3, "").unwrap();
        let g = s.create_group(a, &[b.account]).unwrap().group;
        // Nothing is fanned out until the end.
        assert_eq!(s.group_send(a, 1, g).unwrap().seq, 2);
        s.change(a, g, Change::Remove(vec![b.account])).unwrap(); // seq 3
        s.change(a, g, Change::Add(vec![c.account])).unwrap(); // seq 4
        assert_eq!(s.group_send(a, 2, g).unwrap().seq, 5);
        assert_eq!(s.group_send(b, 1, g), Err(SendFailure::Code(pb::ErrorCode::Forbidden)), "b was removed");
        assert_eq!(s.store.group(g).unwrap().unwrap().members.len(), 3, "b is kept until the fan-out passes 3");
        s.fan_out(1);
        assert_eq!(group_entries(&s, b), vec![(1, "notice"), (2, "message"), (3, "notice")]);
        assert_eq!(group_entries(&s, c), vec![(4, "notice"), (5, "message")]);
        assert_eq!(group_entries(&s, a), vec![(1, "notice"), (3, "notice"), (4, "notice")]);
        let record = s.store.group(g).unwrap().unwrap();
        assert_eq!(record.members.iter().map(|m| m.account).collect::<Vec<_>>(), vec![a.account, c.account]);
        // The notice b got says it is out; c's says it is in.
        let notices: Vec<pb::GroupInfo> = s
            .store
            .inbox_after(b, 0, 10)
            .unwrap()
            .into_iter()
            .filter_map(|(_, m)| if let Message::GroupInfo(i) = m { Some(i) } else { None })
            .collect();
        assert_eq!((notices[1].version, notices[1].by, &notices[1].members), (2, a.account, &vec![a.account]));
        // Removed and added again: one membership at a time, each entry once.
        s.change(a, g, Change::Add(vec![b.account])).unwrap(); // seq 6
        s.change(a, g, Change::Remove(vec![b.account])).unwrap(); // seq 7
        s.change(a, g, Change::Add(vec![b.account])).unwrap(); // seq 8
        assert_eq!(s.group_send(a, 3, g).unwrap().seq, 9);
        s.fan_out(128);
        let seqs: Vec<u64> = group_entries(&s, b).into_iter().map(|(seq, _)| seq).collect();
        assert_eq!(seqs, vec![1, 2, 3, 6, 7, 8, 9]);
    }

    #[test]
    fn membership_rules_and_bad_requests_change_nothing() {
        let s = setup(Registration::Open);
        let accounts: Vec<DeviceAddr> = (1..=10).map(|k| s.register(k, "").unwrap()).collect();
        let [a, b, c, d] = [accounts[0], accounts[1], accounts[2], accounts[3]];
        use pb::ErrorCode::*;
        assert_eq!(s.create_group(a, &[b.account, b.account]).unwrap_err(), BadRequest);
        assert_eq!(s.create_group(a, &[0]).unwrap_err(), BadRequest);
        assert_eq!(s.create_group(a, &[999]).unwrap_err(), NotFound);
        let nine: Vec<u64> = accounts[1..].iter().map(|x| x.account).collect();
        assert_eq!(s.create_group(a, &nine).unwrap_err(), TooLarge, "the test limit is 8");
        let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
        assert_eq!(g, 1, "refused creations used no id");
        assert_eq!(s.change(a, 0, Change::Leave), Err(BadRequest));
        assert_eq!(s.change(a, 77, Change::Add(vec![d.account])), Err(NotFound));
        assert_eq!(s.change(b, g, Change::Add(vec![d.account])), Err(Forbidden), "b is no admin");
        assert_eq!(s.change(d, g, Change::Leave), Err(Forbidden), "d is no member");
        assert_eq!(s.change(a, g, Change::Add(vec![d.account, d.account])), Err(BadRequest));
        assert_eq!(s.change(a, g, Change::Add(vec![])), Err(BadRequest));
        assert_eq!(s.change(a, g, Change::Add(nine[2..].to_vec())), Err(TooLarge));
        assert_eq!(s.group_send(d, 1, g), Err(SendFailure::Code(Forbidden)));
        assert_eq!(s.group_send(a, 1, 0), Err(SendFailure::Code(BadRequest)), "neither to nor group");
        assert_eq!(s.group_send(a, 2, 77), Err(SendFailure::Code(NotFound)));
        let record = s.store.group(g).unwrap().unwrap();
        assert_eq!((record.version, record.members.len()), (1, 3), "nothing changed");
        assert_eq!(s.store.counter(Counter::GroupSeq(g)).unwrap(), 2);
        // Adding someone already in changes nothing either (a retry).
        s.change(a, g, Change::Add(vec![b.account])).unwrap();
        assert_eq!(s.store.group(g).unwrap().unwrap().version, 1);
        // The last admin leaves: the oldest member (the earliest to join,
        // then the lowest account) becomes admin.
        s.change(a, g, Change::Add(vec![d.account])).unwrap();
        s.change(a, g, Change::Leave).unwrap();
        let record = s.store.group(g).unwrap().unwrap();
        let admins: Vec<u64> = record.current().filter(|m| m.admin).map(|m| m.account).collect();
        assert_eq!(admins, vec![b.account]);
        assert_eq!(record.version, 3);
        assert_eq!(s.change(b, g, Change::Remove(vec![c.account, d.account])), Ok(()));
        assert_eq!(s.group_send(c, 1, g), Err(SendFailure::Code(Forbidden)), "a removed member cannot send");
        assert_eq!(s.store.groups_of(b.account, 0, 10).unwrap(), vec![g]);
        assert!(s.store.groups_of(c.account, 0, 10).unwrap().is_empty());
    }

    #[test]
    fn per_device_ciphertexts_reach_only_their_device_and_must_name_member_devices() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let b2 = s.link(b.account, 3);
        let outsider = s.register(4, "").unwrap();
        let g = s.create_group(a, &[b.account]).unwrap().group;
        let key = |account, device, p: &'static [u8]| pb::DeviceCiphertext {
            account,
            device,
            payload: Bytes::from_static(p),
        };
        let send = |id, per_device| pb::Send {
            id,
            group: g,
            payload: Bytes::from_static(b"megolm"),
            per_device,
            ..Default::default()
        };
        let run = |m: pb::Send| s.rt.block_on(s.services().messaging.send(a, m).unwrap());
        let Err(SendFailure::Mismatch(m)) = run(send(1, vec![key(outsider.account, 0, b"x"), key(b.account, 9, b"y")]))
        else {
            panic!("expected a mismatch");
        };
        assert_eq!(m.extra.len(), 2);
        assert!(m.missing.is_empty());
        assert_eq!(run(send(2, vec![key(0, 0, b"x")])), Err(SendFailure::Code(pb::ErrorCode::BadRequest)));
        let huge = pb::Send { payload: Bytes::from(vec![0u8; 65_500]), ..send(3, vec![]) };
        assert_eq!(run(huge), Err(SendFailure::Code(pb::ErrorCode::TooLarge)));
        let sent = run(send(4, vec![key(b2.account, b2.device, b"sender key for b2")])).unwrap();
        s.fan_out(128);
        let got = |d| match s.store.inbox_after(d, 0, 10).unwrap().pop().unwrap().1 {
            Message::Deliver(x) => x,
            other => panic!("{other:?}"),
        };
        let (d1, d2) = (got(b), got(b2));
        assert_eq!((d1.seq, &d1.payload[..], &d1.device_payload[..]), (sent.seq, &b"megolm"[..], &b""[..]));
        assert_eq!(
            (d2.seq, &d2.payload[..], &d2.device_payload[..]),
            (sent.seq, &b"megolm"[..], &b"sender key for b2"[..])
        );
        assert_eq!(s.store.group_body_stats(Some(g)).unwrap().extras, 0, "copied into the entry, then deleted");
    }

    #[test]
    fn group_receipts_count_each_member_once_and_reach_the_sender_coalesced() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let b2 = s.link(b.account, 3);
        let c = s.register(4, "").unwrap();
        let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
        let seq = s.group_send(a, 1, g).unwrap().seq;
        s.fan_out(128);
        let before = ids(&s, a).len();
        for d in [b, b2, c] {
            s.ack(d, &ids(&s, d));
        }
        for d in [b, b2] {
            let op = s.services().groups.read(d, g, seq);
            assert!(op.try_submit(&s.services().writer).is_ok());
        }
        s.barrier();
        let counts = s.store.group_counts(g, seq).unwrap().unwrap();
        assert_eq!((counts.recipients, counts.delivered, counts.read), (2, 2, 1), "b's two devices count once");
        s.flush_group_receipts();
        let receipts: Vec<(i32, u64, u64, u32)> = s
            .store
            .inbox_after(a, 0, 100)
            .unwrap()
            .into_iter()
            .skip(before)
            .filter_map(
                |(_, m)| if let Message::Receipt(r) = m { Some((r.kind, r.group, r.seq, r.count)) } else { None },
            )
            .collect();
        let (dl, rd) = (pb::ReceiptKind::Delivered as i32, pb::ReceiptKind::Read as i32);
        assert_eq!(receipts, vec![(dl, g, seq, 2), (rd, g, seq, 1)], "one receipt per kind, with the counts");
        s.flush_group_receipts();
        assert_eq!(ids(&s, a).len(), before + 2, "nothing new to tell");
        // c reads too: everyone has; the sender is told and the counts go.
        assert!(s.services().groups.read(c, g, seq).try_submit(&s.services().writer).is_ok());
        s.barrier();
        s.flush_group_receipts();
        assert_eq!(ids(&s, a).len(), before + 3);
        assert!(s.store.group_counts(g, seq).unwrap().is_none());
    }
}

#[cfg(test)]
mod expiry_tests {
    use pipit_protocol::message::pb;
    use pipit_protocol::Message;
    use tokio::sync::oneshot;

    use crate::config::Registration;
    use crate::model::unix_now;
    use crate::service::expiry::ExpireOp;
    use crate::service::testing::setup;

    #[test]
    fn an_expired_group_entry_releases_its_body_and_tells_the_sender_once() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let b2 = s.link(b.account, 3);
        let c = s.register(4, "").unwrap();
        let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
        let sent = s.group_send(a, 1, g).unwrap();
        s.fan_out(128);
        let (tx, rx) = oneshot::channel();
        s.rt.block_on(s.services().writer.submit(Box::new(ExpireOp::new(unix_now() + 101, tx)))).unwrap();
        let round = rx.blocking_recv().unwrap();
        assert!(round.finished && round.expired > 0, "{round:?}");
        for d in [b, b2, c] {
            assert!(s.store.inbox_after(d, 0, 10).unwrap().is_empty());
        }
        let stats = s.store.group_body_stats(Some(g)).unwrap();
        assert_eq!((stats.messages, stats.notices), (0, 0), "every body went with its last reference");
        assert!(s.store.group_counts(g, sent.seq).unwrap().is_none(), "and the counts with the TTL");
        let notices: Vec<pb::Expired> = s
            .store
            .inbox_after(a, 0, 10)
            .unwrap()
            .into_iter()
            .filter_map(|(_, m)| if let Message::Expired(e) = m { Some(e) } else { None })
            .collect();
        assert_eq!(notices.len(), 1, "{notices:?}");
        assert_eq!((notices[0].group, notices[0].seq, notices[0].devices, notices[0].peer), (g, sent.seq, 3, 0));
    }
}
