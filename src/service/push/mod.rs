//! Push wake-ups for devices without a connection (SPEC.md 5.9).
//!
//! A device registers a token (`PushToken`), stored durably. When a
//! message lands in the inbox of a device that has no connection, the
//! registry hands its address to [`Wakeups::wake`] on the writer thread,
//! which only tries to put it in a bounded queue: a full queue drops the
//! wake-up (counted), never the message, and never blocks the writer or a
//! shard. One worker thread (`pipit-push`) takes the queue, looks the
//! token up, and asks the operator's gateway to wake the device: at most
//! once per device per interval (later messages within it are coalesced
//! into it), at most `concurrency` requests at a time, each with a
//! timeout and retried with backoff when the gateway is busy or
//! unreachable. A gateway that says the token is gone makes the server
//! forget it. The request carries no message content: which device, its
//! token, and how many entries wait.

mod gateway;

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::Either;
use pipit_protocol::message::pb;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tokio_util::sync::CancellationToken;

pub use gateway::PushSetupError;

use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::{unix_now, DeviceAddr};
use crate::route::{Registry, Wakeups};
use crate::store::push_tokens::PushRecord;
use crate::store::{StorageError, Store, Txn};
use gateway::{Gateway, Verdict, WakeUp};

/// Where counting a device's waiting entries for the gateway stops.
const UNREAD_CAP: usize = 1_000;

/// Push settings.
#[derive(Debug, Clone)]
pub struct PushConfig {
    /// The Matrix push gateway's notify URL (for APNs and FCM tokens);
    /// empty: none.
    pub gateway_url: String,
    /// The app id the gateway knows the iOS app by; empty: APNs tokens
    /// are not accepted.
    pub apns_app_id: String,
    /// The app id the gateway knows the Android app by; empty: FCM tokens
    /// are not accepted.
    pub fcm_app_id: String,
    /// Accept UnifiedPush endpoints (the server POSTs to them itself).
    pub unifiedpush: bool,
    /// Let UnifiedPush endpoints name loopback, private and link-local
    /// addresses (tests, closed networks).
    pub allow_private_endpoints: bool,
    /// At most one wake-up per device per interval.
    pub interval: Duration,
    /// Time one request may take, connecting included.
    pub timeout: Duration,
    /// Attempts after the first, for 5xx, 429 and connection errors.
    pub retries: u32,
    /// The wait before the first retry; doubled for each next one.
    pub retry_base: Duration,
    /// The longest wait between retries.
    pub retry_max: Duration,
    /// Wake-ups waiting or in progress, at most.
    pub queue: usize,
    /// Requests in flight at once, at most.
    pub concurrency: usize,
}

impl Default for PushConfig {
    fn default() -> Self {
        Self {
            gateway_url: String::new(),
            apns_app_id: String::new(),
            fcm_app_id: String::new(),
            unifiedpush: false,
            allow_private_endpoints: false,
            interval: Duration::from_secs(60),
            timeout: Duration::from_secs(10),
            retries: 4,
            retry_base: Duration::from_secs(1),
            retry_max: Duration::from_secs(60),
            queue: 10_000,
            concurrency: 64,
        }
    }
}

impl PushConfig {
    /// Whether wake-ups can be delivered at all.
    pub fn enabled(&self) -> bool {
        let matrix = !self.gateway_url.is_empty() && (!self.apns_app_id.is_empty() || !self.fcm_app_id.is_empty());
        matrix || self.unifiedpush
    }
}

enum Job {
    /// A message waits for this device, which has no connection.
    Wake(DeviceAddr),
    /// Its token changed: what the worker remembers about it is stale.
    Forget(DeviceAddr),
}

/// The bounded queue into the worker.
struct Queue {
    tx: mpsc::Sender<Job>,
    /// Deliveries the worker is working on (looking up, sending, waiting
    /// to retry).
    busy: Arc<AtomicUsize>,
}

impl Wakeups for Queue {
    fn wake(&self, to: DeviceAddr) {
        if self.tx.try_send(Job::Wake(to)).is_err() {
            metrics::counter!("pipit_push_dropped_total", "reason" => "queue_full").increment(1);
        }
    }
}

/// Push tokens and wake-ups.
#[derive(Clone)]
pub struct Push {
    writer: Writer,
    /// `None` when the operator configured no way to deliver wake-ups.
    live: Option<(Arc<Gateway>, Arc<Queue>)>,
}

impl Push {
    /// Push over `store` and `registry`; when configured, starts the
    /// worker thread (until `shutdown`) and makes the registry hand it
    /// wake-ups.
    pub(crate) fn start(
        cfg: PushConfig,
        store: Arc<Store>,
        registry: Arc<Registry>,
        writer: Writer,
        shutdown: CancellationToken,
    ) -> Result<Self, PushSetupError> {
        if !cfg.enabled() {
            return Ok(Self { writer, live: None });
        }
        let gateway = Arc::new(Gateway::new(&cfg)?);
        let (tx, rx) = mpsc::channel(cfg.queue.max(1));
        let busy = Arc::new(AtomicUsize::new(0));
        let queue = Arc::new(Queue { tx, busy: busy.clone() });
        let worker = Worker {
            permits: Arc::new(Semaphore::new(cfg.concurrency.max(1))),
            cfg,
            store,
            registry: registry.clone(),
            writer: writer.clone(),
            gateway: gateway.clone(),
            busy,
        };
        std::thread::Builder::new()
            .name("pipit-push".into())
            .spawn(move || worker.run(rx, shutdown))
            .map_err(|e| PushSetupError::Thread(e.to_string()))?;
        registry.set_wakeups(queue.clone());
        Ok(Self { writer, live: Some((gateway, queue)) })
    }

    /// Whether this server delivers wake-ups.
    pub fn enabled(&self) -> bool {
        self.live.is_some()
    }

    /// Wake-ups waiting or in progress.
    pub fn queued(&self) -> usize {
        self.live.as_ref().map_or(0, |(_, q)| q.tx.max_capacity() - q.tx.capacity() + q.busy.load(Ordering::Relaxed))
    }

    /// Registers `token` of `platform` for `addr` (an empty token removes
    /// it); the future answers once it is durable, or why not.
    pub fn set_token(
        &self,
        addr: DeviceAddr,
        platform: i32,
        token: Bytes,
    ) -> Result<impl Future<Output = Result<(), pb::ErrorCode>> + Send + 'static, SubmitError> {
        let refuse = |code| Ok(Either::Left(std::future::ready(Err(code))));
        let Some((gateway, queue)) = &self.live else {
            return refuse(pb::ErrorCode::NotSupported);
        };
        let record = if token.is_empty() {
            None
        } else {
            if let Err(code) = gateway.check_token(platform, &token) {
                return refuse(code);
            }
            Some(PushRecord { platform, registered: unix_now(), token })
        };
        let (tx, rx) = oneshot::channel();
        let op = TokenOp { addr, record, queue: queue.clone(), reply: Some(tx) };
        self.writer.try_submit(Box::new(op)).map_err(|r| r.reason)?;
        Ok(Either::Right(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) }))
    }
}

struct TokenOp {
    addr: DeviceAddr,
    record: Option<PushRecord>,
    queue: Arc<Queue>,
    reply: Option<oneshot::Sender<Result<(), pb::ErrorCode>>>,
}

impl Operation<Ctx> for TokenOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        match &self.record {
            Some(r) => txn.put_push_token(self.addr, r.clone()),
            None => txn.delete_push_token(self.addr),
        }
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        let r = match outcome {
            Outcome::Durable => {
                // Best effort: a stale "no token" lasts one interval at most.
                let _ = self.queue.tx.try_send(Job::Forget(self.addr));
                Ok(())
            }
            Outcome::Failed(_) => Err(pb::ErrorCode::Internal),
        };
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

/// Forgets a token the gateway says is gone, unless the device has
/// registered another since.
struct DropTokenOp {
    addr: DeviceAddr,
    token: Bytes,
}

impl Operation<Ctx> for DropTokenOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        if txn.push_token(self.addr)?.is_some_and(|r| r.token == self.token) {
            txn.delete_push_token(self.addr);
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut Ctx, _: Outcome<'_>) {}
}

/// What the worker remembers about a device it woke recently.
struct Slot {
    /// No new wake-up before this.
    until: Instant,
    /// A delivery is under way (looking up, sending, retrying).
    busy: bool,
    /// The device has no token: nothing was coalesced.
    no_token: bool,
}

/// A delivery ended.
struct Done {
    addr: DeviceAddr,
    no_token: bool,
}

struct Worker {
    cfg: PushConfig,
    store: Arc<Store>,
    registry: Arc<Registry>,
    writer: Writer,
    gateway: Arc<Gateway>,
    busy: Arc<AtomicUsize>,
    permits: Arc<Semaphore>,
}

fn failed(reason: &'static str) {
    metrics::counter!("pipit_push_failed_total", "reason" => reason).increment(1);
}

impl Worker {
    fn run(self, mut rx: mpsc::Receiver<Job>, shutdown: CancellationToken) {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "push worker: no runtime; wake-ups are off");
                return;
            }
        };
        let me = Arc::new(self);
        rt.block_on(async move {
            let mut slots: HashMap<DeviceAddr, Slot> = HashMap::new();
            // At most one report per delivery, and at most `queue`
            // deliveries: this channel never holds more.
            let (report_tx, mut reports) = mpsc::channel::<Done>(me.cfg.queue.max(1));
            let mut sweep = tokio::time::interval(Duration::from_secs(1));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    job = rx.recv() => match job {
                        None => break,
                        Some(Job::Wake(addr)) => me.wake(addr, &mut slots, &report_tx),
                        Some(Job::Forget(addr)) => {
                            if slots.get(&addr).is_some_and(|s| !s.busy) {
                                slots.remove(&addr);
                            }
                        }
                    },
                    Some(Done { addr, no_token }) = reports.recv() => {
                        if let Some(s) = slots.get_mut(&addr) {
                            s.busy = false;
                            s.no_token = no_token;
                        }
                    }
                    _ = sweep.tick() => {
                        let now = Instant::now();
                        slots.retain(|_, s| s.busy || s.until > now);
                    }
                }
            }
        });
    }

    fn wake(self: &Arc<Self>, addr: DeviceAddr, slots: &mut HashMap<DeviceAddr, Slot>, reports: &mpsc::Sender<Done>) {
        let now = Instant::now();
        if let Some(s) = slots.get(&addr) {
            if s.busy || s.until > now {
                if !s.no_token {
                    metrics::counter!("pipit_push_coalesced_total").increment(1);
                }
                return;
            }
        }
        if slots.len() >= self.cfg.queue {
            slots.retain(|_, s| s.busy || s.until > now);
            if slots.len() >= self.cfg.queue {
                metrics::counter!("pipit_push_dropped_total", "reason" => "queue_full").increment(1);
                return;
            }
        }
        slots.insert(addr, Slot { until: now + self.cfg.interval, busy: true, no_token: false });
        self.busy.fetch_add(1, Ordering::Relaxed);
        let me = self.clone();
        let reports = reports.clone();
        tokio::spawn(async move {
            let no_token = me.deliver(addr).await;
            me.busy.fetch_sub(1, Ordering::Relaxed);
            let _ = reports.send(Done { addr, no_token }).await;
        });
    }

    /// Wakes `addr` if it has a token; true when it has none.
    async fn deliver(&self, addr: DeviceAddr) -> bool {
        let store = self.store.clone();
        let found = super::blocking(move || {
            let Some(record) = store.push_token(addr)? else { return Ok(None) };
            Ok(Some((record, store.inbox_count_after(addr, 0, UNREAD_CAP)?)))
        })
        .await;
        let (record, unread) = match found {
            Ok(Some(x)) => x,
            Ok(None) => return true,
            Err(e) => {
                tracing::warn!(error = %e, device = %addr, "push: token lookup failed");
                failed("storage");
                return false;
            }
        };
        let wake = WakeUp { addr, record: &record, unread };
        for attempt in 0..=self.cfg.retries {
            if self.registry.is_online(addr) {
                // It connected meanwhile: the message is on its way.
                metrics::counter!("pipit_push_skipped_total", "reason" => "online").increment(1);
                return false;
            }
            let verdict = {
                let Ok(_permit) = self.permits.acquire().await else { return false };
                self.gateway.send(&wake).await
            };
            match verdict {
                Verdict::Sent => {
                    metrics::counter!("pipit_push_sent_total").increment(1);
                    return false;
                }
                Verdict::TokenGone => {
                    failed("token_gone");
                    tracing::info!(device = %addr, "push: the gateway says the token is gone; forgetting it");
                    let op = DropTokenOp { addr, token: record.token.clone() };
                    let _ = self.writer.submit(Box::new(op)).await;
                    return false;
                }
                Verdict::Rejected(reason) => {
                    failed(reason);
                    tracing::warn!(device = %addr, reason, "push: the gateway refused the wake-up");
                    return false;
                }
                Verdict::Retry(reason) => {
                    metrics::counter!("pipit_push_retries_total", "reason" => reason).increment(1);
                    if attempt == self.cfg.retries {
                        failed("gave_up");
                        tracing::warn!(device = %addr, reason, "push: gave up after retries");
                        return false;
                    }
                    tokio::time::sleep(self.backoff(attempt)).await;
                }
            }
        }
        false
    }

    /// The wait before retry `attempt + 1`: doubling from the base, capped,
    /// with up to a quarter of jitter so retries after a gateway outage do
    /// not arrive in step.
    fn backoff(&self, attempt: u32) -> Duration {
        let d = self.cfg.retry_base.saturating_mul(1 << attempt.min(16)).min(self.cfg.retry_max);
        let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=d.as_millis() as u64 / 4);
        d + Duration::from_millis(jitter)
    }
}
