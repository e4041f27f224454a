//! Several nodes: who owns which account, and which nodes are up.
//!
//! The node list and its version (the epoch) live in etcd, with a lease
//! per node for liveness (`membership`); every node watches them and
//! keeps the latest [`View`]. The ring over the list (`ring`) places each
//! account on one owner node. Nothing here passes through the commit: a
//! view is replaced whole when etcd says the list or liveness changed.
//!
//! When etcd cannot be reached, the last view stays in force: no node
//! declares another down on its own (`pipit_cluster_etcd_up` says so).

pub mod membership;
pub mod ring;
mod settings;

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock, RwLock};

use pipit_protocol::PublicKey;

pub use membership::{join, JoinError};
pub use ring::{owned_id, Ring, MAX_NODES};
pub use settings::ClusterConfig;

/// One node of the list, as it registered itself in etcd.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    /// Its `node_id`.
    pub id: String,
    /// Its slot: the residue of the account ids it creates.
    pub slot: u32,
    /// `host:port` devices are redirected to.
    pub advertise: String,
    /// `host:port` other nodes dial for links.
    pub link: String,
    /// Its server static key (devices pin it when redirected).
    pub key: PublicKey,
}

impl Member {
    /// `advertise` as host and port.
    pub fn host_port(&self) -> (&str, u16) {
        self.advertise
            .rsplit_once(':')
            .and_then(|(h, p)| Some((h.trim_start_matches('[').trim_end_matches(']'), p.parse().ok()?)))
            .unwrap_or((self.advertise.as_str(), 0))
    }
}

/// One version of the cluster as this node knows it.
#[derive(Debug, Clone)]
pub struct View {
    /// The node list's version in etcd; grows with every change to it.
    pub epoch: u64,
    /// The node list, by id.
    pub members: Vec<Member>,
    /// Ids of the nodes whose lease is held.
    pub alive: BTreeSet<String>,
    /// The ring over `members` (indices into it).
    pub ring: Ring,
}

impl View {
    fn new(epoch: u64, mut members: Vec<Member>, alive: BTreeSet<String>) -> Self {
        members.sort_by(|a, b| a.id.cmp(&b.id));
        let ring = Ring::new(members.iter().map(|m| m.id.as_str()));
        Self { epoch, members, alive, ring }
    }

    /// The member that owns `account`.
    pub fn owner(&self, account: u64) -> Option<&Member> {
        self.ring.owner(account).map(|i| &self.members[i])
    }
}

/// Where an account lives, from this node's point of view.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Placement {
    /// Here.
    Local,
    /// On another node, whose lease is held.
    Remote(Member),
    /// On another node that is down (its lease lapsed).
    Down(Member),
}

/// What the node links carry that is never stored: set by the network
/// layer once its links run, used by the services.
pub trait Relay: Send + Sync + 'static {
    /// Relays a typing notice from `from` to `to`, an account of node
    /// `node`, if its link is up and has room; answers whether it went.
    fn typing(&self, node: &str, to: u64, from: u64, typing: bool) -> bool;
}

struct Shared {
    /// The node links, once they run.
    relay: OnceLock<Arc<dyn Relay>>,
    me: String,
    slot: u32,
    /// Seconds a device of a down node is told to wait: a node back up
    /// is seen within about a lease.
    retry_after_secs: u32,
    /// Messages that may wait for one other node.
    outbound_max: u64,
    view: RwLock<Arc<View>>,
    etcd_up: AtomicBool,
}

/// This node's handle on the cluster: cheap to clone, read on every login
/// and registration.
#[derive(Clone)]
pub struct Cluster {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster").field("me", &self.shared.me).field("epoch", &self.view().epoch).finish()
    }
}

impl Cluster {
    fn new(me: String, slot: u32, retry_after_secs: u32, outbound_max: u64, view: View) -> Self {
        let view = RwLock::new(Arc::new(view));
        let etcd_up = AtomicBool::new(true);
        let relay = OnceLock::new();
        Self { shared: Arc::new(Shared { relay, me, slot, retry_after_secs, outbound_max, view, etcd_up }) }
    }

    /// Installs the node links (once; later calls are ignored).
    pub fn set_relay(&self, relay: Arc<dyn Relay>) {
        let _ = self.shared.relay.set(relay);
    }

    /// The node links, if they run.
    pub fn relay(&self) -> Option<&Arc<dyn Relay>> {
        self.shared.relay.get()
    }

    /// Messages that may wait for one other node before sends to it are
    /// refused.
    pub fn outbound_max(&self) -> u64 {
        self.shared.outbound_max
    }

    /// What a device whose account's node is down is told to wait.
    pub fn retry_after_secs(&self) -> u32 {
        self.shared.retry_after_secs
    }

    /// This node's id.
    pub fn me(&self) -> &str {
        &self.shared.me
    }

    /// This node's slot.
    pub fn slot(&self) -> u32 {
        self.shared.slot
    }

    /// The current view.
    pub fn view(&self) -> Arc<View> {
        self.shared.view.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Whether etcd answered the last time this node asked.
    pub fn etcd_up(&self) -> bool {
        self.shared.etcd_up.load(Ordering::Relaxed)
    }

    fn set_view(&self, view: View) {
        metrics::gauge!("pipit_cluster_epoch").set(view.epoch as f64);
        metrics::gauge!("pipit_cluster_nodes").set(view.members.len() as f64);
        metrics::gauge!("pipit_cluster_nodes_alive").set(view.alive.len() as f64);
        *self.shared.view.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(view);
    }

    fn set_etcd_up(&self, up: bool) {
        metrics::gauge!("pipit_cluster_etcd_up").set(if up { 1.0 } else { 0.0 });
        self.shared.etcd_up.store(up, Ordering::Relaxed);
    }

    /// Where `account` lives. An account the ring cannot place (an empty
    /// list: never, since this node is on it) counts as local.
    pub fn place(&self, account: u64) -> Placement {
        let view = self.view();
        match view.owner(account) {
            None => Placement::Local,
            Some(m) if m.id == self.shared.me => Placement::Local,
            Some(m) if view.alive.contains(&m.id) => Placement::Remote(m.clone()),
            Some(m) => Placement::Down(m.clone()),
        }
    }

    /// A new account id owned by this node (see [`ring::owned_id`]), with
    /// `next` handing out this node's counter; `None`: retry later.
    pub fn new_account_id<E>(&self, next: impl FnMut() -> Result<u64, E>) -> Result<Option<u64>, E> {
        let view = self.view();
        let Some(me) = view.members.iter().position(|m| m.id == self.shared.me) else {
            return Ok(None);
        };
        owned_id(&view.ring, me, self.shared.slot, next)
    }
}
