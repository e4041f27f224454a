//! A link emulator: a TCP proxy in user space that delays, rate-limits,
//! jitters, stalls and cuts traffic, since this kernel has no `netem`.
//!
//! Each direction models a bottleneck link: a chunk read at `t` leaves the
//! bottleneck when the link is free plus its serialization time at the
//! configured rate, and is written to the other side one-way delay (plus
//! jitter, never reordering) later. Only loopback addresses are accepted,
//! as everything here is meant for tests on this machine.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// The link's shape, per direction.
#[derive(Debug, Clone, Copy, Default)]
pub struct Link {
    /// One-way propagation delay.
    pub delay: Duration,
    /// Bandwidth cap in bits per second; 0 = unlimited.
    pub rate_bps: u64,
    /// Extra random delay, up to this much (order is kept).
    pub jitter: Duration,
}

impl Link {
    /// A 2G-like link: `rtt` split evenly, `kbps` each way.
    pub fn mobile(rtt: Duration, kbps: u64) -> Self {
        Self { delay: rtt / 2, rate_bps: kbps * 1_000, jitter: Duration::ZERO }
    }

    fn serialization(&self, bytes: usize) -> Duration {
        // A zero rate means unlimited: no serialization delay.
        Duration::from_nanos((bytes as u64 * 8).saturating_mul(1_000_000_000).checked_div(self.rate_bps).unwrap_or(0))
    }
}

/// Byte and chunk counters for one direction.
#[derive(Debug, Default)]
pub struct Counters {
    /// Bytes forwarded.
    pub bytes: AtomicU64,
    /// Writes forwarded (each at least one TCP segment).
    pub writes: AtomicU64,
}

/// Counters for both directions and connections.
#[derive(Debug, Default)]
pub struct Stats {
    /// Client to server.
    pub up: Counters,
    /// Server to client.
    pub down: Counters,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections cut by [`Proxy::cut`].
    pub cuts: AtomicU64,
}

struct Shared {
    upstream: Mutex<SocketAddr>,
    up: Link,
    down: Link,
    stats: Stats,
    /// Replaced on every cut: connections watch the token they started with.
    generation: Mutex<CancellationToken>,
    /// While true, nothing is forwarded (a stall: sockets stay open).
    stalled: watch::Sender<bool>,
}

/// A running proxy. Dropping it stops accepting and closes every
/// connection.
pub struct Proxy {
    addr: SocketAddr,
    shared: Arc<Shared>,
    stop: CancellationToken,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.cancel();
        self.shared.generation.lock().expect("lock").cancel();
    }
}

/// Refuses anything but loopback: traffic generators here must never aim
/// elsewhere.
fn check_loopback(addr: SocketAddr) -> std::io::Result<()> {
    if addr.ip().is_loopback() {
        Ok(())
    } else {
        Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{addr} is not a loopback address")))
    }
}

impl Proxy {
    /// Listens on `listen` and forwards to `upstream` through links shaped
    /// `up` (client to server) and `down`.
    pub async fn start(listen: SocketAddr, upstream: SocketAddr, up: Link, down: Link) -> std::io::Result<Self> {
        check_loopback(listen)?;
        check_loopback(upstream)?;
        let listener = TcpListener::bind(listen).await?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            upstream: Mutex::new(upstream),
            up,
            down,
            stats: Stats::default(),
            generation: Mutex::new(CancellationToken::new()),
            stalled: watch::channel(false).0,
        });
        let stop = CancellationToken::new();
        tokio::spawn(accept_loop(listener, shared.clone(), stop.clone()));
        Ok(Self { addr, shared, stop })
    }

    /// Where clients connect.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Points new connections at another server (a restarted one).
    pub fn set_upstream(&self, upstream: SocketAddr) -> std::io::Result<()> {
        check_loopback(upstream)?;
        *self.shared.upstream.lock().expect("lock") = upstream;
        Ok(())
    }

    /// Cuts every open connection at once, as a dropped mobile link does
    /// (both ends see the connection close; bytes in flight are lost).
    pub fn cut(&self) {
        let mut g = self.shared.generation.lock().expect("lock");
        g.cancel();
        *g = CancellationToken::new();
        self.shared.stats.cuts.fetch_add(1, Ordering::Relaxed);
    }

    /// Stops (true) or resumes (false) forwarding without closing anything,
    /// as a link that stalls does.
    pub fn stall(&self, stalled: bool) {
        let _ = self.shared.stalled.send(stalled);
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }
}

async fn accept_loop(listener: TcpListener, shared: Arc<Shared>, stop: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            _ = stop.cancelled() => return,
            a = listener.accept() => a,
        };
        let Ok((client, _)) = accepted else { continue };
        let shared = shared.clone();
        tokio::spawn(async move {
            let upstream = *shared.upstream.lock().expect("lock");
            let token = shared.generation.lock().expect("lock").clone();
            let Ok(server) = TcpStream::connect(upstream).await else { return };
            let _ = client.set_nodelay(true);
            let _ = server.set_nodelay(true);
            shared.stats.connections.fetch_add(1, Ordering::Relaxed);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            let up = tokio::spawn(pump(cr, sw, shared.clone(), true, token.clone()));
            let down = tokio::spawn(pump(sr, cw, shared.clone(), false, token.clone()));
            let _ = tokio::join!(up, down);
        });
    }
}

/// Forwards one direction through the emulated link.
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    shared: Arc<Shared>,
    upward: bool,
    cut: CancellationToken,
) {
    let link = if upward { shared.up } else { shared.down };
    // Bounded: a reader cannot run ahead of the emulated link by more than
    // this many chunks (that is TCP's own window doing its job).
    let (tx, mut rx) = mpsc::channel::<(Instant, Bytes)>(64);
    let reader_cut = cut.clone();
    let mut stalled = shared.stalled.subscribe();
    let reader = async move {
        let mut link_free = Instant::now();
        let mut last_out = Instant::now();
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = tokio::select! {
                _ = reader_cut.cancelled() => return,
                r = from.read(&mut buf) => match r { Ok(0) | Err(_) => return, Ok(n) => n },
            };
            let now = Instant::now();
            link_free = link_free.max(now) + link.serialization(n);
            let jitter = if link.jitter.is_zero() {
                Duration::ZERO
            } else {
                Duration::from_nanos(rand::random_range(0..=link.jitter.as_nanos() as u64))
            };
            // Never reorder: a later chunk leaves no earlier than the last.
            let out = (link_free + link.delay + jitter).max(last_out);
            last_out = out;
            if tx.send((out, Bytes::copy_from_slice(&buf[..n]))).await.is_err() {
                return;
            }
        }
    };
    let counters = if upward { &shared.stats.up } else { &shared.stats.down };
    let writer = async {
        while let Some((at, chunk)) = rx.recv().await {
            tokio::select! {
                _ = cut.cancelled() => return,
                _ = tokio::time::sleep_until(at) => {}
            }
            while *stalled.borrow() {
                tokio::select! {
                    _ = cut.cancelled() => return,
                    r = stalled.changed() => if r.is_err() { return },
                }
            }
            if to.write_all(&chunk).await.is_err() {
                return;
            }
            counters.bytes.fetch_add(chunk.len() as u64, Ordering::Relaxed);
            counters.writes.fetch_add(1, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}
