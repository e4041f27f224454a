//! Sends: a send is recognised if it was stored before (same sending
//! device and client id: the original answer, never a second copy), gets
//! the conversation's next sequence number, and lands in the inbox of
//! every device of the recipient and every other device of the sender.
//! A group send goes to `super::group_send` once the dedup check passed.

use std::collections::HashMap;
use std::future::Future;
use std::time::Instant;

use bytes::Bytes;
use pipit_protocol::message::pb;

pub(super) mod outcome;

pub use outcome::{Digest, SendFailure};

use super::inbox::{enqueue, Pushes};
use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::{unix_now, DeviceAddr};
use crate::route::cluster::Placement;
use crate::store::counters::Counter;
use crate::store::dedup::DedupRecord;
use crate::store::{StorageError, Txn};

type Reply = tokio::sync::oneshot::Sender<Result<pb::Sent, SendFailure>>;

/// Queues sends.
#[derive(Clone)]
pub struct Messaging {
    writer: Writer,
}

impl Messaging {
    pub(crate) fn new(writer: Writer) -> Self {
        Self { writer }
    }

    /// Queues `send` from `from`; the future answers once it is durable
    /// (or refused). A full queue, or storage without room, is refused at
    /// once: nothing was stored and the client retries.
    ///
    /// The content digest is computed here, on the caller's thread, so
    /// that hashing a large payload does not hold up the writer.
    pub fn send(
        &self,
        from: DeviceAddr,
        send: pb::Send,
    ) -> Result<impl Future<Output = Result<pb::Sent, SendFailure>> + Send + 'static, SubmitError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let digest = content_digest(&send);
        let op = SendOp {
            from,
            send,
            digest,
            received: Instant::now(),
            result: None,
            fanout: false,
            stored: false,
            forwarded: None,
            pushes: Pushes::default(),
            reply: tx,
        };
        self.writer.try_submit_new(Box::new(op)).map_err(|r| r.reason)?;
        Ok(async move { rx.await.unwrap_or(Err(SendFailure::Code(pb::ErrorCode::Unavailable))) })
    }
}

struct SendOp {
    from: DeviceAddr,
    send: pb::Send,
    digest: Digest,
    received: Instant,
    result: Option<Result<pb::Sent, SendFailure>>,
    /// A group send that created a fan-out job.
    fanout: bool,
    /// A 1:1 message written (not a retry answered from its dedup record).
    stored: bool,
    /// Queued for the node with this slot (the recipient's owner).
    forwarded: Option<u32>,
    pushes: Pushes,
    reply: Reply,
}

impl Operation<Ctx> for SendOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        self.fanout = false;
        self.stored = false;
        self.forwarded = None;
        let (from, send, digest) = (self.from, &self.send, self.digest);
        // The recipient's owner, when another node: the send is queued
        // for it (store and forward) instead of delivered here.
        let owner = match &ctx.rules.cluster {
            Some(c) if send.group == 0 && send.to != 0 => match c.place(send.to) {
                Placement::Remote(m) | Placement::Down(m) => Some((m.slot, c.outbound_max(), c.retry_after_secs())),
                _ => None,
            },
            _ => None,
        };
        let out = Out { pushes: &mut self.pushes, fanout: &mut self.fanout, stored: &mut self.stored };
        self.result = Some(match owner {
            Some(queue) => store_remote(txn, from, send, digest, queue, out, &mut self.forwarded)?,
            None => store_send(txn, from, send, digest, out)?,
        });
        Ok(())
    }

    fn finish(self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        let result = match outcome {
            Outcome::Durable => {
                let r = self.result.unwrap_or(Err(SendFailure::Code(pb::ErrorCode::Internal)));
                if r.is_ok() {
                    metrics::histogram!("pipit_send_durable_seconds").record(self.received.elapsed().as_secs_f64());
                }
                self.pushes.release(&*ctx.deliveries);
                // Counted here, after the sync: a round that failed and ran
                // again must not count twice.
                match &r {
                    _ if self.stored => metrics::counter!("pipit_messages_stored_total").increment(1),
                    // Answered from its dedup record (a new group send
                    // made a fan-out job instead).
                    Ok(_) if !self.fanout => metrics::counter!("pipit_messages_deduplicated_total").increment(1),
                    Err(SendFailure::Code(pb::ErrorCode::IdReused)) => {
                        metrics::counter!("pipit_messages_id_reused_total").increment(1)
                    }
                    // Only a full outbound queue refuses for now here.
                    Err(SendFailure::Unavailable { .. }) => {
                        metrics::counter!("pipit_forward_queue_full_total").increment(1)
                    }
                    _ => {}
                }
                if self.fanout {
                    metrics::counter!("pipit_group_sends_total").increment(1);
                    ctx.fanout.wake();
                }
                if let Some(slot) = self.forwarded {
                    super::forward::wake(ctx, slot);
                }
                r
            }
            Outcome::Failed(e) if e.is_full() => {
                metrics::counter!("pipit_sends_refused_total", "reason" => "storage_full").increment(1);
                Err(SendFailure::Unavailable { retry_after_secs: super::STORAGE_RETRY_SECS })
            }
            Outcome::Failed(_) => Err(SendFailure::Code(pb::ErrorCode::Internal)),
        };
        let _ = self.reply.send(result);
    }
}

/// The digest of everything in `send` but its id: recipient, group,
/// payload and per-device ciphertexts, each length-prefixed so no two
/// different sends hash the same input. BLAKE2s, truncated: stable across
/// versions (records outlive a binary) and far from colliding by accident.
pub fn content_digest(send: &pb::Send) -> Digest {
    use blake2::Digest as _;
    let mut h = blake2::Blake2s256::new();
    h.update(b"pipit send v1");
    h.update(send.to.to_be_bytes());
    h.update(send.group.to_be_bytes());
    h.update((send.payload.len() as u64).to_be_bytes());
    h.update(&send.payload);
    h.update((send.per_device.len() as u64).to_be_bytes());
    for c in &send.per_device {
        h.update(c.account.to_be_bytes());
        h.update(c.device.to_be_bytes());
        h.update((c.payload.len() as u64).to_be_bytes());
        h.update(&c.payload);
    }
    let full = h.finalize();
    let mut d = [0u8; 8];
    d.copy_from_slice(&full[..8]);
    d
}

/// What storing a send produced besides its answer.
struct Out<'a> {
    pushes: &'a mut Pushes,
    fanout: &'a mut bool,
    stored: &'a mut bool,
}

type Stored = Result<Result<pb::Sent, SendFailure>, StorageError>;

/// The checks every send passes first: a retry gets its original answer
/// (even if the request would now be refused), then the shape and size.
/// `Some`: the answer, nothing more to do.
fn precheck(txn: &mut Txn<'_>, from: DeviceAddr, send: &pb::Send, digest: Digest) -> Option<Stored> {
    let fail = |c| Some(Ok(Err(SendFailure::Code(c))));
    let dedup = match txn.dedup(from, send.id) {
        Ok(d) => d,
        Err(e) => return Some(Err(e)),
    };
    if let Some(r) = dedup {
        // Records written before digests were kept match any content.
        if r.digest.is_some_and(|d| d != digest) {
            return fail(pb::ErrorCode::IdReused);
        }
        return Some(Ok(Ok(pb::Sent { id: send.id, seq: r.seq, time: r.time })));
    }
    if send.id == 0 || (send.to == 0) == (send.group == 0) {
        // The connection refuses these before a send gets here.
        return fail(pb::ErrorCode::BadRequest);
    }
    if send.to != 0 && !send.payload.is_empty() && !send.per_device.is_empty() {
        // A 1:1 send is one payload for every device or one ciphertext per
        // device, never both: each device gets one of them, so the other
        // would reach nobody (SPEC.md 5.1).
        return fail(pb::ErrorCode::BadRequest);
    }
    // What the recipient gets must fit a packet; a payload that would not
    // is refused now rather than stored to block the recipient's inbox.
    if pipit_protocol::message::check_send(send).is_err() {
        return fail(pb::ErrorCode::TooLarge);
    }
    None
}

fn store_send(txn: &mut Txn<'_>, from: DeviceAddr, send: &pb::Send, digest: Digest, out: Out<'_>) -> Stored {
    let fail = |c| Ok(Err(SendFailure::Code(c)));
    if let Some(answer) = precheck(txn, from, send, digest) {
        return answer;
    }
    let Out { pushes, fanout, stored } = out;
    if send.group != 0 {
        return super::group_send::store(txn, from, send, digest, fanout);
    }
    let Some(recipient) = txn.account(send.to)? else {
        return fail(pb::ErrorCode::NotFound);
    };
    let Some(own) = txn.account(from.account)? else {
        return fail(pb::ErrorCode::UnknownDevice);
    };
    let targets: Vec<(DeviceAddr, bool)> = recipient
        .devices
        .iter()
        .map(|d| (DeviceAddr::new(send.to, d.device), false))
        // A note to self reaches the account's other devices only.
        .filter(|(a, _)| *a != from)
        .chain(
            own.devices
                .iter()
                .filter(|d| d.device != from.device && from.account != send.to)
                .map(|d| (DeviceAddr::new(from.account, d.device), true)),
        )
        .collect();
    // Per-device ciphertexts must name exactly the target devices.
    let mut per_device: HashMap<DeviceAddr, Bytes> = HashMap::new();
    if !send.per_device.is_empty() {
        for c in &send.per_device {
            let account = if c.account == 0 { send.to } else { c.account };
            per_device.insert(DeviceAddr::new(account, c.device), c.payload.clone());
        }
        let missing: Vec<pb::DeviceRef> = targets
            .iter()
            .filter(|(a, _)| !per_device.contains_key(a))
            .map(|(a, _)| pb::DeviceRef { account: a.account, device: a.device })
            .collect();
        let extra: Vec<pb::DeviceRef> = per_device
            .keys()
            .filter(|a| !targets.iter().any(|(t, _)| t == *a))
            .map(|a| pb::DeviceRef { account: a.account, device: a.device })
            .collect();
        if !missing.is_empty() || !extra.is_empty() {
            return Ok(Err(SendFailure::Mismatch(pb::DeviceMismatch { id: send.id, missing, extra })));
        }
    }
    let now = unix_now();
    let seq = txn.next(Counter::conversation(from.account, send.to))?;
    for (to, own_copy) in targets {
        let payload = per_device.remove(&to).unwrap_or_else(|| send.payload.clone());
        let deliver = pb::Deliver {
            inbox: 0,
            from: from.account,
            from_device: from.device,
            seq,
            time: now,
            payload,
            peer: if own_copy { send.to } else { 0 },
            group: 0,
            device_payload: Bytes::new(),
        };
        enqueue(txn, to, deliver.into(), pushes)?;
    }
    txn.put_dedup(from, send.id, DedupRecord { seq, time: now, digest: Some(digest) });
    *stored = true;
    Ok(Ok(pb::Sent { id: send.id, seq, time: now }))
}

/// A 1:1 send to an account that the node with `slot` owns (at most `max`
/// entries waiting for it, else refused with `retry_after_secs`): stored here
/// as an outbound entry to that node, with the copies for the sender's
/// other devices and the dedup record, all in one commit, so "sent" means
/// durable here. The owner delivers it when the entry arrives.
///
/// Its sequence number comes from this direction's own counter, the
/// sender's node being its only writer: `2k` when the sender's account id
/// is the lower one, `2k + 1` otherwise, so the two directions, numbered
/// on two nodes, never collide (SPEC.md 5.11).
fn store_remote(
    txn: &mut Txn<'_>,
    from: DeviceAddr,
    send: &pb::Send,
    digest: Digest,
    (slot, max, retry_after_secs): (u32, u64, u32),
    out: Out<'_>,
    forwarded: &mut Option<u32>,
) -> Stored {
    if let Some(answer) = precheck(txn, from, send, digest) {
        return answer;
    }
    // Bounded: past `max` waiting for that node, refuse (nothing stored,
    // the client retries) rather than grow the queue without end.
    let queued = txn.counter(Counter::OutboundNext(slot))?.saturating_sub(1);
    if queued.saturating_sub(txn.counter(Counter::OutboundAcked(slot))?) >= max {
        return Ok(Err(SendFailure::Unavailable { retry_after_secs }));
    }
    if !send.per_device.is_empty() {
        // Needs the recipient's device list, which its owner holds: not
        // offered across nodes yet.
        return Ok(Err(SendFailure::Code(pb::ErrorCode::NotSupported)));
    }
    let Some(own) = txn.account(from.account)? else {
        return Ok(Err(SendFailure::Code(pb::ErrorCode::UnknownDevice)));
    };
    let now = unix_now();
    let k = txn.next(Counter::Direction { from: from.account, to: send.to })?;
    let seq = 2 * k + u64::from(from.account > send.to);
    for d in own.devices.iter().filter(|d| d.device != from.device) {
        let deliver = pb::Deliver {
            inbox: 0,
            from: from.account,
            from_device: from.device,
            seq,
            time: now,
            payload: send.payload.clone(),
            peer: send.to,
            group: 0,
            device_payload: Bytes::new(),
        };
        enqueue(txn, DeviceAddr::new(from.account, d.device), deliver.into(), out.pushes)?;
    }
    let forward = pipit_protocol::node::pb::ForwardedSend {
        from_account: from.account,
        from_device: from.device,
        to: send.to,
        seq,
        time: now,
        payload: send.payload.clone(),
    };
    let forward = pipit_protocol::node::pb::Forward { entry: 0, send: Some(forward), receipt: None };
    super::forward::queue(txn, slot, forward)?;
    txn.put_dedup(from, send.id, DedupRecord { seq, time: now, digest: Some(digest) });
    *out.stored = true;
    *forwarded = Some(slot);
    Ok(Ok(pb::Sent { id: send.id, seq, time: now }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::settings::Registration;
    use crate::service::testing::setup;
    use crate::store::Table;

    #[test]
    fn sends_get_sequence_numbers_inbox_ids_and_dedup() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        assert_eq!((a.account, b.account), (1, 2));
        assert_eq!(s.register(1, "").unwrap(), a, "re-registration is idempotent");
        let s1 = s.send(a, 10, b.account).unwrap();
        let s2 = s.send(b, 10, a.account).unwrap();
        assert_eq!((s1.seq, s2.seq), (1, 2), "one sequence per conversation, both directions");
        assert_eq!(s.send(a, 10, b.account).unwrap(), s1, "a retry gets the original answer");
        let inbox = s.store.inbox_after(b, 0, 10).unwrap();
        assert_eq!(inbox.len(), 1, "stored once");
        assert_eq!(inbox[0].0, 1);
        assert_eq!(s.pushed.0.lock().unwrap().len(), 2);
        assert_eq!(s.send(a, 11, 999), Err(SendFailure::Code(pb::ErrorCode::NotFound)));
    }

    #[test]
    fn the_same_id_with_other_content_is_refused_and_nothing_is_stored() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let first = s.send_payload(a, 5, b.account, b"first").unwrap();
        assert_eq!(s.send_payload(a, 5, b.account, b"first").unwrap(), first, "a retry");
        assert_eq!(s.send_payload(a, 5, b.account, b"other"), Err(SendFailure::Code(pb::ErrorCode::IdReused)));
        assert_eq!(
            s.send_payload(a, 5, 999, b"first"),
            Err(SendFailure::Code(pb::ErrorCode::IdReused)),
            "other recipient"
        );
        let inbox = s.store.inbox_after(b, 0, 10).unwrap();
        assert_eq!(inbox.len(), 1, "only the first was stored: {inbox:?}");
        // The digest covers every part of the content.
        let base = pb::Send { id: 1, to: 2, payload: bytes::Bytes::from_static(b"p"), ..Default::default() };
        let variants = [
            pb::Send { id: 9, ..base.clone() },
            pb::Send { to: 3, ..base.clone() },
            pb::Send { payload: bytes::Bytes::from_static(b"q"), ..base.clone() },
            pb::Send {
                per_device: vec![pb::DeviceCiphertext { account: 0, device: 1, payload: bytes::Bytes::new() }],
                ..base.clone()
            },
        ];
        assert_eq!(content_digest(&variants[0]), content_digest(&base), "the id is not content");
        for v in &variants[1..] {
            assert_ne!(content_digest(v), content_digest(&base), "{v:?}");
        }
    }

    /// A send that fails half way through its fan-out (here: a corrupt
    /// inbox counter of the recipient's second device) must leave nothing
    /// behind, so that its retry is stored exactly once, with the first
    /// sequence number.
    #[test]
    fn a_send_that_fails_part_way_leaves_nothing_and_its_retry_is_stored_once() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let link = s.services().accounts.link(b, pipit_protocol::PublicKey([3; 32]), "tablet".into());
        let b2 = DeviceAddr::new(b.account, s.rt.block_on(link.unwrap()).unwrap());
        // Plant a corrupt counter for b's second device: reading it fails
        // after the first device's entry was already staged.
        let mut key = b"i".to_vec();
        key.extend_from_slice(&b2.account.to_be_bytes());
        key.extend_from_slice(&b2.device.to_be_bytes());
        s.store.put_raw(Table::Counters, &key, b"bad");
        assert_eq!(s.send(a, 1, b.account), Err(SendFailure::Code(pb::ErrorCode::Internal)));
        // The disk is repaired; the client retries the same message.
        s.store.put_raw(Table::Counters, &key, &1u64.to_be_bytes());
        let sent = s.send(a, 1, b.account).unwrap();
        assert_eq!(sent.seq, 1, "the failed attempt consumed no sequence number");
        let first = s.store.inbox_after(b, 0, 10).unwrap();
        assert_eq!(first.len(), 1, "stored once on the first device: {first:?}");
        assert_eq!(s.store.inbox_after(b2, 0, 10).unwrap().len(), 1);
    }
}
