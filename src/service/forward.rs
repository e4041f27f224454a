//! Store and forward between cluster nodes, the product side.
//!
//! A send to an account another node owns is made durable here first, as
//! an entry of the outbound queue to that node (`store::outbound`),
//! in the same commit as the sender's dedup record and its own devices'
//! copies; only then is the sender told "sent". The link to that node
//! (`net::nodes`) forwards entries in order; the owner applies each one
//! exactly once (one mark per origin node: entries apply in order), puts
//! it in the recipient's inboxes and acknowledges; only then is the entry
//! deleted here. A crash on either side between store and acknowledge
//! sends the entry again and the owner's mark answers it without storing
//! it twice.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::node::pb as node_pb;
use prost::Message as _;
use tokio::sync::{oneshot, Notify};

use super::inbox::{enqueue, Pushes};
use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::DeviceAddr;
use crate::store::counters::Counter;
use crate::store::{StorageError, Store, Txn};

/// Entries one acknowledgement may delete in one commit; the rest go with
/// the next (a peer never has more than its in-flight bound outstanding).
const MAX_DELETES_PER_ACK: u64 = 4_096;

/// One wake-up per destination node: the link to it waits on it for new
/// entries.
#[derive(Default)]
pub struct Wakes {
    by_slot: Mutex<HashMap<u32, Arc<Notify>>>,
}

impl Wakes {
    fn get(&self, slot: u32) -> Arc<Notify> {
        self.by_slot.lock().unwrap_or_else(|e| e.into_inner()).entry(slot).or_default().clone()
    }
}

/// The handle the node links use.
#[derive(Clone)]
pub struct Forward {
    writer: Writer,
    store: Arc<Store>,
    wakes: Arc<Wakes>,
}

/// What applying a forwarded entry came to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Applied {
    /// Durable here; acknowledge everything up to this entry.
    Through(u64),
    /// Past a gap: not applied; acknowledge up to this (the last applied).
    Gap(u64),
}

impl Forward {
    pub(crate) fn new(writer: Writer, store: Arc<Store>, wakes: Arc<Wakes>) -> Self {
        Self { writer, store, wakes }
    }

    /// Notified whenever new entries for the node with `slot` are durable.
    pub fn wakeup(&self, slot: u32) -> Arc<Notify> {
        self.wakes.get(slot)
    }

    /// Entries for `slot` after `after`, in order: at most `limit`, and
    /// about `max_bytes` (at least one).
    pub async fn pending(
        &self,
        slot: u32,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.outbound_after(slot, after, limit, max_bytes)).await
    }

    /// The highest entry `slot` has acknowledged.
    pub async fn acked(&self, slot: u32) -> Result<u64, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.counter(Counter::OutboundAcked(slot))).await
    }

    /// Entries queued for `slot` and not yet acknowledged.
    pub fn depth_blocking(&self, slot: u32) -> Result<u64, StorageError> {
        let next = self.store.counter(Counter::OutboundNext(slot))?;
        let acked = self.store.counter(Counter::OutboundAcked(slot))?;
        Ok(next.saturating_sub(1).saturating_sub(acked))
    }

    /// `slot` acknowledged every entry up to `through`: deletes them.
    /// Waits for room in the writer's queue (never dropped).
    pub async fn acknowledge(&self, slot: u32, through: u64) -> Result<(), SubmitError> {
        self.writer.submit(Box::new(Acknowledge { slot, through })).await
    }

    /// Applies `forward` from the node with slot `origin`; waits for room
    /// in the writer's queue, then answers once durable.
    pub async fn apply(
        &self,
        origin: u32,
        forward: node_pb::Forward,
    ) -> Result<impl Future<Output = Result<Applied, ()>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = Apply { origin, forward, result: None, applied: false, pushes: Pushes::default(), reply: Some(tx) };
        self.writer.submit(Box::new(op)).await?;
        Ok(async move { rx.await.unwrap_or(Err(())) })
    }
}

/// Stages `forward` (its `entry` is set here) as the next outbound entry
/// to the node with `slot`; its wake-up is due once the commit is durable.
pub(crate) fn queue(txn: &mut Txn<'_>, slot: u32, mut forward: node_pb::Forward) -> Result<u64, StorageError> {
    let entry = txn.next(Counter::OutboundNext(slot))?;
    forward.entry = entry;
    txn.put_outbound(slot, entry, &forward.encode_to_vec());
    Ok(entry)
}

/// Decodes a queued entry as read by [`Forward::pending`].
pub fn decode_entry(bytes: Bytes) -> Result<node_pb::Forward, StorageError> {
    node_pb::Forward::decode(bytes).map_err(|_| StorageError::Corrupt("outbound"))
}

/// Tells the link to `slot` that entries wait (after the commit).
pub(crate) fn wake(ctx: &Ctx, slot: u32) {
    ctx.wakes.get(slot).notify_one();
}

struct Acknowledge {
    slot: u32,
    through: u64,
}

impl Operation<Ctx> for Acknowledge {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        let acked = txn.counter(Counter::OutboundAcked(self.slot))?;
        // Never past what was queued, whatever the peer says.
        let queued = txn.counter(Counter::OutboundNext(self.slot))?.saturating_sub(1);
        let through = self.through.min(queued).min(acked.saturating_add(MAX_DELETES_PER_ACK));
        if through <= acked {
            return Ok(());
        }
        for entry in acked + 1..=through {
            txn.delete_outbound(self.slot, entry);
        }
        txn.set_counter(Counter::OutboundAcked(self.slot), through);
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        if let Outcome::Failed(e) = outcome {
            // The entries stay; the next acknowledgement deletes them.
            tracing::warn!(error = %e, slot = self.slot, "deleting acknowledged forwards failed");
        }
    }
}

/// Puts a forwarded message in every device inbox of its recipient.
fn deliver(txn: &mut Txn<'_>, s: &node_pb::ForwardedSend, pushes: &mut Pushes) -> Result<(), StorageError> {
    let Some(recipient) = txn.account(s.to)? else {
        // The sender's node placed the account here, but it does not
        // exist: nothing to deliver. Applied all the same, or the queue
        // behind it would wait forever.
        tracing::warn!(to = s.to, from = s.from_account, "forwarded message for an unknown account dropped");
        metrics::counter!("pipit_forwards_dropped_total").increment(1);
        return Ok(());
    };
    for d in &recipient.devices {
        let deliver = pb::Deliver {
            inbox: 0,
            from: s.from_account,
            from_device: s.from_device,
            seq: s.seq,
            time: s.time,
            payload: s.payload.clone(),
            peer: 0,
            group: 0,
            device_payload: Bytes::new(),
        };
        enqueue(txn, DeviceAddr::new(s.to, d.device), deliver.into(), pushes)?;
    }
    Ok(())
}

struct Apply {
    origin: u32,
    forward: node_pb::Forward,
    result: Option<Applied>,
    /// Stored now (not a duplicate, not past a gap).
    applied: bool,
    pushes: Pushes,
    reply: Option<oneshot::Sender<Result<Applied, ()>>>,
}

impl Operation<Ctx> for Apply {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        self.applied = false;
        let mark = txn.counter(Counter::InboundMark(self.origin))?;
        if self.forward.entry <= mark {
            metrics::counter!("pipit_forwards_deduplicated_total").increment(1);
            self.result = Some(Applied::Through(mark));
            return Ok(());
        }
        if self.forward.entry != mark + 1 {
            self.result = Some(Applied::Gap(mark));
            return Ok(());
        }
        match (&self.forward.send, &self.forward.receipt) {
            (Some(s), None) => deliver(txn, s, &mut self.pushes)?,
            (None, Some(r)) => {
                let receipt = pb::Receipt {
                    kind: i32::try_from(r.kind).unwrap_or(0),
                    peer: r.peer,
                    through: r.through,
                    time: r.time,
                    ..Default::default()
                };
                super::receipts::deliver_receipt(txn, r.to, receipt, &mut self.pushes)?;
            }
            _ => {
                // Neither or both: a peer that breaks the rules. Applied as
                // nothing, so that the queue behind it moves on.
                tracing::warn!(entry = self.forward.entry, "malformed forward dropped");
                metrics::counter!("pipit_forwards_dropped_total").increment(1);
            }
        }
        txn.set_counter(Counter::InboundMark(self.origin), self.forward.entry);
        self.result = Some(Applied::Through(self.forward.entry));
        self.applied = true;
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        let r = match outcome {
            Outcome::Durable => {
                self.pushes.release(&*ctx.deliveries);
                if self.applied {
                    metrics::counter!("pipit_forwards_applied_total").increment(1);
                }
                self.result.ok_or(())
            }
            Outcome::Failed(_) => Err(()),
        };
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::settings::Registration;
    use crate::service::testing::setup;

    fn fwd(entry: u64, to: u64, seq: u64) -> node_pb::Forward {
        let send = node_pb::ForwardedSend {
            from_account: 9_000,
            from_device: 0,
            to,
            seq,
            time: 1,
            payload: Bytes::from(format!("m{seq}")),
        };
        node_pb::Forward { entry, send: Some(send), receipt: None }
    }

    #[test]
    fn entries_apply_once_and_in_order() {
        let s = setup(Registration::Open);
        let b = s.register(1, "").unwrap();
        let f = s.services().forward.clone();
        let apply = |entry, seq| s.rt.block_on(async { f.apply(3, fwd(entry, b.account, seq)).await.unwrap().await });
        assert_eq!(apply(1, 2), Ok(Applied::Through(1)));
        assert_eq!(apply(1, 2), Ok(Applied::Through(1)), "a repeat is acknowledged, not stored again");
        assert_eq!(apply(3, 6), Ok(Applied::Gap(1)), "past a gap: not applied");
        assert_eq!(apply(2, 4), Ok(Applied::Through(2)));
        assert_eq!(apply(3, 6), Ok(Applied::Through(3)), "sent again after the gap");
        // Another origin has its own mark.
        assert_eq!(
            s.rt.block_on(async { f.apply(4, fwd(1, b.account, 8)).await.unwrap().await }),
            Ok(Applied::Through(1))
        );
        let seqs: Vec<u64> = s
            .store
            .inbox_after(b, 0, 10)
            .unwrap()
            .into_iter()
            .map(|(_, m)| match m {
                pipit_protocol::Message::Deliver(d) => d.seq,
                other => panic!("{other:?}"),
            })
            .collect();
        assert_eq!(seqs, [2, 4, 6, 8]);
    }

    #[test]
    fn an_acknowledgement_deletes_what_it_covers_and_no_more() {
        let s = setup(Registration::Open);
        let f = s.services().forward.clone();
        // Queue three entries for slot 5, as a send to its account would.
        struct Queue(u64);
        impl Operation<Ctx> for Queue {
            fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
                assert_eq!(queue(txn, 5, fwd(0, 1, self.0))?, self.0);
                Ok(())
            }
            fn finish(self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {}
        }
        for seq in 1..=3 {
            s.rt.block_on(s.services().writer.submit(Box::new(Queue(seq)))).unwrap();
        }
        s.rt.block_on(s.services().writer.barrier()).unwrap();
        assert_eq!(f.depth_blocking(5).unwrap(), 3);
        s.rt.block_on(f.acknowledge(5, 2)).unwrap();
        s.rt.block_on(s.services().writer.barrier()).unwrap();
        assert_eq!(f.depth_blocking(5).unwrap(), 1);
        let left = s.rt.block_on(f.pending(5, 0, 10, 1 << 20)).unwrap();
        assert_eq!(left.iter().map(|(e, _)| *e).collect::<Vec<_>>(), [3]);
        // An acknowledgement past what was queued deletes only what was.
        s.rt.block_on(f.acknowledge(5, 99)).unwrap();
        s.rt.block_on(s.services().writer.barrier()).unwrap();
        assert_eq!(f.depth_blocking(5).unwrap(), 0);
        assert!(s.rt.block_on(f.pending(5, 0, 10, 1 << 20)).unwrap().is_empty());
    }
}
