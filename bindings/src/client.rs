//! The client object apps hold.

use std::sync::Arc;

use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::PublicKey;
use pipit_client::{Events, FileStore};
use tokio::sync::{Mutex, RwLock};

use crate::runtime::{run, run_blocking};
use crate::{ClientConfig, Event, GroupInfo, PipitError, Stats};

/// Where a push token comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum PushPlatform {
    /// An APNs device token (base64), for iOS.
    Apns,
    /// An FCM registration token, for Android.
    Fcm,
    /// A UnifiedPush endpoint URL.
    UnifiedPush,
}

impl From<PushPlatform> for pb::PushPlatform {
    fn from(p: PushPlatform) -> Self {
        match p {
            PushPlatform::Apns => pb::PushPlatform::Apns,
            PushPlatform::Fcm => pb::PushPlatform::Fcm,
            PushPlatform::UnifiedPush => pb::PushPlatform::UnifiedPush,
        }
    }
}

/// Starts a client: opens (or creates) `storage_dir`, which holds the
/// device's private key, its progress and the outbox, then connects in the
/// background. The first start registers a new account (with
/// `config.invite` if the server wants one); later starts log in as the
/// same device. Events arrive through [`Client::next_event`].
#[uniffi::export]
pub async fn start_client(config: ClientConfig, storage_dir: String) -> Result<Arc<Client>, PipitError> {
    run_blocking(move || {
        let store = FileStore::open(storage_dir)?;
        let (client, events) = pipit_client::Client::start(config.try_into()?, store)?;
        let identity = client.identity().to_string();
        let e2e_identity = client.e2e_identity().map(|i| i.to_string());
        Ok(Arc::new(Client {
            inner: Arc::new(RwLock::new(Some(client))),
            events: Mutex::new(events),
            identity,
            e2e_identity,
        }))
    })
    .await
}

/// A running client. Every method is async and runs on the bindings' own
/// runtime; dropping the object stops the client.
#[derive(uniffi::Object)]
pub struct Client {
    /// `None` once closed. Calls share it; `close` takes it.
    inner: Arc<RwLock<Option<pipit_client::Client>>>,
    /// Behind a lock only so that `next_event` can take `&self`; one
    /// reader at a time gets each event.
    events: Mutex<Events>,
    identity: String,
    e2e_identity: Option<String>,
}

/// Runs `$body` on the runtime with the library client bound to `$c`,
/// or fails with `Stopped` once the client is closed. A macro rather than
/// a function taking an async closure: stable Rust cannot require such a
/// closure's future to be `Send`.
macro_rules! with_client {
    ($self:ident, |$c:ident| $body:expr) => {{
        let inner = $self.inner.clone();
        run(async move {
            let guard = inner.read().await;
            let $c = guard.as_ref().ok_or(PipitError::Stopped)?;
            Ok($body)
        })
        .await
    }};
}

#[uniffi::export]
impl Client {
    /// This device's public key, 64 hex digits: what another device of the
    /// same account passes to `link_device`.
    pub fn identity(&self) -> String {
        self.identity.clone()
    }

    /// Queues a 1:1 message to account `to`. Returns its id once it is in
    /// the outbox on disk; `Event.Sent` with that id follows when the
    /// server has it, however many reconnects that takes.
    pub async fn send(&self, to: u64, payload: Vec<u8>) -> Result<u64, PipitError> {
        with_client!(self, |c| c.send(to, payload).await?)
    }

    /// Tells `peer` this device read its messages up to sequence number
    /// `through`. Not queued: lost if offline (send it again later).
    pub async fn mark_read(&self, peer: u64, through: u64) -> Result<(), PipitError> {
        with_client!(self, |c| c.mark_read(peer, through).await?)
    }

    /// Authorises another device (its `identity()`) for this account. The
    /// answer is `Event.Linked` or `Event.RequestFailed` with the same
    /// `req`, an id the app picks. Not queued: lost if offline.
    pub async fn link_device(&self, req: u64, key: String, name: String) -> Result<(), PipitError> {
        let key: PublicKey = key.parse().map_err(|e| PipitError::InvalidArgument { reason: format!("key: {e}") })?;
        let m = pb::LinkDevice { req, key: key.as_bytes().to_vec().into(), name };
        with_client!(self, |c| c.request(vec![m.into()]).await?)
    }

    /// Asks for the devices of `account` (0: this account). The answer is
    /// `Event.DeviceList` or `Event.RequestFailed` with the same `req`.
    /// Not queued: lost if offline.
    pub async fn request_device_list(&self, req: u64, account: u64) -> Result<(), PipitError> {
        let m = pb::DeviceListRequest { req, account };
        with_client!(self, |c| c.request(vec![m.into()]).await?)
    }

    /// Queues a message to every member of `group` (this account must be
    /// one). Like `send`, it survives reconnects in the outbox.
    pub async fn send_group(&self, group: u64, payload: Vec<u8>) -> Result<u64, PipitError> {
        with_client!(self, |c| c.send_group(group, payload).await?)
    }

    /// Tells the group this device read its messages up to `through`.
    pub async fn mark_group_read(&self, group: u64, through: u64) -> Result<(), PipitError> {
        with_client!(self, |c| c.mark_group_read(group, through).await?)
    }

    /// Creates a group of this account (its first admin) and `members`.
    /// Waits for a connection; fails with `Network` if the connection
    /// dropped before the answer (list the groups to see whether it was
    /// made: a repeated create makes a second group).
    pub async fn create_group(&self, name: String, members: Vec<u64>) -> Result<GroupInfo, PipitError> {
        with_client!(self, |c| c.create_group(&name, &members).await?.into())
    }

    /// Adds members (admins only). Safe to repeat.
    pub async fn add_members(&self, group: u64, members: Vec<u64>) -> Result<(), PipitError> {
        with_client!(self, |c| c.add_members(group, &members).await?)
    }

    /// Removes members (admins only). Safe to repeat.
    pub async fn remove_members(&self, group: u64, members: Vec<u64>) -> Result<(), PipitError> {
        with_client!(self, |c| c.remove_members(group, &members).await?)
    }

    /// Leaves a group.
    pub async fn leave_group(&self, group: u64) -> Result<(), PipitError> {
        with_client!(self, |c| c.leave_group(group).await?)
    }

    /// Every group this account is in.
    pub async fn list_groups(&self) -> Result<Vec<GroupInfo>, PipitError> {
        with_client!(self, |c| c.groups().await?.into_iter().map(GroupInfo::from).collect())
    }

    /// Watches these accounts' presence (the contacts whose chats are
    /// open), replacing the set watched before; an empty list stops. Each
    /// account's state arrives as `Event.Presence` before this returns;
    /// changes follow. Sent again after every reconnect.
    pub async fn watch_presence(&self, accounts: Vec<u64>) -> Result<(), PipitError> {
        with_client!(self, |c| c.watch_presence(accounts).await?)
    }

    /// Shows or hides this account's last seen from everyone.
    pub async fn set_last_seen_visible(&self, visible: bool) -> Result<(), PipitError> {
        with_client!(self, |c| c.set_last_seen_visible(visible).await?)
    }

    /// Tells `peer` this device is typing (or stopped). At most once:
    /// dropped when offline.
    pub async fn typing(&self, peer: u64, typing: bool) -> Result<(), PipitError> {
        with_client!(self, |c| c.typing(peer, typing).await?)
    }

    /// Tells the other members of `group` this device is typing (or
    /// stopped). At most once: dropped when offline.
    pub async fn typing_in_group(&self, group: u64, typing: bool) -> Result<(), PipitError> {
        let m = pb::Typing { group, typing, ..Default::default() };
        with_client!(self, |c| c.request(vec![m.into()]).await?)
    }

    /// Registers this device's push token (empty: removes it), so the
    /// server wakes the app when something arrives while it has no
    /// connection. `Refused` (NOT_SUPPORTED) when the server delivers no
    /// wake-ups for that platform.
    pub async fn set_push_token(&self, platform: PushPlatform, token: Vec<u8>) -> Result<(), PipitError> {
        with_client!(self, |c| c.set_push_token(platform.into(), token).await?)
    }

    /// This device's end-to-end identity (its Curve25519 key, 64 hex
    /// digits), what two people compare to be sure no one is in the
    /// middle; `None` with encryption off.
    pub fn e2e_identity(&self) -> Option<String> {
        self.e2e_identity.clone()
    }

    /// Accepts the new identity `account`/`device` showed in
    /// `Event.IdentityChanged` (ideally after the people compared it): from
    /// now on messages are encrypted for it and its messages believed.
    /// `false` when it showed none.
    pub async fn trust_identity(&self, account: u64, device: u32) -> Result<bool, PipitError> {
        with_client!(self, |c| c.trust_identity(account, device).await?)
    }

    /// Counters, for diagnostics.
    pub async fn stats(&self) -> Result<Stats, PipitError> {
        with_client!(self, |c| Stats::from(c.stats()))
    }

    /// The next event; `None` once the client has stopped or closed.
    ///
    /// Awaited directly rather than on the runtime: waiting for a channel
    /// blocks no thread, and a caller that cancels (a coroutine, an
    /// `asyncio` timeout) then loses no event.
    pub async fn next_event(&self) -> Option<Event> {
        self.events.lock().await.next().await.map(Event::from)
    }

    /// Stops the client and closes its connection; later calls fail with
    /// `Stopped`. What is in the outbox goes out on the next start.
    pub async fn close(&self) {
        let inner = self.inner.clone();
        let _ = run(async move {
            if let Some(c) = inner.write().await.take() {
                c.close().await;
            }
            Ok(())
        })
        .await;
    }
}
