//! Admission control for new connections: the handshake is the one thing
//! a peer can make the server do that costs it real CPU (three to five
//! X25519 operations) for no cryptography of its own (32 random bytes
//! pass for an XX first message). Without limits a few hundred such
//! connections saturate a core and every established session's deliveries
//! wait behind them.
//!
//! - **Handshakes in progress are bounded** (`max_handshakes`): a
//!   connection takes a slot after accept and gives it back when its
//!   handshake ends. With none free a shard stops accepting until one
//!   frees, so new connections wait in the kernel's backlog rather than
//!   being refused: a reconnect storm larger than the bound gets in, a
//!   little later. A slot is cheap to take back from a peer that stalls:
//!   each handshake step has its own deadlines (see `handshake`).
//! - **Each source address has a share of the slots**
//!   (`max_handshakes_per_source`, by default a 32nd of them; IPv6 by
//!   /64): a source holding its share has its next connection refused,
//!   so a few addresses cannot take every slot and lock logins out.
//! - **Each source address has a token bucket** (`handshake_rate_per_source`
//!   per second, up to `handshake_burst_per_source` at once): a source
//!   over its rate is refused before any cryptography. The map of sources
//!   is bounded: idle sources (no handshake in progress, bucket full
//!   again) are evicted, and a new source that finds it full of busy ones
//!   is let through unmetered rather than locked out.
//! - **Established sessions come first**: handshake cryptography runs on
//!   its own threads at a lower scheduling priority (nice 10), not on the
//!   shards, so a shard's event loop keeps delivering while a flood of
//!   handshakes waits for the CPU the shards leave.
//!
//! A refusal costs the server an accept and a 4-byte `Refuse` frame
//! (`RATE_LIMITED`, best effort), and is counted and logged (at most one
//! line per 10 s).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::ConnError;
use crate::model::LogGate;

/// Admission settings.
#[derive(Debug, Clone, Copy)]
pub struct AdmissionConfig {
    /// Handshakes in progress at once, server-wide.
    pub max_handshakes: usize,
    /// Handshakes in progress at once from one source address.
    pub max_per_source: usize,
    /// New connections per second per source address; 0 = no limit.
    pub rate_per_source: f64,
    /// How many a source may open at once before its rate applies.
    pub burst_per_source: f64,
    /// Threads doing handshake cryptography.
    pub threads: usize,
}

/// Most source addresses tracked at once.
const MAX_SOURCES: usize = 65_536;

/// Scheduling priority of the handshake threads (nice): below the
/// shards', so established sessions are served first when the CPU is
/// short, but not so low that logins starve behind steady traffic
/// (weight 110 against the shards' 1,024: about a tenth of a busy core).
const HANDSHAKE_NICE: i32 = 10;

/// What is known of one source address.
#[derive(Debug, Clone, Copy)]
struct Source {
    /// Its token bucket: tokens left, as of `at`.
    tokens: f64,
    at: Instant,
    /// Its handshakes in progress.
    in_progress: usize,
}

type Sources = Arc<Mutex<HashMap<IpAddr, Source>>>;

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// The source holds its share of the handshake slots.
    Busy,
    /// The source is over its rate.
    Throttled,
}

impl Refusal {
    fn as_str(self) -> &'static str {
        match self {
            Refusal::Busy => "busy",
            Refusal::Throttled => "throttled",
        }
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// The admission state of one server.
pub(super) struct Admission {
    cfg: AdmissionConfig,
    slots: Arc<Semaphore>,
    sources: Sources,
    jobs: crossbeam_channel::Sender<Job>,
}

/// A connection admitted by its source, waiting for a server-wide slot
/// ([`Admitted::slot`]).
pub(super) struct Admitted {
    source: Option<SourceHold>,
    slots: Arc<Semaphore>,
}

/// A connection's place among the handshakes in progress, server-wide and
/// of its source; both are given back when it is dropped.
pub(super) struct Slot {
    _permit: OwnedSemaphorePermit,
    _source: Option<SourceHold>,
}

/// One handshake in progress counted against its source.
struct SourceHold {
    sources: Sources,
    key: IpAddr,
}

impl Drop for SourceHold {
    fn drop(&mut self) {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = sources.get_mut(&self.key) {
            s.in_progress = s.in_progress.saturating_sub(1);
        }
    }
}

impl Admitted {
    /// Waits for a server-wide handshake slot. The listener awaits this
    /// before it accepts again, so while every slot is taken new
    /// connections wait in the kernel's backlog.
    pub(super) async fn slot(self) -> Slot {
        // The semaphore is never closed.
        let permit = self.slots.acquire_owned().await.expect("handshake slots are never closed");
        Slot { _permit: permit, _source: self.source }
    }
}

static REFUSED_LOG: LogGate = LogGate::new(10_000);

impl Admission {
    /// Starts the handshake threads.
    pub(super) fn start(cfg: AdmissionConfig) -> std::io::Result<Self> {
        let (jobs, rx) = crossbeam_channel::unbounded::<Job>();
        for i in 0..cfg.threads.max(1) {
            let rx = rx.clone();
            std::thread::Builder::new().name(format!("pipit-handshake-{i}")).spawn(move || {
                // Lowering one's own priority needs no privilege; if it
                // fails anyway the threads still work, at equal priority.
                if let Err(e) = rustix::process::setpriority_process(None, HANDSHAKE_NICE) {
                    tracing::debug!(error = %e, "could not lower the handshake threads' priority");
                }
                // Ends when the server's last connection context is gone.
                while let Ok(job) = rx.recv() {
                    job();
                }
            })?;
        }
        Ok(Self {
            cfg,
            slots: Arc::new(Semaphore::new(cfg.max_handshakes.max(1))),
            sources: Arc::new(Mutex::new(HashMap::new())),
            jobs,
        })
    }

    /// Admits a new connection from `source` as far as its source goes
    /// (its rate, its share of the slots), or says why not. The
    /// server-wide slot comes next, from [`Admitted::slot`].
    pub(super) fn admit(&self, source: IpAddr, now: Instant) -> Result<Admitted, Refusal> {
        let source = self.take(source, now)?;
        Ok(Admitted { source, slots: self.slots.clone() })
    }

    fn refused(&self, why: Refusal, source: IpAddr) -> Refusal {
        metrics::counter!("pipit_connections_refused_total", "reason" => why.as_str()).increment(1);
        if let Some(suppressed) = REFUSED_LOG.open() {
            tracing::warn!(%source, reason = why.as_str(), suppressed, "refused a new connection before its handshake");
        }
        why
    }

    /// Takes a token and a share of the slots from `ip`'s source.
    /// `Ok(None)`: the source is not tracked (no limits apply, or the map
    /// is full of busy sources).
    fn take(&self, ip: IpAddr, now: Instant) -> Result<Option<SourceHold>, Refusal> {
        let rate = self.cfg.rate_per_source;
        let share = self.cfg.max_per_source;
        if rate <= 0.0 && share >= self.cfg.max_handshakes {
            return Ok(None);
        }
        let burst = self.cfg.burst_per_source.max(1.0);
        // A bucket that has refilled and no handshake in progress: nothing
        // worth keeping.
        let idle = |s: &Source| {
            s.in_progress == 0
                && (rate <= 0.0 || s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * rate >= burst)
        };
        let key = source_key(ip);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            sources.retain(|_, s| !idle(s));
            if sources.len() >= MAX_SOURCES {
                return Ok(None);
            }
        }
        let s = sources.entry(key).or_insert(Source { tokens: burst, at: now, in_progress: 0 });
        if s.in_progress >= share {
            drop(sources);
            return Err(self.refused(Refusal::Busy, ip));
        }
        if rate > 0.0 {
            s.tokens = (s.tokens + now.saturating_duration_since(s.at).as_secs_f64() * rate).min(burst);
            s.at = now;
            if s.tokens < 1.0 {
                drop(sources);
                return Err(self.refused(Refusal::Throttled, ip));
            }
            s.tokens -= 1.0;
        }
        s.in_progress += 1;
        Ok(Some(SourceHold { sources: self.sources.clone(), key }))
    }

    /// Runs `f` (handshake cryptography) on a handshake thread.
    pub(super) async fn crypto<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, ConnError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.jobs
            .send(Box::new(move || {
                let _ = tx.send(f());
            }))
            .map_err(|_| ConnError::Closed)?;
        rx.await.map_err(|_| ConnError::Closed)
    }

    /// Handshakes in progress now.
    pub(super) fn in_progress(&self) -> usize {
        self.cfg.max_handshakes.max(1) - self.slots.available_permits()
    }
}

/// The unit a rate applies to: an IPv4 address, or an IPv6 /64 (what one
/// subscriber usually gets).
fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let mut seg = v6.segments();
                seg[4..].fill(0);
                IpAddr::V6(seg.into())
            }
        },
    }
}

/// Writes a `Refuse(RATE_LIMITED)` frame without waiting, and closes.
pub(super) fn refuse(stream: std::net::TcpStream) {
    use std::io::Write as _;
    let mut frame = bytes::BytesMut::new();
    pipit_protocol::handshake::refuse(pipit_protocol::message::pb::ErrorCode::RateLimited, &mut frame);
    let _ = (&stream).write(&frame);
    drop(stream);
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn admission(rate: f64, burst: f64, slots: usize, per_source: usize) -> Admission {
        Admission::start(AdmissionConfig {
            max_handshakes: slots,
            max_per_source: per_source,
            rate_per_source: rate,
            burst_per_source: burst,
            threads: 1,
        })
        .unwrap()
    }

    fn block_on<F: std::future::Future>(f: F) -> F::Output {
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
    }

    #[test]
    fn a_source_over_its_rate_is_refused_and_others_are_not() {
        let a = admission(10.0, 3.0, 100, 100);
        let t = Instant::now();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let mut admitted = Vec::new();
        for _ in 0..3 {
            admitted.push(a.admit(one, t).unwrap());
        }
        assert_eq!(a.admit(one, t).err(), Some(Refusal::Throttled));
        assert!(a.admit(two, t).is_ok(), "another source is unaffected");
        // A tenth of a second later, one more token.
        assert!(a.admit(one, t + Duration::from_millis(110)).is_ok());
        assert_eq!(a.admit(one, t + Duration::from_millis(110)).err(), Some(Refusal::Throttled));
    }

    #[test]
    fn a_source_holding_its_share_of_the_slots_is_refused_and_others_are_not() {
        let a = admission(0.0, 0.0, 8, 2);
        let t = Instant::now();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let first = a.admit(one, t).unwrap();
        let _second = a.admit(one, t).unwrap();
        assert_eq!(a.admit(one, t).err(), Some(Refusal::Busy));
        let _other = a.admit(two, t).unwrap();
        // Its share comes back when a handshake ends, slot or no slot yet.
        let slot = block_on(first.slot());
        assert_eq!(a.admit(one, t).err(), Some(Refusal::Busy));
        drop(slot);
        assert!(a.admit(one, t).is_ok());
    }

    #[test]
    fn past_max_handshakes_a_connection_waits_for_a_slot() {
        let a = admission(0.0, 0.0, 2, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        block_on(async {
            let s1 = a.admit(ip, Instant::now()).unwrap().slot().await;
            let _s2 = a.admit(ip, Instant::now()).unwrap().slot().await;
            assert_eq!(a.in_progress(), 2);
            let mut third = std::pin::pin!(a.admit(ip, Instant::now()).unwrap().slot());
            assert!(tokio::time::timeout(Duration::from_millis(50), &mut third).await.is_err(), "no slot is free");
            drop(s1);
            tokio::time::timeout(Duration::from_secs(1), third).await.expect("the freed slot");
        });
    }

    #[test]
    fn idle_sources_are_evicted_and_busy_ones_kept() {
        let a = admission(1.0, 1.0, 100_000, 1);
        let t = Instant::now();
        let busy: IpAddr = "10.0.0.1".parse().unwrap();
        let _held = a.admit(busy, t).unwrap();
        for i in 0..MAX_SOURCES as u32 - 1 {
            let ip = IpAddr::V4((0x0b00_0000 + i).into());
            drop(a.admit(ip, t).unwrap());
        }
        // Full: a new source evicts the refilled ones, not the busy one.
        let later = t + Duration::from_secs(2);
        assert!(a.admit("12.0.0.1".parse().unwrap(), later).is_ok());
        assert_eq!(a.sources.lock().unwrap().len(), 2);
        assert_eq!(a.admit(busy, later).err(), Some(Refusal::Busy));
    }

    #[test]
    fn ipv6_sources_count_by_their_64_prefix() {
        let a: IpAddr = "2001:db8:1:2:aaaa::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:bbbb::2".parse().unwrap();
        let c: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert_eq!(source_key(a), source_key(b));
        assert_ne!(source_key(a), source_key(c));
        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(source_key(mapped), "10.0.0.1".parse::<IpAddr>().unwrap());
    }

    #[test]
    fn crypto_runs_on_a_handshake_thread() {
        let a = admission(0.0, 0.0, 1, 1);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let name = rt.block_on(a.crypto(|| std::thread::current().name().map(str::to_string))).unwrap();
        assert_eq!(name.as_deref(), Some("pipit-handshake-0"));
    }
}
