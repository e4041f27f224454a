//! Accounts and devices: registration (open or by invite), invite codes,
//! linking a companion device, and device lists. A device's static key is
//! its identity.

use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::PublicKey;
use tokio::sync::oneshot;

use super::{expiry, Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::{unix_now, DeviceAddr};
use crate::route::cluster::Cluster;
use crate::service::settings::Registration;
use crate::store::counters::Counter;
use crate::store::{StorageError, Store, Txn};

/// Registration, invites and devices.
#[derive(Clone)]
pub struct Accounts {
    writer: Writer,
    store: Arc<Store>,
}

impl Accounts {
    pub(crate) fn new(writer: Writer, store: Arc<Store>) -> Self {
        Self { writer, store }
    }

    /// The device a static key belongs to.
    pub async fn device_by_key(&self, key: PublicKey) -> Result<Option<DeviceAddr>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.device_by_key(&key)).await
    }

    /// An account's device list.
    pub async fn device_list(&self, account: u64) -> Result<Option<pb::DeviceList>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.account(account)).await
    }

    /// Up to `limit` accounts (admin).
    pub async fn list(&self, limit: usize) -> Result<Vec<pb::DeviceList>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.accounts(limit)).await
    }

    /// Creates an account whose device 0 is `key` (or finds the one it
    /// already has: a retried registration whose answer was lost).
    pub async fn register(&self, key: PublicKey, name: String, invite: Bytes) -> Result<DeviceAddr, pb::ErrorCode> {
        let (tx, rx) = oneshot::channel();
        let op = Register { key, name, invite, result: None, reply: Some(tx) };
        if self.writer.try_submit_new(Box::new(op)).is_err() {
            return Err(pb::ErrorCode::Unavailable);
        }
        rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable))
    }

    /// Adds `key` as a new device of `by`'s account; the future answers
    /// its device number (SPEC.md 5.5: a key the account already has
    /// answers that device's number; `by`'s own key is `BAD_REQUEST`,
    /// another account's `FORBIDDEN`, a 17th device `TOO_LARGE`).
    pub fn link(
        &self,
        by: DeviceAddr,
        key: PublicKey,
        name: String,
    ) -> Result<impl Future<Output = Result<u32, pb::ErrorCode>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = Link { by, key, name, result: None, reply: Some(tx) };
        self.writer.try_submit_new(Box::new(op)).map_err(|r| r.reason)?;
        Ok(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) })
    }

    /// Removes device `device` of `by`'s account (`by` itself, or another
    /// device of the same account): its key and its end-to-end keys go and
    /// its connection is closed at once; then its inbox is emptied in
    /// bounded rounds, each group reference releasing its body. The future
    /// answers once all of that is durable. Should the server stop between
    /// the rounds, the expiry sweep empties what is left.
    pub fn unlink(
        &self,
        by: DeviceAddr,
        device: u32,
    ) -> Result<impl Future<Output = Result<(), pb::ErrorCode>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = Unlink { by, device, result: None, reply: Some(tx) };
        self.writer.try_submit(Box::new(op)).map_err(|r| r.reason)?;
        let writer = self.writer.clone();
        Ok(async move {
            rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable))?;
            let gone = DeviceAddr::new(by.account, device);
            loop {
                let (tx, rx) = oneshot::channel();
                let op = PurgeInbox { addr: gone, more: false, reply: Some(tx) };
                writer.submit(Box::new(op)).await.map_err(|_| pb::ErrorCode::Unavailable)?;
                if !rx.await.map_err(|_| pb::ErrorCode::Unavailable)? {
                    return Ok(());
                }
            }
        })
    }

    /// Issues a single-use invite code valid for `ttl_secs`.
    pub async fn create_invite(&self, ttl_secs: u64) -> Result<String, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = CreateInvite { ttl_secs, code: invite_code(), reply: Some(tx) };
        self.writer.submit(Box::new(op)).await?;
        rx.await.map_err(|_| SubmitError::Stopped)?.ok_or(SubmitError::Stopped)
    }
}

/// Adds `key` as the next device of `list`'s account and records both.
/// A device number is never given twice, not even after its device was
/// unlinked: other devices' sessions and dedup records name it.
fn add_device(
    txn: &mut Txn<'_>,
    mut list: pb::DeviceList,
    key: PublicKey,
    name: &str,
) -> Result<DeviceAddr, StorageError> {
    let next = Counter::NextDevice(list.account);
    let listed = list.devices.iter().map(|d| d.device + 1).max().unwrap_or(0);
    let device = listed.max(u32::try_from(txn.counter(next)?).unwrap_or(u32::MAX));
    txn.set_counter(next, u64::from(device) + 1);
    list.devices.push(pb::DeviceInfo {
        device,
        name: name.to_string(),
        key: Bytes::copy_from_slice(key.as_bytes()),
        last_seen: unix_now(),
    });
    let addr = DeviceAddr::new(list.account, device);
    txn.put_account(list);
    txn.put_device_key(key, addr);
    Ok(addr)
}

/// Sends `r` to the waiting caller: the result if durable, UNAVAILABLE
/// if the disk was full (retry later), else INTERNAL.
fn answer<T>(
    reply: Option<oneshot::Sender<Result<T, pb::ErrorCode>>>,
    result: Option<Result<T, pb::ErrorCode>>,
    outcome: Outcome<'_>,
) {
    let r = match outcome {
        Outcome::Durable => result.unwrap_or(Err(pb::ErrorCode::Internal)),
        Outcome::Failed(e) if e.is_full() => Err(pb::ErrorCode::Unavailable),
        Outcome::Failed(_) => Err(pb::ErrorCode::Internal),
    };
    if let Some(tx) = reply {
        let _ = tx.send(r);
    }
}

struct Register {
    key: PublicKey,
    name: String,
    invite: Bytes,
    result: Option<Result<DeviceAddr, pb::ErrorCode>>,
    reply: Option<oneshot::Sender<Result<DeviceAddr, pb::ErrorCode>>>,
}

impl Operation<Ctx> for Register {
    fn apply(&mut self, ctx: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.result = Some(self.register(ctx.rules.registration, ctx.rules.cluster.as_ref(), txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        answer(self.reply.take(), self.result.take(), outcome);
    }
}

impl Register {
    fn register(
        &self,
        policy: Registration,
        cluster: Option<&Cluster>,
        txn: &mut Txn<'_>,
    ) -> Result<Result<DeviceAddr, pb::ErrorCode>, StorageError> {
        if let Some(addr) = txn.device_by_key(&self.key)? {
            return Ok(Ok(addr));
        }
        // In a cluster the id comes first, so that running out of
        // candidates does not spend the invite.
        let clustered = match cluster {
            None => None,
            // Owned here and unique cluster-wide with no round trip: see
            // `route::cluster::ring::owned_id`. The counter then counts
            // candidates, not accounts.
            Some(c) => match c.new_account_id(|| txn.next(Counter::NextAccount))? {
                Some(id) => Some(id),
                None => return Ok(Err(pb::ErrorCode::Unavailable)),
            },
        };
        if policy == Registration::Invite {
            if self.invite.is_empty() {
                return Ok(Err(pb::ErrorCode::RegistrationClosed));
            }
            match txn.invite(&self.invite)? {
                Some(expires) if expires > unix_now() => txn.delete_invite(&self.invite),
                _ => return Ok(Err(pb::ErrorCode::InvalidInvite)),
            }
        }
        let account = match clustered {
            Some(id) => id,
            None => txn.next(Counter::NextAccount)?,
        };
        let list = pb::DeviceList { req: 0, account, devices: Vec::new() };
        Ok(Ok(add_device(txn, list, self.key, &self.name)?))
    }
}

struct Link {
    /// The device that asked.
    by: DeviceAddr,
    key: PublicKey,
    name: String,
    result: Option<Result<u32, pb::ErrorCode>>,
    reply: Option<oneshot::Sender<Result<u32, pb::ErrorCode>>>,
}

impl Operation<Ctx> for Link {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.result = Some(self.link(txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        answer(self.reply.take(), self.result.take(), outcome);
    }
}

impl Link {
    fn link(&self, txn: &mut Txn<'_>) -> Result<Result<u32, pb::ErrorCode>, StorageError> {
        if let Some(addr) = txn.device_by_key(&self.key)? {
            // Linking the same key twice is idempotent (a retry after a
            // lost answer); the asking device's own key would be a
            // `Linked` that linked nothing; another account's key cannot
            // be taken over.
            return Ok(if addr == self.by {
                Err(pb::ErrorCode::BadRequest)
            } else if addr.account == self.by.account {
                Ok(addr.device)
            } else {
                Err(pb::ErrorCode::Forbidden)
            });
        }
        let Some(list) = txn.account(self.by.account)? else {
            return Ok(Err(pb::ErrorCode::NotFound));
        };
        if list.devices.len() >= pipit_protocol::limits::MAX_DEVICES_PER_ACCOUNT {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        Ok(Ok(add_device(txn, (*list).clone(), self.key, &self.name)?.device))
    }
}

struct Unlink {
    by: DeviceAddr,
    device: u32,
    result: Option<Result<(), pb::ErrorCode>>,
    reply: Option<oneshot::Sender<Result<(), pb::ErrorCode>>>,
}

impl Operation<Ctx> for Unlink {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.result = Some(self.unlink(txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let (Outcome::Durable, Some(Ok(()))) = (&outcome, &self.result) {
            let gone = DeviceAddr::new(self.by.account, self.device);
            ctx.deliveries.disconnect(gone, pb::ErrorCode::UnknownDevice);
            tracing::info!(device = %gone, by = %self.by, "device unlinked");
        }
        answer(self.reply.take(), self.result.take(), outcome);
    }
}

impl Unlink {
    fn unlink(&self, txn: &mut Txn<'_>) -> Result<Result<(), pb::ErrorCode>, StorageError> {
        let Some(list) = txn.account(self.by.account)? else {
            return Ok(Err(pb::ErrorCode::UnknownDevice));
        };
        let Some(info) = list.devices.iter().find(|d| d.device == self.device).cloned() else {
            return Ok(Err(pb::ErrorCode::NotFound));
        };
        if list.devices.len() == 1 {
            // An account without devices could never be used again.
            return Ok(Err(pb::ErrorCode::Forbidden));
        }
        let gone = DeviceAddr::new(self.by.account, self.device);
        let mut list = (*list).clone();
        list.devices.retain(|d| d.device != self.device);
        txn.put_account(list);
        if let Some(key) = PublicKey::from_slice(&info.key) {
            txn.delete_device_key(key);
        }
        if let Some(r) = txn.key_record(gone)? {
            txn.delete_keys(gone, r.head..r.tail);
            txn.delete_key_record(gone);
        }
        txn.delete_queued_receipts_of(gone);
        Ok(Ok(()))
    }
}

/// One round of emptying an unlinked device's inbox.
struct PurgeInbox {
    addr: DeviceAddr,
    /// Entries are left for another round.
    more: bool,
    reply: Option<oneshot::Sender<bool>>,
}

impl Operation<Ctx> for PurgeInbox {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.more = purge_inbox(txn, self.addr, expiry::DELETE_MAX)?;
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        if let (Outcome::Durable, Some(tx)) = (outcome, self.reply.take()) {
            let _ = tx.send(self.more);
        }
    }
}

/// Deletes up to `max` entries of `addr`'s inbox, releasing the group
/// bodies they refer to; true if entries are left. A range delete would
/// be one write, but it would leave every body it referred to stored for
/// ever.
pub(crate) fn purge_inbox(txn: &mut Txn<'_>, addr: DeviceAddr, max: usize) -> Result<bool, StorageError> {
    let mut doomed = Vec::new();
    let mut more = false;
    for item in txn.store().inbox_scan(Some((addr, 0))) {
        let item = item?;
        if item.addr != addr {
            break;
        }
        if doomed.len() == max {
            more = true;
            break;
        }
        doomed.push(item.id);
    }
    for id in doomed {
        match txn.take_inbox_ref(addr, id)? {
            Some(r) => txn.release_group_body(r.group, r.seq)?,
            None => txn.delete_inbox(addr, id),
        }
    }
    Ok(more)
}

struct CreateInvite {
    ttl_secs: u64,
    code: String,
    reply: Option<oneshot::Sender<Option<String>>>,
}

impl Operation<Ctx> for CreateInvite {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        txn.put_invite(self.code.as_bytes(), unix_now().saturating_add(self.ttl_secs));
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        let code = matches!(outcome, Outcome::Durable).then(|| std::mem::take(&mut self.code));
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(code);
        }
    }
}

fn invite_code() -> String {
    use rand::Rng;
    const ALPHABET: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    let mut rng = rand::rng();
    let mut s = String::with_capacity(9);
    for i in 0..8 {
        if i == 4 {
            s.push('-');
        }
        s.push(ALPHABET[rng.random_range(0..ALPHABET.len())] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::service::testing::setup;

    #[test]
    fn invites_are_single_use() {
        let s = setup(Registration::Invite);
        assert_eq!(s.register(1, ""), Err(pb::ErrorCode::RegistrationClosed));
        assert_eq!(s.register(1, "NOPE-NOPE"), Err(pb::ErrorCode::InvalidInvite));
        let code = s.rt.block_on(s.services().accounts.create_invite(60)).unwrap();
        assert!(s.register(1, &code).is_ok());
        assert_eq!(s.register(2, &code), Err(pb::ErrorCode::InvalidInvite));
    }

    #[test]
    fn unlinking_removes_the_device_and_its_number_is_never_given_again() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let accounts = &s.services().accounts;
        assert_eq!(s.rt.block_on(accounts.unlink(a, 0).unwrap()), Err(pb::ErrorCode::Forbidden), "the last device");
        let second = s.rt.block_on(accounts.link(a, PublicKey([2; 32]), "tab".into()).unwrap()).unwrap();
        assert_eq!(second, 1);
        assert_eq!(s.rt.block_on(accounts.unlink(a, 7).unwrap()), Err(pb::ErrorCode::NotFound));
        s.rt.block_on(accounts.unlink(a, second).unwrap()).unwrap();
        assert_eq!(s.store.device_by_key(&PublicKey([2; 32])).unwrap(), None);
        let third = s.rt.block_on(accounts.link(a, PublicKey([3; 32]), "tab".into()).unwrap()).unwrap();
        assert_eq!(third, 2, "device 1 is not given again");
        let list = s.store.account(a.account).unwrap().unwrap();
        assert_eq!(list.devices.iter().map(|d| d.device).collect::<Vec<_>>(), vec![0, 2]);
    }

    /// Group entries of an unlinked device release their bodies: nothing
    /// stays stored once every remaining device has acked.
    #[test]
    fn unlinking_a_device_with_group_entries_releases_their_bodies() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let b2 = s.link(b.account, 3);
        let info = s.create_group(a, &[b.account]).unwrap();
        s.group_send(a, 1, info.group).unwrap();
        s.send(a, 2, b.account).unwrap();
        s.fan_out(128);
        let refs = |seq| s.store.counter(Counter::BodyRefs { group: info.group, seq }).unwrap();
        assert_eq!((refs(1), refs(2)), (3, 2), "notice: a, b, b2; message: b, b2");
        assert_eq!(s.store.inbox_after(b2, 0, 10).unwrap().len(), 3);

        s.rt.block_on(s.services().accounts.unlink(b, b2.device).unwrap()).unwrap();
        assert!(s.store.inbox_after(b2, 0, 10).unwrap().is_empty());
        assert_eq!((refs(1), refs(2)), (2, 1));
        for d in [a, b] {
            let ids: Vec<u64> = s.store.inbox_after(d, 0, 10).unwrap().iter().map(|(id, _)| *id).collect();
            s.ack(d, &ids);
        }
        assert_eq!(s.store.group_body_stats(Some(info.group)).unwrap().messages, 0);
        assert_eq!(s.store.group_body_stats(Some(info.group)).unwrap().notices, 0);
    }

    /// Emptying goes in rounds of a bounded size, and what an unlink that
    /// stopped part way left is found and emptied by the expiry sweep,
    /// whatever its age, without telling the senders.
    #[test]
    fn an_unlink_that_stopped_part_way_is_finished_by_the_expiry_sweep() {
        struct Round(DeviceAddr, bool, Option<oneshot::Sender<bool>>);
        impl Operation<Ctx> for Round {
            fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
                self.1 = purge_inbox(txn, self.0, 2)?;
                Ok(())
            }
            fn finish(mut self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {
                self.2.take().unwrap().send(self.1).unwrap();
            }
        }
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let b2 = s.link(b.account, 3);
        let info = s.create_group(a, &[b.account]).unwrap();
        for id in 1..=3 {
            s.group_send(a, id, info.group).unwrap();
        }
        s.fan_out(128);
        assert_eq!(s.store.inbox_after(b2, 0, 10).unwrap().len(), 4);
        let round = || {
            let (tx, rx) = oneshot::channel();
            s.rt.block_on(s.services().writer.submit(Box::new(Round(b2, false, Some(tx))))).unwrap();
            s.rt.block_on(rx).unwrap()
        };
        assert!(round(), "two of four: more left");
        assert_eq!(s.store.inbox_after(b2, 0, 10).unwrap().len(), 2);

        // The device leaves its account; the server stops before the rest.
        let (tx, rx) = oneshot::channel();
        let op = Unlink { by: b, device: b2.device, result: None, reply: Some(tx) };
        s.rt.block_on(s.services().writer.submit(Box::new(op))).unwrap();
        s.rt.block_on(rx).unwrap().unwrap();
        assert_eq!(s.store.inbox_after(b2, 0, 10).unwrap().len(), 2);

        assert_eq!(s.expire(unix_now()).expired, 2, "only the unlinked device's two");
        assert!(s.store.inbox_after(b2, 0, 10).unwrap().is_empty());
        for d in [a, b] {
            let ids: Vec<u64> = s.store.inbox_after(d, 0, 10).unwrap().iter().map(|(id, _)| *id).collect();
            assert!(!s
                .store
                .inbox_after(d, 0, 10)
                .unwrap()
                .iter()
                .any(|(_, m)| matches!(m, pipit_protocol::Message::Expired(_))));
            s.ack(d, &ids);
        }
        let stats = s.store.group_body_stats(Some(info.group)).unwrap();
        assert_eq!((stats.messages, stats.notices), (0, 0), "every body went with its last reference");
    }
}
