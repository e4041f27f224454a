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
//! - `keys`: the end-to-end key directory: uploads, fetches that hand out
//!   each one-time prekey once, low-stock notices, the fetch rate limit.

pub mod accounts;
pub mod expiry;
pub mod features;
pub mod inbox;
pub mod keys;
pub mod messaging;
pub mod receipts;

use std::sync::Arc;

use crate::commit::{self, EngineConfig, SubmitError};
use crate::config::Registration;
use crate::route::Deliveries;
use crate::store::Store;

pub use accounts::Accounts;
pub use inbox::InboxReader;
pub use keys::{KeyRules, Keys};
pub use messaging::Messaging;
pub use receipts::Receipts;

/// The rules the writer applies.
#[derive(Debug, Clone)]
pub struct Rules {
    /// Undelivered entries and dedup records expire after this many seconds.
    pub ttl_secs: u64,
    /// Who may register.
    pub registration: Registration,
    /// The key directory's settings.
    pub keys: KeyRules,
}

/// What the writer's operations may use besides the transaction.
pub struct Ctx {
    rules: Rules,
    deliveries: Arc<dyn Deliveries>,
    expiry: expiry::Cursor,
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
    /// The end-to-end key directory.
    pub keys: Keys,
    /// The writer itself (barriers at shutdown, metrics).
    pub writer: Writer,
}

/// Starts the writer thread and returns the handles over it.
pub fn start(
    store: Arc<Store>,
    rules: Rules,
    deliveries: Arc<dyn Deliveries>,
    engine: EngineConfig,
) -> std::io::Result<(Services, std::thread::JoinHandle<()>)> {
    let key_rules = rules.keys;
    let ctx = Ctx { rules, deliveries, expiry: expiry::Cursor::default() };
    let (writer, thread) = Writer::start(store.clone(), ctx, engine)?;
    let services = Services {
        accounts: Accounts::new(writer.clone(), store.clone()),
        messaging: Messaging::new(writer.clone()),
        receipts: Receipts,
        inbox: InboxReader::new(store.clone()),
        keys: Keys::new(writer.clone(), store, key_rules),
        writer,
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
            // ends once every handle is gone; wait for it.
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
        let rules = Rules { ttl_secs: 100, registration, keys };
        let engine = EngineConfig { max_batch: 64, capacity: 1024, sync: true };
        let (services, writer) = start(store.clone(), rules, pushed.clone(), engine).unwrap();
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
            let digest = messaging::content_digest(&send);
            self.rt.block_on(self.services().messaging.send(from, send, digest).unwrap())
        }

        pub(crate) fn barrier(&self) {
            self.rt.block_on(self.services().writer.barrier()).unwrap();
        }
    }
}
