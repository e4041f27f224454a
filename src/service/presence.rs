//! Presence: who is online, last seen, and the privacy setting that hides
//! it (SPEC.md 5.8).
//!
//! The live state (connections, watchers, fan-out) is `route::presence`;
//! this file adds what needs a clock or the disk. An account is shown
//! offline only after its last connection has been gone for the grace
//! period, run by one timer thread (`pipit-presence`). Its last seen is
//! made durable through the writer when it goes offline, at most once per
//! granularity per account: a departure within the granularity of the
//! previous write is held and written when the granularity has passed,
//! so a flapping link costs no write per reconnect and the durable value
//! is never older than the granularity. These writes are best effort and
//! never make a client wait: a full storage queue holds them back, it
//! does not push back on anyone.

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Condvar, Mutex, Weak};
use std::time::{Duration, Instant};

use pipit_protocol::message::pb;
use tokio::sync::oneshot;

use super::{Ctx, Writer};
use crate::commit::{Operation, Outcome, SubmitError};
use crate::model::{unix_now, DeviceAddr};
use crate::route::{ConnHandle, Leaving, Registry, Stored, Watcher};
use crate::store::{StorageError, Store, Txn};

/// Presence settings.
#[derive(Debug, Clone, Copy)]
pub struct PresenceConfig {
    /// How long an account stays online after its last connection left.
    pub grace: Duration,
    /// Shortest time between two durable writes of one account's last
    /// seen.
    pub granularity: Duration,
    /// Most accounts one connection may watch (at most the protocol's
    /// 256).
    pub max_subscriptions: usize,
}

impl Default for PresenceConfig {
    fn default() -> Self {
        Self { grace: Duration::from_secs(5), granularity: Duration::from_secs(60), max_subscriptions: 256 }
    }
}

/// Last-seen writes held back (a full storage queue); past this the
/// oldest are dropped: the in-memory value stays right, only a restart
/// would show an older one.
const UNSENT_MAX: usize = 100_000;
/// Accounts whose recent write is remembered for the granularity; past
/// this, departures are written without holding them back.
const RECENT_MAX: usize = 1 << 20;
/// Most last-seen writes in one writer operation.
const WRITES_PER_OP: usize = 4_096;

/// Presence for the network layer: connect and disconnect hooks,
/// subscriptions, privacy.
#[derive(Clone)]
pub struct Presence {
    registry: Arc<Registry>,
    store: Arc<Store>,
    writer: Writer,
    cfg: PresenceConfig,
    timer: Arc<Timer>,
}

/// Where a departure waits for its grace period, and a last seen for its
/// granularity.
struct Timer {
    state: Mutex<TimerState>,
    wake: Condvar,
}

#[derive(Default)]
struct TimerState {
    /// Departures in order of their deadlines (one grace period for all,
    /// so arrival order is deadline order).
    grace: VecDeque<(Instant, Leaving)>,
    /// Accounts written within the granularity: when, and the newer last
    /// seen held back since.
    recent: HashMap<u64, Recent>,
    /// When each `recent` entry's granularity ends, in order.
    windows: VecDeque<(Instant, u64)>,
    /// Writes not yet handed to the writer.
    unsent: Vec<(u64, u64)>,
    stopped: bool,
}

struct Recent {
    written: Instant,
    held: Option<u64>,
}

impl TimerState {
    /// `account` was last seen at `time`: write it now, or hold it until
    /// the granularity since the previous write has passed.
    fn last_seen(&mut self, account: u64, time: u64, now: Instant, granularity: Duration) {
        match self.recent.get_mut(&account) {
            Some(r) if now < r.written + granularity => r.held = Some(time),
            _ => {
                if self.recent.len() < RECENT_MAX {
                    self.recent.insert(account, Recent { written: now, held: None });
                    self.windows.push_back((now + granularity, account));
                }
                self.queue_write(account, time);
            }
        }
    }

    fn queue_write(&mut self, account: u64, time: u64) {
        if self.unsent.len() >= UNSENT_MAX {
            metrics::counter!("pipit_last_seen_dropped_total").increment(1);
            self.unsent.remove(0);
        }
        self.unsent.push((account, time));
    }

    /// Granularity windows that ended by `now`: held values are written
    /// and start a new window; idle ones are forgotten.
    fn windows_ended(&mut self, now: Instant, granularity: Duration) {
        while let Some(&(end, account)) = self.windows.front() {
            if end > now {
                break;
            }
            self.windows.pop_front();
            let Some(r) = self.recent.get_mut(&account) else { continue };
            if r.written + granularity != end {
                continue;
            }
            match r.held.take() {
                Some(time) => {
                    r.written = now;
                    self.windows.push_back((now + granularity, account));
                    self.queue_write(account, time);
                }
                None => {
                    self.recent.remove(&account);
                }
            }
        }
    }

    fn next_deadline(&self) -> Option<Instant> {
        let g = self.grace.front().map(|(d, _)| *d);
        let w = self.windows.front().map(|(d, _)| *d);
        g.into_iter().chain(w).min()
    }
}

impl Presence {
    /// Presence over `registry`, writing through `writer`; starts the
    /// timer thread, which runs until [`Presence::stop`] or until every
    /// handle is gone.
    pub(crate) fn start(
        registry: Arc<Registry>,
        store: Arc<Store>,
        writer: Writer,
        cfg: PresenceConfig,
    ) -> std::io::Result<Self> {
        let timer = Arc::new(Timer { state: Mutex::new(TimerState::default()), wake: Condvar::new() });
        let thread =
            TimerThread { timer: Arc::downgrade(&timer), registry: registry.clone(), writer: writer.clone(), cfg };
        std::thread::Builder::new().name("pipit-presence".into()).spawn(move || thread.run())?;
        Ok(Self { registry, store, writer, cfg, timer })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.timer.lock()
    }

    /// The settings.
    pub fn config(&self) -> &PresenceConfig {
        &self.cfg
    }

    /// A device logged in on `handle`; returns the connection it replaces.
    pub fn connect(&self, addr: DeviceAddr, handle: ConnHandle) -> Option<ConnHandle> {
        self.registry.insert(addr, handle)
    }

    /// Connection `id` of `addr` ended.
    pub fn disconnect(&self, addr: DeviceAddr, id: u64) {
        let Some(leaving) = self.registry.remove(addr, id, unix_now()) else { return };
        let now = Instant::now();
        if self.cfg.grace.is_zero() {
            if let Some(t) = self.registry.grace_over(leaving) {
                self.lock().last_seen(leaving.account, t, now, self.cfg.granularity);
                self.timer.wake.notify_one();
            }
            return;
        }
        let mut st = self.lock();
        let was_idle = st.grace.is_empty();
        st.grace.push_back((now + self.cfg.grace, leaving));
        drop(st);
        if was_idle {
            self.timer.wake.notify_one();
        }
    }

    /// Replaces `watcher`'s subscriptions with `accounts`, whose current
    /// state it gets at once. `seq` increases with each request of one
    /// connection. All or nothing: an unknown account is `NOT_FOUND` and
    /// changes nothing; more than the configured number is `TOO_LARGE`.
    pub async fn subscribe(
        &self,
        watcher: Arc<Watcher>,
        seq: u64,
        mut accounts: Vec<u64>,
    ) -> Result<(), pb::ErrorCode> {
        accounts.sort_unstable();
        accounts.dedup();
        if accounts.len() > self.cfg.max_subscriptions {
            return Err(pb::ErrorCode::TooLarge);
        }
        if accounts.first() == Some(&0) {
            return Err(pb::ErrorCode::NotFound);
        }
        let store = self.store.clone();
        let stored = super::blocking(move || read_stored(&store, &accounts)).await.map_err(|e| {
            tracing::warn!(error = %e, "presence subscription: storage read failed");
            pb::ErrorCode::Internal
        })?;
        let Some(stored) = stored else {
            return Err(pb::ErrorCode::NotFound);
        };
        self.registry.watch(&watcher, seq, &stored);
        Ok(())
    }

    /// Ends `watcher`'s subscriptions: its connection closed.
    pub fn unwatch(&self, watcher: &Arc<Watcher>) {
        self.registry.unwatch(watcher);
    }

    /// Stores `account`'s privacy settings; the future answers once they
    /// are durable (and shown to watchers).
    pub fn set_privacy(
        &self,
        account: u64,
        settings: pb::PrivacySet,
    ) -> Result<impl Future<Output = Result<(), pb::ErrorCode>> + Send + 'static, SubmitError> {
        if pb::LastSeenVisibility::try_from(settings.last_seen).is_err() {
            // A setting this server does not know: refusing is the only
            // answer that does not pretend to honour it.
            return Ok(futures_util::future::Either::Left(std::future::ready(Err(pb::ErrorCode::BadRequest))));
        }
        let (tx, rx) = oneshot::channel();
        let op = PrivacyOp { account, settings, registry: self.registry.clone(), reply: Some(tx) };
        self.writer.try_submit(Box::new(op)).map_err(|r| r.reason)?;
        Ok(futures_util::future::Either::Right(async move { rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) }))
    }

    /// At shutdown, once every connection is gone: ends the grace periods,
    /// hands every held last seen to the writer (waiting up to `timeout`
    /// for room) and stops the timer thread.
    pub fn stop(&self, timeout: Duration) {
        let now = Instant::now();
        let writes = {
            let mut st = self.lock();
            st.stopped = true;
            let departures = std::mem::take(&mut st.grace);
            for (_, l) in departures {
                if let Some(time) = self.registry.grace_over(l) {
                    st.queue_write(l.account, time);
                }
            }
            let held: Vec<(u64, u64)> =
                st.recent.iter_mut().filter_map(|(a, r)| r.held.take().map(|t| (*a, t))).collect();
            st.unsent.extend(held);
            st.recent.clear();
            st.windows.clear();
            std::mem::take(&mut st.unsent)
        };
        self.timer.wake.notify_one();
        for chunk in writes.chunks(WRITES_PER_OP) {
            let op = Box::new(LastSeenOp { writes: chunk.to_vec() });
            let left = timeout.saturating_sub(now.elapsed());
            if self.writer.submit_blocking(op, left).is_err() {
                tracing::warn!("shutdown: last seen not saved for some accounts (storage queue full)");
                break;
            }
        }
    }
}

/// The thread that ends grace periods and hands last seen to the writer.
/// It holds the timer weakly: once every [`Presence`] handle is gone it
/// ends (within a second), and with it its handle on the writer.
struct TimerThread {
    timer: Weak<Timer>,
    registry: Arc<Registry>,
    writer: Writer,
    cfg: PresenceConfig,
}

impl Timer {
    fn lock(&self) -> std::sync::MutexGuard<'_, TimerState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The longest the timer thread sleeps before checking it is still
/// wanted.
const IDLE_WAKE: Duration = Duration::from_secs(1);

impl TimerThread {
    fn run(self) {
        loop {
            let Some(timer) = self.timer.upgrade() else { return };
            if !self.turn(&timer) {
                return;
            }
        }
    }

    /// One turn: ends due grace periods, writes what is due, sleeps until
    /// the next deadline (at most [`IDLE_WAKE`]). False once stopped.
    fn turn(&self, timer: &Timer) -> bool {
        let mut st = timer.lock();
        if st.stopped {
            return false;
        }
        let now = Instant::now();
        let mut due = Vec::new();
        while st.grace.front().is_some_and(|(d, _)| *d <= now) {
            if let Some((_, l)) = st.grace.pop_front() {
                due.push(l);
            }
        }
        if !due.is_empty() {
            // Publishing takes registry locks: not under this one.
            drop(st);
            let ended: Vec<(u64, u64)> =
                due.into_iter().filter_map(|l| self.registry.grace_over(l).map(|t| (l.account, t))).collect();
            st = timer.lock();
            for (account, time) in ended {
                st.last_seen(account, time, now, self.cfg.granularity);
            }
        }
        st.windows_ended(now, self.cfg.granularity);
        self.flush(&mut st);
        let wake = now + IDLE_WAKE;
        let next = st.next_deadline().map_or(wake, |d| d.min(wake));
        let wait = next.saturating_duration_since(Instant::now());
        drop(timer.wake.wait_timeout(st, wait).unwrap_or_else(|p| p.into_inner()));
        true
    }

    /// Hands held writes to the writer, as many operations as it has room
    /// for; the rest wait for the next turn (at most a second away).
    fn flush(&self, st: &mut TimerState) {
        while !st.unsent.is_empty() {
            let n = st.unsent.len().min(WRITES_PER_OP);
            let op = Box::new(LastSeenOp { writes: st.unsent[..n].to_vec() });
            if self.writer.try_submit(op).is_err() {
                return;
            }
            st.unsent.drain(..n);
        }
    }
}

/// Each account's durable presence, or `None` when one does not exist.
fn read_stored(store: &Store, accounts: &[u64]) -> Result<Option<Vec<Stored>>, StorageError> {
    let mut out = Vec::with_capacity(accounts.len());
    for &account in accounts {
        if !store.account_exists(account)? {
            return Ok(None);
        }
        let hidden = store.privacy(account)?.last_seen == pb::LastSeenVisibility::Nobody as i32;
        out.push(Stored { account, last_seen: store.last_seen(account)?, hidden });
    }
    Ok(Some(out))
}

struct LastSeenOp {
    writes: Vec<(u64, u64)>,
}

impl Operation<Ctx> for LastSeenOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        for &(account, time) in &self.writes {
            txn.put_last_seen(account, time);
        }
        Ok(())
    }

    fn finish(self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        match outcome {
            Outcome::Durable => metrics::counter!("pipit_last_seen_written_total").increment(self.writes.len() as u64),
            Outcome::Failed(e) => tracing::warn!(error = %e, accounts = self.writes.len(), "last seen not saved"),
        }
    }
}

struct PrivacyOp {
    account: u64,
    settings: pb::PrivacySet,
    registry: Arc<Registry>,
    reply: Option<oneshot::Sender<Result<(), pb::ErrorCode>>>,
}

impl Operation<Ctx> for PrivacyOp {
    fn apply(&mut self, _: &mut Ctx, txn: &mut Txn<'_>) -> Result<(), StorageError> {
        txn.put_privacy(self.account, self.settings);
        Ok(())
    }

    fn finish(mut self: Box<Self>, _: &mut Ctx, outcome: Outcome<'_>) {
        let r = match outcome {
            Outcome::Durable => {
                let hidden = self.settings.last_seen == pb::LastSeenVisibility::Nobody as i32;
                self.registry.set_hidden(self.account, hidden);
                Ok(())
            }
            Outcome::Failed(_) => Err(pb::ErrorCode::Internal),
        };
        if let Some(tx) = self.reply.take() {
            let _ = tx.send(r);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn last_seen_is_written_at_most_once_per_granularity_and_never_lost() {
        let g = Duration::from_secs(60);
        let t0 = Instant::now();
        let mut st = TimerState::default();
        st.last_seen(7, 1_000, t0, g);
        assert_eq!(std::mem::take(&mut st.unsent), vec![(7, 1_000)], "the first departure is written");
        for (i, t) in [1_010, 1_020, 1_030].into_iter().enumerate() {
            st.last_seen(7, t, t0 + Duration::from_secs(10 * (i as u64 + 1)), g);
        }
        assert!(st.unsent.is_empty(), "flaps within the granularity are held");
        st.windows_ended(t0 + Duration::from_secs(59), g);
        assert!(st.unsent.is_empty());
        st.windows_ended(t0 + g, g);
        assert_eq!(std::mem::take(&mut st.unsent), vec![(7, 1_030)], "the newest held value, once");
        st.windows_ended(t0 + 2 * g, g);
        assert!(st.unsent.is_empty());
        assert!(st.recent.is_empty(), "a quiet account is forgotten");
        st.last_seen(7, 2_000, t0 + 2 * g, g);
        assert_eq!(st.unsent, vec![(7, 2_000)]);
    }
}
