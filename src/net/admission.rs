//! Admission control for new connections: the handshake is the one thing
//! a peer can make the server do that costs it real CPU (three to five
//! X25519 operations) for no cryptography of its own (32 random bytes
//! pass for an XX first message). Without limits a few hundred such
//! connections saturate a core and every established session's deliveries
//! wait behind them.
//!
//! - **Handshakes in progress are bounded** (`max_handshakes`): a
//!   connection takes a slot at accept and gives it back when its
//!   handshake ends; with none free it is refused at once.
//! - **Each source address has a token bucket** (`handshake_rate_per_source`
//!   per second, up to `handshake_burst_per_source` at once; IPv6 by /64):
//!   a source over its rate is refused before any cryptography. The map
//!   of sources is bounded: idle buckets (full again) are evicted, and a
//!   new source that finds it full of busy ones is let through unmetered
//!   rather than locked out.
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

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// Why a connection was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refusal {
    /// Every handshake slot is taken.
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
    sources: Mutex<HashMap<IpAddr, Bucket>>,
    jobs: crossbeam_channel::Sender<Job>,
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
            sources: Mutex::new(HashMap::new()),
            jobs,
        })
    }

    /// Admits a new connection from `source` (a handshake slot, held until
    /// the handshake ends), or says why not.
    pub(super) fn admit(&self, source: IpAddr, now: Instant) -> Result<OwnedSemaphorePermit, Refusal> {
        if !self.take_token(source, now) {
            return Err(self.refused(Refusal::Throttled, source));
        }
        self.slots.clone().try_acquire_owned().map_err(|_| self.refused(Refusal::Busy, source))
    }

    fn refused(&self, why: Refusal, source: IpAddr) -> Refusal {
        metrics::counter!("pipit_connections_refused_total", "reason" => why.as_str()).increment(1);
        if let Some(suppressed) = REFUSED_LOG.open() {
            tracing::warn!(%source, reason = why.as_str(), suppressed, "refused a new connection before its handshake");
        }
        why
    }

    fn take_token(&self, source: IpAddr, now: Instant) -> bool {
        let rate = self.cfg.rate_per_source;
        if rate <= 0.0 {
            return true;
        }
        let burst = self.cfg.burst_per_source.max(1.0);
        let key = source_key(source);
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if !sources.contains_key(&key) && sources.len() >= MAX_SOURCES {
            // A bucket that has refilled holds nothing worth keeping.
            sources.retain(|_, b| b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate < burst);
            if sources.len() >= MAX_SOURCES {
                return true;
            }
        }
        let b = sources.entry(key).or_insert(Bucket { tokens: burst, at: now });
        b.tokens = (b.tokens + now.saturating_duration_since(b.at).as_secs_f64() * rate).min(burst);
        b.at = now;
        if b.tokens >= 1.0 {
            b.tokens -= 1.0;
            true
        } else {
            false
        }
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

    fn admission(rate: f64, burst: f64, slots: usize) -> Admission {
        Admission::start(AdmissionConfig {
            max_handshakes: slots,
            rate_per_source: rate,
            burst_per_source: burst,
            threads: 1,
        })
        .unwrap()
    }

    #[test]
    fn a_source_over_its_rate_is_refused_and_others_are_not() {
        let a = admission(10.0, 3.0, 100);
        let t = Instant::now();
        let one: IpAddr = "10.0.0.1".parse().unwrap();
        let two: IpAddr = "10.0.0.2".parse().unwrap();
        let mut permits = Vec::new();
        for _ in 0..3 {
            permits.push(a.admit(one, t).unwrap());
        }
        assert_eq!(a.admit(one, t).unwrap_err(), Refusal::Throttled);
        assert!(a.admit(two, t).is_ok(), "another source is unaffected");
        // A tenth of a second later, one more token.
        assert!(a.admit(one, t + Duration::from_millis(110)).is_ok());
        assert_eq!(a.admit(one, t + Duration::from_millis(110)).unwrap_err(), Refusal::Throttled);
    }

    #[test]
    fn handshakes_in_progress_are_bounded() {
        let a = admission(0.0, 0.0, 2);
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        let p1 = a.admit(ip, Instant::now()).unwrap();
        let _p2 = a.admit(ip, Instant::now()).unwrap();
        assert_eq!(a.admit(ip, Instant::now()).unwrap_err(), Refusal::Busy);
        assert_eq!(a.in_progress(), 2);
        drop(p1);
        assert!(a.admit(ip, Instant::now()).is_ok());
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
        let a = admission(0.0, 0.0, 1);
        let rt = tokio::runtime::Builder::new_current_thread().build().unwrap();
        let name = rt.block_on(a.crypto(|| std::thread::current().name().map(str::to_string))).unwrap();
        assert_eq!(name.as_deref(), Some("pipit-handshake-0"));
    }
}
