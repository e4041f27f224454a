//! Acks and receipts: an ack deletes inbox entries and tells each sender
//! "delivered"; a read receipt from a reader tells the sender "read".
//! Receipts are cumulative per conversation, and a high-water mark per
//! (kind, sender, peer) keeps a repeated or older one from being stored
//! again; a newer one replaces the one still waiting in each of the
//! sender's inboxes (`super::inbox::enqueue_receipt`).

use std::collections::HashMap;

use pipit_protocol::message::pb;
use pipit_protocol::node::pb as node_pb;
use pipit_protocol::Message;

use super::inbox::{enqueue_receipt, Pushes};
use super::{Ctx, Submission};
use crate::commit::{Operation, Outcome};
use crate::model::{unix_now, DeviceAddr};
use crate::route::cluster::Placement;
use crate::store::counters::Counter;
use crate::store::{StorageError, Txn};

/// What a delivery that a device acked was, for receipts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Acked {
    /// The inbox id.
    pub id: u64,
    /// Sender account of a 1:1 message from someone else, else 0.
    pub sender: u64,
    /// Its sequence number.
    pub seq: u64,
    /// The group of a group entry (a message or a change notice), whose
    /// inbox entry refers to a shared body; else 0.
    pub group: u64,
}

/// What acking inbox entry `id` (holding `m`) of a device of `own_account`
/// means for receipts.
pub fn acked_meta(own_account: u64, id: u64, m: &Message) -> Acked {
    match m {
        Message::Deliver(d) if d.from != own_account && d.group == 0 && d.peer == 0 => {
            Acked { id, sender: d.from, seq: d.seq, group: 0 }
        }
        Message::Deliver(d) if d.group != 0 => Acked { id, sender: 0, seq: d.seq, group: d.group },
        Message::GroupInfo(g) if g.group != 0 => Acked { id, sender: 0, seq: g.seq, group: g.group },
        _ => Acked { id, sender: 0, seq: 0, group: 0 },
    }
}

/// Builds acks and read receipts. Neither may be dropped once accepted,
/// so each is a [`Submission`] the caller queues without losing it.
#[derive(Clone, Default)]
pub struct Receipts;

impl Receipts {
    /// `device` processed the entries `acked`.
    pub fn ack(&self, device: DeviceAddr, acked: Vec<Acked>) -> Submission {
        Submission(Box::new(AckOp { device, acked, pushes: Pushes::default(), forwarded: Vec::new() }))
    }

    /// `from` read `peer`'s messages up to seq `through`.
    pub fn read(&self, from: DeviceAddr, peer: u64, through: u64) -> Submission {
        Submission(Box::new(ReadOp { from, peer, through, pushes: Pushes::default(), forwarded: Vec::new() }))
    }
}

/// Sends `receipt` to `to`: to every device of it here, or, when another
/// node owns it, as a forward to that node (its slot is added to
/// `forwarded`, to wake the link after the commit).
fn receipt(
    ctx: &Ctx,
    txn: &mut Txn<'_>,
    to: u64,
    receipt: pb::Receipt,
    pushes: &mut Pushes,
    forwarded: &mut Vec<u32>,
) -> Result<(), StorageError> {
    let owner = match &ctx.rules.cluster {
        Some(c) => match c.place(to) {
            Placement::Remote(m) | Placement::Down(m) => Some(m.slot),
            _ => None,
        },
        None => None,
    };
    let Some(slot) = owner else {
        return deliver_receipt(txn, to, receipt, pushes);
    };
    // The mark here keeps repeats off the link; the owner keeps its own.
    let mark = Counter::ReceiptMark { kind: receipt.kind as u8, to, peer: receipt.peer };
    if receipt.through <= txn.counter(mark)? {
        return Ok(());
    }
    txn.set_counter(mark, receipt.through);
    let r = node_pb::ForwardedReceipt {
        to,
        kind: u32::try_from(receipt.kind).unwrap_or(0),
        peer: receipt.peer,
        through: receipt.through,
        time: receipt.time,
    };
    super::forward::queue(txn, slot, node_pb::Forward { entry: 0, send: None, receipt: Some(r) })?;
    if !forwarded.contains(&slot) {
        forwarded.push(slot);
    }
    Ok(())
}

/// Puts `receipt` in every device inbox of `to` (an account of this
/// node), unless a receipt of this kind already covered `through` for
/// this conversation.
pub(crate) fn deliver_receipt(
    txn: &mut Txn<'_>,
    to: u64,
    receipt: pb::Receipt,
    pushes: &mut Pushes,
) -> Result<(), StorageError> {
    let mark = Counter::ReceiptMark { kind: receipt.kind as u8, to, peer: receipt.peer };
    if receipt.through <= txn.counter(mark)? {
        return Ok(());
    }
    txn.set_counter(mark, receipt.through);
    let Some(account) = txn.account(to)? else {
        return Ok(());
    };
    for d in &account.devices {
        enqueue_receipt(txn, DeviceAddr::new(to, d.device), receipt, pushes)?;
    }
    Ok(())
}

struct AckOp {
    device: DeviceAddr,
    acked: Vec<Acked>,
    pushes: Pushes,
    /// Slots of nodes a receipt was queued for.
    forwarded: Vec<u32>,
}

impl Operation<Ctx> for AckOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        self.forwarded.clear();
        let now = unix_now();
        let mut delivered: HashMap<u64, u64> = HashMap::new();
        let mut group_messages = Vec::new();
        for a in &self.acked {
            if a.group != 0 {
                // A reference: the body's count drops once per entry, and
                // only if the entry is still there.
                match txn.take_inbox_ref(self.device, a.id)? {
                    Some(r) => {
                        txn.release_group_body(r.group, r.seq)?;
                        if !r.notice && r.from != self.device.account {
                            group_messages.push(r);
                        }
                    }
                    None => txn.delete_inbox(self.device, a.id),
                }
                continue;
            }
            txn.delete_inbox(self.device, a.id);
            if a.sender != 0 && a.sender != self.device.account {
                let e = delivered.entry(a.sender).or_default();
                *e = (*e).max(a.seq);
            }
        }
        for (sender, seq) in delivered {
            let r = pb::Receipt {
                kind: pb::ReceiptKind::Delivered as i32,
                peer: self.device.account,
                through: seq,
                time: now,
                ..Default::default()
            };
            receipt(ctx, txn, sender, r, &mut self.pushes, &mut self.forwarded)?;
        }
        if !group_messages.is_empty() {
            super::group_receipts::delivered(txn, self.device.account, group_messages)?;
        }
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let Outcome::Durable = outcome {
            metrics::counter!("pipit_inbox_acked_total").increment(self.acked.len() as u64);
            self.pushes.release(&*ctx.deliveries);
            for slot in &self.forwarded {
                super::forward::wake(ctx, *slot);
            }
        }
    }
}

struct ReadOp {
    from: DeviceAddr,
    peer: u64,
    through: u64,
    pushes: Pushes,
    forwarded: Vec<u32>,
}

impl Operation<Ctx> for ReadOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        self.forwarded.clear();
        if self.peer == 0 || self.peer == self.from.account || self.through == 0 {
            return Ok(());
        }
        let r = pb::Receipt {
            kind: pb::ReceiptKind::Read as i32,
            peer: self.from.account,
            through: self.through,
            time: unix_now(),
            ..Default::default()
        };
        receipt(ctx, txn, self.peer, r, &mut self.pushes, &mut self.forwarded)
    }

    fn finish(self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let Outcome::Durable = outcome {
            self.pushes.release(&*ctx.deliveries);
            for slot in &self.forwarded {
                super::forward::wake(ctx, *slot);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::settings::Registration;
    use crate::service::testing::setup;

    #[test]
    fn acks_delete_and_produce_one_delivered_receipt() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let sent = s.send(a, 1, b.account).unwrap();
        let acked = vec![Acked { id: 1, sender: a.account, seq: sent.seq, group: 0 }];
        for _ in 0..2 {
            assert!(s.services().receipts.ack(b, acked.clone()).try_submit(&s.services().writer).is_ok());
        }
        s.barrier();
        assert!(s.store.inbox_after(b, 0, 10).unwrap().is_empty());
        let receipts = s.store.inbox_after(a, 0, 10).unwrap();
        assert_eq!(receipts.len(), 1, "the second ack adds no receipt");
        let Message::Receipt(r) = &receipts[0].1 else { panic!() };
        assert_eq!((r.kind, r.peer, r.through), (pb::ReceiptKind::Delivered as i32, b.account, sent.seq));
    }

    /// However many receipts a sender's devices miss, each finds only the
    /// latest per conversation and kind waiting, in the order the latest
    /// ones were made.
    #[test]
    fn only_the_latest_receipt_per_conversation_and_kind_waits_on_every_device() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let a2 = s.link(a.account, 5);
        let b = s.register(2, "").unwrap();
        let c = s.register(3, "").unwrap();
        let last = (1..=3).map(|id| s.send(a, id, b.account).unwrap().seq).max().unwrap();
        let to_c = s.send(a, 4, c.account).unwrap().seq;
        let submit = |op: crate::service::Submission| assert!(op.try_submit(&s.services().writer).is_ok());
        // b acks and reads each message on its own; then c acks its one.
        for (id, m) in s.store.inbox_after(b, 0, 10).unwrap() {
            let Message::Deliver(d) = m else { panic!("{m:?}") };
            submit(s.services().receipts.ack(b, vec![Acked { id, sender: a.account, seq: d.seq, group: 0 }]));
            submit(s.services().receipts.read(b, a.account, d.seq));
        }
        let (id, _) = s.store.inbox_after(c, 0, 10).unwrap()[0].clone();
        submit(s.services().receipts.ack(c, vec![Acked { id, sender: a.account, seq: to_c, group: 0 }]));
        s.barrier();
        let (dl, rd) = (pb::ReceiptKind::Delivered as i32, pb::ReceiptKind::Read as i32);
        for device in [a, a2] {
            let receipts: Vec<(i32, u64, u64)> = s
                .store
                .inbox_after(device, 0, 100)
                .unwrap()
                .into_iter()
                .filter_map(|(_, m)| if let Message::Receipt(r) = m { Some((r.kind, r.peer, r.through)) } else { None })
                .collect();
            assert_eq!(receipts, vec![(dl, b.account, last), (rd, b.account, last), (dl, c.account, to_c)], "{device}");
        }
    }
}
