//! Durable state in RocksDB, and the one writer thread that commits it.
//!
//! Column families, each keyed big-endian so iteration order is the order
//! we mean:
//!
//! | family | key | value |
//! |---|---|---|
//! | `accounts` | account | `pb::DeviceList`: the account's devices |
//! | `keys` | device static key (32) | account (8) device (4) |
//! | `inbox` | account device inbox-id | packet of one Deliver/Receipt/Expired |
//! | `dedup` | account device client-id | seq (8) time (8) |
//! | `counters` | tagged key | next value (8) |
//! | `invites` | code | expiry time (8) |
//!
//! Every write goes through [`Writer`]: one thread that drains the
//! operations all shards queued, applies them to one `WriteBatch`, commits
//! it with a synced WAL write (group commit), and only then answers the
//! callers and pushes new inbox entries to online devices. Counters (the
//! next inbox id per device, the next sequence number per conversation)
//! have one owner, this thread, so they need no locks.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use pipit_protocol::message::{decode_packet, encode_packet, pb};
use pipit_protocol::{Message, PublicKey};
use rocksdb::{ColumnFamilyDescriptor, Direction, IteratorMode, Options, WriteBatch, WriteOptions, DB};
use tokio::sync::oneshot;

use crate::config::Registration;

const CF_ACCOUNTS: &str = "accounts";
const CF_KEYS: &str = "keys";
const CF_INBOX: &str = "inbox";
const CF_DEDUP: &str = "dedup";
const CF_COUNTERS: &str = "counters";
const CF_INVITES: &str = "invites";
const FAMILIES: [&str; 6] = [CF_ACCOUNTS, CF_KEYS, CF_INBOX, CF_DEDUP, CF_COUNTERS, CF_INVITES];

/// One device of one account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DeviceAddr {
    /// Account id, from 1.
    pub account: u64,
    /// Device number within the account, from 0.
    pub device: u32,
}

impl DeviceAddr {
    fn key(self) -> [u8; 12] {
        let mut k = [0u8; 12];
        k[..8].copy_from_slice(&self.account.to_be_bytes());
        k[8..].copy_from_slice(&self.device.to_be_bytes());
        k
    }

    fn from_key(k: &[u8]) -> Option<Self> {
        Some(Self {
            account: u64::from_be_bytes(k.get(..8)?.try_into().ok()?),
            device: u32::from_be_bytes(k.get(8..12)?.try_into().ok()?),
        })
    }

    fn inbox_key(self, id: u64) -> [u8; 20] {
        let mut k = [0u8; 20];
        k[..12].copy_from_slice(&self.key());
        k[12..].copy_from_slice(&id.to_be_bytes());
        k
    }
}

impl std::fmt::Display for DeviceAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.account, self.device)
    }
}

/// Storage failed; the operation had no effect.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// RocksDB reported an error.
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    /// A stored value does not decode: corruption or a bug.
    #[error("corrupt record in {0}")]
    Corrupt(&'static str),
    /// The writer thread is gone (shutting down).
    #[error("storage writer stopped")]
    Stopped,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// The database: reads happen on whatever thread calls (never a shard's
/// async code: they go through `spawn_blocking`); writes go to [`Writer`].
pub struct Store {
    db: DB,
}

impl Store {
    /// Opens (creating if needed) the database under `dir`.
    pub fn open(dir: &Path) -> Result<Arc<Self>, StorageError> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // Payloads are end-to-end encrypted and do not compress.
        opts.set_compression_type(rocksdb::DBCompressionType::None);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        // Most point lookups on the send path are for keys that do not
        // exist (a dedup record for a new message): bloom filters answer
        // those without touching table files.
        let cache = rocksdb::Cache::new_lru_cache(64 << 20);
        let cfs = FAMILIES.iter().map(|name| {
            let mut block = rocksdb::BlockBasedOptions::default();
            block.set_bloom_filter(10.0, false);
            block.set_block_cache(&cache);
            block.set_cache_index_and_filter_blocks(true);
            let mut o = Options::default();
            o.set_compression_type(rocksdb::DBCompressionType::None);
            o.set_block_based_table_factory(&block);
            ColumnFamilyDescriptor::new(*name, o)
        });
        let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
        Ok(Arc::new(Self { db }))
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db.cf_handle(name).expect("column families are created at open")
    }

    /// The device a static key belongs to.
    pub fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceAddr>, StorageError> {
        match self.db.get_pinned_cf(self.cf(CF_KEYS), key.as_bytes())? {
            None => Ok(None),
            Some(v) => DeviceAddr::from_key(&v).map(Some).ok_or(StorageError::Corrupt(CF_KEYS)),
        }
    }

    /// An account's device list.
    pub fn account(&self, account: u64) -> Result<Option<pb::DeviceList>, StorageError> {
        use prost::Message as _;
        match self.db.get_pinned_cf(self.cf(CF_ACCOUNTS), account.to_be_bytes())? {
            None => Ok(None),
            Some(v) => pb::DeviceList::decode(&v[..]).map(Some).map_err(|_| StorageError::Corrupt(CF_ACCOUNTS)),
        }
    }

    /// Every account id, in order (admin).
    pub fn accounts(&self, limit: usize) -> Result<Vec<pb::DeviceList>, StorageError> {
        use prost::Message as _;
        let mut out = Vec::new();
        for item in self.db.iterator_cf(self.cf(CF_ACCOUNTS), IteratorMode::Start).take(limit) {
            let (_, v) = item?;
            out.push(pb::DeviceList::decode(&v[..]).map_err(|_| StorageError::Corrupt(CF_ACCOUNTS))?);
        }
        Ok(out)
    }

    /// Up to `limit` inbox entries of `addr` with id greater than `after`,
    /// in order, each with its inbox id filled in.
    pub fn inbox_after(&self, addr: DeviceAddr, after: u64, limit: usize) -> Result<Vec<(u64, Message)>, StorageError> {
        let start = addr.inbox_key(after.saturating_add(1));
        let prefix = addr.key();
        let mut out = Vec::new();
        let iter = self.db.iterator_cf(self.cf(CF_INBOX), IteratorMode::From(&start, Direction::Forward));
        for item in iter {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let id = u64::from_be_bytes(k[12..20].try_into().map_err(|_| StorageError::Corrupt(CF_INBOX))?);
            let msg = decode_entry(&v, id)?;
            out.push((id, msg));
        }
        Ok(out)
    }

    /// The inbox id the device's next entry will get.
    pub fn inbox_next(&self, addr: DeviceAddr) -> Result<u64, StorageError> {
        let mut key = b"i".to_vec();
        key.extend_from_slice(&addr.key());
        Ok(self.get_u64(CF_COUNTERS, &key)?.unwrap_or(1))
    }

    /// Entries waiting in all inboxes, as RocksDB estimates it (cheap:
    /// no scan), for the inbox depth gauge.
    pub fn inbox_estimate(&self) -> u64 {
        self.db.property_int_value_cf(self.cf(CF_INBOX), "rocksdb.estimate-num-keys").ok().flatten().unwrap_or(0)
    }

    /// Entries waiting in a device's inbox (admin, metrics).
    pub fn inbox_depth(&self, addr: DeviceAddr) -> Result<usize, StorageError> {
        let prefix = addr.key();
        let mut n = 0;
        for item in self.db.prefix_iterator_cf(self.cf(CF_INBOX), prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    fn get_u64(&self, cf: &str, key: &[u8]) -> Result<Option<u64>, StorageError> {
        match self.db.get_pinned_cf(self.cf(cf), key)? {
            None => Ok(None),
            Some(v) => {
                v[..].try_into().map(|b| Some(u64::from_be_bytes(b))).map_err(|_| StorageError::Corrupt(CF_COUNTERS))
            }
        }
    }
}

fn decode_entry(v: &[u8], id: u64) -> Result<Message, StorageError> {
    let mut msgs = decode_packet(Bytes::copy_from_slice(v)).map_err(|_| StorageError::Corrupt(CF_INBOX))?;
    let mut m = msgs.pop().ok_or(StorageError::Corrupt(CF_INBOX))?;
    if !set_inbox_id(&mut m, id) {
        return Err(StorageError::Corrupt(CF_INBOX));
    }
    Ok(m)
}

/// Stamps an inbox entry with its id; false for kinds that are not inbox
/// entries.
fn set_inbox_id(m: &mut Message, id: u64) -> bool {
    match m {
        Message::Deliver(d) => d.inbox = id,
        Message::Receipt(r) => r.inbox = id,
        Message::Expired(e) => e.inbox = id,
        _ => return false,
    }
    true
}

fn entry_time(m: &Message) -> u64 {
    match m {
        Message::Deliver(d) => d.time,
        Message::Receipt(r) => r.time,
        _ => 0,
    }
}

fn encode_entry(m: &Message) -> Vec<u8> {
    let mut v = Vec::with_capacity(m.encoded_len());
    encode_packet(std::slice::from_ref(m), &mut v);
    v
}

/// Why a send was not stored.
#[derive(Debug, Clone, PartialEq)]
pub enum SendFailure {
    /// A coarse error for the client.
    Code(pb::ErrorCode),
    /// Per-device ciphertexts did not match the devices.
    Mismatch(pb::DeviceMismatch),
}

/// What a delivery that a device acked was, for receipts.
#[derive(Debug, Clone, Copy)]
pub struct Acked {
    /// The inbox id.
    pub id: u64,
    /// Sender account of a 1:1 message from someone else, else 0.
    pub sender: u64,
    /// Its sequence number.
    pub seq: u64,
}

/// A request to the writer thread.
pub enum Op {
    /// Create an account for `key` (or return the one it already has).
    Register {
        /// The device key from the handshake.
        key: PublicKey,
        /// Device name.
        name: String,
        /// Invite code, if the client sent one.
        invite: Bytes,
        /// Answer.
        reply: oneshot::Sender<Result<DeviceAddr, pb::ErrorCode>>,
    },
    /// Store a 1:1 message.
    Send {
        /// The sending device.
        from: DeviceAddr,
        /// What it sent.
        send: pb::Send,
        /// When the server received it, for latency metrics.
        received: Instant,
        /// Answer: `Sent` once durable.
        reply: oneshot::Sender<Result<pb::Sent, SendFailure>>,
    },
    /// Delete acked inbox entries and send delivered receipts.
    Ack {
        /// The device that acked.
        device: DeviceAddr,
        /// The entries.
        acked: Vec<Acked>,
    },
    /// A read receipt from `from` for messages of `peer` up to `through`.
    Read {
        /// The reader.
        from: DeviceAddr,
        /// The conversation partner who sent the messages.
        peer: u64,
        /// Highest seq read.
        through: u64,
    },
    /// Authorise another device key for an account.
    Link {
        /// The account.
        account: u64,
        /// The new device's static key.
        key: PublicKey,
        /// Its name.
        name: String,
        /// The new device number.
        reply: oneshot::Sender<Result<u32, pb::ErrorCode>>,
    },
    /// Issue an invite code valid for `ttl_secs`.
    CreateInvite {
        /// Validity.
        ttl_secs: u64,
        /// The code.
        reply: oneshot::Sender<String>,
    },
    /// Expire undelivered entries older than the TTL; answers the count.
    Expire {
        /// Current time, seconds.
        now: u64,
        /// What the round did.
        reply: Option<oneshot::Sender<ExpiryRound>>,
    },
    /// Called once everything queued before it is durable.
    Barrier(Box<dyn FnOnce() + Send>),
}

/// What the writer does after a commit: answer callers, push to devices.
pub trait Deliveries: Send + Sync + 'static {
    /// A new inbox entry for `to` is durable.
    fn push(&self, to: DeviceAddr, id: u64, msg: &Message);
}

/// Writer settings.
#[derive(Debug, Clone)]
pub struct WriterConfig {
    /// Most operations per commit.
    pub max_batch: usize,
    /// Undelivered entries expire after this many seconds.
    pub ttl_secs: u64,
    /// Registration policy.
    pub registration: Registration,
    /// Sync the WAL on every commit.
    pub sync: bool,
}

/// Handle for queueing writes.
#[derive(Clone)]
pub struct Writer {
    tx: crossbeam_channel::Sender<Op>,
}

impl Writer {
    /// Starts the writer thread. The queue holds `capacity` operations; a
    /// full queue pushes back on the shards (their `submit` fails and the
    /// client is told UNAVAILABLE), so memory stays bounded.
    pub fn start(
        store: Arc<Store>,
        cfg: WriterConfig,
        deliveries: Arc<dyn Deliveries>,
        capacity: usize,
    ) -> (Self, std::thread::JoinHandle<()>) {
        let (tx, rx) = crossbeam_channel::bounded(capacity);
        let handle = std::thread::Builder::new()
            .name("pipit-storage".into())
            .spawn(move || WriterThread::new(store, cfg, deliveries).run(rx))
            .expect("spawn storage thread");
        (Self { tx }, handle)
    }

    /// Queues an operation without blocking. Fails when the queue is full
    /// or the writer has stopped.
    pub fn submit(&self, op: Op) -> Result<(), StorageError> {
        self.tx.try_send(op).map_err(|_| StorageError::Stopped)
    }

    /// Waits until everything queued so far is durable.
    pub async fn barrier(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.tx
            .send(Op::Barrier(Box::new(move || {
                let _ = tx.send(());
            })))
            .map_err(|_| StorageError::Stopped)?;
        rx.await.map_err(|_| StorageError::Stopped)
    }

    /// [`Writer::barrier`] for threads outside any async runtime; gives up
    /// after `timeout`.
    pub fn barrier_blocking(&self, timeout: Duration) -> Result<(), StorageError> {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send_timeout(
                Op::Barrier(Box::new(move || {
                    let _ = tx.send(());
                })),
                timeout,
            )
            .map_err(|_| StorageError::Stopped)?;
        rx.recv_timeout(timeout).map_err(|_| StorageError::Stopped)
    }
}

enum Effect {
    Register(oneshot::Sender<Result<DeviceAddr, pb::ErrorCode>>, Result<DeviceAddr, pb::ErrorCode>),
    Link(oneshot::Sender<Result<u32, pb::ErrorCode>>, Result<u32, pb::ErrorCode>),
    Sent(oneshot::Sender<Result<pb::Sent, SendFailure>>, Result<pb::Sent, SendFailure>, Option<Instant>),
    Push(DeviceAddr, u64, Message),
    Invite(oneshot::Sender<String>, String),
    Expired(Option<oneshot::Sender<ExpiryRound>>, ExpiryRound),
    Barrier(Box<dyn FnOnce() + Send>),
}

struct WriterThread {
    store: Arc<Store>,
    cfg: WriterConfig,
    deliveries: Arc<dyn Deliveries>,
    /// Authoritative cache of counters: this thread is their only writer.
    /// Cleared when a commit fails, so it is reloaded from what is durable.
    counters: HashMap<Vec<u8>, u64>,
    /// Dedup records written in the batch being built.
    batch_dedup: HashMap<(DeviceAddr, u64), pb::Sent>,
    /// Account device lists read or written in this batch.
    batch_accounts: HashMap<u64, pb::DeviceList>,
    batch_keys: HashMap<PublicKey, DeviceAddr>,
    /// Committed account device lists: this thread is their only writer,
    /// so the cache is exact. Bounded by clearing.
    accounts: HashMap<u64, pb::DeviceList>,
    /// Where the next expiry round resumes its inbox scan.
    expiry_cursor: Vec<u8>,
    /// Where it resumes its dedup scan.
    dedup_cursor: Vec<u8>,
    sync_opts: WriteOptions,
}

/// Most inbox entries one expiry round reads.
const EXPIRY_SCAN_MAX: usize = 50_000;

/// What one expiry round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExpiryRound {
    /// Entries deleted.
    pub expired: usize,
    /// The scan reached the end of the inbox.
    pub finished: bool,
}

const COUNTER_CACHE_MAX: usize = 1 << 20;
const ACCOUNT_CACHE_MAX: usize = 1 << 18;

impl WriterThread {
    fn new(store: Arc<Store>, cfg: WriterConfig, deliveries: Arc<dyn Deliveries>) -> Self {
        let mut sync_opts = WriteOptions::default();
        sync_opts.set_sync(cfg.sync);
        Self {
            store,
            cfg,
            deliveries,
            counters: HashMap::new(),
            batch_dedup: HashMap::new(),
            batch_accounts: HashMap::new(),
            batch_keys: HashMap::new(),
            accounts: HashMap::new(),
            expiry_cursor: Vec::new(),
            dedup_cursor: Vec::new(),
            sync_opts,
        }
    }

    fn run(mut self, rx: crossbeam_channel::Receiver<Op>) {
        while let Ok(first) = rx.recv() {
            let mut ops = vec![first];
            while ops.len() < self.cfg.max_batch {
                match rx.try_recv() {
                    Ok(op) => ops.push(op),
                    Err(_) => break,
                }
            }
            self.commit(ops);
        }
        tracing::debug!("storage writer stopped");
    }

    fn commit(&mut self, ops: Vec<Op>) {
        let n = ops.len();
        let mut batch = WriteBatch::default();
        let mut effects = Vec::with_capacity(n);
        let now = unix_now();
        for op in ops {
            if let Err(e) = self.apply(op, now, &mut batch, &mut effects) {
                tracing::error!(error = %e, "storage read failed while building a batch");
            }
        }
        self.batch_dedup.clear();
        self.batch_accounts.clear();
        self.batch_keys.clear();
        let started = Instant::now();
        let result = if batch.is_empty() { Ok(()) } else { self.store.db.write_opt(batch, &self.sync_opts) };
        metrics::histogram!("pipit_group_commit_ops").record(n as f64);
        metrics::histogram!("pipit_group_commit_seconds").record(started.elapsed().as_secs_f64());
        if let Err(e) = result {
            // Nothing of this batch is durable: fail every caller and forget
            // cached counters that counted it.
            tracing::error!(error = %e, "group commit failed");
            metrics::counter!("pipit_storage_errors_total").increment(1);
            self.counters.clear();
            self.accounts.clear();
            for effect in effects {
                match effect {
                    Effect::Register(tx, _) => drop(tx.send(Err(pb::ErrorCode::Internal))),
                    Effect::Link(tx, _) => drop(tx.send(Err(pb::ErrorCode::Internal))),
                    Effect::Sent(tx, _, _) => drop(tx.send(Err(SendFailure::Code(pb::ErrorCode::Internal)))),
                    Effect::Push(..) | Effect::Invite(..) | Effect::Expired(..) => {}
                    Effect::Barrier(done) => done(),
                }
            }
            return;
        }
        if self.counters.len() > COUNTER_CACHE_MAX {
            self.counters.clear();
        }
        for effect in effects {
            match effect {
                Effect::Register(tx, r) => drop(tx.send(r)),
                Effect::Link(tx, r) => drop(tx.send(r)),
                Effect::Sent(tx, r, received) => {
                    if let (Ok(_), Some(t)) = (&r, received) {
                        metrics::histogram!("pipit_send_durable_seconds").record(t.elapsed().as_secs_f64());
                    }
                    drop(tx.send(r));
                }
                Effect::Push(to, id, msg) => self.deliveries.push(to, id, &msg),
                Effect::Invite(tx, code) => drop(tx.send(code)),
                Effect::Expired(tx, n) => {
                    if let Some(tx) = tx {
                        let _ = tx.send(n);
                    }
                }
                Effect::Barrier(done) => done(),
            }
        }
    }

    fn next(&mut self, key: Vec<u8>, batch: &mut WriteBatch) -> Result<u64, StorageError> {
        let current = match self.counters.get(&key) {
            Some(v) => *v,
            None => self.store.get_u64(CF_COUNTERS, &key)?.unwrap_or(1),
        };
        batch.put_cf(self.store.cf(CF_COUNTERS), &key, (current + 1).to_be_bytes());
        self.counters.insert(key, current + 1);
        Ok(current)
    }

    fn account(&mut self, account: u64) -> Result<Option<pb::DeviceList>, StorageError> {
        if let Some(a) = self.batch_accounts.get(&account).or_else(|| self.accounts.get(&account)) {
            return Ok(Some(a.clone()));
        }
        let found = self.store.account(account)?;
        if let Some(list) = &found {
            if self.accounts.len() >= ACCOUNT_CACHE_MAX {
                self.accounts.clear();
            }
            self.accounts.insert(account, list.clone());
        }
        Ok(found)
    }

    fn apply(&mut self, op: Op, now: u64, batch: &mut WriteBatch, fx: &mut Vec<Effect>) -> Result<(), StorageError> {
        match op {
            Op::Register { key, name, invite, reply } => {
                let r = self.register(key, name, invite, now, batch);
                let r = match r {
                    Ok(r) => r,
                    Err(e) => {
                        fx.push(Effect::Register(reply, Err(pb::ErrorCode::Internal)));
                        return Err(e);
                    }
                };
                fx.push(Effect::Register(reply, r));
            }
            Op::Send { from, send, received, reply } => match self.send(from, send, now, batch, fx) {
                Ok(r) => fx.push(Effect::Sent(reply, r, Some(received))),
                Err(e) => {
                    fx.push(Effect::Sent(reply, Err(SendFailure::Code(pb::ErrorCode::Internal)), None));
                    return Err(e);
                }
            },
            Op::Ack { device, acked } => self.ack(device, acked, now, batch, fx)?,
            Op::Read { from, peer, through } => self.read(from, peer, through, now, batch, fx)?,
            Op::Link { account, key, name, reply } => match self.link(account, key, name, now, batch) {
                Ok(r) => fx.push(Effect::Link(reply, r)),
                Err(e) => {
                    fx.push(Effect::Link(reply, Err(pb::ErrorCode::Internal)));
                    return Err(e);
                }
            },
            Op::CreateInvite { ttl_secs, reply } => {
                let code = invite_code();
                batch.put_cf(self.store.cf(CF_INVITES), code.as_bytes(), (now + ttl_secs).to_be_bytes());
                fx.push(Effect::Invite(reply, code));
            }
            Op::Expire { now, reply } => {
                let n = self.expire(now, batch, fx)?;
                fx.push(Effect::Expired(reply, n));
            }
            Op::Barrier(tx) => fx.push(Effect::Barrier(tx)),
        }
        Ok(())
    }

    fn register(
        &mut self,
        key: PublicKey,
        name: String,
        invite: Bytes,
        now: u64,
        batch: &mut WriteBatch,
    ) -> Result<Result<DeviceAddr, pb::ErrorCode>, StorageError> {
        // A retried registration (its answer was lost) gets the same account.
        if let Some(addr) = self.known_device(&key)? {
            return Ok(Ok(addr));
        }
        if self.cfg.registration == Registration::Invite {
            if invite.is_empty() {
                return Ok(Err(pb::ErrorCode::RegistrationClosed));
            }
            match self.store.get_u64(CF_INVITES, &invite)? {
                Some(expires) if expires > now => batch.delete_cf(self.store.cf(CF_INVITES), &invite),
                _ => return Ok(Err(pb::ErrorCode::InvalidInvite)),
            }
        }
        let account = self.next(b"next_account".to_vec(), batch)?;
        let list = pb::DeviceList { req: 0, account, devices: Vec::new() };
        Ok(Ok(self.add_device(list, key, name, now, batch)))
    }

    /// The device a key already belongs to, in this batch or on disk.
    fn known_device(&self, key: &PublicKey) -> Result<Option<DeviceAddr>, StorageError> {
        match self.batch_keys.get(key) {
            Some(addr) => Ok(Some(*addr)),
            None => self.store.device_by_key(key),
        }
    }

    /// Adds `key` as the next device of `list`'s account and records both.
    fn add_device(
        &mut self,
        mut list: pb::DeviceList,
        key: PublicKey,
        name: String,
        now: u64,
        batch: &mut WriteBatch,
    ) -> DeviceAddr {
        let device = list.devices.iter().map(|d| d.device + 1).max().unwrap_or(0);
        list.devices.push(pb::DeviceInfo { device, name, key: Bytes::copy_from_slice(key.as_bytes()), last_seen: now });
        self.put_account(&list, batch);
        let addr = DeviceAddr { account: list.account, device };
        batch.put_cf(self.store.cf(CF_KEYS), key.as_bytes(), addr.key());
        self.batch_keys.insert(key, addr);
        addr
    }

    fn link(
        &mut self,
        account: u64,
        key: PublicKey,
        name: String,
        now: u64,
        batch: &mut WriteBatch,
    ) -> Result<Result<u32, pb::ErrorCode>, StorageError> {
        if let Some(addr) = self.known_device(&key)? {
            // Linking the same key twice is idempotent; another account's
            // key cannot be taken over.
            return Ok(if addr.account == account { Ok(addr.device) } else { Err(pb::ErrorCode::Forbidden) });
        }
        let Some(list) = self.account(account)? else {
            return Ok(Err(pb::ErrorCode::NotFound));
        };
        if list.devices.len() >= pipit_protocol::limits::MAX_DEVICES_PER_ACCOUNT {
            return Ok(Err(pb::ErrorCode::TooLarge));
        }
        Ok(Ok(self.add_device(list, key, name, now, batch).device))
    }

    fn put_account(&mut self, list: &pb::DeviceList, batch: &mut WriteBatch) {
        use prost::Message as _;
        batch.put_cf(self.store.cf(CF_ACCOUNTS), list.account.to_be_bytes(), list.encode_to_vec());
        self.batch_accounts.insert(list.account, list.clone());
        // Not durable yet: the committed cache learns it after the commit.
        self.accounts.remove(&list.account);
    }

    /// Appends `msg` to `to`'s inbox.
    fn enqueue(
        &mut self,
        to: DeviceAddr,
        mut msg: Message,
        batch: &mut WriteBatch,
        fx: &mut Vec<Effect>,
    ) -> Result<(), StorageError> {
        let mut key = b"i".to_vec();
        key.extend_from_slice(&to.key());
        let id = self.next(key, batch)?;
        set_inbox_id(&mut msg, id);
        batch.put_cf(self.store.cf(CF_INBOX), to.inbox_key(id), encode_entry(&msg));
        fx.push(Effect::Push(to, id, msg));
        Ok(())
    }

    fn send(
        &mut self,
        from: DeviceAddr,
        send: pb::Send,
        now: u64,
        batch: &mut WriteBatch,
        fx: &mut Vec<Effect>,
    ) -> Result<Result<pb::Sent, SendFailure>, StorageError> {
        let fail = |c| Ok(Err(SendFailure::Code(c)));
        // Dedup first: a retry must get the original answer even if the
        // request would now be refused.
        let dedup_key = {
            let mut k = from.key().to_vec();
            k.extend_from_slice(&send.id.to_be_bytes());
            k
        };
        if let Some(sent) = self.batch_dedup.get(&(from, send.id)) {
            metrics::counter!("pipit_messages_deduplicated_total").increment(1);
            return Ok(Ok(*sent));
        }
        if let Some(v) = self.store.db.get_pinned_cf(self.store.cf(CF_DEDUP), &dedup_key)? {
            if v.len() != 16 {
                return Err(StorageError::Corrupt(CF_DEDUP));
            }
            metrics::counter!("pipit_messages_deduplicated_total").increment(1);
            let seq = u64::from_be_bytes(v[..8].try_into().expect("8 bytes"));
            let time = u64::from_be_bytes(v[8..].try_into().expect("8 bytes"));
            return Ok(Ok(pb::Sent { id: send.id, seq, time }));
        }
        if send.group != 0 {
            // Groups are served by a later version of this server.
            return fail(pb::ErrorCode::Unavailable);
        }
        if send.to == 0 {
            return fail(pb::ErrorCode::BadRequest);
        }
        let Some(recipient) = self.account(send.to)? else {
            return fail(pb::ErrorCode::NotFound);
        };
        let Some(own) = self.account(from.account)? else {
            return fail(pb::ErrorCode::UnknownDevice);
        };
        let targets: Vec<(DeviceAddr, bool)> = recipient
            .devices
            .iter()
            .map(|d| (DeviceAddr { account: send.to, device: d.device }, false))
            // A note to self reaches the account's other devices only.
            .filter(|(a, _)| *a != from)
            .chain(
                own.devices
                    .iter()
                    .filter(|d| d.device != from.device && from.account != send.to)
                    .map(|d| (DeviceAddr { account: from.account, device: d.device }, true)),
            )
            .collect();
        // Per-device ciphertexts must name exactly the target devices.
        let mut per_device: HashMap<DeviceAddr, Bytes> = HashMap::new();
        if !send.per_device.is_empty() {
            for c in &send.per_device {
                let account = if c.account == 0 { send.to } else { c.account };
                per_device.insert(DeviceAddr { account, device: c.device }, c.payload.clone());
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
        let conv = conversation_key(from.account, send.to);
        let seq = self.next(conv, batch)?;
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
            };
            self.enqueue(to, deliver.into(), batch, fx)?;
        }
        let mut v = [0u8; 16];
        v[..8].copy_from_slice(&seq.to_be_bytes());
        v[8..].copy_from_slice(&now.to_be_bytes());
        batch.put_cf(self.store.cf(CF_DEDUP), &dedup_key, v);
        let sent = pb::Sent { id: send.id, seq, time: now };
        self.batch_dedup.insert((from, send.id), sent);
        metrics::counter!("pipit_messages_stored_total").increment(1);
        Ok(Ok(sent))
    }

    /// Sends `receipt` to every device of `to`, unless a receipt of this
    /// kind already covered `through` (high-water mark per conversation).
    fn receipt(
        &mut self,
        to: u64,
        receipt: pb::Receipt,
        batch: &mut WriteBatch,
        fx: &mut Vec<Effect>,
    ) -> Result<(), StorageError> {
        let mut mark = vec![b'r', receipt.kind as u8];
        mark.extend_from_slice(&to.to_be_bytes());
        mark.extend_from_slice(&receipt.peer.to_be_bytes());
        let seen = match self.counters.get(&mark) {
            Some(v) => *v,
            None => self.store.get_u64(CF_COUNTERS, &mark)?.unwrap_or(0),
        };
        if receipt.through <= seen {
            return Ok(());
        }
        batch.put_cf(self.store.cf(CF_COUNTERS), &mark, receipt.through.to_be_bytes());
        self.counters.insert(mark, receipt.through);
        let Some(account) = self.account(to)? else {
            return Ok(());
        };
        for d in &account.devices {
            self.enqueue(DeviceAddr { account: to, device: d.device }, receipt.into(), batch, fx)?;
        }
        Ok(())
    }

    fn ack(
        &mut self,
        device: DeviceAddr,
        acked: Vec<Acked>,
        now: u64,
        batch: &mut WriteBatch,
        fx: &mut Vec<Effect>,
    ) -> Result<(), StorageError> {
        let mut delivered: HashMap<u64, u64> = HashMap::new();
        for a in &acked {
            batch.delete_cf(self.store.cf(CF_INBOX), device.inbox_key(a.id));
            if a.sender != 0 && a.sender != device.account {
                let e = delivered.entry(a.sender).or_default();
                *e = (*e).max(a.seq);
            }
        }
        metrics::counter!("pipit_inbox_acked_total").increment(acked.len() as u64);
        for (sender, seq) in delivered {
            let r = pb::Receipt {
                kind: pb::ReceiptKind::Delivered as i32,
                peer: device.account,
                through: seq,
                time: now,
                ..Default::default()
            };
            self.receipt(sender, r, batch, fx)?;
        }
        Ok(())
    }

    fn read(
        &mut self,
        from: DeviceAddr,
        peer: u64,
        through: u64,
        now: u64,
        batch: &mut WriteBatch,
        fx: &mut Vec<Effect>,
    ) -> Result<(), StorageError> {
        if peer == 0 || peer == from.account || through == 0 {
            return Ok(());
        }
        let r = pb::Receipt {
            kind: pb::ReceiptKind::Read as i32,
            peer: from.account,
            through,
            time: now,
            ..Default::default()
        };
        self.receipt(peer, r, batch, fx)
    }

    /// Deletes entries older than the TTL and tells senders. Runs in this
    /// thread, so it is bounded: at most `max_batch` deletions and
    /// EXPIRY_SCAN_MAX reads per round; the sweeper calls again until a
    /// round finishes.
    fn expire(&mut self, now: u64, batch: &mut WriteBatch, fx: &mut Vec<Effect>) -> Result<ExpiryRound, StorageError> {
        let cutoff = now.saturating_sub(self.cfg.ttl_secs);
        let mut notices: HashMap<(u64, u64, u64), u32> = HashMap::new();
        let mut n = 0;
        let mut scanned = 0;
        // Resume where the last round stopped: one round never scans more
        // than EXPIRY_SCAN_MAX entries, so writes wait at most that long.
        let start = std::mem::take(&mut self.expiry_cursor);
        let mode = if start.is_empty() { IteratorMode::Start } else { IteratorMode::From(&start, Direction::Forward) };
        let iter = self.store.db.iterator_cf(self.store.cf(CF_INBOX), mode);
        let mut finished = true;
        for item in iter {
            let (k, v) = item?;
            scanned += 1;
            if scanned > EXPIRY_SCAN_MAX || n >= self.cfg.max_batch {
                self.expiry_cursor = k.to_vec();
                finished = false;
                break;
            }
            let Ok(msg) = decode_entry(&v, 0) else {
                continue;
            };
            let time = entry_time(&msg);
            if time == 0 || time > cutoff {
                continue;
            }
            batch.delete_cf(self.store.cf(CF_INBOX), &k);
            n += 1;
            if let (Message::Deliver(d), Some(owner)) = (&msg, DeviceAddr::from_key(&k)) {
                if d.from != owner.account {
                    *notices.entry((d.from, owner.account, d.seq)).or_default() += 1;
                }
            }
        }
        for ((sender, peer, seq), devices) in notices {
            let Some(account) = self.account(sender)? else {
                continue;
            };
            for d in &account.devices {
                let e = pb::Expired { peer, group: 0, seq, devices, inbox: 0 };
                self.enqueue(DeviceAddr { account: sender, device: d.device }, e.into(), batch, fx)?;
            }
        }
        metrics::counter!("pipit_messages_expired_total").increment(n as u64);
        let dedup_finished = self.expire_dedup(cutoff, batch)?;
        Ok(ExpiryRound { expired: n, finished: finished && dedup_finished })
    }

    /// Forgets dedup records older than the TTL: a retry is expected within
    /// the time a message may wait, not after. Bounded like the inbox scan.
    fn expire_dedup(&mut self, cutoff: u64, batch: &mut WriteBatch) -> Result<bool, StorageError> {
        let start = std::mem::take(&mut self.dedup_cursor);
        let mode = if start.is_empty() { IteratorMode::Start } else { IteratorMode::From(&start, Direction::Forward) };
        for (i, item) in self.store.db.iterator_cf(self.store.cf(CF_DEDUP), mode).enumerate() {
            let (k, v) = item?;
            if i >= EXPIRY_SCAN_MAX {
                self.dedup_cursor = k.to_vec();
                return Ok(false);
            }
            let time = v.get(8..16).and_then(|b| b.try_into().ok()).map_or(0, u64::from_be_bytes);
            if time <= cutoff {
                batch.delete_cf(self.store.cf(CF_DEDUP), &k);
            }
        }
        Ok(true)
    }
}

/// Key of a 1:1 conversation's sequence counter: the same for both sides.
fn conversation_key(a: u64, b: u64) -> Vec<u8> {
    let (lo, hi) = if a <= b { (a, b) } else { (b, a) };
    let mut k = b"s".to_vec();
    k.extend_from_slice(&lo.to_be_bytes());
    k.extend_from_slice(&hi.to_be_bytes());
    k
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

/// Runs an expiry sweep every `every` until `stop`. A sweep is a series of
/// bounded rounds (see [`ExpiryRound`]) until the scan reaches the end.
pub fn spawn_sweeper(writer: Writer, every: Duration, stop: tokio_util::sync::CancellationToken) {
    std::thread::Builder::new()
        .name("pipit-expiry".into())
        .spawn(move || loop {
            let deadline = Instant::now() + every;
            while Instant::now() < deadline {
                if stop.is_cancelled() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100).min(every));
            }
            loop {
                let (tx, rx) = oneshot::channel();
                if writer.submit(Op::Expire { now: unix_now(), reply: Some(tx) }).is_err() {
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
        })
        .expect("spawn expiry thread");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Collect(std::sync::Mutex<Vec<(DeviceAddr, u64, Message)>>);
    impl Deliveries for Collect {
        fn push(&self, to: DeviceAddr, id: u64, msg: &Message) {
            self.0.lock().unwrap().push((to, id, msg.clone()));
        }
    }

    fn setup(reg: Registration) -> (tempfile::TempDir, Arc<Store>, Writer, Arc<Collect>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let collect = Arc::new(Collect::default());
        let cfg = WriterConfig { max_batch: 64, ttl_secs: 100, registration: reg, sync: true };
        let (w, _) = Writer::start(store.clone(), cfg, collect.clone(), 1024);
        (dir, store, w, collect)
    }

    fn register(w: &Writer, key: PublicKey, invite: &str) -> Result<DeviceAddr, pb::ErrorCode> {
        let (tx, rx) = oneshot::channel();
        w.submit(Op::Register { key, name: "t".into(), invite: Bytes::copy_from_slice(invite.as_bytes()), reply: tx })
            .unwrap();
        rx.blocking_recv().unwrap()
    }

    fn send(w: &Writer, from: DeviceAddr, id: u64, to: u64) -> Result<pb::Sent, SendFailure> {
        let (tx, rx) = oneshot::channel();
        let send = pb::Send { id, to, payload: Bytes::from_static(b"x"), ..Default::default() };
        w.submit(Op::Send { from, send, received: Instant::now(), reply: tx }).unwrap();
        rx.blocking_recv().unwrap()
    }

    #[test]
    fn sends_get_sequence_numbers_inbox_ids_and_dedup() {
        let (_d, store, w, pushed) = setup(Registration::Open);
        let a = register(&w, PublicKey([1; 32]), "").unwrap();
        let b = register(&w, PublicKey([2; 32]), "").unwrap();
        assert_eq!((a.account, b.account), (1, 2));
        assert_eq!(register(&w, PublicKey([1; 32]), "").unwrap(), a, "re-registration is idempotent");
        let s1 = send(&w, a, 10, b.account).unwrap();
        let s2 = send(&w, b, 10, a.account).unwrap();
        assert_eq!((s1.seq, s2.seq), (1, 2), "one sequence per conversation, both directions");
        assert_eq!(send(&w, a, 10, b.account).unwrap(), s1, "a retry gets the original answer");
        let inbox = store.inbox_after(b, 0, 10).unwrap();
        assert_eq!(inbox.len(), 1, "stored once");
        assert_eq!(inbox[0].0, 1);
        assert_eq!(pushed.0.lock().unwrap().len(), 2);
        assert_eq!(send(&w, a, 11, 999), Err(SendFailure::Code(pb::ErrorCode::NotFound)));
    }

    #[test]
    fn acks_delete_and_produce_one_delivered_receipt() {
        let (_d, store, w, _) = setup(Registration::Open);
        let a = register(&w, PublicKey([1; 32]), "").unwrap();
        let b = register(&w, PublicKey([2; 32]), "").unwrap();
        let s = send(&w, a, 1, b.account).unwrap();
        let acked = vec![Acked { id: 1, sender: a.account, seq: s.seq }];
        w.submit(Op::Ack { device: b, acked: acked.clone() }).unwrap();
        w.submit(Op::Ack { device: b, acked }).unwrap();
        w.barrier_blocking(Duration::from_secs(5)).unwrap();
        assert!(store.inbox_after(b, 0, 10).unwrap().is_empty());
        let receipts = store.inbox_after(a, 0, 10).unwrap();
        assert_eq!(receipts.len(), 1, "the second ack adds no receipt");
        let Message::Receipt(r) = &receipts[0].1 else { panic!() };
        assert_eq!((r.kind, r.peer, r.through), (pb::ReceiptKind::Delivered as i32, b.account, s.seq));
    }

    #[test]
    fn invites_are_single_use() {
        let (_d, _store, w, _) = setup(Registration::Invite);
        assert_eq!(register(&w, PublicKey([1; 32]), ""), Err(pb::ErrorCode::RegistrationClosed));
        assert_eq!(register(&w, PublicKey([1; 32]), "NOPE-NOPE"), Err(pb::ErrorCode::InvalidInvite));
        let (tx, rx) = oneshot::channel();
        w.submit(Op::CreateInvite { ttl_secs: 60, reply: tx }).unwrap();
        let code = rx.blocking_recv().unwrap();
        assert!(register(&w, PublicKey([1; 32]), &code).is_ok());
        assert_eq!(register(&w, PublicKey([2; 32]), &code), Err(pb::ErrorCode::InvalidInvite));
    }

    #[test]
    fn expiry_deletes_old_entries_and_tells_the_sender() {
        let (_d, store, w, _) = setup(Registration::Open);
        let a = register(&w, PublicKey([1; 32]), "").unwrap();
        let b = register(&w, PublicKey([2; 32]), "").unwrap();
        let s = send(&w, a, 1, b.account).unwrap();
        let (tx, rx) = oneshot::channel();
        w.submit(Op::Expire { now: unix_now() + 101, reply: Some(tx) }).unwrap();
        assert_eq!(rx.blocking_recv().unwrap(), ExpiryRound { expired: 1, finished: true });
        assert!(store.inbox_after(b, 0, 10).unwrap().is_empty());
        let notices = store.inbox_after(a, 0, 10).unwrap();
        let Message::Expired(e) = &notices[0].1 else { panic!("{notices:?}") };
        assert_eq!((e.peer, e.seq, e.devices), (b.account, s.seq, 1));
        // The dedup record went with it: the same id is now a new message.
        let again = send(&w, a, 1, b.account).unwrap();
        assert_ne!(again.seq, s.seq);
    }
}
