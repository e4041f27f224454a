//! Expiry: an inbox entry undelivered after the TTL is deleted and its
//! sender told (`Expired`); an entry of an unlinked device (an unlink that
//! stopped part way) is deleted whatever its age; dedup records go after the same time (a retry
//! is expected within the time a message may wait, not after), and so do
//! `GroupCreate` records and the receipt counts of group messages. A group entry's body goes with
//! the last of its references, expired or acked.
//!
//! A sweep is a series of bounded rounds, each one writer operation that
//! reads at most [`SCAN_MAX`] entries and deletes at most
//! [`DELETE_MAX`], so writes queued behind it wait only that long.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use super::inbox::{enqueue, Pushes};
use super::{Ctx, Submission, Writer};
use crate::commit::{Operation, Outcome};
use crate::model::{unix_now, DeviceAddr};
use crate::store::inbox::InboxEntry;
use crate::store::{StorageError, Txn};

/// Most entries one round reads (inbox, dedup, group counts and group
/// creates each).
pub const SCAN_MAX: usize = 50_000;
/// Most entries one round deletes.
pub const DELETE_MAX: usize = 4_096;

/// Where the next round resumes each scan; a sweep ends when all of them
/// are done, and the next sweep starts them over.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct Cursor {
    inbox: Scan<(DeviceAddr, u64)>,
    dedup: Scan<(DeviceAddr, u64)>,
    group_counts: Scan<(u64, u64)>,
    group_creates: Scan<(DeviceAddr, u64)>,
}

/// One scan's place in a sweep.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum Scan<K> {
    #[default]
    Start,
    At(K),
    /// Reached the end in this sweep: not read again until the others
    /// finish (a scan that finished early would otherwise start over in
    /// every round the others still need).
    Done,
}

impl<K: Copy> Scan<K> {
    /// Runs `round` from this place unless the scan is done; where the
    /// next round resumes.
    fn run(self, round: impl FnOnce(Option<K>) -> Result<Option<K>, StorageError>) -> Result<Scan<K>, StorageError> {
        let from = match self {
            Scan::Done => return Ok(Scan::Done),
            Scan::Start => None,
            Scan::At(k) => Some(k),
        };
        Ok(round(from)?.map_or(Scan::Done, Scan::At))
    }
}

/// What one expiry round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryRound {
    /// Entries deleted.
    pub expired: usize,
    /// Every scan reached the end.
    pub finished: bool,
}

/// One round of a sweep at time `now`.
pub(crate) struct ExpireOp {
    now: u64,
    next: Cursor,
    round: ExpiryRound,
    pushes: Pushes,
    reply: Option<oneshot::Sender<ExpiryRound>>,
}

impl ExpireOp {
    pub(crate) fn new(now: u64, reply: oneshot::Sender<ExpiryRound>) -> Self {
        Self {
            now,
            next: Cursor::default(),
            round: ExpiryRound { expired: 0, finished: false },
            pushes: Pushes::default(),
            reply: Some(reply),
        }
    }
}

impl Operation<Ctx> for ExpireOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        let cutoff = self.now.saturating_sub(ctx.rules.ttl_secs);
        let mut expired = 0;
        let pushes = &mut self.pushes;
        let inbox = ctx.expiry.inbox.run(|from| {
            let (n, next) = expire_inbox(txn, from, cutoff, pushes)?;
            expired = n;
            Ok(next)
        })?;
        let dedup = ctx.expiry.dedup.run(|from| expire_dedup(txn, from, cutoff))?;
        let group_counts = ctx.expiry.group_counts.run(|from| expire_group_counts(txn, from, cutoff))?;
        let group_creates = ctx.expiry.group_creates.run(|from| expire_group_creates(txn, from, cutoff))?;
        let finished =
            inbox == Scan::Done && dedup == Scan::Done && group_counts == Scan::Done && group_creates == Scan::Done;
        self.next = if finished { Cursor::default() } else { Cursor { inbox, dedup, group_counts, group_creates } };
        self.round = ExpiryRound { expired, finished };
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let Outcome::Durable = outcome {
            ctx.expiry = self.next;
            metrics::counter!("pipit_messages_expired_total").increment(self.round.expired as u64);
            std::mem::take(&mut self.pushes).release(&*ctx.deliveries);
        } else {
            self.round = ExpiryRound { expired: 0, finished: true };
        }
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(self.round);
        }
    }
}

/// Deletes inbox entries older than `cutoff`; returns how many and where
/// the next round resumes (`None`: the scan reached the end).
fn expire_inbox(
    txn: &mut Txn<'_>,
    from: Option<(DeviceAddr, u64)>,
    cutoff: u64,
    pushes: &mut Pushes,
) -> Result<(usize, Option<(DeviceAddr, u64)>), StorageError> {
    // (sender, 1:1 peer, group, seq) -> devices it expired on.
    let mut notices: HashMap<(u64, u64, u64, u64), u32> = HashMap::new();
    let mut doomed = Vec::new();
    let mut resume = None;
    // The device of the entries being read, and whether it is still linked.
    let mut known: Option<(DeviceAddr, bool)> = None;
    for (scanned, item) in txn.store().inbox_scan(from).enumerate() {
        let item = item?;
        if scanned >= SCAN_MAX || doomed.len() >= DELETE_MAX {
            resume = Some((item.addr, item.id));
            break;
        }
        let Ok(entry) = item.entry else {
            continue;
        };
        let is_ref = matches!(entry, InboxEntry::GroupRef(_));
        if known.is_none_or(|(addr, _)| addr != item.addr) {
            let linked = txn
                .store()
                .account(item.addr.account)?
                .is_some_and(|a| a.devices.iter().any(|d| d.device == item.addr.device));
            known = Some((item.addr, linked));
        }
        if known.is_some_and(|(_, linked)| !linked) {
            // Left by an unlink that stopped part way: nobody to tell.
            doomed.push((item.addr, item.id, is_ref));
            continue;
        }
        let time = entry.time();
        if time == 0 || time > cutoff {
            continue;
        }
        doomed.push((item.addr, item.id, is_ref));
        match &entry {
            InboxEntry::Message(Message::Deliver(d)) if d.from != item.addr.account => {
                *notices.entry((d.from, item.addr.account, 0, d.seq)).or_default() += 1;
            }
            InboxEntry::GroupRef(r) if !r.notice && r.from != item.addr.account => {
                *notices.entry((r.from, 0, r.group, r.seq)).or_default() += 1;
            }
            _ => {}
        }
    }
    for &(addr, id, is_ref) in &doomed {
        if !is_ref {
            txn.delete_inbox(addr, id);
        } else if let Some(r) = txn.take_inbox_ref(addr, id)? {
            txn.release_group_body(r.group, r.seq)?;
        }
    }
    for ((sender, peer, group, seq), devices) in notices {
        let Some(account) = txn.account(sender)? else {
            continue;
        };
        for d in &account.devices {
            let e = pb::Expired { peer, group, seq, devices, inbox: 0 };
            enqueue(txn, DeviceAddr::new(sender, d.device), e.into(), pushes)?;
        }
    }
    Ok((doomed.len(), resume))
}

fn expire_dedup(
    txn: &mut Txn<'_>,
    from: Option<(DeviceAddr, u64)>,
    cutoff: u64,
) -> Result<Option<(DeviceAddr, u64)>, StorageError> {
    let mut doomed = Vec::new();
    let mut resume = None;
    for (i, item) in txn.store().dedup_scan(from).enumerate() {
        let (k, r) = item?;
        if i >= SCAN_MAX {
            resume = Some(k);
            break;
        }
        if r.time <= cutoff {
            doomed.push(k);
        }
    }
    for (addr, id) in doomed {
        txn.delete_dedup(addr, id);
    }
    Ok(resume)
}

/// Forgets `GroupCreate` records older than `cutoff`, as dedup records.
fn expire_group_creates(
    txn: &mut Txn<'_>,
    from: Option<(DeviceAddr, u64)>,
    cutoff: u64,
) -> Result<Option<(DeviceAddr, u64)>, StorageError> {
    let mut doomed = Vec::new();
    let mut resume = None;
    for (i, item) in txn.store().group_creates_scan(from).enumerate() {
        let (k, r) = item?;
        if i >= SCAN_MAX {
            resume = Some(k);
            break;
        }
        if r.time <= cutoff {
            doomed.push(k);
        }
    }
    for (addr, id) in doomed {
        txn.delete_group_create(addr, id);
    }
    Ok(resume)
}

/// Forgets the receipt counts of group messages older than `cutoff`.
fn expire_group_counts(
    txn: &mut Txn<'_>,
    from: Option<(u64, u64)>,
    cutoff: u64,
) -> Result<Option<(u64, u64)>, StorageError> {
    let mut doomed = Vec::new();
    let mut resume = None;
    for (i, item) in txn.store().group_counts_scan(from).enumerate() {
        let (k, c) = item?;
        if i >= SCAN_MAX {
            resume = Some(k);
            break;
        }
        if c.time <= cutoff {
            doomed.push((k, c.sender));
        }
    }
    for ((group, seq), sender) in doomed {
        super::group_receipts::forget(txn, group, seq, sender)?;
    }
    Ok(resume)
}

/// Drops inbox entry `id` of `device`, which no connection can deliver
/// (a `Deliver` larger than a packet: stored by a server that checked
/// payloads against the `Send` and not against the `Deliver` it becomes),
/// and tells its sender it expired on that device. Left in place it would
/// close the device's connection at every login and block every entry
/// after it; the caller moves past it at once and logs it.
pub fn undeliverable(device: DeviceAddr, id: u64, entry: &Message) -> Submission {
    let (sender, seq) = match entry {
        Message::Deliver(d) if d.from != device.account && d.group == 0 => (d.from, d.seq),
        _ => (0, 0),
    };
    Submission(Box::new(UndeliverableOp { device, id, sender, seq, pushes: Pushes::default() }))
}

struct UndeliverableOp {
    device: DeviceAddr,
    id: u64,
    /// The account to tell, or 0 (an own-device copy, or not a message).
    sender: u64,
    seq: u64,
    pushes: Pushes,
}

impl Operation<Ctx> for UndeliverableOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.pushes = Pushes::default();
        // A group entry is a reference: its body's count drops with it.
        match txn.take_inbox_ref(self.device, self.id)? {
            Some(r) => txn.release_group_body(r.group, r.seq)?,
            None => txn.delete_inbox(self.device, self.id),
        }
        if self.sender == 0 {
            return Ok(());
        }
        let Some(account) = txn.account(self.sender)? else {
            return Ok(());
        };
        for d in &account.devices {
            let e = pb::Expired { peer: self.device.account, group: 0, seq: self.seq, devices: 1, inbox: 0 };
            enqueue(txn, DeviceAddr::new(self.sender, d.device), e.into(), &mut self.pushes)?;
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let Outcome::Durable = outcome {
            metrics::counter!("pipit_messages_expired_total").increment(1);
            std::mem::take(&mut self.pushes).release(&*ctx.deliveries);
        }
    }
}

/// Runs an expiry sweep every `every` until `stop`, on its own thread.
pub fn spawn_sweeper(writer: Writer, every: Duration, stop: CancellationToken) -> std::io::Result<()> {
    std::thread::Builder::new().name("pipit-expiry".into()).spawn(move || loop {
        let deadline = Instant::now() + every;
        while Instant::now() < deadline {
            if stop.is_cancelled() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100).min(every));
        }
        loop {
            let (tx, rx) = oneshot::channel();
            let op = Box::new(ExpireOp::new(unix_now(), tx));
            if writer.submit_blocking(op, Duration::from_secs(60)).is_err() {
                break;
            }
            match rx.blocking_recv() {
                Ok(round) => {
                    if round.expired > 0 {
                        tracing::info!(expired = round.expired, "expiry sweep");
                    }
                    if round.finished || stop.is_cancelled() {
                        break;
                    }
                }
                Err(_) => return,
            }
        }
    })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::settings::Registration;
    use crate::service::testing::setup;

    #[test]
    fn expiry_deletes_old_entries_and_tells_the_sender() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let sent = s.send(a, 1, b.account).unwrap();
        assert_eq!(s.expire(unix_now() + 101), ExpiryRound { expired: 1, finished: true });
        assert!(s.store.inbox_after(b, 0, 10).unwrap().is_empty());
        let notices = s.store.inbox_after(a, 0, 10).unwrap();
        let Message::Expired(e) = &notices[0].1 else { panic!("{notices:?}") };
        assert_eq!((e.peer, e.seq, e.devices), (b.account, sent.seq, 1));
        // The dedup record went with it: the same id is now a new message.
        let again = s.send(a, 1, b.account).unwrap();
        assert_ne!(again.seq, sent.seq);
    }

    /// A `GroupCreate`'s record lasts as long as a dedup record: until it
    /// goes a retry gets the same group, after that the id is new again.
    #[test]
    fn group_create_records_answer_retries_until_they_expire() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let create = |id, members: Vec<u64>| {
            let created = s.services().groups.create(a, id, bytes::Bytes::from_static(b"g"), members);
            s.rt.block_on(created.unwrap())
        };
        let first = create(7, vec![b.account]).unwrap();
        assert_eq!(create(7, vec![b.account]).unwrap(), first, "the original answer");
        assert_eq!(create(7, vec![]), Err(pb::ErrorCode::IdReused));
        assert_ne!(create(0, vec![b.account]).unwrap().group, create(0, vec![b.account]).unwrap().group);
        s.expire(unix_now() + 101);
        assert_ne!(create(7, vec![]).unwrap().group, first.group, "forgotten: a new create");
    }

    /// A scan that reached the end is not read again while the others
    /// still need rounds; the next sweep starts every scan over.
    #[test]
    fn a_finished_scan_waits_for_the_others() {
        let mut calls = Vec::new();
        let mut step = |scan: Scan<u64>, next: Option<u64>| {
            scan.run(|from| {
                calls.push(from);
                Ok(next)
            })
            .unwrap()
        };
        assert_eq!(step(Scan::Start, Some(5)), Scan::At(5));
        assert_eq!(step(Scan::At(5), None), Scan::Done);
        assert_eq!(step(Scan::Done, Some(9)), Scan::Done);
        assert_eq!(calls, vec![None, Some(5)], "a done scan is not run");
    }
}
