//! The product's rules, one file per concern. Each file defines its
//! operations (what the writer applies, all or nothing) and a handle that
//! the network layer calls; none of them knows about sockets.
//!
//! - `accounts`: registration, invites, linking devices, device lists.
//! - `messaging`: 1:1 sends: dedup, sequence numbers, fan-out to devices.
//! - `receipts`: acks (deleting inbox entries) and delivered/read receipts.
//! - `inbox`: appending to a device's inbox; reading it at login and when
//!   a connection catches up.
//! - `expiry`: undelivered entries and dedup records past their time.
//! - `features`: which optional protocol features this server offers.
//! - `groups`: creating groups and changing their members.
//! - `group_send`: a group message: its body stored once, a fan-out job.
//! - `fanout`: the driver that turns fan-out jobs into members' inbox
//!   entries, in bounded steps, after "sent".
//! - `group_receipts`: delivered and read counts per group message,
//!   coalesced for the sender.
//! - `presence`: online, offline after a grace period, last seen, privacy,
//!   subscriptions.
//! - `typing`: typing notices, relayed at most once, rate-limited.
//! - `push`: push tokens and content-free wake-ups through a gateway.
//! - `forward`: store and forward of sends between cluster nodes.
//! - `keys`: the end-to-end key directory: uploads, fetches that hand out
//!   each one-time prekey once, low-stock notices, the fetch rate limit.

pub mod accounts;
mod configure;
pub mod expiry;
pub mod fanout;
pub mod features;
pub mod forward;
pub mod group_receipts;
pub mod group_send;
pub mod groups;
pub mod inbox;
pub mod keys;
pub mod messaging;
pub mod presence;
pub mod push;
pub mod receipts;
pub mod settings;
pub mod typing;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::commit::{self, EngineConfig, SubmitError};
use crate::route::cluster::Cluster;
use crate::route::{Deliveries, Registry};
use crate::service::settings::Registration;
use crate::store::Store;

pub use accounts::Accounts;
pub use fanout::Fanout;
pub use features::Features;
pub use groups::Groups;
pub use inbox::InboxReader;
pub use keys::{KeyRules, Keys};
pub use messaging::Messaging;
pub use presence::{Presence, PresenceConfig};
pub use push::{Push, PushConfig, PushSetupError};
pub use receipts::Receipts;
pub use typing::{Typing, TypingConfig};

/// Seconds a client is told to wait before sending again when storage
/// has no room (below its reserve, or full): long enough not to hammer a
/// server whose operator is freeing space, short enough that chat resumes
/// soon after.
pub const STORAGE_RETRY_SECS: u32 = 10;

/// Seconds a client is told to wait when the writer's queue is full.
pub const QUEUE_RETRY_SECS: u32 = 1;

/// The `retry_after_secs` for a send refused with `reason`.
pub fn retry_after(reason: SubmitError) -> u32 {
    match reason {
        SubmitError::NoRoom => STORAGE_RETRY_SECS,
        _ => QUEUE_RETRY_SECS,
    }
}

/// The rules the writer applies.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Undelivered entries and dedup records expire after this many seconds.
    pub ttl_secs: u64,
    /// Who may register.
    pub registration: Registration,
    /// Most member accounts of one group.
    pub max_group_members: usize,
    /// The key directory's settings.
    pub keys: KeyRules,
    /// This node's cluster; `None`: a single node.
    pub cluster: Option<Cluster>,
}

/// What the writer's operations may use besides the transaction.
pub struct Ctx {
    rules: Rules,
    deliveries: Arc<dyn Deliveries>,
    expiry: expiry::Cursor,
    fanout: Arc<fanout::Shared>,
    /// Wake-ups of the node links when forwards are queued.
    wakes: Arc<forward::Wakes>,
}

/// The group-commit writer, carrying this layer's operations.
pub type Writer = commit::Writer<Ctx>;

/// One of this layer's operations.
pub type Op = Box<dyn commit::Operation<Ctx>>;

/// An operation that must reach the writer once accepted (an ack, a
/// read receipt): never dropped for want of room. The caller submits it
/// with [`Submission::try_submit`]; when the queue is full it gets it
/// back, keeps it (in order with later ones), reads no more input, and
/// tries again once [`Writer::room`] says there is room. Memory stays
/// bounded and nothing accepted is lost.
pub struct Submission(Op);

impl Submission {
    /// Queues the operation if there is room now; else gives it back. An
    /// operation for a writer that has stopped is dropped (the server is
    /// shutting down; the client repeats what was not acknowledged).
    pub fn try_submit(self, writer: &Writer) -> Result<(), Submission> {
        match writer.try_submit(self.0) {
            Ok(()) => Ok(()),
            Err(commit::Refused { reason: SubmitError::Full, op }) => Err(Submission(op)),
            Err(_) => Ok(()),
        }
    }
}

/// Every handle the network layer uses.
#[derive(Clone)]
pub struct Services {
    /// Registration, invites, devices.
    pub accounts: Accounts,
    /// Sends.
    pub messaging: Messaging,
    /// Acks and receipts.
    pub receipts: Receipts,
    /// Reading inboxes.
    pub inbox: InboxReader,
    /// Group requests.
    pub groups: Groups,
    /// The group fan-out.
    pub fanout: Fanout,
    /// Presence: connect and disconnect hooks, subscriptions, privacy.
    pub presence: Presence,
    /// Typing notices.
    pub typing: Typing,
    /// Push tokens and wake-ups.
    pub push: Push,
    /// The optional features offered.
    pub features: Features,
    /// The end-to-end key directory.
    pub keys: Keys,
    /// The writer itself (barriers at shutdown, metrics).
    pub writer: Writer,
    /// This node's cluster (placement, liveness); `None`: a single node.
    pub cluster: Option<Cluster>,
    /// Store and forward to and from other nodes (idle on a single node).
    pub forward: forward::Forward,
}

/// What the services that never pass through the commit need: the
/// registry they work on, their settings, and when to stop.
pub struct Live {
    /// Online devices and presence.
    pub registry: Arc<Registry>,
    /// Presence settings.
    pub presence: PresenceConfig,
    /// Typing settings.
    pub typing: TypingConfig,
    /// Push settings.
    pub push: PushConfig,
    /// Stops the push worker.
    pub shutdown: CancellationToken,
}

/// Why the services did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// A thread could not be started.
    #[error("starting a thread: {0}")]
    Thread(#[from] std::io::Error),
    /// The push client could not be built.
    #[error(transparent)]
    Push(#[from] PushSetupError),
}

/// Starts the writer thread and returns the handles over it.
pub fn start(
    store: Arc<Store>,
    rules: Rules,
    deliveries: Arc<dyn Deliveries>,
    engine: EngineConfig,
    live: Live,
) -> Result<(Services, std::thread::JoinHandle<()>), StartError> {
    let key_rules = rules.keys;
    let cluster = rules.cluster.clone();
    let shared = fanout::Shared::new(std::time::Duration::ZERO);
    let wakes = Arc::new(forward::Wakes::default());
    let ctx =
        Ctx { rules, deliveries, expiry: expiry::Cursor::default(), fanout: shared.clone(), wakes: wakes.clone() };
    let (writer, thread) = Writer::start(store.clone(), ctx, engine)?;
    let push = Push::start(live.push, store.clone(), live.registry.clone(), writer.clone(), live.shutdown)?;
    let services = Services {
        accounts: Accounts::new(writer.clone(), store.clone()),
        messaging: Messaging::new(writer.clone()),
        forward: forward::Forward::new(writer.clone(), store.clone(), wakes),
        receipts: Receipts,
        groups: Groups::new(writer.clone(), store.clone()),
        fanout: Fanout::new(shared, store.clone()),
        inbox: InboxReader::new(store.clone()),
        presence: Presence::start(live.registry.clone(), store.clone(), writer.clone(), live.presence)?,
        typing: Typing::new(live.registry, store.clone(), live.typing, cluster.clone()),
        keys: Keys::new(writer.clone(), store, key_rules),
        features: Features::new(push.enabled()),
        push,
        writer,
        cluster,
    };
    Ok((services, thread))
}

/// Runs a blocking storage read off the async threads.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::store::StorageError> + Send + 'static,
) -> Result<T, crate::store::StorageError> {
    tokio::task::spawn_blocking(f).await.map_err(|_| crate::store::StorageError::Stopped)?
}

#[cfg(test)]
pub(crate) mod testing {
    //! A writer over a temporary RocksDB, collecting what it pushes.
    use std::sync::{Arc, Mutex};

    use bytes::Bytes;
    use pipit_protocol::message::pb;
    use pipit_protocol::{Message, PublicKey};

    use super::*;
    use crate::model::DeviceAddr;

    #[derive(Default)]
    pub(crate) struct Collect(pub(crate) Mutex<Vec<(DeviceAddr, u64, Message)>>);

    impl Deliveries for Collect {
        fn push(&self, to: DeviceAddr, id: u64, msg: Message) {
            self.0.lock().unwrap().push((to, id, msg));
        }

        fn notify(&self, to: DeviceAddr, msg: Message) {
            self.push(to, 0, msg);
        }
    }

    pub(crate) struct Setup {
        pub(crate) store: Arc<Store>,
        pub(crate) pushed: Arc<Collect>,
        pub(crate) rt: tokio::runtime::Runtime,
        services: Option<Services>,
        writer: Option<std::thread::JoinHandle<()>>,
        _dir: tempfile::TempDir,
    }

    impl Drop for Setup {
        fn drop(&mut self) {
            // Close the database before its directory goes: the writer
            // ends once every handle is gone (the presence timer holds
            // one until it stops); wait for it.
            if let Some(s) = &self.services {
                s.presence.stop(std::time::Duration::from_secs(1));
            }
            self.services = None;
            if let Some(w) = self.writer.take() {
                let _ = w.join();
            }
        }
    }

    pub(crate) fn setup(registration: Registration) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let pushed = Arc::new(Collect::default());
        let keys = KeyRules { low_water: 16, fetch_burst: 1_000, fetch_per_minute: 600 };
        let rules = Rules { ttl_secs: 100, registration, max_group_members: 8, keys, cluster: None };
        let engine = EngineConfig {
            max_batch: 64,
            capacity: 1024,
            sync: true,
            reserve_bytes: 0,
            full_wait: std::time::Duration::from_secs(1),
        };
        let live = Live {
            registry: Arc::new(Registry::default()),
            presence: PresenceConfig::default(),
            typing: TypingConfig::default(),
            push: PushConfig::default(),
            shutdown: CancellationToken::new(),
        };
        let (services, writer) = start(store.clone(), rules, pushed.clone(), engine, live).unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        Setup { store, pushed, rt, services: Some(services), writer: Some(writer), _dir: dir }
    }

    impl Setup {
        pub(crate) fn services(&self) -> &Services {
            self.services.as_ref().expect("set until drop")
        }

        pub(crate) fn register(&self, key: u8, invite: &str) -> Result<DeviceAddr, pb::ErrorCode> {
            let invite = Bytes::copy_from_slice(invite.as_bytes());
            self.rt.block_on(self.services().accounts.register(PublicKey([key; 32]), "t".into(), invite))
        }

        pub(crate) fn send(&self, from: DeviceAddr, id: u64, to: u64) -> Result<pb::Sent, messaging::SendFailure> {
            self.send_payload(from, id, to, b"x")
        }

        pub(crate) fn send_payload(
            &self,
            from: DeviceAddr,
            id: u64,
            to: u64,
            payload: &'static [u8],
        ) -> Result<pb::Sent, messaging::SendFailure> {
            let send = pb::Send { id, to, payload: Bytes::from_static(payload), ..Default::default() };
            self.rt.block_on(self.services().messaging.send(from, send).unwrap())
        }

        /// Runs one expiry round as if the clock read `now`.
        pub(crate) fn expire(&self, now: u64) -> expiry::ExpiryRound {
            let (tx, rx) = tokio::sync::oneshot::channel();
            self.rt.block_on(self.services().writer.submit(Box::new(expiry::ExpireOp::new(now, tx)))).unwrap();
            rx.blocking_recv().unwrap()
        }

        pub(crate) fn barrier(&self) {
            self.rt.block_on(self.services().writer.barrier()).unwrap();
        }

        pub(crate) fn link(&self, account: u64, key: u8) -> DeviceAddr {
            let link = self.services().accounts.link(DeviceAddr::new(account, 0), PublicKey([key; 32]), "t".into());
            DeviceAddr::new(account, self.rt.block_on(link.unwrap()).unwrap())
        }

        pub(crate) fn create_group(&self, by: DeviceAddr, members: &[u64]) -> Result<pb::GroupInfo, pb::ErrorCode> {
            let created = self.services().groups.create(by, 0, Bytes::from_static(b"g"), members.to_vec());
            self.rt.block_on(created.unwrap())
        }

        pub(crate) fn change(&self, by: DeviceAddr, group: u64, c: groups::Change) -> Result<(), pb::ErrorCode> {
            self.rt.block_on(self.services().groups.change(by, group, c).unwrap())
        }

        pub(crate) fn group_send(
            &self,
            from: DeviceAddr,
            id: u64,
            group: u64,
        ) -> Result<pb::Sent, messaging::SendFailure> {
            let send = pb::Send { id, group, payload: Bytes::from_static(b"hello group"), ..Default::default() };
            self.rt.block_on(self.services().messaging.send(from, send).unwrap())
        }

        /// One fan-out step of entry `seq` of `group`.
        pub(crate) fn step(&self, group: u64, seq: u64, batch: usize) -> fanout::Step {
            let (tx, rx) = crossbeam_channel::unbounded();
            let op = Box::new(fanout::StepOp::new(group, seq, batch, tx));
            self.rt.block_on(self.services().writer.submit(op)).unwrap();
            rx.recv().unwrap().expect("durable")
        }

        /// Runs every fan-out job to its end, as the driver would.
        pub(crate) fn fan_out(&self, batch: usize) {
            loop {
                let heads = self.store.fanout_heads(0, 64).unwrap();
                if heads.is_empty() {
                    return;
                }
                for (g, s) in heads {
                    self.step(g, s, batch);
                }
            }
        }

        /// Acks `ids` of `device`'s inbox, as its connection would.
        pub(crate) fn ack(&self, device: DeviceAddr, ids: &[u64]) {
            let entries = self.store.inbox_after(device, 0, 10_000).unwrap();
            let acked = entries
                .iter()
                .filter(|(id, _)| ids.contains(id))
                .map(|(id, m)| receipts::acked_meta(device.account, *id, m))
                .collect();
            assert!(self.services().receipts.ack(device, acked).try_submit(&self.services().writer).is_ok());
            self.barrier();
        }

        /// Flushes group receipt counts to senders.
        pub(crate) fn flush_group_receipts(&self) {
            let (tx, rx) = crossbeam_channel::unbounded();
            let op = Box::new(group_receipts::FlushOp::new(tx));
            self.rt.block_on(self.services().writer.submit(op)).unwrap();
            rx.recv().unwrap().expect("durable");
        }
    }
}
