//! One node link's life: dialing with backoff, accepting (strangers
//! refused before any cryptography), and the loop that carries forwards,
//! acknowledgements, lookups, pings and typing over it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_protocol::node::{pb, DialStep, LinkAcceptor, LinkDialer, LinkIncoming, LinkSession};
use pipit_protocol::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::{
    Ask, Ctx, LinkFailure, LinkState, BACKOFF_MAX, BACKOFF_MIN, DEAD_AFTER, HANDSHAKE_TIMEOUT, MAX_ASKS, MAX_IN_FLIGHT,
    PACKET_BYTES, PING_EVERY, WRITE_TIMEOUT,
};
use crate::model::DeviceAddr;
use crate::route::cluster::Member;
use crate::service::forward::Applied;

pub(super) async fn dial_loop(peer: Member, ctx: Arc<Ctx>) {
    let mut backoff = BACKOFF_MIN;
    loop {
        ctx.links.update(&peer.id, true, |s| s.state = LinkState::Connecting);
        let result = match tokio::time::timeout(HANDSHAKE_TIMEOUT, dial(&peer, &ctx)).await {
            Err(_) => Err(LinkFailure::Timeout),
            Ok(Err(e)) => Err(e),
            Ok(Ok((stream, session, inbuf, hello))) => {
                backoff = BACKOFF_MIN;
                ctx.links.up(&peer.id, true);
                run(stream, session, inbuf, &peer, &hello, true, &ctx).await
            }
        };
        let why = result.err().unwrap_or(LinkFailure::Closed);
        if matches!(why, LinkFailure::Shutdown) {
            return;
        }
        ctx.links.down(&peer.id, true, &why);
        let jitter = rand::random_range(0..=backoff.as_millis() as u64 / 2);
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff + Duration::from_millis(jitter)) => {}
        }
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn dial(peer: &Member, ctx: &Ctx) -> Result<(TcpStream, LinkSession, BytesMut, pb::NodeHello), LinkFailure> {
    let mut stream = TcpStream::connect(peer.link.as_str()).await?;
    stream.set_nodelay(true)?;
    let keys = ctx.keys.get();
    let mut out = BytesMut::new();
    let mut dialer = LinkDialer::dial(keys.current(), &peer.key, &ctx.hello(), &mut out)?;
    stream.write_all(&out).await?;
    let mut inbuf = BytesMut::with_capacity(1024);
    loop {
        if stream.read_buf(&mut inbuf).await? == 0 {
            return Err(LinkFailure::Closed);
        }
        match dialer.read(&mut inbuf)? {
            DialStep::NeedMore(d) => dialer = d,
            DialStep::Established(hello, session) => {
                if hello.node_id != peer.id {
                    return Err(LinkFailure::WrongPeer(format!("{} answered as {:?}", peer.id, hello.node_id)));
                }
                return Ok((stream, session, inbuf, hello));
            }
        }
    }
}

pub(super) async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((stream, from)) => {
                    let ctx = ctx.clone();
                    tokio::spawn(async move {
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, accept(stream, &ctx)).await {
                            Ok(Ok((stream, session, inbuf, peer, hello))) => {
                                ctx.links.up(&peer.id, false);
                                let why = run(stream, session, inbuf, &peer, &hello, false, &ctx).await.err();
                                let why = why.unwrap_or(LinkFailure::Closed);
                                if !matches!(why, LinkFailure::Shutdown) {
                                    ctx.links.down(&peer.id, false, &why);
                                }
                            }
                            Ok(Err(e)) => {
                                metrics::counter!("pipit_node_link_refused_total").increment(1);
                                tracing::warn!(%from, reason = %e, "node link refused");
                            }
                            Err(_) => tracing::debug!(%from, "node-link handshake timed out"),
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "node-link accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

type Accepted = (TcpStream, LinkSession, BytesMut, Member, pb::NodeHello);

async fn accept(mut stream: TcpStream, ctx: &Ctx) -> Result<Accepted, LinkFailure> {
    stream.set_nodelay(true)?;
    let mut acceptor = LinkAcceptor::new();
    let mut inbuf = BytesMut::with_capacity(1024);
    let offer = loop {
        if stream.read_buf(&mut inbuf).await? == 0 {
            return Err(LinkFailure::Closed);
        }
        if let Some(offer) = acceptor.read(&mut inbuf)? {
            break offer;
        }
    };
    // Only a member that dials this node may: one whose id sorts first.
    // Anyone else is closed on without an answer, before any cryptography.
    let view = ctx.cluster.view();
    let Some(peer) = view.members.iter().find(|m| m.key == *offer.claimed_key()) else {
        return Err(LinkFailure::WrongPeer(format!("key {} is not in the node list", offer.claimed_key())));
    };
    if peer.id.as_str() >= ctx.cluster.me() {
        return Err(LinkFailure::WrongPeer(format!("{} dialed, but this node dials it", peer.id)));
    }
    let keys = ctx.keys.get();
    let mut out = BytesMut::new();
    let (hello, session) = offer.accept(keys.current(), &ctx.hello(), &mut out)?;
    if hello.node_id != peer.id {
        return Err(LinkFailure::WrongPeer(format!("{}'s key says it is {:?}", peer.id, hello.node_id)));
    }
    write(&mut stream, &mut out).await?;
    Ok((stream, session, inbuf, peer.clone(), hello))
}

async fn write(stream: &mut TcpStream, out: &mut BytesMut) -> Result<(), LinkFailure> {
    tokio::time::timeout(WRITE_TIMEOUT, stream.write_all(out)).await.map_err(|_| LinkFailure::Timeout)??;
    out.clear();
    Ok(())
}

/// Runs an established link (see [`serve`]) with its question channel
/// open for [`Links::lookup`] while it lasts.
async fn run(
    stream: TcpStream,
    session: LinkSession,
    inbuf: BytesMut,
    peer: &Member,
    hello: &pb::NodeHello,
    dialer: bool,
    ctx: &Ctx,
) -> Result<(), LinkFailure> {
    let (id, mut asks) = ctx.links.open_asks(&peer.id);
    let r = serve(stream, session, inbuf, peer, hello, dialer, ctx, &mut asks).await;
    ctx.links.close_asks(&peer.id, id);
    r
}

/// Runs an established link until it fails or the node stops: pings,
/// forwards this node's queue to the peer (at most its in-flight bound
/// unacknowledged, in entry order, again from the first unacknowledged
/// one after every reconnect), applies what the peer forwards and
/// acknowledges it once durable; asks and answers lookups.
#[allow(clippy::too_many_arguments)]
async fn serve(
    mut stream: TcpStream,
    mut session: LinkSession,
    mut inbuf: BytesMut,
    peer: &Member,
    hello: &pb::NodeHello,
    dialer: bool,
    ctx: &Ctx,
    asks: &mut mpsc::Receiver<Ask>,
) -> Result<(), LinkFailure> {
    // Lookups this node asked on this link, by req: bounded by the
    // channel (MAX_ASKS), and dropped (answered "unknown") with the link.
    let mut asked: HashMap<u64, oneshot::Sender<Option<DeviceAddr>>> = HashMap::new();
    let mut next_req = 1u64;
    // The services' storage error, kept as text: net does not name the
    // storage layer.
    fn storage(e: impl std::fmt::Display) -> LinkFailure {
        LinkFailure::Storage(e.to_string())
    }
    let name = peer.id.as_str();
    // What the link costs on the wire (after the handshake), both ways.
    let bytes_out = metrics::counter!("pipit_node_link_transmitted_bytes_total", "peer" => name.to_string());
    let bytes_in = metrics::counter!("pipit_node_link_received_bytes_total", "peer" => name.to_string());
    let mut out = BytesMut::new();
    let mut tick = tokio::time::interval(PING_EVERY);
    let mut heard = Instant::now();
    // The ping in flight: its id and when it left. One at a time is enough
    // for a round-trip figure and bounds what a peer can make us track.
    let mut ping: Option<(u64, Instant)> = None;
    let mut next_ping = 1u64;
    // Outgoing: everything up to `acked` is acknowledged, up to `sent` is
    // on the wire.
    let their_limit = u64::from(if hello.max_in_flight == 0 {
        pipit_protocol::node::DEFAULT_MAX_IN_FLIGHT
    } else {
        hello.max_in_flight
    })
    .min(u64::from(MAX_IN_FLIGHT));
    let wake = ctx.forward.wakeup(peer.slot);
    let mut acked = ctx.forward.acked(peer.slot).await.map_err(storage)?;
    // Whether the queue may hold more than was sent: read it only then
    // (a commit that queued something wakes us; so does room freed by an
    // acknowledgement, and the ping tick as a backstop).
    let mut more = true;
    let mut sent = acked;
    // Incoming: forwards applying, their outcomes, and the mark acked.
    let (applied_tx, mut applied_rx) = tokio::sync::mpsc::channel::<Result<Applied, ()>>(MAX_IN_FLIGHT as usize * 2);
    let mut applying: u64 = 0;
    let mut acked_to_peer = 0u64;
    loop {
        // Frames already buffered (the handshake's read may carry some).
        let mut reply = pb::NodePacket::default();
        while let Some(incoming) = session.open(&mut inbuf)? {
            let LinkIncoming::Packet(p) = incoming else { continue };
            reply.pong.extend(p.ping.iter().map(|p| pb::LinkPong { id: p.id }));
            for pong in &p.pong {
                if let Some((id, at)) = ping {
                    if pong.id == id {
                        ctx.links.rtt(name, dialer, at.elapsed());
                        ping = None;
                    }
                }
            }
            for f in p.forward {
                applying += 1;
                if applying > u64::from(MAX_IN_FLIGHT) * 2 {
                    return Err(LinkFailure::Protocol(format!("{name} exceeded {MAX_IN_FLIGHT} forwards in flight")));
                }
                // Waits for room in the writer: the backpressure that
                // stops this link reading while storage is behind.
                let done = ctx.forward.apply(peer.slot, f).await.map_err(|e| LinkFailure::Storage(e.to_string()))?;
                let tx = applied_tx.clone();
                tokio::spawn(async move {
                    let _ = tx.send(done.await).await;
                });
            }
            for t in p.typing {
                ctx.typing.from_node(t.to, t.from, t.typing);
            }
            for r in p.lookup_result {
                if let Some(reply) = asked.remove(&r.req) {
                    let found = (r.account != 0).then(|| DeviceAddr::new(r.account, r.device));
                    let _ = reply.send(found);
                }
            }
            if p.lookup.len() > MAX_ASKS {
                return Err(LinkFailure::Protocol(format!("{name} asked {} lookups at once", p.lookup.len())));
            }
            for q in p.lookup {
                // A point read; answered at once, whatever it finds.
                let found = match PublicKey::from_slice(&q.key) {
                    Some(key) => ctx.accounts.device_by_key(key).await.map_err(storage)?,
                    None => None,
                };
                let (account, device) = found.map_or((0, 0), |a| (a.account, a.device));
                reply.lookup_result.push(pb::LookupResult { req: q.req, account, device });
            }
            for a in p.forward_ack {
                let through = a.through.min(sent);
                if through > acked {
                    acked = through;
                    more = true;
                    ctx.forward.acknowledge(peer.slot, acked).await.map_err(|e| LinkFailure::Storage(e.to_string()))?;
                }
            }
        }
        // Forward what waits, within the peer's in-flight bound.
        while more && sent - acked < their_limit {
            let room = usize::try_from(their_limit - (sent - acked)).unwrap_or(usize::MAX);
            let entries = ctx.forward.pending(peer.slot, sent, room, PACKET_BYTES).await.map_err(storage)?;
            let Some(&(last, _)) = entries.last() else {
                more = false;
                break;
            };
            let mut packet = pb::NodePacket::default();
            for (entry, bytes) in entries {
                let mut f = crate::service::forward::decode_entry(bytes).map_err(storage)?;
                f.entry = entry;
                packet.forward.push(f);
            }
            metrics::counter!("pipit_node_link_forwarded_total", "peer" => name.to_string())
                .increment(packet.forward.len() as u64);
            reply.forward = packet.forward;
            session.seal(&reply, &mut out)?;
            reply = pb::NodePacket::default();
            sent = last;
        }
        if !reply.pong.is_empty() || !reply.lookup_result.is_empty() {
            session.seal(&reply, &mut out)?;
        }
        if !out.is_empty() {
            bytes_out.increment(out.len() as u64);
            write(&mut stream, &mut out).await?;
        }
        tokio::select! {
            _ = ctx.shutdown.cancelled() => return Err(LinkFailure::Shutdown),
            read = stream.read_buf(&mut inbuf) => {
                let n = read?;
                if n == 0 {
                    return Err(LinkFailure::Closed);
                }
                bytes_in.increment(n as u64);
                heard = Instant::now();
            }
            _ = wake.notified() => more = true,
            Some(ask) = asks.recv(), if asked.len() < MAX_ASKS => {
                let q = match ask {
                    Ask::Lookup { key, reply } => {
                        let req = next_req;
                        next_req += 1;
                        asked.insert(req, reply);
                        let lookup = pb::Lookup { req, key: bytes::Bytes::copy_from_slice(key.as_bytes()) };
                        pb::NodePacket { lookup: vec![lookup], ..Default::default() }
                    }
                    Ask::Typing(t) => pb::NodePacket { typing: vec![t], ..Default::default() },
                };
                session.seal(&q, &mut out)?;
                bytes_out.increment(out.len() as u64);
                write(&mut stream, &mut out).await?;
            }
            Some(r) = applied_rx.recv() => {
                applying = applying.saturating_sub(1);
                let through = match r {
                    Ok(Applied::Through(t) | Applied::Gap(t)) => t,
                    // Not stored (storage failed): the peer sends it again
                    // after a reconnect.
                    Err(()) => return Err(LinkFailure::Storage("a forward was not stored".into())),
                };
                // Acknowledge all outcomes that are in now, in one packet.
                let mut through = through;
                while let Ok(more) = applied_rx.try_recv() {
                    applying = applying.saturating_sub(1);
                    match more {
                        Ok(Applied::Through(t) | Applied::Gap(t)) => through = through.max(t),
                        Err(()) => return Err(LinkFailure::Storage("a forward was not stored".into())),
                    }
                }
                if through > acked_to_peer {
                    acked_to_peer = through;
                    let ack = pb::NodePacket { forward_ack: vec![pb::ForwardAck { through }], ..Default::default() };
                    session.seal(&ack, &mut out)?;
                    bytes_out.increment(out.len() as u64);
            write(&mut stream, &mut out).await?;
                }
            }
            _ = tick.tick() => {
                more = true;
                if heard.elapsed() > DEAD_AFTER {
                    return Err(LinkFailure::Timeout);
                }
                if ping.is_none_or(|(_, at)| at.elapsed() > DEAD_AFTER) {
                    ping = Some((next_ping, Instant::now()));
                    let p = pb::NodePacket { ping: vec![pb::LinkPing { id: next_ping }], ..Default::default() };
                    next_ping += 1;
                    session.seal(&p, &mut out)?;
                } else {
                    // A pong is still due: keep the path warm without
                    // asking for more.
                    session.write_keepalive(&mut out);
                }
                bytes_out.increment(out.len() as u64);
            write(&mut stream, &mut out).await?;
            }
        }
    }
}
