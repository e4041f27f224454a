//! Receipts in groups, coalesced for the sender.
//!
//! One message to a 1,024-member group would cost its sender 2,046
//! receipts (a delivered and a read from each member) if receipts were
//! forwarded as in 1:1. Instead the server counts, per group message, the
//! members that have received it (the first device of a member to ack it)
//! and read it (a member's cumulative `Receipt{READ, group, through}`),
//! each member once, and every flush interval tells the sender's devices
//! the counts that changed: one `Receipt{kind, group, seq, count}` per
//! message and kind per flush, whatever the group's size. Counts wait
//! durably (`group_receipts` and its dirty index) when the sender is
//! offline, like every receipt.

use std::time::{Duration, Instant};

use pipit_protocol::message::pb;
use tokio_util::sync::CancellationToken;

use super::inbox::{enqueue_receipt, Pushes};
use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome};
use crate::model::{unix_now, DeviceAddr};
use crate::store::counters::Counter;
use crate::store::group_receipts::GroupCounts;
use crate::store::inbox::GroupRef;
use crate::store::queued_receipts::ReceiptSlot;
use crate::store::{StorageError, Txn};

/// A read receipt counts towards at most this many of the newest seqs it
/// covers, so that one receipt after a long absence stays one bounded
/// operation.
pub const READ_SPAN: u64 = 1_024;
/// Most messages one flush tells senders about.
pub const FLUSH_MAX: usize = 256;

/// Stores `c`, or forgets it once it can no longer change anything the
/// sender sees: fanned out, read by every recipient, and told.
fn settle(txn: &mut Txn<'_>, group: u64, seq: u64, c: GroupCounts) -> Result<(), StorageError> {
    if c.fanned_out && c.read >= c.recipients && !c.dirty() {
        forget(txn, group, seq, c.sender)
    } else {
        txn.put_group_counts(group, seq, c)
    }
}

/// Forgets message `seq`'s counts, and where its sender's devices hold
/// their latest receipts for it: none will follow to replace them.
pub(crate) fn forget(txn: &mut Txn<'_>, group: u64, seq: u64, sender: u64) -> Result<(), StorageError> {
    txn.delete_group_counts(group, seq);
    if let Some(account) = txn.account(sender)? {
        for d in &account.devices {
            for kind in [pb::ReceiptKind::Delivered, pb::ReceiptKind::Read] {
                let slot = ReceiptSlot { kind: kind as u8, group, about: seq };
                txn.delete_queued_receipt(DeviceAddr::new(sender, d.device), slot);
            }
        }
    }
    Ok(())
}

/// The fan-out of message `seq` reached `recipients` member accounts.
pub(crate) fn fanned_out(txn: &mut Txn<'_>, group: u64, seq: u64, recipients: u64) -> Result<(), StorageError> {
    let Some(mut c) = txn.group_counts(group, seq)? else {
        return Ok(());
    };
    c.recipients = u32::try_from(recipients).unwrap_or(u32::MAX);
    c.fanned_out = true;
    settle(txn, group, seq, c)
}

/// A device of `member` acknowledged these group messages (from others).
pub(crate) fn delivered(txn: &mut Txn<'_>, member: u64, mut refs: Vec<GroupRef>) -> Result<(), StorageError> {
    refs.sort_by_key(|r| (r.group, r.seq));
    for r in refs {
        let mark = Counter::GroupMark { kind: pb::ReceiptKind::Delivered as u8, member, group: r.group };
        // Another device of the member (or this one, cumulatively) got
        // here first: the member is counted already.
        if r.seq <= txn.counter(mark)? {
            continue;
        }
        txn.set_counter(mark, r.seq);
        if let Some(mut c) = txn.group_counts(r.group, r.seq)? {
            c.delivered = c.delivered.saturating_add(1);
            settle(txn, r.group, r.seq, c)?;
        }
    }
    Ok(())
}

/// A member's read receipt: `from` read `group` up to seq `through`.
pub(crate) struct ReadOp {
    from: DeviceAddr,
    group: u64,
    through: u64,
}

impl ReadOp {
    pub(crate) fn new(from: DeviceAddr, group: u64, through: u64) -> Self {
        Self { from, group, through }
    }
}

impl Operation<Ctx> for ReadOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        let member = self.from.account;
        let Some(g) = txn.group(self.group)? else {
            return Ok(());
        };
        // Only messages the member received count: someone who never
        // belonged reads nothing; one who left may still report what it
        // read before (until the fan-out forgets its membership).
        let spans: Vec<_> = g.members.iter().filter(|m| m.account == member).cloned().collect();
        if spans.is_empty() {
            return Ok(());
        }
        let mark = Counter::GroupMark { kind: pb::ReceiptKind::Read as u8, member, group: self.group };
        let old = txn.counter(mark)?;
        if self.through <= old {
            return Ok(());
        }
        txn.set_counter(mark, self.through);
        let from = (old + 1).max(self.through.saturating_sub(READ_SPAN - 1));
        let seqs = txn.store().group_counts_between(self.group, from, self.through, READ_SPAN as usize)?;
        for seq in seqs {
            let Some(mut c) = txn.group_counts(self.group, seq)? else {
                continue;
            };
            if c.sender == member || !spans.iter().any(|m| super::groups::receives(m, seq, false)) {
                continue;
            }
            c.read = c.read.saturating_add(1);
            settle(txn, self.group, seq, c)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {}
}

/// Tells senders the counts that changed since they were last told.
pub(crate) struct FlushOp {
    more: bool,
    pushes: Pushes,
    done: Option<crossbeam_channel::Sender<Option<bool>>>,
}

impl FlushOp {
    pub(crate) fn new(done: crossbeam_channel::Sender<Option<bool>>) -> Self {
        Self { more: false, pushes: Pushes::default(), done: Some(done) }
    }
}

impl Operation<Ctx> for FlushOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        let dirty = txn.store().dirty_group_counts(FLUSH_MAX)?;
        self.more = dirty.len() == FLUSH_MAX;
        let now = unix_now();
        for (group, seq) in dirty {
            let Some(mut c) = txn.group_counts(group, seq)? else {
                // Counts already gone; only the index entry is left.
                txn.delete_group_counts(group, seq);
                continue;
            };
            let mut receipts = Vec::with_capacity(2);
            if c.delivered != c.told_delivered {
                receipts.push((pb::ReceiptKind::Delivered, c.delivered));
            }
            if c.read != c.told_read {
                receipts.push((pb::ReceiptKind::Read, c.read));
            }
            c.told_delivered = c.delivered;
            c.told_read = c.read;
            if let Some(sender) = txn.account(c.sender)? {
                for (kind, count) in receipts {
                    let r = pb::Receipt { kind: kind as i32, group, seq, count, time: now, ..Default::default() };
                    for d in &sender.devices {
                        enqueue_receipt(txn, DeviceAddr::new(c.sender, d.device), r, &mut self.pushes)?;
                    }
                }
            }
            // After the receipts: counts settled for good forget where the
            // last ones wait, and these must replace the ones before.
            settle(txn, group, seq, c)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        let result = match outcome {
            Outcome::Durable => {
                std::mem::take(&mut self.pushes).release(&*ctx.deliveries);
                Some(self.more)
            }
            Outcome::Failed(_) => None,
        };
        if let Some(tx) = self.done.take() {
            let _ = tx.send(result);
        }
    }
}

/// Flushes group receipt counts every `every` until `stop`, on its own
/// thread. Counts that changed during one interval reach the sender as one
/// receipt per message and kind.
pub fn spawn_flusher(writer: Writer, every: Duration, stop: CancellationToken) -> std::io::Result<()> {
    std::thread::Builder::new().name("pipit-group-receipts".into()).spawn(move || {
        let (tx, rx) = crossbeam_channel::unbounded();
        loop {
            let deadline = Instant::now() + every;
            while Instant::now() < deadline {
                if stop.is_cancelled() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50).min(every));
            }
            loop {
                if writer.submit_blocking(Box::new(FlushOp::new(tx.clone())), Duration::from_secs(60)).is_err() {
                    break;
                }
                // Wait for the answer before the next flush: two flushes of
                // the same counts in one round would tell the sender twice.
                let more = loop {
                    match rx.recv_timeout(Duration::from_secs(1)) {
                        Ok(more) => break more,
                        Err(_) if stop.is_cancelled() => return,
                        Err(_) => {}
                    }
                };
                if more != Some(true) || stop.is_cancelled() {
                    break;
                }
            }
        }
    })?;
    Ok(())
}
