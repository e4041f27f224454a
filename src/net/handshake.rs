//! From accepted socket to logged-in connection: the Noise handshake
//! (bounded in time and bytes by the protocol crate), then the hello: a
//! login finds the device by its key, a registration creates an account.
//! The answer carries the first queued deliveries.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_protocol::handshake::{Hello, ServerHandshake, ServerStep};
use pipit_protocol::keepalive::negotiate_interval;
use pipit_protocol::limits::{MAX_INVITE_LEN, MAX_NAME_LEN};
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey, Session};
use tokio::net::TcpStream;

use super::admission::Slot;
use super::answers::{error, retry_later};
use super::connection::{write_out, Conn};
use super::{ConnCtx, ConnError};
use crate::model::{unix_now, DeviceAddr};
use crate::route::cluster::{Cluster, Placement};
use crate::route::{ConnHandle, Mailbox};

/// A connection past its handshake and login.
pub(super) struct Established {
    pub(super) stream: TcpStream,
    pub(super) session: Session,
    pub(super) inbuf: BytesMut,
    pub(super) conn: Conn,
    pub(super) keepalive: Duration,
}

fn handshake_metric(pattern: &'static str, result: &'static str) {
    metrics::counter!("pipit_handshakes_total", "pattern" => pattern, "result" => result).increment(1);
}

async fn read_some(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ConnError> {
    use tokio::io::AsyncReadExt;
    buf.reserve(1024);
    match stream.read_buf(buf).await? {
        0 => Err(ConnError::Closed),
        n => {
            metrics::counter!("pipit_received_bytes_total").increment(n as u64);
            Ok(())
        }
    }
}

/// When the handshake gives up on the peer: each message the server waits
/// for must start within the idle timeout, arrive whole within the step
/// timeout, and the whole handshake end within the handshake timeout. A
/// peer that opens a connection and stalls (silent, half a frame, an XX
/// left unfinished) gives its slot back at the first deadline it misses,
/// not after the whole handshake timeout.
#[derive(Debug, Clone, Copy)]
struct Deadlines {
    whole: Instant,
    step: Instant,
    idle: Duration,
    step_timeout: Duration,
}

impl Deadlines {
    fn new(cfg: &super::NetConfig, now: Instant) -> Self {
        Self::with(cfg.handshake_timeout, cfg.handshake_step_timeout, cfg.handshake_idle_timeout, now)
    }

    fn with(whole: Duration, step: Duration, idle: Duration, now: Instant) -> Self {
        Self { whole: now + whole, step: now + step, idle, step_timeout: step }
    }

    /// The server has answered and waits for the peer's next message.
    fn next_step(&mut self, now: Instant) {
        self.step = now + self.step_timeout;
    }

    /// Until when the next read may wait, from `now`.
    fn read_by(&self, now: Instant) -> Instant {
        (now + self.idle).min(self.step).min(self.whole)
    }
}

/// Runs the handshake and the login. `slot` is this connection's place
/// among the handshakes in progress, given back once the handshake's
/// work is done.
pub(super) async fn establish(mut stream: TcpStream, slot: Slot, ctx: &Arc<ConnCtx>) -> Result<Established, ConnError> {
    let cfg = &ctx.cfg;
    let write_timeout = cfg.write_timeout;
    let started = Instant::now();
    let mut deadlines = Deadlines::new(cfg, started);
    // One snapshot for the whole handshake: a key reload meanwhile must not
    // make it answer with one key and report another as current.
    let keys = ctx.keys.get();
    let mut hs = ServerHandshake::new(keys.clone(), started, cfg.handshake_timeout);
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();

    let accepted = loop {
        let by = tokio::time::Instant::from_std(deadlines.read_by(Instant::now()));
        match tokio::time::timeout_at(by, read_some(&mut stream, &mut inbuf)).await {
            Err(_) => {
                handshake_metric("unknown", "timeout");
                return Err(ConnError::Timeout);
            }
            Ok(r) => r?,
        }
        // The cryptography runs on a handshake thread, below the shards'
        // priority (see `admission`).
        let (step, back_in, back_out) = ctx
            .admission
            .crypto(move || {
                let step = hs.read(&mut inbuf, Instant::now(), &mut out);
                (step, inbuf, out)
            })
            .await?;
        (inbuf, out) = (back_in, back_out);
        match step {
            Ok(ServerStep::NeedMore(next)) => {
                hs = next;
                if !out.is_empty() {
                    // An answer (XX message 2, a retry): the peer's next
                    // message is a new step.
                    write_out(&mut stream, &mut out, cfg.handshake_step_timeout).await?;
                    deadlines.next_step(Instant::now());
                }
            }
            Ok(ServerStep::Accepted(a)) => break *a,
            Err(e) => {
                let _ = write_out(&mut stream, &mut out, cfg.handshake_step_timeout).await;
                handshake_metric("unknown", "error");
                return Err(e.into());
            }
        }
    };
    let pattern = accepted.pattern.as_str();

    // Whose node is this? A device of an account owned elsewhere is
    // sent there before anything is looked up here (SPEC.md 3.7).
    let elsewhere = match (&accepted.hello, &ctx.services.cluster) {
        (Hello::Login(l), Some(cluster)) if l.account != 0 => placement_refusal(cluster, l.account),
        _ => None,
    };
    let verdict = match elsewhere {
        Some(refusal) => Err(refusal),
        None => match identify(&accepted.hello, accepted.client_key, ctx).await? {
            Ok(v) => Ok(v),
            // A login without an account id whose key this node does not
            // know: in a cluster, the other nodes are asked (bounded).
            Err(pb::ErrorCode::UnknownDevice) if matches!(&accepted.hello, Hello::Login(l) if l.account == 0) => {
                match found_elsewhere(ctx, accepted.client_key).await {
                    Some(refusal) => Err(refusal),
                    None => Err((pb::ErrorCode::UnknownDevice, vec![error(pb::ErrorCode::UnknownDevice)])),
                }
            }
            Err(code) => Err((code, vec![error(code)])),
        },
    };
    let (addr, proposed_keepalive, acked_through) = match verdict {
        Ok(v) => v,
        Err((code, answer)) => {
            let result = match code {
                pb::ErrorCode::UnknownDevice => "unknown_device",
                pb::ErrorCode::WrongNode => "redirected",
                _ => "refused",
            };
            handshake_metric(pattern, result);
            let (_, back) = ctx
                .admission
                .crypto(move || {
                    let r = accepted.finish(&answer, &mut out);
                    (r.is_ok(), out)
                })
                .await?;
            out = back;
            drop(slot);
            let _ = write_out(&mut stream, &mut out, write_timeout).await;
            return Err(ConnError::Refused(code));
        }
    };
    let keepalive_secs = negotiate_interval(
        proposed_keepalive,
        cfg.keepalive_min_secs,
        cfg.keepalive_max_secs,
        cfg.keepalive_default_secs,
    );
    let window = cfg.delivery_window;

    // Become the device's connection before reading the inbox, so that
    // every entry committed from now on is pushed to us, and every earlier
    // one is in the read below.
    let handle = ConnHandle { id: ctx.next_conn_id(), mailbox: Arc::new(Mailbox::new(window * 2, ctx.budget.clone())) };
    let conn_id = handle.id;
    if let Some(old) = ctx.services.presence.connect(addr, handle.clone()) {
        old.mailbox.kick(pb::ErrorCode::Replaced);
    }
    let unregister = |e: ConnError| {
        ctx.services.presence.disconnect(addr, conn_id);
        e
    };
    let inbox = ctx.services.inbox.at_login(addr, acked_through, window).await.map_err(|e| unregister(e.into()))?;
    let inbox_depth = inbox.depth;
    let mut conn = Conn::new(ctx, addr, handle, inbox);
    let pending = u32::try_from(inbox_depth).unwrap_or(u32::MAX);
    if accepted.retired_key {
        // Operators watch this fall to zero before dropping retired keys.
        metrics::counter!("pipit_retired_key_logins_total").increment(1);
    }
    let login_ok: Message = pb::LoginOk {
        account: addr.account,
        device: addr.device,
        server_time: unix_now(),
        keepalive_secs,
        pending,
        new_server_key: if accepted.retired_key {
            bytes::Bytes::copy_from_slice(keys.current().public().as_bytes())
        } else {
            bytes::Bytes::new()
        },
        window: window as u32,
        features: ctx.services.features.list().iter().map(|f| *f as i32).collect(),
    }
    .into();
    let mut first = vec![login_ok];
    if ctx.services.features.offers(pb::Feature::KeyDirectory) {
        // A device whose one-time prekeys ran low while it was away learns
        // it here, before its first queued message.
        if let Some(status) = ctx.services.keys.at_login(addr).await.map_err(|e| unregister(e.into()))? {
            first.push(status.into());
        }
    }
    first.append(&mut conn.outq);
    let (finished, back) = ctx
        .admission
        .crypto(move || {
            let r = accepted.finish(&first, &mut out);
            (r, out)
        })
        .await
        .map_err(unregister)?;
    out = back;
    // The handshake's work is done: what is left is a write that costs no
    // CPU and may wait on a slow link, so it holds no slot.
    drop(slot);
    let session = finished.map_err(|e| unregister(e.into()))?;
    handshake_metric(pattern, "ok");
    metrics::histogram!("pipit_handshake_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(device = %addr, pattern, "logged in");
    write_out(&mut stream, &mut out, write_timeout).await.map_err(unregister)?;
    Ok(Established { stream, session, inbuf, conn, keepalive: Duration::from_secs(u64::from(keepalive_secs)) })
}

/// What a login or registration at this node gives: the device, its
/// proposed keepalive and what it has acked; or why not.
type Identified = Result<(DeviceAddr, u32, u64), pb::ErrorCode>;

/// Who is this? Finds the device by its key, or registers it.
async fn identify(hello: &Hello, client_key: PublicKey, ctx: &Arc<ConnCtx>) -> Result<Identified, ConnError> {
    Ok(match hello {
        Hello::Login(l) if l.user_agent.len() > MAX_NAME_LEN => Err(pb::ErrorCode::TooLarge),
        Hello::Login(l) => match ctx.services.accounts.device_by_key(client_key).await? {
            // Account 0: a freshly linked device that does not know its
            // ids yet; the key says who it is. Otherwise the ids must be
            // the key's (SPEC.md 5.5): a device never logs in as another.
            Some(addr) if l.account == 0 || (l.account == addr.account && l.device == addr.device) => {
                Ok((addr, l.keepalive_secs, l.acked_through))
            }
            Some(addr) => {
                tracing::debug!(device = %addr, account = l.account, claimed_device = l.device, "login ids do not match the key");
                Err(pb::ErrorCode::UnknownDevice)
            }
            None => Err(pb::ErrorCode::UnknownDevice),
        },
        Hello::Register(r) => {
            if r.device_name.len() > MAX_NAME_LEN
                || r.invite.len() > MAX_INVITE_LEN
                || r.user_agent.len() > MAX_NAME_LEN
            {
                Err(pb::ErrorCode::TooLarge)
            } else {
                ctx.services
                    .accounts
                    .register(client_key, r.device_name.clone(), r.invite.clone())
                    .await
                    .map(|addr| (addr, r.keepalive_secs, 0))
            }
        }
    })
}

/// For a login that names no account and whose key this node does not
/// know: asks the other nodes (at most `nodes::LOOKUP_TIMEOUT`) and
/// redirects to the one that knows it.
async fn found_elsewhere(ctx: &Arc<ConnCtx>, key: PublicKey) -> Option<(pb::ErrorCode, Vec<Message>)> {
    let (cluster, links) = (ctx.services.cluster.as_ref()?, ctx.links.as_ref()?);
    let (_, addr) = links.lookup(key).await?;
    metrics::counter!("pipit_login_lookups_found_total").increment(1);
    placement_refusal(cluster, addr.account)
}

/// The answer for a login of `account` when another node owns it: a
/// `Redirect` there (the client reconnects with IK to the key given), or
/// `UNAVAILABLE` when that node is down (retry once its lease is back).
fn placement_refusal(cluster: &Cluster, account: u64) -> Option<(pb::ErrorCode, Vec<Message>)> {
    match cluster.place(account) {
        Placement::Remote(owner) => {
            let (host, port) = owner.host_port();
            let redirect = pb::Redirect {
                host: host.to_string(),
                port: u32::from(port),
                server_key: bytes::Bytes::copy_from_slice(owner.key.as_bytes()),
            };
            Some((pb::ErrorCode::WrongNode, vec![redirect.into(), error(pb::ErrorCode::WrongNode)]))
        }
        Placement::Down(owner) => {
            tracing::debug!(account, node = %owner.id, "login for an account whose node is down");
            let e = retry_later(pb::ErrorCode::Unavailable, cluster.retry_after_secs());
            Some((pb::ErrorCode::Unavailable, vec![e]))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_read_waits_for_the_nearest_of_idle_step_and_whole() {
        let s = Duration::from_secs;
        let t = Instant::now();
        let mut d = Deadlines::with(s(10), s(5), s(2), t);
        // A silent peer: the idle timeout.
        assert_eq!(d.read_by(t), t + s(2));
        // A trickle restarts the idle timeout but not the step's.
        assert_eq!(d.read_by(t + s(4)), t + s(5));
        // The server answered at 4 s: the next message has its own step.
        d.next_step(t + s(4));
        assert_eq!(d.read_by(t + s(6)), t + s(8));
        assert_eq!(d.read_by(t + s(8)), t + s(9));
        // And never past the whole handshake's.
        d.next_step(t + s(8));
        assert_eq!(d.read_by(t + s(9)), t + s(10));
    }
}
