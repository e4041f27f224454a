//! Listeners and shards: one thread per shard, each a single-threaded
//! tokio runtime with its own `SO_REUSEPORT` listener, so the kernel
//! spreads new connections across shards and a connection's task never
//! migrates.

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio_util::task::TaskTracker;

use super::{ConnCtx, NetConfig};

/// A listening socket that shares its port with the other shards'.
pub fn bind(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(4096)?;
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
                        metrics::counter!("pipit_connections_refused_total").increment(1);
                        drop(stream);
                        continue;
                    }
                    tune(&stream, &ctx.cfg);
                    metrics::counter!("pipit_connections_accepted_total").increment(1);
                    let ctx = ctx.clone();
                    tracker.spawn(async move {
                        tracing::trace!(%peer, "accepted");
                        super::connection::run(stream, &ctx).await;
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
