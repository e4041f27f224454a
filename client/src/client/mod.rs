//! The reconnecting client an app embeds.
//!
//! One background task owns the connection and the [`Store`]. It connects
//! (IK with the pinned key, XX on first contact, which pins the key),
//! reconnects with full-jitter backoff, sends everything in the outbox on
//! every new connection with the same client ids until each gets "sent",
//! drops deliveries it has already processed, coalesces its acks, keeps
//! the connection alive at the negotiated interval, and reports everything
//! as [`Event`]s.

mod calls;
mod config;
mod connect;
mod event;
mod incoming;
mod order;
mod outbox;
mod task;

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey, StaticKeypair};
use tokio::sync::{mpsc, oneshot};

use crate::e2e::{DeviceIdentity, E2e, Encryption, Vault};
use crate::store::{State, Store};
use crate::ClientError;

pub use config::{Config, PickleKey};
pub use event::{Event, Stats};
use task::Task;

enum Cmd {
    Send(pb::Send, oneshot::Sender<Result<u64, ClientError>>),
    Raw(Vec<Message>),
    /// A request the task numbers, sends (again after a reconnect) until
    /// it is answered, and answers.
    Call(Message, oneshot::Sender<Result<Message, ClientError>>),
    Trust(u64, u32, oneshot::Sender<Result<bool, ClientError>>),
    Close(oneshot::Sender<()>),
}

/// Request ids the library assigns start here, so they never meet the
/// small ids an app picks for [`Client::request`].
const CALL_REQ_BASE: u64 = 1 << 20;

/// Handle to a running client. Dropping it stops the client.
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    stats: Arc<Stats>,
    identity: PublicKey,
    e2e_identity: Option<DeviceIdentity>,
}

/// The client's events, in order. Also a `futures` `Stream`.
pub struct Events {
    rx: mpsc::Receiver<Event>,
}

impl Events {
    /// The next event; `None` once the client has stopped.
    pub async fn next(&mut self) -> Option<Event> {
        self.rx.recv().await
    }
}

impl futures_core::Stream for Events {
    type Item = Event;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Event>> {
        self.rx.poll_recv(cx)
    }
}

impl Client {
    /// Starts a client over `store`: loads its identity (generating and
    /// saving one on first use) and outbox, then connects in the
    /// background. Must be called inside a tokio runtime.
    pub fn start(config: Config, mut store: impl Store) -> Result<(Client, Events), ClientError> {
        let state = match store.load_state()? {
            Some(s) => s,
            None => {
                let s = State::new(StaticKeypair::generate());
                store.save_state(&s)?;
                s
            }
        };
        let outbox = store.load_outbox()?.into_iter().map(|s| (s.id, s)).collect();
        let (e2e, pending) = match config.encryption {
            Encryption::Off => (None, BTreeMap::new()),
            Encryption::On => {
                let vault = match &config.pickle_key {
                    Some(k) => Vault::new(&k.0),
                    None => Vault::derived(state.identity.private_bytes()),
                };
                let e2e = E2e::load(&mut store, vault)?;
                let pending = e2e.stashed(&mut store)?.into_iter().map(|s| (s.id, s)).collect();
                (Some(e2e), pending)
            }
        };
        let e2e_identity = e2e.as_ref().map(E2e::identity);
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(config.event_buffer.max(1));
        let stats = Arc::new(Stats::default());
        let identity = *state.identity.public();
        let task = Task {
            config,
            store: Box::new(store),
            state,
            outbox,
            events: ev_tx,
            cmds: cmd_rx,
            stats: stats.clone(),
            deferred: BTreeMap::new(),
            calls: BTreeMap::new(),
            next_req: CALL_REQ_BASE,
            watching: Vec::new(),
            e2e,
            pending,
            reseal_at: None,
            reseals: BTreeMap::new(),
            held_connected: None,
            out: Vec::new(),
            lanes: order::Lanes::default(),
        };
        tokio::spawn(task.run());
        Ok((Client { cmds: cmd_tx, stats, identity, e2e_identity }, Events { rx: ev_rx }))
    }

    /// This device's public key (what another device links).
    pub fn identity(&self) -> &PublicKey {
        &self.identity
    }

    /// This device's end-to-end identity (`None` with encryption off):
    /// what its people compare to be sure no one is in the middle.
    pub fn e2e_identity(&self) -> Option<DeviceIdentity> {
        self.e2e_identity
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Accepts the identity `account`/`device` showed in an
    /// [`Event::IdentityChanged`]: from now on messages are encrypted for
    /// it and its messages believed. `false` when it showed none.
    pub async fn trust_identity(&self, account: u64, device: u32) -> Result<bool, ClientError> {
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Trust(account, device, tx)).await.map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Queues a 1:1 message. Returns its client id once it is in the
    /// outbox (durable if the store is); the `Sent` event follows when the
    /// server has it, after however many reconnects that takes. A payload
    /// that cannot be sent is refused here with [`ClientError::TooLarge`]
    /// (with encryption on, `max` is the largest plaintext whose
    /// ciphertext fits).
    pub async fn send(&self, to: u64, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        self.queue(pb::Send { to, payload: payload.into(), ..Default::default() }).await
    }

    /// Queues `send` (a 1:1 or group message; its id is assigned here).
    pub(crate) async fn queue(&self, mut send: pb::Send) -> Result<u64, ClientError> {
        // Room for the largest id the counter will reach.
        send.id = u64::MAX;
        check_size(&[Message::from(send.clone())])?;
        if self.e2e_identity.is_some() {
            // Encrypted, it grows: refused now if even its smallest sealed
            // form cannot be sent, rather than by a later `SendFailed`.
            let fits = |s: &pb::Send| check_size(&[Message::from(s.clone())]).is_ok();
            if !fits(&crate::e2e::smallest_sealed(&send)) {
                let max = crate::e2e::largest_plaintext(&send, fits);
                return Err(ClientError::TooLarge { len: send.payload.len(), max });
            }
        }
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Send(send, tx)).await.map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Tells `peer` this device read its messages up to `through`.
    pub async fn mark_read(&self, peer: u64, through: u64) -> Result<(), ClientError> {
        let r = pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer, through, ..Default::default() };
        self.request(vec![r.into()]).await
    }

    /// Watches these accounts' presence (typically the contacts whose
    /// chats are open), replacing the set watched before; an empty list
    /// stops watching. Returns once the server has answered, by which
    /// time each account's current state has arrived as an
    /// [`Event::Presence`]; changes follow as they happen. The set is
    /// sent again after every reconnect (the server forgets it with the
    /// connection). Waits for a connection if there is none; refused
    /// with `NOT_FOUND` for an unknown account and `TOO_LARGE` past the
    /// server's limit (256), and the set in force stays.
    pub async fn watch_presence(&self, accounts: Vec<u64>) -> Result<(), ClientError> {
        self.call(pb::PresenceSubscribe { accounts, req: 0 }.into()).await.map(drop)
    }

    /// Shows (`true`) or hides this account's last seen from everyone who
    /// watches it. Returns once the setting is durable on the server.
    pub async fn set_last_seen_visible(&self, visible: bool) -> Result<(), ClientError> {
        let last_seen = if visible { pb::LastSeenVisibility::Everyone } else { pb::LastSeenVisibility::Nobody };
        self.call(pb::PrivacySet { last_seen: last_seen as i32, req: 0 }.into()).await.map(drop)
    }

    /// Tells `peer` that this device is typing (`true`) or stopped.
    /// At most once: dropped when not connected, and the server drops it
    /// when the peer is offline or this device sends too many.
    pub async fn typing(&self, peer: u64, typing: bool) -> Result<(), ClientError> {
        self.request(vec![pb::Typing { peer, typing, ..Default::default() }.into()]).await
    }

    /// Registers this device's push token (`platform` and the token its
    /// push library gave the app: an FCM registration token, the base64
    /// APNs device token, or a UnifiedPush endpoint URL), so the server
    /// wakes the app when something arrives while it has no connection;
    /// an empty token removes it. Returns once the server has stored it;
    /// `NOT_SUPPORTED` when the server delivers no wake-ups for this
    /// platform.
    pub async fn set_push_token(&self, platform: pb::PushPlatform, token: impl Into<Bytes>) -> Result<(), ClientError> {
        let m = pb::PushToken { platform: platform as i32, token: token.into(), req: 0 };
        self.call(m.into()).await.map(drop)
    }

    /// Sends a request (its `req` is chosen here) and waits for its
    /// answer: the result, `Done`, or the server's refusal as
    /// [`ClientError::Refused`]. Sent again after a reconnect until
    /// answered, and after the pause the server asks when it is busy.
    pub async fn call(&self, request: Message) -> Result<Message, ClientError> {
        check_size(std::slice::from_ref(&request))?;
        let (tx, rx) = oneshot::channel();
        self.cmds.send(Cmd::Call(request, tx)).await.map_err(|_| ClientError::Stopped)?;
        rx.await.map_err(|_| ClientError::Stopped)?
    }

    /// Sends other protocol messages (requests, typing) if connected; they
    /// are not queued across reconnects. Request ids below 2^20 are the
    /// app's; the library's own start there.
    pub async fn request(&self, messages: Vec<Message>) -> Result<(), ClientError> {
        check_size(&messages)?;
        self.cmds.send(Cmd::Raw(messages)).await.map_err(|_| ClientError::Stopped)
    }

    /// Stops the client and closes its connection.
    pub async fn close(self) {
        let (tx, rx) = oneshot::channel();
        if self.cmds.send(Cmd::Close(tx)).await.is_ok() {
            let _ = rx.await;
        }
    }
}

/// Refuses what no server could deliver: a message larger than a packet,
/// and a `Send` whose payload would not fit the recipient's `Deliver`
/// (the protocol crate's rule, the same one the server applies).
fn check_size(messages: &[Message]) -> Result<(), ClientError> {
    let max = pipit_protocol::limits::MAX_PACKET_LEN;
    for m in messages {
        if let Message::Send(s) = m {
            let largest = s.per_device.iter().map(|c| c.payload.len()).chain([s.payload.len()]).max().unwrap_or(0);
            if pipit_protocol::message::check_send(s).is_err() {
                let max_payload = pipit_protocol::limits::MAX_PAYLOAD_LEN;
                return Err(if largest > max_payload {
                    ClientError::TooLarge { len: largest, max: max_payload }
                } else {
                    ClientError::TooLarge { len: m.encoded_len(), max }
                });
            }
        }
        if m.encoded_len() > max {
            return Err(ClientError::TooLarge { len: m.encoded_len(), max });
        }
    }
    Ok(())
}
