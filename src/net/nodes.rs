//! Node links, the I/O side: one persistent, Noise-KK-encrypted TCP
//! connection between every two nodes of the cluster (the rules are the
//! protocol crate's `node` module).
//!
//! One link per pair: the node whose id sorts first dials, the other
//! accepts, so two nodes never race to open two. A dialer reconnects with
//! jittered exponential backoff (100 ms up to 5 s). Each side pings every
//! `PING_EVERY` and closes a link that has said nothing for `DEAD_AFTER`,
//! so a stalled path is noticed within seconds, not at TCP's timeout. An
//! acceptor refuses, without an answer, any key that is not a member of
//! the node list; a frame that fails to decrypt (forged, replayed) ends
//! the link. Every link's state and round-trip time is in [`Links`] (for
//! `pipit admin cluster`) and in metrics.
//!
//! The links run on a thread of their own, apart from the shards.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_protocol::node::{pb, DialStep, LinkAcceptor, LinkDialer, LinkError, LinkIncoming, LinkSession};
use pipit_protocol::PublicKey;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::keys::KeyRing;
use crate::model::DeviceAddr;
use crate::route::cluster::{Cluster, Member};
use crate::service::accounts::Accounts;
use crate::service::forward::{Applied, Forward};
use crate::service::{Services, Typing};

/// How often a link pings the other side.
const PING_EVERY: Duration = Duration::from_secs(2);

/// A link that has received nothing for this long is closed.
const DEAD_AFTER: Duration = Duration::from_secs(10);

/// Time a link handshake may take, either side.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Time one write may make no progress before the link is closed.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

/// Reconnect delays: the first, and the most.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

/// Forwards this node accepts unacknowledged on a link (told to the
/// other node in the hello), and the most it sends unacknowledged.
const MAX_IN_FLIGHT: u32 = 256;

/// Bytes of queued forwards read for one packet (below a frame's
/// 65,519, leaving room for the packet's own fields).
const PACKET_BYTES: usize = 48 * 1024;

/// Questions waiting for one link, and unanswered on it, at most.
const MAX_ASKS: usize = 64;

/// How long a login waits for the other nodes to say whose key it is.
pub const LOOKUP_TIMEOUT: Duration = Duration::from_secs(2);

/// How often the dialers are matched to the node list.
const SUPERVISE_EVERY: Duration = Duration::from_millis(500);

/// Where a link stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum LinkState {
    /// Dialing, or waiting for the other node to dial.
    Connecting,
    /// Handshake done; packets flow.
    Up,
    /// The last attempt failed; a new one follows (dialer) or is awaited.
    Down,
}

impl LinkState {
    /// Lower-case name for the admin command.
    pub fn as_str(self) -> &'static str {
        match self {
            LinkState::Connecting => "connecting",
            LinkState::Up => "up",
            LinkState::Down => "down",
        }
    }
}

/// One link as an operator sees it.
#[derive(Debug, Clone)]
pub struct LinkStatus {
    /// Its state.
    pub state: LinkState,
    /// Whether this node dials it (else it accepts it).
    pub dialer: bool,
    /// The last measured round trip.
    pub rtt: Option<Duration>,
    /// Times it came up.
    pub connects: u64,
    /// Why it last went down, if it did.
    pub last_error: String,
}

/// What another part of this node hands a link to send.
#[derive(Debug)]
enum Ask {
    /// Whose device is this key?
    Lookup { key: PublicKey, reply: oneshot::Sender<Option<DeviceAddr>> },
    /// A typing notice, at most once.
    Typing(pb::NodeTyping),
}

/// Every link of this node, by peer id.
#[derive(Debug, Default)]
pub struct Links {
    peers: Mutex<BTreeMap<String, LinkStatus>>,
    /// The links that are up, by peer id: where to ask them things, and
    /// which link's channel it is (a newer link replaces an older one).
    asks: Mutex<HashMap<String, (u64, mpsc::Sender<Ask>)>>,
    next_channel: std::sync::atomic::AtomicU64,
}

impl Links {
    /// Asks every node with a link up whose device `key` is, at once,
    /// for at most `LOOKUP_TIMEOUT`: the first that knows it answers its
    /// id and the device. A link too busy to take the question is
    /// skipped. `None`: no node knows the key (or none answered in time).
    pub async fn lookup(&self, key: PublicKey) -> Option<(String, DeviceAddr)> {
        let asks: Vec<(String, mpsc::Sender<Ask>)> = self
            .asks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.clone()))
            .collect();
        let mut answers = futures_util::stream::FuturesUnordered::new();
        for (peer, tx) in asks {
            let (reply, rx) = oneshot::channel();
            if tx.try_send(Ask::Lookup { key, reply }).is_ok() {
                answers.push(async move { rx.await.ok().flatten().map(|addr| (peer, addr)) });
            }
        }
        use futures_util::StreamExt as _;
        let first = async {
            while let Some(answer) = answers.next().await {
                if answer.is_some() {
                    return answer;
                }
            }
            None
        };
        tokio::time::timeout(LOOKUP_TIMEOUT, first).await.ok().flatten()
    }

    fn ask(&self, peer: &str, ask: Ask) -> bool {
        let tx = self.asks.lock().unwrap_or_else(|e| e.into_inner()).get(peer).map(|(_, tx)| tx.clone());
        tx.is_some_and(|tx| tx.try_send(ask).is_ok())
    }

    fn open_asks(&self, peer: &str) -> (u64, mpsc::Receiver<Ask>) {
        // One channel per link for lookups and typing: bounded, and a
        // full one refuses rather than waits (neither is ever stored).
        let (tx, rx) = mpsc::channel(MAX_ASKS);
        let id = self.next_channel.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.asks.lock().unwrap_or_else(|e| e.into_inner()).insert(peer.to_string(), (id, tx));
        (id, rx)
    }

    fn close_asks(&self, peer: &str, id: u64) {
        let mut asks = self.asks.lock().unwrap_or_else(|e| e.into_inner());
        // Only this link's own channel: a newer link may have replaced it.
        if asks.get(peer).is_some_and(|(current, _)| *current == id) {
            asks.remove(peer);
        }
    }

    /// A copy of every link's status.
    pub fn snapshot(&self) -> BTreeMap<String, LinkStatus> {
        self.peers.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn update(&self, peer: &str, dialer: bool, f: impl FnOnce(&mut LinkStatus)) {
        let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        let s = peers.entry(peer.to_string()).or_insert_with(|| LinkStatus {
            state: LinkState::Connecting,
            dialer,
            rtt: None,
            connects: 0,
            last_error: String::new(),
        });
        f(s);
        let up = if s.state == LinkState::Up { 1.0 } else { 0.0 };
        metrics::gauge!("pipit_node_link_up", "peer" => peer.to_string()).set(up);
    }

    fn up(&self, peer: &str, dialer: bool) {
        metrics::counter!("pipit_node_link_connects_total", "peer" => peer.to_string()).increment(1);
        tracing::info!(peer, "node link up");
        self.update(peer, dialer, |s| {
            s.state = LinkState::Up;
            s.connects += 1;
        });
    }

    fn down(&self, peer: &str, dialer: bool, why: &LinkFailure) {
        tracing::info!(peer, reason = %why, "node link down");
        self.update(peer, dialer, |s| {
            s.state = LinkState::Down;
            s.rtt = None;
            s.last_error = why.to_string();
        });
    }

    fn rtt(&self, peer: &str, dialer: bool, rtt: Duration) {
        metrics::gauge!("pipit_node_link_rtt_seconds", "peer" => peer.to_string()).set(rtt.as_secs_f64());
        self.update(peer, dialer, |s| s.rtt = Some(rtt));
    }
}

/// Why a link ended.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkFailure {
    /// The socket failed.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The protocol failed (handshake rejected, frame forged or replayed).
    #[error(transparent)]
    Link(#[from] LinkError),
    /// The other side closed.
    #[error("closed by the other node")]
    Closed,
    /// Nothing arrived for `DEAD_AFTER`, or a handshake or write took too
    /// long.
    #[error("timed out")]
    Timeout,
    /// The other side is not who the node list says.
    #[error("{0}")]
    WrongPeer(String),
    /// This node is stopping.
    #[error("shutting down")]
    Shutdown,
    /// Storage failed (reading the queue, applying a forward).
    #[error("storage: {0}")]
    Storage(String),
    /// The other node broke the link's rules (too many forwards in
    /// flight, an entry that does not decode).
    #[error("protocol: {0}")]
    Protocol(String),
}

struct Ctx {
    cluster: Cluster,
    keys: Arc<KeyRing>,
    links: Arc<Links>,
    forward: Forward,
    accounts: Accounts,
    typing: Typing,
    shutdown: CancellationToken,
}

impl Ctx {
    fn hello(&self) -> pb::NodeHello {
        pb::NodeHello {
            node_id: self.cluster.me().to_string(),
            epoch: self.cluster.view().epoch,
            max_in_flight: MAX_IN_FLIGHT,
        }
    }
}

/// Starts the node links on their own thread: accepts on `listener`,
/// dials the members whose ids sort after this node's. Stops at
/// `shutdown`.
pub fn spawn(
    cluster: Cluster,
    services: &Services,
    keys: Arc<KeyRing>,
    links: Arc<Links>,
    listener: std::net::TcpListener,
    shutdown: CancellationToken,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    listener.set_nonblocking(true)?;
    let ctx = Arc::new(Ctx {
        cluster,
        keys,
        links,
        forward: services.forward.clone(),
        accounts: services.accounts.clone(),
        typing: services.typing.clone(),
        shutdown,
    });
    let thread = std::thread::Builder::new().name("pipit-links".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "no runtime for node links; this node cannot reach the others");
                return;
            }
        };
        rt.block_on(async move {
            let listener = match TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => {
                    tracing::error!(error = %e, "node-link listener");
                    return;
                }
            };
            tokio::spawn(accept_loop(listener, ctx.clone()));
            supervise(ctx).await;
        });
    })?;
    Ok(thread)
}

/// Keeps one dialer per member this node dials, restarting it when the
/// member's address or key changes.
async fn supervise(ctx: Arc<Ctx>) {
    let mut dialers: HashMap<String, (Member, tokio::task::JoinHandle<()>)> = HashMap::new();
    let mut tick = tokio::time::interval(SUPERVISE_EVERY);
    loop {
        tokio::select! {
            _ = ctx.shutdown.cancelled() => break,
            _ = tick.tick() => {}
        }
        let view = ctx.cluster.view();
        for m in view.members.iter().filter(|m| m.id.as_str() > ctx.cluster.me()) {
            let stale = dialers.get(&m.id).is_some_and(|(known, _)| known != m);
            if stale {
                if let Some((_, task)) = dialers.remove(&m.id) {
                    task.abort();
                }
            }
            if !dialers.contains_key(&m.id) {
                let task = tokio::spawn(dial_loop(m.clone(), ctx.clone()));
                dialers.insert(m.id.clone(), (m.clone(), task));
            }
        }
    }
    for (_, (_, task)) in dialers {
        task.abort();
    }
}

async fn dial_loop(peer: Member, ctx: Arc<Ctx>) {
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

async fn accept_loop(listener: TcpListener, ctx: Arc<Ctx>) {
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
    let storage = |e: crate::store::StorageError| LinkFailure::Storage(e.to_string());
    let name = peer.id.as_str();
    // What the link costs on the wire (after the handshake), both ways.
    let bytes_out = metrics::counter!("pipit_node_link_bytes_out_total", "peer" => name.to_string());
    let bytes_in = metrics::counter!("pipit_node_link_bytes_in_total", "peer" => name.to_string());
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

impl crate::route::cluster::Relay for Links {
    fn typing(&self, node: &str, to: u64, from: u64, typing: bool) -> bool {
        self.ask(node, Ask::Typing(pb::NodeTyping { to, from, typing }))
    }
}
