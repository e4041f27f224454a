//! The end-to-end key directory: devices publish an identity, a signed
//! prekey and a stock of one-time prekeys; other devices fetch bundles to
//! start pairwise sessions. The server checks what it can without a
//! private key (lengths, the signed prekey's signature, done by the
//! network layer with `pipit_protocol::e2e::check_upload`) and stores
//! nothing else: no plaintext ever passes here.
//!
//! A one-time prekey is handed out at most once: the fetch that takes it
//! is a writer operation that deletes it, and its answer leaves only after
//! that deletion is synced. When a device's stock falls below the low-water
//! mark it is told (`KeysStatus`) at once if online, else at its next
//! login. Fetches are rate-limited per requesting account, so one account
//! cannot drain everyone's stock; a device whose stock is empty still gets
//! sessions started with its signed prekey (Olm's fallback key).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use pipit_protocol::limits::{MAX_DEVICES_PER_ACCOUNT, MAX_ONE_TIME_PREKEYS};
use pipit_protocol::message::pb;
use tokio::sync::oneshot;

use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::DeviceAddr;
use crate::store::e2e_keys::KeyRecord;
use crate::store::{StorageError, Store, Txn};

/// The directory's settings.
#[derive(Debug, Clone, Copy)]
pub struct KeyRules {
    /// A device whose stock is below this many one-time prekeys is told.
    pub low_water: u32,
    /// Bundles one account may fetch at once.
    pub fetch_burst: u32,
    /// Bundles one account may fetch per minute, sustained.
    pub fetch_per_minute: u32,
}

/// Accounts whose fetch budget is tracked at once. A full budget is the
/// same as none, so when the table is full the full ones go first; if it
/// is still full, fetches wait a second (which only a flood of distinct
/// accounts can cause).
const LIMITER_MAX_ACCOUNTS: usize = 100_000;

/// Why a fetch was not queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum FetchRefused {
    /// The requesting account spent its budget: retry after this many
    /// seconds.
    RateLimited(u32),
    /// The writer's queue is full or stopped.
    Busy(SubmitError),
}

/// Publishing and fetching keys.
#[derive(Clone)]
pub struct Keys {
    writer: Writer,
    store: Arc<Store>,
    rules: KeyRules,
    limiter: Arc<Mutex<Limiter>>,
}

impl Keys {
    pub(crate) fn new(writer: Writer, store: Arc<Store>, rules: KeyRules) -> Self {
        let limiter = Limiter::new(rules.fetch_burst, rules.fetch_per_minute, LIMITER_MAX_ACCOUNTS);
        Self { writer, store, rules, limiter: Arc::new(Mutex::new(limiter)) }
    }

    /// Stores `upload` (already checked with `check_upload`) for `addr`;
    /// the future answers once it is durable.
    pub fn upload(
        &self,
        addr: DeviceAddr,
        upload: pb::KeysUpload,
    ) -> Result<impl Future<Output = Result<(), pb::ErrorCode>> + Send + 'static, SubmitError> {
        let (tx, rx) = oneshot::channel();
        let op = UploadOp { addr, upload, result: None, reply: Some(tx) };
        self.writer.try_submit(Box::new(op)).map_err(|r| r.reason)?;
        Ok(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) })
    }

    /// Hands out bundles of `fetch.account`'s devices to `requester`,
    /// each with one one-time prekey while the device has any. The future
    /// answers once the hand-out is durable.
    pub fn fetch(
        &self,
        requester: DeviceAddr,
        fetch: pb::KeysFetch,
    ) -> Result<impl Future<Output = Result<pb::KeysResult, pb::ErrorCode>> + Send + 'static, FetchRefused> {
        // Charged one bundle now, the rest once the answer is known: fetches
        // in flight at once cannot overshoot the budget by more than what
        // each returns beyond one.
        let now = Instant::now();
        let mut limiter = self.lock_limiter();
        limiter.check(requester.account, now).map_err(FetchRefused::RateLimited)?;
        limiter.charge(requester.account, 1, now);
        drop(limiter);
        let (tx, rx) = oneshot::channel();
        let op = FetchOp {
            requester,
            fetch,
            low_water: self.rules.low_water,
            limiter: self.limiter.clone(),
            result: None,
            notices: Vec::new(),
            reply: Some(tx),
        };
        self.writer.try_submit(Box::new(op)).map_err(|r| FetchRefused::Busy(r.reason))?;
        Ok(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) })
    }

    /// What a device should be told at login: its stock, when it has
    /// published keys and the stock is below the low-water mark.
    pub async fn at_login(&self, addr: DeviceAddr) -> Result<Option<pb::KeysStatus>, StorageError> {
        let store = self.store.clone();
        let low = u64::from(self.rules.low_water);
        super::blocking(move || {
            Ok(store
                .key_record(addr)?
                .filter(|r| r.stock() < low)
                .map(|r| pb::KeysStatus { one_time_left: u32::try_from(r.stock()).unwrap_or(u32::MAX) }))
        })
        .await
    }

    fn lock_limiter(&self) -> std::sync::MutexGuard<'_, Limiter> {
        self.limiter.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Sends `r` to the waiting caller: the result if durable, else INTERNAL.
fn answer<T>(
    reply: Option<oneshot::Sender<Result<T, pb::ErrorCode>>>,
    result: Option<Result<T, pb::ErrorCode>>,
    outcome: &Outcome<'_>,
) {
    let r = match outcome {
        Outcome::Durable => result.unwrap_or(Err(pb::ErrorCode::Internal)),
        Outcome::Failed(_) => Err(pb::ErrorCode::Internal),
    };
    if let Some(tx) = reply {
        let _ = tx.send(r);
    }
}

fn array<const N: usize>(b: &[u8]) -> Result<[u8; N], pb::ErrorCode> {
    b.try_into().map_err(|_| pb::ErrorCode::BadRequest)
}

struct UploadOp {
    addr: DeviceAddr,
    upload: pb::KeysUpload,
    result: Option<Result<(), pb::ErrorCode>>,
    reply: Option<oneshot::Sender<Result<(), pb::ErrorCode>>>,
}

impl Operation<Ctx> for UploadOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.result = Some(self.store(txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        if matches!(outcome, Outcome::Durable) && matches!(self.result, Some(Ok(()))) {
            metrics::counter!("pipit_keys_uploaded_total").increment(self.upload.one_time.len() as u64);
        }
        answer(self.reply.take(), self.result.take(), &outcome);
    }
}

impl UploadOp {
    /// Decides everything first and writes only once the upload is known
    /// to be acceptable: a refused upload stores nothing.
    fn store(&self, txn: &mut Txn<'_>) -> Result<Result<(), pb::ErrorCode>, StorageError> {
        let u = &self.upload;
        let old = txn.key_record(self.addr)?;
        let mut record = match (&old, &u.signed) {
            // Keys without an identity to belong to.
            (None, None) => return Ok(Err(pb::ErrorCode::BadRequest)),
            (None, Some(s)) => {
                let Ok(r) = new_record(&u.identity, s, 0) else { return Ok(Err(pb::ErrorCode::BadRequest)) };
                r
            }
            (Some(old), Some(s)) if old.identity[..] != u.identity[..] => {
                // A new identity: the stock was made for the old one and is
                // useless now. Slots keep counting up.
                let Ok(r) = new_record(&u.identity, s, old.tail) else { return Ok(Err(pb::ErrorCode::BadRequest)) };
                txn.delete_keys(self.addr, old.head..old.tail);
                r
            }
            (Some(old), Some(s)) => {
                let mut r = (**old).clone();
                let (Ok(key), Ok(sig)) = (array(&s.key), array(&s.signature)) else {
                    return Ok(Err(pb::ErrorCode::BadRequest));
                };
                (r.signed_id, r.signed_key, r.signature) = (s.id, key, sig);
                r
            }
            (Some(old), None) => (**old).clone(),
        };
        // Ids increase (checked before this): those not above the highest
        // taken are a retried upload's, already stored.
        let fresh: Vec<&pb::PreKey> = u.one_time.iter().filter(|k| record.max_id.is_none_or(|m| k.id > m)).collect();
        if record.stock() + fresh.len() as u64 > MAX_ONE_TIME_PREKEYS as u64 {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        for k in fresh {
            let Ok(key) = array(&k.key) else { return Ok(Err(pb::ErrorCode::BadRequest)) };
            txn.put_one_time_key(self.addr, record.tail, (k.id, key));
            record.tail += 1;
            record.max_id = Some(k.id);
        }
        txn.put_key_record(self.addr, record);
        Ok(Ok(()))
    }
}

fn new_record(identity: &[u8], s: &pb::SignedPreKey, slot: u64) -> Result<KeyRecord, pb::ErrorCode> {
    Ok(KeyRecord {
        identity: array(identity)?,
        signed_id: s.id,
        signed_key: array(&s.key)?,
        signature: array(&s.signature)?,
        head: slot,
        tail: slot,
        max_id: None,
    })
}

struct FetchOp {
    requester: DeviceAddr,
    fetch: pb::KeysFetch,
    low_water: u32,
    limiter: Arc<Mutex<Limiter>>,
    result: Option<Result<pb::KeysResult, pb::ErrorCode>>,
    /// Devices whose stock this fetch left below the low-water mark.
    notices: Vec<(DeviceAddr, u64)>,
    reply: Option<oneshot::Sender<Result<pb::KeysResult, pb::ErrorCode>>>,
}

impl Operation<Ctx> for FetchOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        self.notices.clear();
        self.result = Some(self.hand_out(txn)?);
        Ok(())
    }

    fn finish(mut self: Box<Self>, ctx: &mut Ctx, outcome: Outcome<'_>) {
        if let (Outcome::Durable, Some(Ok(r))) = (&outcome, &self.result) {
            let handed = r.bundles.iter().filter(|b| b.one_time.is_some()).count();
            metrics::counter!("pipit_keys_handed_out_total").increment(handed as u64);
            metrics::counter!("pipit_keys_fallback_total").increment((r.bundles.len() - handed) as u64);
            if let Some(rest) = r.bundles.len().checked_sub(1).filter(|n| *n > 0) {
                let mut limiter = self.limiter.lock().unwrap_or_else(|p| p.into_inner());
                limiter.charge(self.requester.account, rest as u32, Instant::now());
            }
            for (addr, left) in self.notices.drain(..) {
                let status = pb::KeysStatus { one_time_left: u32::try_from(left).unwrap_or(u32::MAX) };
                ctx.deliveries.notify(addr, status.into());
            }
        }
        answer(self.reply.take(), self.result.take(), &outcome);
    }
}

impl FetchOp {
    fn hand_out(&mut self, txn: &mut Txn<'_>) -> Result<Result<pb::KeysResult, pb::ErrorCode>, StorageError> {
        let account = if self.fetch.account == 0 { self.requester.account } else { self.fetch.account };
        if self.fetch.devices.len() > MAX_DEVICES_PER_ACCOUNT {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        let Some(list) = txn.account(account)? else {
            return Ok(Err(pb::ErrorCode::NotFound));
        };
        let mut devices: Vec<u32> = list
            .devices
            .iter()
            .map(|d| d.device)
            .filter(|d| self.fetch.devices.is_empty() || self.fetch.devices.contains(d))
            // Nobody needs a session with itself.
            .filter(|d| DeviceAddr::new(account, *d) != self.requester)
            .collect();
        devices.sort_unstable();
        devices.dedup();
        let mut bundles = Vec::with_capacity(devices.len());
        for device in devices {
            let addr = DeviceAddr::new(account, device);
            let Some(record) = txn.key_record(addr)? else { continue };
            let mut record = (*record).clone();
            let head = record.head;
            let mut one_time = None;
            // A missing slot is skipped rather than failing every fetch of
            // the device from now on.
            while record.head < record.tail && one_time.is_none() {
                let slot = record.head;
                record.head += 1;
                if let Some((id, key)) = txn.one_time_key(addr, slot)? {
                    txn.delete_one_time_key(addr, slot);
                    one_time = Some(pb::PreKey { id, key: Bytes::copy_from_slice(&key) });
                }
            }
            if record.stock() < u64::from(self.low_water) && one_time.is_some() {
                self.notices.push((addr, record.stock()));
            }
            bundles.push(pb::KeyBundle {
                device,
                identity: Bytes::copy_from_slice(&record.identity),
                signed: Some(pb::SignedPreKey {
                    id: record.signed_id,
                    key: Bytes::copy_from_slice(&record.signed_key),
                    signature: Bytes::copy_from_slice(&record.signature),
                }),
                one_time,
            });
            if record.head != head {
                txn.put_key_record(addr, record);
            }
        }
        Ok(Ok(pb::KeysResult { req: self.fetch.req, account, bundles }))
    }
}

/// A token bucket per requesting account: `burst` bundles at once,
/// refilled at `per_minute`.
#[derive(Debug)]
struct Limiter {
    buckets: HashMap<u64, Bucket>,
    burst: f64,
    per_sec: f64,
    max_accounts: usize,
}

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Limiter {
    fn new(burst: u32, per_minute: u32, max_accounts: usize) -> Self {
        Self {
            buckets: HashMap::new(),
            burst: f64::from(burst.max(1)),
            per_sec: f64::from(per_minute.max(1)) / 60.0,
            max_accounts,
        }
    }

    fn refilled(&self, b: Bucket, now: Instant) -> f64 {
        (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * self.per_sec).min(self.burst)
    }

    /// Whether `account` may fetch now; else the seconds until it may.
    fn check(&mut self, account: u64, now: Instant) -> Result<(), u32> {
        let tokens = match self.buckets.get(&account) {
            Some(b) => self.refilled(*b, now),
            None => self.burst,
        };
        if tokens >= 1.0 {
            return Ok(());
        }
        Err(((1.0 - tokens) / self.per_sec).ceil().clamp(1.0, 3_600.0) as u32)
    }

    /// `account` was handed `n` bundles.
    fn charge(&mut self, account: u64, n: u32, now: Instant) {
        if !self.buckets.contains_key(&account) && self.buckets.len() >= self.max_accounts {
            let burst = self.burst;
            let per_sec = self.per_sec;
            self.buckets.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * per_sec < burst);
            if self.buckets.len() >= self.max_accounts {
                // Every tracked account is mid-burst: rather than grow,
                // forget the one this charge is for (it was admitted).
                return;
            }
        }
        let tokens = match self.buckets.get(&account) {
            Some(b) => self.refilled(*b, now),
            None => self.burst,
        };
        self.buckets.insert(account, Bucket { tokens: tokens - f64::from(n), at: now });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::service::settings::Registration;
    use crate::service::testing::setup;

    #[test]
    fn the_limiter_refills_and_stays_bounded() {
        let t0 = Instant::now();
        let mut l = Limiter::new(3, 60, 2);
        assert_eq!(l.check(1, t0), Ok(()));
        l.charge(1, 3, t0);
        assert_eq!(l.check(1, t0), Err(1), "one token a second");
        assert_eq!(l.check(1, t0 + Duration::from_secs(1)), Ok(()));
        l.charge(2, 1, t0);
        // A third account while two are mid-burst is not tracked.
        l.charge(3, 1, t0);
        assert_eq!(l.buckets.len(), 2);
        // Once one has refilled, it makes room.
        l.charge(4, 1, t0 + Duration::from_secs(60));
        assert!(l.buckets.contains_key(&4));
        assert!(l.buckets.len() <= 2);
    }

    #[test]
    fn a_fetch_takes_each_one_time_key_once_then_the_signed_prekey_is_left() {
        let s = setup(Registration::Open);
        let a = s.register(1, "").unwrap();
        let b = s.register(2, "").unwrap();
        let keys = s.services().keys.clone();
        let upload = pb::KeysUpload {
            req: 1,
            identity: Bytes::from(vec![7; 64]),
            signed: Some(pb::SignedPreKey {
                id: 1,
                key: Bytes::from(vec![8; 32]),
                signature: Bytes::from(vec![9; 64]),
            }),
            one_time: (1..=3).map(|id| pb::PreKey { id, key: Bytes::from(vec![id as u8; 32]) }).collect(),
        };
        s.rt.block_on(keys.upload(b, upload.clone()).unwrap()).unwrap();
        // A retried upload adds nothing.
        s.rt.block_on(keys.upload(b, upload).unwrap()).unwrap();
        let fetch = pb::KeysFetch { req: 2, account: b.account, devices: vec![] };
        let mut got = Vec::new();
        for _ in 0..4 {
            let r = s.rt.block_on(keys.fetch(a, fetch.clone()).unwrap()).unwrap();
            assert_eq!(r.bundles.len(), 1);
            got.push(r.bundles[0].one_time.as_ref().map(|k| k.id));
        }
        assert_eq!(got, vec![Some(1), Some(2), Some(3), None]);
        assert!(s.store.one_time_keys(b).unwrap().is_empty());
        // Stock below the low-water mark: the device was told.
        let notices = s.pushed.0.lock().unwrap().iter().filter(|(to, id, _)| *to == b && *id == 0).count();
        assert_eq!(notices, 3);
        // Its own bundle is never handed to a device.
        let own = s.rt.block_on(keys.fetch(b, fetch).unwrap()).unwrap();
        assert!(own.bundles.is_empty());
    }
}
