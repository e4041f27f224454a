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
        if g.members.is_empty() {
            // Its last member has left and heard so: nobody can send to
            // it or change it again, so nothing of it is kept (bodies go
            // with their references, receipt counts with their age).
            txn.delete_group(group);
            txn.delete_counter(Counter::GroupSeq(group));
        } else {
            txn.put_group(g);
        }
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
mod tests;

#[cfg(test)]
mod expiry_tests;
