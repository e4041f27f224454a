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
use std::time::Duration;

use pipit_protocol::node::{pb, LinkError};
use pipit_protocol::PublicKey;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::keys::KeyRing;
use crate::model::DeviceAddr;
use crate::route::cluster::{Cluster, Member};
use crate::service::accounts::Accounts;
use crate::service::forward::Forward;
use crate::service::{Services, Typing};

mod link;
use link::{accept_loop, dial_loop};

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

impl crate::route::cluster::Relay for Links {
    fn typing(&self, node: &str, to: u64, from: u64, typing: bool) -> bool {
        self.ask(node, Ask::Typing(pb::NodeTyping { to, from, typing }))
    }
}
