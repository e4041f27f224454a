//! Listeners and shards: one thread per shard, each a single-threaded
//! tokio runtime with its own `SO_REUSEPORT` listener, so the kernel
//! spreads new connections across shards and a connection's task never
//! migrates. A shard accepts only while a handshake slot is free (see
//! `admission`): past `max_handshakes` new connections wait in the
//! kernel's backlog, not refused.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio_util::task::TaskTracker;

use super::{ConnCtx, NetConfig};

/// The listening sockets of `n` shards on `addr`, sharing one port with
/// `SO_REUSEPORT` so the kernel spreads new connections across them.
///
/// `SO_REUSEPORT` would just as gladly let a second server of the same
/// user join the group and take a share of new connections, so first:
/// a probe bind without it fails with "address in use" when anything
/// listens there, pipit or not; and a lock on the address (an abstract
/// Unix socket named after it, released by the kernel when the process
/// ends, however it ends) keeps two servers that start at the same moment
/// from both passing the probe. Port 0 picks a free port and needs
/// neither.
pub fn bind_all(addr: SocketAddr, n: usize) -> anyhow::Result<Shared> {
    let probe = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    // Address reuse lets a restart bind past its old connections in
    // TIME_WAIT; it does not let it bind past a listener.
    probe.set_reuse_address(true)?;
    let lock = if addr.port() == 0 { None } else { Some(lock_address(addr)?) };
    probe.bind(&addr.into()).map_err(|e| in_use(addr, e))?;
    let addr = probe.local_addr()?.as_socket().context("a TCP address")?;
    drop(probe);
    let mut listeners = Vec::with_capacity(n);
    for _ in 0..n.max(1) {
        listeners.push(bind(addr)?);
    }
    Ok(Shared { listeners, _lock: lock })
}

/// The shards' listeners, and the lock that keeps another server off
/// their address while they live.
#[derive(Debug)]
pub struct Shared {
    /// One per shard.
    pub listeners: Vec<std::net::TcpListener>,
    _lock: Option<std::os::unix::net::UnixListener>,
}

fn in_use(addr: SocketAddr, e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::AddrInUse {
        anyhow::anyhow!("address {addr} is in use: another server (pipit or not) listens there")
    } else {
        anyhow::Error::new(e).context(format!("binding {addr}"))
    }
}

fn lock_address(addr: SocketAddr) -> anyhow::Result<std::os::unix::net::UnixListener> {
    use std::os::linux::net::SocketAddrExt as _;
    let name = format!("pipit-listen-{addr}");
    let unix = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    std::os::unix::net::UnixListener::bind_addr(&unix).map_err(|e| in_use(addr, e))
}

/// A listening socket that shares its port with the other shards'.
fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    // Connections wait here while every handshake slot is taken (see
    // `run_shard`); the kernel caps this at net.core.somaxconn.
    socket.listen(65_535)?;
    Ok(socket.into())
}

/// Socket options for a mobile client: no Nagle delay (we coalesce
/// ourselves), TCP keepalive as a backstop to app keepalives, and
/// TCP_USER_TIMEOUT so data stuck unacknowledged on a dead path is
/// abandoned instead of retransmitted for 15 minutes.
fn tune(stream: &tokio::net::TcpStream, cfg: &NetConfig) {
    let s = SockRef::from(stream);
    let _ = s.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(u64::from(cfg.keepalive_max_secs) + 60))
        .with_interval(Duration::from_secs(30))
        .with_retries(4);
    let _ = s.set_tcp_keepalive(&ka);
    let _ = s.set_tcp_user_timeout(Some(cfg.tcp_user_timeout));
}

/// Runs shard `index` on the calling thread until shutdown: accepts on
/// `listener` and serves each connection as a task of this shard.
pub fn run_shard(index: usize, listener: std::net::TcpListener, ctx: Arc<ConnCtx>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("shard runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = ctx.shutdown.cancelled() => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, shard = index, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if ctx.connections.fetch_add(1, Ordering::AcqRel) >= ctx.cfg.max_connections {
                        ctx.connections.fetch_sub(1, Ordering::AcqRel);
                        metrics::counter!("pipit_connections_refused_total", "reason" => "max_connections").increment(1);
                        drop(stream);
                        continue;
                    }
                    let admitted = match ctx.admission.admit(peer.ip(), std::time::Instant::now()) {
                        Ok(admitted) => admitted,
                        Err(_) => {
                            ctx.connections.fetch_sub(1, Ordering::AcqRel);
                            if let Ok(s) = stream.into_std() {
                                super::admission::refuse(s);
                            }
                            continue;
                        }
                    };
                    // With every handshake slot taken, this shard accepts
                    // nothing more until one frees: later connections wait
                    // in the kernel's backlog instead of being refused.
                    let slot = tokio::select! {
                        _ = ctx.shutdown.cancelled() => {
                            ctx.connections.fetch_sub(1, Ordering::AcqRel);
                            break;
                        }
                        slot = admitted.slot() => slot,
                    };
                    tune(&stream, &ctx.cfg);
                    metrics::counter!("pipit_connections_accepted_total").increment(1);
                    let ctx = ctx.clone();
                    tracker.spawn(async move {
                        tracing::trace!(%peer, "accepted");
                        super::serve::run(stream, peer, slot, &ctx).await;
                        ctx.connections.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
        }
        drop(listener);
        tracker.close();
        tracker.wait().await;
    });
}
