//! One accepted socket from its handshake to its close: the handshake and
//! login (`handshake.rs`), then the session's I/O loop (`connection.rs`),
//! then the registry cleanup. It sits above both so the handshake can build
//! the connection state without the connection loop importing the
//! handshake back.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpStream;

use super::admission::Slot;
use super::handshake::{establish, Established};
use super::{ConnCtx, ConnError};
use crate::model::LogGate;

/// Serves one accepted socket until it closes. `slot` is its place among
/// the handshakes in progress.
pub(super) async fn run(stream: TcpStream, peer: SocketAddr, slot: Slot, ctx: &Arc<ConnCtx>) {
    metrics::gauge!("pipit_connections").increment(1.0);
    let result = serve(stream, slot, ctx).await;
    metrics::gauge!("pipit_connections").decrement(1.0);
    match result {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(e) if e.is_violation() => {
            // Scanners and attackers can make these as fast as they can
            // connect: count each, log a line per 10 s.
            static LOG: LogGate = LogGate::new(10_000);
            let stage = if matches!(e, ConnError::Handshake(_)) { "handshake" } else { "session" };
            metrics::counter!("pipit_protocol_violations_total", "stage" => stage).increment(1);
            match LOG.open() {
                Some(suppressed) => {
                    tracing::warn!(%peer, error = %e, suppressed, "closed a connection for a protocol violation")
                }
                None => tracing::debug!(%peer, error = %e, "closed a connection for a protocol violation"),
            }
        }
        Err(ConnError::Io(e)) => tracing::debug!(%peer, error = %e, "connection i/o error"),
        Err(e) => tracing::debug!(%peer, error = %e, "connection closed"),
    }
}

async fn serve(stream: TcpStream, slot: Slot, ctx: &Arc<ConnCtx>) -> Result<(), ConnError> {
    // The handshake and the login hold state an established connection no
    // longer needs; run them in their own allocation so it is freed once
    // they are done instead of sizing every idle connection's future.
    let Established { stream, session, inbuf, mut conn, keepalive } = Box::pin(establish(stream, slot, ctx)).await?;
    let result = conn.run(stream, session, inbuf, keepalive).await;
    if let Some(w) = &conn.watcher {
        ctx.services.presence.unwatch(w);
    }
    ctx.services.presence.disconnect(conn.addr, conn.handle.id);
    result
}
