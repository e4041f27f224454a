//! This node in etcd: it enters itself in the node list (bumping the
//! epoch), holds a lease that says it is up, and watches the list and the
//! leases of the others, replacing the [`View`] whenever they change.
//!
//! Layout under the configured prefix `P`:
//!
//! ```text
//! P/members/<node_id>   {"id","slot","advertise","link","key"}, kept
//!                       for good
//! P/epoch               the node list's version, decimal; bumped in the
//!                       same transaction as every change to P/members/
//! P/alive/<node_id>     the node's server key, attached to its lease
//! ```
//!
//! Every change to the list is a compare-and-swap on `P/epoch`, so two
//! nodes joining at once never take the same slot and every node sees
//! the list change exactly when the epoch does. Liveness is only what
//! etcd says: when etcd cannot be reached, the last view stays.
//!
//! The etcd client runs on its own thread with a small runtime, apart
//! from the shards: a slow etcd never delays a connection.

use std::collections::BTreeSet;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, GetOptions, PutOptions, Txn, TxnOp, WatchOptions};
use pipit_protocol::PublicKey;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use super::{Cluster, ClusterConfig, Member, View, MAX_NODES};

/// Attempts at the compare-and-swap that enters this node in the list
/// before giving up (each loses only to another node's change).
const JOIN_ATTEMPTS: usize = 16;

/// Longest pause between attempts to reach etcd again.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Why this node could not join its cluster.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum JoinError {
    /// etcd did not answer in time, or refused.
    #[error("etcd at {endpoints} is unreachable: {reason}")]
    Unreachable {
        /// The configured endpoints.
        endpoints: String,
        /// What went wrong.
        reason: String,
    },
    /// Another process holds this node id's lease with another server key.
    #[error("node id {0:?} is already up with another server key (two machines with one node_id?)")]
    AlreadyLive(String),
    /// The list already has `MAX_NODES` nodes.
    #[error("the cluster already has {MAX_NODES} nodes")]
    Full,
    /// Other nodes kept changing the list; start again.
    #[error("the node list kept changing while joining; try again")]
    Contention,
    /// The data in etcd is not what pipit wrote.
    #[error("etcd key {key}: {reason}")]
    Corrupt {
        /// The key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// The membership thread could not start.
    #[error("starting the cluster thread: {0}")]
    Thread(#[from] std::io::Error),
}

#[derive(Serialize, Deserialize)]
struct Record {
    id: String,
    slot: u32,
    advertise: String,
    #[serde(default)]
    link: String,
    key: String,
}

struct Keys {
    members: String,
    epoch: String,
    alive_prefix: String,
    me_member: String,
    me_alive: String,
    all: String,
}

impl Keys {
    fn new(prefix: &str, me: &str) -> Self {
        Self {
            members: format!("{prefix}/members/"),
            epoch: format!("{prefix}/epoch"),
            alive_prefix: format!("{prefix}/alive/"),
            me_member: format!("{prefix}/members/{me}"),
            me_alive: format!("{prefix}/alive/{me}"),
            all: format!("{prefix}/"),
        }
    }
}

/// What one read of the prefix found.
struct Snapshot {
    view: View,
    /// The store revision of the read (watches start after it).
    revision: i64,
    /// `P/epoch`'s mod revision (0: absent), for the compare-and-swap.
    epoch_rev: i64,
    /// Who holds each alive key, by node id: their server keys.
    alive_keys: Vec<(String, String)>,
}

struct Node {
    cfg: ClusterConfig,
    key: PublicKey,
    keys: Keys,
}

impl Node {
    fn unreachable(&self, e: impl std::fmt::Display) -> JoinError {
        JoinError::Unreachable { endpoints: self.cfg.etcd_endpoints.join(","), reason: e.to_string() }
    }

    async fn connect(&self) -> Result<Client, JoinError> {
        let t = Duration::from_secs(self.cfg.etcd_timeout_secs);
        let opts = ConnectOptions::new()
            .with_connect_timeout(t)
            .with_timeout(t)
            .with_keep_alive(Duration::from_secs(self.cfg.lease_secs.div_ceil(3).max(1)), t);
        let c = tokio::time::timeout(t, Client::connect(&self.cfg.etcd_endpoints, Some(opts)))
            .await
            .map_err(|_| self.unreachable("timed out"))?
            .map_err(|e| self.unreachable(e))?;
        Ok(c)
    }

    async fn read(&self, client: &mut Client) -> Result<Snapshot, JoinError> {
        // At most every member, every alive key and the epoch.
        let limit = (2 * MAX_NODES + 8) as i64;
        let resp = client
            .get(self.keys.all.as_bytes(), Some(GetOptions::new().with_prefix().with_limit(limit)))
            .await
            .map_err(|e| self.unreachable(e))?;
        let revision = resp.header().map_or(0, |h| h.revision());
        let (mut members, mut alive, mut alive_keys) = (Vec::new(), BTreeSet::new(), Vec::new());
        let (mut epoch, mut epoch_rev) = (0u64, 0i64);
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            let corrupt = |reason: &str| JoinError::Corrupt { key: key.clone(), reason: reason.to_string() };
            if key == self.keys.epoch {
                epoch = std::str::from_utf8(kv.value())
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt("not a number"))?;
                epoch_rev = kv.mod_revision();
            } else if let Some(id) = key.strip_prefix(&self.keys.members) {
                let r: Record = serde_json::from_slice(kv.value()).map_err(|e| corrupt(&e.to_string()))?;
                let node_key: PublicKey = r.key.parse().map_err(|_| corrupt("bad server key"))?;
                if r.id != id || u64::from(r.slot) >= MAX_NODES {
                    return Err(corrupt("id or slot out of place"));
                }
                members.push(Member { id: r.id, slot: r.slot, advertise: r.advertise, link: r.link, key: node_key });
            } else if let Some(id) = key.strip_prefix(&self.keys.alive_prefix) {
                alive.insert(id.to_string());
                alive_keys.push((id.to_string(), String::from_utf8_lossy(kv.value()).into_owned()));
            }
        }
        let mut slots = BTreeSet::new();
        for m in &members {
            if !slots.insert(m.slot) {
                return Err(JoinError::Corrupt {
                    key: self.keys.members.clone(),
                    reason: format!("slot {} twice", m.slot),
                });
            }
        }
        Ok(Snapshot { view: View::new(epoch, members, alive), revision, epoch_rev, alive_keys })
    }

    /// Enters (or updates) this node in the list; answers its slot.
    async fn enter(&self, client: &mut Client) -> Result<u32, JoinError> {
        let advertise = self.cfg.advertise.clone();
        let link = self.cfg.link_address().unwrap_or_default();
        for _ in 0..JOIN_ATTEMPTS {
            let snap = self.read(client).await?;
            let slot = match snap.view.members.iter().find(|m| m.id == self.cfg.node_id) {
                Some(m) if m.key == self.key && m.advertise == advertise && m.link == link => return Ok(m.slot),
                // A rotated server key or a new address: same slot, new epoch.
                Some(m) => m.slot,
                None => {
                    let used: BTreeSet<u32> = snap.view.members.iter().map(|m| m.slot).collect();
                    (0..MAX_NODES as u32).find(|s| !used.contains(s)).ok_or(JoinError::Full)?
                }
            };
            let record = Record {
                id: self.cfg.node_id.clone(),
                slot,
                advertise: advertise.clone(),
                link: link.clone(),
                key: self.key.to_string(),
            };
            let json = serde_json::to_vec(&record).map_err(|e| self.unreachable(e))?;
            let txn = Txn::new()
                .when([Compare::mod_revision(self.keys.epoch.as_bytes(), CompareOp::Equal, snap.epoch_rev)])
                .and_then([
                    TxnOp::put(self.keys.me_member.as_bytes(), json, None),
                    TxnOp::put(self.keys.epoch.as_bytes(), (snap.view.epoch + 1).to_string(), None),
                ]);
            let resp = client.txn(txn).await.map_err(|e| self.unreachable(e))?;
            if resp.succeeded() {
                tracing::info!(node = %self.cfg.node_id, slot, epoch = snap.view.epoch + 1, "entered the node list");
                return Ok(slot);
            }
        }
        Err(JoinError::Contention)
    }

    /// Takes a new lease and says this node is up with it. A previous
    /// incarnation of this node (same server key: same data directory)
    /// may still hold the alive key after a crash; it is taken over. A
    /// different key is another machine with this node id: refused.
    async fn go_live(&self, client: &mut Client) -> Result<i64, JoinError> {
        let snap = self.read(client).await?;
        let mine = self.key.to_string();
        if let Some((_, holder)) = snap.alive_keys.iter().find(|(id, _)| *id == self.cfg.node_id) {
            if *holder != mine {
                return Err(JoinError::AlreadyLive(self.cfg.node_id.clone()));
            }
        }
        let ttl = i64::try_from(self.cfg.lease_secs).unwrap_or(i64::MAX);
        let lease = client.lease_grant(ttl, None).await.map_err(|e| self.unreachable(e))?.id();
        client
            .put(self.keys.me_alive.as_bytes(), mine, Some(PutOptions::new().with_lease(lease)))
            .await
            .map_err(|e| self.unreachable(e))?;
        Ok(lease)
    }
}

/// Joins the cluster `cfg` names with this server's `key`: enters the
/// node list, takes a lease, reads the view; then keeps all three current
/// on a thread of its own until `shutdown`, when it gives the lease back
/// (the others see this node down at once, not a lease later).
///
/// Fails with a clear error when etcd is unreachable within
/// `etcd_timeout_secs`.
pub fn join(
    cfg: &ClusterConfig,
    key: PublicKey,
    shutdown: CancellationToken,
) -> Result<(Cluster, std::thread::JoinHandle<()>), JoinError> {
    let node = Node { keys: Keys::new(&cfg.etcd_prefix, &cfg.node_id), cfg: cfg.clone(), key };
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let thread = std::thread::Builder::new().name("pipit-cluster".into()).spawn(move || {
        let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
            Ok(rt) => rt,
            Err(e) => {
                let _ = tx.send(Err(JoinError::Thread(e)));
                return;
            }
        };
        rt.block_on(async move {
            let first = async {
                let mut client = node.connect().await?;
                let slot = node.enter(&mut client).await?;
                let lease = node.go_live(&mut client).await?;
                let snap = node.read(&mut client).await?;
                Ok::<_, JoinError>((client, slot, lease, snap))
            };
            let limit = Duration::from_secs(node.cfg.etcd_timeout_secs);
            let (client, slot, lease, snap) = match tokio::time::timeout(limit, first).await {
                Ok(Ok(v)) => v,
                Ok(Err(e)) => {
                    let _ = tx.send(Err(e));
                    return;
                }
                Err(_) => {
                    let _ = tx.send(Err(node.unreachable("timed out")));
                    return;
                }
            };
            let revision = snap.revision;
            let retry = u32::try_from(node.cfg.lease_secs).unwrap_or(u32::MAX);
            let cluster = Cluster::new(node.cfg.node_id.clone(), slot, retry, node.cfg.outbound_max, snap.view.clone());
            cluster.set_view(snap.view);
            cluster.set_etcd_up(true);
            if tx.send(Ok(cluster.clone())).is_err() {
                return;
            }
            run(&node, &cluster, client, lease, revision, shutdown).await;
        });
    })?;
    match rx.recv() {
        Ok(Ok(cluster)) => Ok((cluster, thread)),
        Ok(Err(e)) => {
            let _ = thread.join();
            Err(e)
        }
        Err(_) => Err(JoinError::Thread(std::io::Error::other("the cluster thread ended"))),
    }
}

/// Why a session with etcd ended.
enum Ended {
    Shutdown,
    Lost(String),
}

async fn run(
    node: &Node,
    cluster: &Cluster,
    mut client: Client,
    mut lease: i64,
    mut revision: i64,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(250);
    loop {
        match session(node, cluster, &mut client, lease, revision, &shutdown).await {
            Ended::Shutdown => {
                // Others see this node down now rather than a lease later.
                let _ = tokio::time::timeout(Duration::from_secs(2), client.lease_revoke(lease)).await;
                return;
            }
            Ended::Lost(why) => {
                cluster.set_etcd_up(false);
                metrics::counter!("pipit_cluster_etcd_errors_total").increment(1);
                tracing::warn!(reason = %why, epoch = cluster.view().epoch, "lost etcd; the current node list stays in force");
            }
        }
        // Again until etcd answers: the list, a fresh lease, the view.
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(MAX_BACKOFF);
            let again = async {
                node.enter(&mut client).await?;
                let new_lease = node.go_live(&mut client).await?;
                let snap = node.read(&mut client).await?;
                Ok::<_, JoinError>((new_lease, snap))
            };
            match again.await {
                Ok((new_lease, snap)) => {
                    if new_lease != lease {
                        // The alive key moved to the new lease; the old
                        // one (probably expired already) holds nothing.
                        let _ = client.lease_revoke(lease).await;
                    }
                    lease = new_lease;
                    revision = snap.revision;
                    cluster.set_view(snap.view);
                    cluster.set_etcd_up(true);
                    backoff = Duration::from_millis(250);
                    tracing::info!(epoch = cluster.view().epoch, "etcd reachable again");
                    break;
                }
                Err(JoinError::AlreadyLive(id)) => {
                    // Someone else took this id while etcd was away from
                    // us: keep serving with the last view and say so.
                    tracing::error!(node = %id, "another process holds this node id in etcd");
                }
                Err(e) => tracing::debug!(error = %e, "etcd still unreachable"),
            }
        }
    }
}

/// Keeps the lease and the view current until etcd fails or shutdown.
async fn session(
    node: &Node,
    cluster: &Cluster,
    client: &mut Client,
    lease: i64,
    revision: i64,
    shutdown: &CancellationToken,
) -> Ended {
    let opened = async {
        let ka = client.lease_keep_alive(lease).await?;
        let watch = client
            .watch(node.keys.all.as_bytes(), Some(WatchOptions::new().with_prefix().with_start_revision(revision + 1)))
            .await?;
        Ok::<_, etcd_client::Error>((ka, watch))
    };
    let ((mut keeper, mut ka_stream), mut watch) = match opened.await {
        Ok(v) => v,
        Err(e) => return Ended::Lost(e.to_string()),
    };
    let mut tick = tokio::time::interval(Duration::from_millis(node.cfg.lease_secs * 1000 / 3));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return Ended::Shutdown,
            _ = tick.tick() => {
                if let Err(e) = keeper.keep_alive().await {
                    return Ended::Lost(e.to_string());
                }
            }
            r = ka_stream.message() => match r {
                Ok(Some(resp)) if resp.ttl() > 0 => {}
                Ok(Some(_)) => return Ended::Lost("lease expired".into()),
                Ok(None) => return Ended::Lost("lease stream closed".into()),
                Err(e) => return Ended::Lost(e.to_string()),
            },
            r = watch.message() => match r {
                Ok(Some(resp)) if resp.canceled() => return Ended::Lost("watch cancelled".into()),
                Ok(Some(_)) => match node.read(client).await {
                    Ok(snap) => {
                        let before = cluster.view();
                        if before.epoch != snap.view.epoch || before.alive != snap.view.alive {
                            tracing::info!(epoch = snap.view.epoch, alive = ?snap.view.alive, "cluster view changed");
                        }
                        cluster.set_view(snap.view);
                    }
                    Err(JoinError::Corrupt { key, reason }) => {
                        tracing::error!(%key, %reason, "ignoring a node list pipit did not write; keeping the current one");
                    }
                    Err(e) => return Ended::Lost(e.to_string()),
                },
                Ok(None) => return Ended::Lost("watch stream closed".into()),
                Err(e) => return Ended::Lost(e.to_string()),
            },
        }
    }
}
