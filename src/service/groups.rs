//! Groups: creating one, adding, removing, leaving, listing.
//!
//! The creator is the first admin; only admins add or remove; any member
//! may leave; when the last admin goes, the oldest remaining member (the
//! earliest to join) becomes admin. A group holds at most
//! `Rules::max_group_members` accounts.
//!
//! Every change takes the group's next seq, the sequence its messages
//! use too, and becomes a change notice (`GroupInfo`) stored once and
//! fanned out to every member device like a message (`super::fanout`), so
//! each member sees changes and messages in one order. Who receives entry
//! `seq` is decided by the seqs at which members joined and left
//! ([`receives`]), never by who is a member when the fan-out runs: a
//! member removed before a message never gets it, a member added after it
//! never does either.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use pipit_protocol::limits::{MAX_NAME_LEN, MAX_PACKET_LEN};
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::oneshot;

use super::{Ctx, Submission, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::{unix_now, DeviceAddr};
use crate::store::counters::Counter;
use crate::store::fanout::{Backlog, FanoutJob};
use crate::store::group_bodies::BodyStats;
use crate::store::group_creates::CreateRecord;
use crate::store::groups::{GroupRecord, Member};
use crate::store::{StorageError, Store, Table, TableUsage, Txn};

/// Whether a membership receives the group's entry `seq`: a message
/// (`notice` false) reaches members who joined before it and had not left
/// by it; a change notice also reaches the members it adds and removes.
pub fn receives(m: &Member, seq: u64, notice: bool) -> bool {
    if notice {
        m.joined <= seq && (m.left == 0 || m.left >= seq)
    } else {
        m.joined < seq && (m.left == 0 || m.left > seq)
    }
}

/// A membership change.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Change {
    /// An admin adds these accounts.
    Add(Vec<u64>),
    /// An admin removes these accounts.
    Remove(Vec<u64>),
    /// The requester leaves.
    Leave,
}

/// What admin sees of a group.
#[derive(Debug, Clone)]
pub struct GroupSummary {
    /// The record.
    pub record: GroupRecord,
    /// The group's next seq.
    pub next_seq: u64,
    /// Fan-out still to do.
    pub backlog: Backlog,
    /// Bodies stored for it.
    pub bodies: BodyStats,
}

/// Group requests.
#[derive(Clone)]
pub struct Groups {
    writer: Writer,
    store: Arc<Store>,
}

type Reply<T> = oneshot::Sender<Result<T, pb::ErrorCode>>;

impl Groups {
    pub(crate) fn new(writer: Writer, store: Arc<Store>) -> Self {
        Self { writer, store }
    }

    /// Creates a group of `by`'s account and `members`; the future answers
    /// its first `GroupInfo` once durable. A create `id` (not 0) that `by`
    /// used before gets that create's answer again, and no second group
    /// (or `ID_REUSED`, if that create asked for another group).
    pub fn create(
        &self,
        by: DeviceAddr,
        id: u64,
        name: Bytes,
        members: Vec<u64>,
    ) -> Result<impl Future<Output = Result<pb::GroupInfo, pb::ErrorCode>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let digest = create_digest(&name, &members);
        let op = CreateOp { by, id, digest, name, members, result: None, created: false, reply: Some(tx) };
        self.writer.try_submit_new(Box::new(op)).map_err(|r| r.reason)?;
        Ok(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) })
    }

    /// Applies `change` to `group` on behalf of `by`; the future answers
    /// once durable (a change that changes nothing, such as adding a
    /// member twice, answers at once and bumps nothing).
    pub fn change(
        &self,
        by: DeviceAddr,
        group: u64,
        change: Change,
    ) -> Result<impl Future<Output = Result<(), pb::ErrorCode>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = ChangeOp { by, group, change, result: None, published: false, reply: Some(tx) };
        self.writer.try_submit_new(Box::new(op)).map_err(|r| r.reason)?;
        Ok(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) })
    }

    /// `from` read the group's entries up to seq `through`: counted once
    /// per member for each message of someone else (see
    /// `super::group_receipts`).
    pub fn read(&self, from: DeviceAddr, group: u64, through: u64) -> Submission {
        Submission(Box::new(super::group_receipts::ReadOp::new(from, group, through)))
    }

    /// The groups `account` is in, with ids above `after`, as many as fit
    /// one packet.
    pub async fn list(&self, account: u64, after: u64) -> Result<pb::GroupList, StorageError> {
        let store = self.store.clone();
        super::blocking(move || list(&store, account, after)).await
    }

    /// A group's record, sequence, fan-out backlog and stored bodies
    /// (admin).
    pub async fn summary(&self, group: u64) -> Result<Option<GroupSummary>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || {
            let Some(record) = store.group(group)? else {
                return Ok(None);
            };
            Ok(Some(GroupSummary {
                record,
                next_seq: store.counter(Counter::GroupSeq(group))?,
                backlog: store.fanout_backlog(Some(group), usize::MAX)?,
                bodies: store.group_body_stats(Some(group))?,
            }))
        })
        .await
    }

    /// Keys and bytes of every table (admin `storage`; benchmarks).
    pub async fn storage(&self, cap: u64) -> Result<Vec<(&'static str, TableUsage)>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || Table::ALL.iter().map(|t| Ok((t.name(), store.table_usage(*t, cap)?))).collect()).await
    }

    /// The bodies stored for `group` (every group: `None`), counted.
    pub async fn bodies(&self, group: Option<u64>) -> Result<BodyStats, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.group_body_stats(group)).await
    }
}

/// The `GroupInfo` describing `g` (current members only).
pub fn info(g: &GroupRecord) -> pb::GroupInfo {
    pb::GroupInfo {
        req: 0,
        group: g.id,
        name: g.name.clone(),
        members: g.current().map(|m| m.account).collect(),
        admins: g.current().filter(|m| m.admin).map(|m| m.account).collect(),
        version: g.version,
        ..Default::default()
    }
}

/// Room for a `GroupList` answer: a packet less a margin for the frame's
/// other messages.
const LIST_BUDGET: usize = MAX_PACKET_LEN - 1024;

fn list(store: &Store, account: u64, after: u64) -> Result<pb::GroupList, StorageError> {
    let mut out = pb::GroupList::default();
    let mut len = 0;
    let mut after = after;
    'pages: loop {
        let ids = store.groups_of(account, after, 64)?;
        let full = ids.len() == 64;
        for id in ids {
            after = id;
            let Some(g) = store.group(id)? else {
                continue;
            };
            let gi = info(&g);
            let gi_len = Message::from(gi.clone()).encoded_len();
            if len + gi_len > LIST_BUDGET && !out.groups.is_empty() {
                out.more = true;
                break 'pages;
            }
            len += gi_len;
            out.groups.push(gi);
        }
        if !full {
            break;
        }
    }
    Ok(out)
}

/// Stores change notice `seq` of `g`, made by `by` at `now`, and its
/// fan-out job.
fn publish(txn: &mut Txn<'_>, g: &GroupRecord, seq: u64, by: u64, now: u64) -> pb::GroupInfo {
    let notice = pb::GroupInfo { seq, time: now, by, ..info(g) };
    txn.put_group_body(g.id, seq, &notice.clone().into());
    // The job's own reference: the body stays until the fan-out is done,
    // even if every entry written so far is acked before that.
    txn.set_counter(Counter::BodyRefs { group: g.id, seq }, 1);
    let mut accounts: Vec<u64> = g.members.iter().map(|m| m.account).collect();
    accounts.dedup();
    let job = FanoutJob {
        remaining: accounts.len() as u64,
        created_ms: super::fanout::now_ms(),
        notice: true,
        from: by,
        time: now,
        ..Default::default()
    };
    txn.put_fanout_job(g.id, seq, &job);
    notice
}

/// Checks a list of accounts from a request: none zero, none twice.
fn distinct(accounts: &[u64]) -> Result<(), pb::ErrorCode> {
    let mut sorted = accounts.to_vec();
    sorted.sort_unstable();
    if sorted.first() == Some(&0) || sorted.windows(2).any(|w| w[0] == w[1]) {
        return Err(pb::ErrorCode::BadRequest);
    }
    Ok(())
}

/// Checks that every account exists.
fn existing(txn: &mut Txn<'_>, accounts: &[u64]) -> Result<Result<(), pb::ErrorCode>, StorageError> {
    for &a in accounts {
        if txn.account(a)?.is_none() {
            return Ok(Err(pb::ErrorCode::NotFound));
        }
    }
    Ok(Ok(()))
}

/// Answers the waiting caller: the result if durable, else INTERNAL.
fn answer<T>(reply: Option<Reply<T>>, result: Option<Result<T, pb::ErrorCode>>, outcome: Outcome<'_>) {
    let r = match outcome {
        Outcome::Durable => result.unwrap_or(Err(pb::ErrorCode::Internal)),
        Outcome::Failed(_) => Err(pb::ErrorCode::Internal),
    };
    if let Some(tx) = reply {
        let _ = tx.send(r);
    }
}

/// The digest of what a `GroupCreate` asks (name, then members in the
/// order given), kept in its create record: a retry asks the same, so the
/// same id with another digest is a reused id. BLAKE2s, truncated, as for
/// sends.
pub fn create_digest(name: &[u8], members: &[u64]) -> [u8; 8] {
    use blake2::Digest as _;
    let mut h = blake2::Blake2s256::new();
    h.update(b"pipit group create v1");
    h.update((name.len() as u64).to_be_bytes());
    h.update(name);
    h.update((members.len() as u64).to_be_bytes());
    for m in members {
        h.update(m.to_be_bytes());
    }
    let full = h.finalize();
    let mut d = [0u8; 8];
    d.copy_from_slice(&full[..8]);
    d
}

struct CreateOp {
    by: DeviceAddr,
    /// The client's create id; 0: not deduplicated.
    id: u64,
    digest: [u8; 8],
    name: Bytes,
    members: Vec<u64>,
    result: Option<Result<pb::GroupInfo, pb::ErrorCode>>,
    /// A group was made (not a retry answered from its record).
    created: bool,
    reply: Option<Reply<pb::GroupInfo>>,
}

impl Operation<Ctx> for CreateOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.created = false;
        self.result = Some(self.create(ctx.rules.max_group_members, txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if matches!(outcome, Outcome::Durable) && self.created {
            metrics::counter!("pipit_group_changes_total").increment(1);
            ctx.fanout.wake();
        }
        answer(self.reply.take(), self.result.take(), outcome);
    }
}

impl CreateOp {
    fn create(&mut self, max: usize, txn: &mut Txn<'_>) -> Result<Result<pb::GroupInfo, pb::ErrorCode>, StorageError> {
        // A retry gets its original answer first, even if the request
        // would now be refused (a member has gone since, say).
        if self.id != 0 {
            if let Some(r) = txn.group_create(self.by, self.id)? {
                if r.digest != self.digest {
                    return Ok(Err(pb::ErrorCode::IdReused));
                }
                return Ok(Ok(r.answer));
            }
        }
        if self.name.len() > MAX_NAME_LEN {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        if let Err(code) = distinct(&self.members) {
            return Ok(Err(code));
        }
        // Naming oneself is allowed: the creator is a member either way.
        let mut accounts: Vec<u64> = self.members.iter().copied().filter(|a| *a != self.by.account).collect();
        accounts.push(self.by.account);
        if accounts.len() > max {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        if let Err(code) = existing(txn, &accounts)? {
            return Ok(Err(code));
        }
        let id = txn.next(Counter::NextGroup)?;
        let seq = txn.next(Counter::GroupSeq(id))?;
        let now = unix_now();
        let mut g = GroupRecord { id, name: self.name.clone(), version: 1, members: Vec::new(), created: now };
        for &account in &accounts {
            g.members.push(Member { account, joined: seq, left: 0, admin: account == self.by.account });
            txn.put_membership(account, id);
        }
        g.sort();
        let notice = publish(txn, &g, seq, self.by.account, now);
        txn.put_group(g);
        if self.id != 0 {
            let record = CreateRecord { time: now, digest: self.digest, answer: notice.clone() };
            txn.put_group_create(self.by, self.id, record);
        }
        self.created = true;
        Ok(Ok(notice))
    }
}

struct ChangeOp {
    by: DeviceAddr,
    group: u64,
    change: Change,
    result: Option<Result<(), pb::ErrorCode>>,
    published: bool,
    reply: Option<Reply<()>>,
}

impl Operation<Ctx> for ChangeOp {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.published = false;
        self.result = Some(self.change(ctx.rules.max_group_members, txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if matches!(outcome, Outcome::Durable) && self.published {
            metrics::counter!("pipit_group_changes_total").increment(1);
            ctx.fanout.wake();
        }
        answer(self.reply.take(), self.result.take(), outcome);
    }
}

impl ChangeOp {
    fn change(&mut self, max: usize, txn: &mut Txn<'_>) -> Result<Result<(), pb::ErrorCode>, StorageError> {
        if self.group == 0 {
            return Ok(Err(pb::ErrorCode::BadRequest));
        }
        let Some(g) = txn.group(self.group)? else {
            return Ok(Err(pb::ErrorCode::NotFound));
        };
        let Some(me) = g.member(self.by.account) else {
            return Ok(Err(pb::ErrorCode::Forbidden));
        };
        let (add, remove): (Vec<u64>, Vec<u64>) = match &self.change {
            Change::Leave => (Vec::new(), vec![self.by.account]),
            Change::Add(list) | Change::Remove(list) => {
                if !me.admin {
                    return Ok(Err(pb::ErrorCode::Forbidden));
                }
                if list.is_empty() {
                    return Ok(Err(pb::ErrorCode::BadRequest));
                }
                if let Err(code) = distinct(list) {
                    return Ok(Err(code));
                }
                // Accounts already in (or already out) are skipped, so a
                // request retried after a lost answer changes nothing.
                let fresh: Vec<u64> = list.iter().copied().filter(|a| g.member(*a).is_none()).collect();
                let present: Vec<u64> = list.iter().copied().filter(|a| g.member(*a).is_some()).collect();
                if matches!(self.change, Change::Add(_)) {
                    if let Err(code) = existing(txn, &fresh)? {
                        return Ok(Err(code));
                    }
                    if g.current().count() + fresh.len() > max {
                        return Ok(Err(pb::ErrorCode::TooLarge));
                    }
                    (fresh, Vec::new())
                } else {
                    (Vec::new(), present)
                }
            }
        };
        if add.is_empty() && remove.is_empty() {
            return Ok(Ok(()));
        }
        let seq = txn.next(Counter::GroupSeq(self.group))?;
        let now = unix_now();
        let mut g = (*g).clone();
        let removed: HashSet<u64> = remove.iter().copied().collect();
        for m in g.members.iter_mut().filter(|m| m.left == 0 && removed.contains(&m.account)) {
            // Kept, marked, until the fan-out has passed `seq`: entries
            // before it still reach this member.
            m.left = seq;
            m.admin = false;
        }
        for &account in &remove {
            txn.delete_membership(account, self.group);
        }
        for &account in &add {
            g.members.push(Member { account, joined: seq, left: 0, admin: false });
            txn.put_membership(account, self.group);
        }
        g.sort();
        if !g.current().any(|m| m.admin) {
            let oldest = g.current().min_by_key(|m| (m.joined, m.account)).map(|m| m.account);
            if let Some(account) = oldest {
                for m in g.members.iter_mut().filter(|m| m.left == 0 && m.account == account) {
                    m.admin = true;
                }
            }
        }
        g.version += 1;
        publish(txn, &g, seq, self.by.account, now);
        txn.put_group(g);
        self.published = true;
        Ok(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn who_receives_an_entry_follows_the_seqs_of_joining_and_leaving() {
        let m = |joined, left| Member { account: 1, joined, left, admin: false };
        // Joined at 5 (the notice that added it), removed at 9.
        let x = m(5, 9);
        assert!(!receives(&x, 4, false) && !receives(&x, 4, true));
        assert!(receives(&x, 5, true), "it hears that it was added");
        assert!(!receives(&x, 5, false));
        assert!(receives(&x, 6, false) && receives(&x, 8, false));
        assert!(!receives(&x, 9, false));
        assert!(receives(&x, 9, true), "it hears that it was removed");
        assert!(!receives(&x, 10, false) && !receives(&x, 10, true));
        assert!(receives(&m(5, 0), 1_000, false));
    }
}
