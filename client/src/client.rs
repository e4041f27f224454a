//! The reconnecting client an app embeds.
//!
//! One background task owns the connection and the [`Store`]. It connects
//! (IK with the pinned key, XX on first contact, which pins the key),
//! reconnects with full-jitter backoff, sends everything in the outbox on
//! every new connection with the same client ids until each gets "sent",
//! drops deliveries it has already processed, coalesces its acks, keeps
//! the connection alive at the negotiated interval, and reports everything
//! as [`Event`]s.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pipit_protocol::handshake::Hello;
use pipit_protocol::keepalive::{Keepalive, KeepaliveAction};
use pipit_protocol::message::pb;
use pipit_protocol::{Message, PublicKey, StaticKeypair};
use tokio::sync::{mpsc, oneshot};

use crate::backoff::Backoff;
use crate::connection::{ConnectOptions, Connection, Received};
use crate::e2e::{DeviceIdentity, E2e, Encryption, Sealed, Undecryptable, Vault};
use crate::store::{State, Store};
use crate::ClientError;

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of the server.
    pub server: String,
    /// Invite code, used only when registering.
    pub invite: String,
    /// Device name, used only when registering.
    pub device_name: String,
    /// Keepalive interval to propose, seconds; 0 = the server's default.
    pub keepalive_secs: u32,
    /// How long to wait for any byte after a keepalive before reconnecting.
    pub response_timeout: Duration,
    /// Time allowed to connect and log in.
    pub connect_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Accept a server key different from the pinned one. Off by default:
    /// a changed key stops the client with [`ClientError::ServerKeyChanged`].
    pub accept_server_key_change: bool,
    /// Events buffered for the app before the client stops reading the
    /// network (which makes the server hold deliveries on disk).
    pub event_buffer: usize,
    /// End-to-end encryption: [`Encryption::On`] unless turned off (for
    /// tests and bots).
    pub encryption: Encryption,
    /// The key that encrypts the end-to-end state in the [`Store`]. Give
    /// one kept in the platform's keystore (Keychain, Android Keystore)
    /// and the store's files alone reveal no session; without one it is
    /// derived from the device's identity key, which lives in the same
    /// store, so it protects no more than the store itself does. It must
    /// stay the same for the life of the store.
    pub pickle_key: Option<PickleKey>,
}

/// A 32-byte key for the end-to-end state (see [`Config::pickle_key`]).
#[derive(Clone)]
pub struct PickleKey(pub [u8; 32]);

impl std::fmt::Debug for PickleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PickleKey(..)")
    }
}

impl Config {
    /// Defaults for `server`.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            invite: String::new(),
            device_name: String::new(),
            keepalive_secs: 0,
            response_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            accept_server_key_change: false,
            event_buffer: 256,
            encryption: Encryption::On,
            pickle_key: None,
        }
    }
}

/// What the client reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Logged in.
    Connected {
        /// Account id.
        account: u64,
        /// Device number.
        device: u32,
        /// Inbox entries waiting at login (up to the server's count cap).
        pending: u32,
        /// The optional features this server offers (groups, presence,
        /// ...). Requests of others are answered `NOT_SUPPORTED`.
        features: Vec<pb::Feature>,
    },
    /// The connection dropped; the client reconnects by itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
    /// The client stopped for good (a changed server key, a refused
    /// device): reconnecting cannot help.
    Stopped {
        /// Why.
        reason: String,
    },
    /// A message for this device (or a copy of one this account sent).
    /// With encryption on, `payload` is the decrypted plaintext, checked
    /// to come from `from`/`from_device` and to belong to this
    /// conversation.
    Message(pb::Deliver),
    /// A message this device cannot read (encryption on); it was
    /// acknowledged all the same, so the stream goes on. `message.payload`
    /// is what arrived.
    Undecryptable {
        /// The delivery as it arrived.
        message: pb::Deliver,
        /// Why it cannot be read.
        reason: Undecryptable,
    },
    /// A device's end-to-end identity is not the one this device pinned.
    /// Until the app accepts it ([`Client::trust_identity`], ideally after
    /// the people compared it), nothing is encrypted for that device and
    /// nothing from it is believed.
    IdentityChanged {
        /// Its account.
        account: u64,
        /// Its device number.
        device: u32,
        /// The identity pinned before.
        old: Option<DeviceIdentity>,
        /// The identity it shows now.
        new: DeviceIdentity,
    },
    /// A send is durable on the server.
    Sent(pb::Sent),
    /// A send was refused for good and removed from the outbox.
    SendFailed {
        /// Its client id.
        id: u64,
        /// Why.
        code: pb::ErrorCode,
    },
    /// A delivered or read receipt.
    Receipt(pb::Receipt),
    /// A sent message expired undelivered.
    Expired(pb::Expired),
    /// A group this account is in was created or changed (members,
    /// admins, name): its new state, in order with the group's messages.
    Group(pb::GroupInfo),
    /// A watched account's presence.
    Presence(pb::Presence),
    /// Someone is typing.
    Typing(pb::Typing),
    /// Any other server message (answers to requests).
    Other(Message),
}

/// Counters, for apps' diagnostics and for tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful logins after the first.
    pub reconnects: AtomicU64,
    /// Deliveries dropped as already processed.
    pub duplicates_dropped: AtomicU64,
    /// Deliveries handed to the app.
    pub received: AtomicU64,
    /// Sends confirmed durable.
    pub sent: AtomicU64,
    /// Sends transmitted again after a reconnect.
    pub resent: AtomicU64,
    /// Sends the server refused for now (busy, rate limit) and that were
    /// transmitted again after its pause, on the same connection.
    pub deferred: AtomicU64,
    /// Deliveries that could not be decrypted.
    pub undecryptable: AtomicU64,
    /// Uploads of this device's end-to-end keys the server stored.
    pub keys_published: AtomicU64,
}

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
            out: Vec::new(),
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
    /// server has it, after however many reconnects that takes.
    pub async fn send(&self, to: u64, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        self.queue(pb::Send { to, payload: payload.into(), ..Default::default() }).await
    }

    /// Queues `send` (a 1:1 or group message; its id is assigned here).
    pub(crate) async fn queue(&self, mut send: pb::Send) -> Result<u64, ClientError> {
        // Room for the largest id the counter will reach.
        send.id = u64::MAX;
        check_size(&[Message::from(send.clone())])?;
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

struct Task {
    config: Config,
    store: Box<dyn Store>,
    state: State,
    /// Mirror of the store's outbox, in id order.
    outbox: BTreeMap<u64, pb::Send>,
    events: mpsc::Sender<Event>,
    cmds: mpsc::Receiver<Cmd>,
    stats: Arc<Stats>,
    /// Outbox entries the server asked us to send again later, on this
    /// connection: when, and how often in a row it has refused them.
    deferred: BTreeMap<u64, Deferred>,
    /// Requests waiting for their answer, by the `req` given them.
    calls: BTreeMap<u64, Call>,
    next_req: u64,
    /// The presence subscription in force, sent again on every new
    /// connection.
    watching: Vec<u64>,
    /// The end-to-end layer; `None` with encryption off.
    e2e: Option<E2e>,
    /// Messages the app sent, as plaintext, in id order, until the server
    /// has them: each is sealed (encrypted) once its keys are in, then
    /// waits in the outbox as sealed. Kept (encrypted) in the store.
    pending: BTreeMap<u64, pb::Send>,
    /// When to try sealing again after a busy server's refusal.
    reseal_at: Option<Instant>,
    /// How often each message was sealed again after a DeviceMismatch.
    reseals: BTreeMap<u64, u32>,
    /// What handling a message gave to send.
    out: Vec<Message>,
}

struct Call {
    msg: Message,
    /// `None` for the library's own (a subscription sent again).
    reply: Option<oneshot::Sender<Result<Message, ClientError>>>,
    /// Not before this (the server asked for a pause), on this connection.
    deferred: Option<Deferred>,
    /// Written to a connection (so it may have been acted on).
    sent: bool,
}

/// Whether a request may be sent again when its answer was lost with a
/// connection. Creating a group is the one that is not: a second copy
/// makes a second group. Every other request sets a state or reads one.
fn repeatable(m: &Message) -> bool {
    !matches!(m, Message::GroupCreate(_))
}

/// A message is sealed again at most this often after `DeviceMismatch`s
/// (devices changing while it is under way) before it fails.
const MAX_RESEALS: u32 = 3;

#[derive(Debug, Clone, Copy)]
struct Deferred {
    at: Instant,
    refusals: u32,
}

/// The longest pause before sending a refused message again, whatever
/// the server asks: a bound on how long a busy server can park a message.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Redirects followed in a row before the client pauses as after any
/// failed connect.
const MAX_REDIRECTS: u32 = 3;

/// The pause before the `refusals`-th attempt of a send the server refused
/// for now: at least what it asked (at least a second), doubling with each
/// refusal in a row, capped, plus up to a quarter of jitter so refused
/// clients do not come back in step.
fn retry_delay(retry_after_secs: u32, refusals: u32) -> Duration {
    let base = Duration::from_secs(u64::from(retry_after_secs.max(1)));
    let d = base.saturating_mul(1 << refusals.saturating_sub(1).min(10)).min(MAX_RETRY_DELAY);
    let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=d.as_millis() as u64 / 4);
    d + Duration::from_millis(jitter)
}

enum End {
    /// The app closed the client.
    Closed(Option<oneshot::Sender<()>>),
    /// The connection failed; reconnect.
    Lost(ClientError),
}

impl Task {
    async fn run(mut self) {
        let mut rng = rand::rngs::StdRng::from_os_rng();
        let mut attempt: u32 = 0;
        let mut logins: u64 = 0;
        // Redirects followed in a row: bounded, so two nodes that disagree
        // about the owner (a ring change in flight) cannot keep the client
        // bouncing without a pause.
        let mut redirects: u32 = 0;
        loop {
            // Dial without borrowing the task, so the app's sends keep
            // landing in the outbox while a slow connect is under way.
            let server = self.state.home.as_ref().map_or_else(|| self.config.server.clone(), |h| h.server.clone());
            let dial = dial(server, self.state.identity.clone(), self.hello(), self.connect_options());
            let connected = tokio::select! {
                c = dial => c.and_then(|conn| self.connected(conn)),
                end = self.offline_commands() => {
                    if let End::Closed(done) = end { finish(done); }
                    return;
                }
            };
            match connected {
                Ok(conn) => {
                    attempt = 0;
                    redirects = 0;
                    logins += 1;
                    if logins > 1 {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    let end = self.online(conn).await;
                    self.drop_unrepeatable_calls();
                    match end {
                        End::Closed(done) => {
                            finish(done);
                            return;
                        }
                        End::Lost(e) => {
                            if !emit(&self.events, Event::Disconnected { reason: e.to_string() }).await {
                                return;
                            }
                        }
                    }
                }
                Err(e) if e.is_fatal() => {
                    let _ = emit(&self.events, Event::Stopped { reason: e.to_string() }).await;
                    return;
                }
                Err(ClientError::Redirected { server, server_key }) if redirects < MAX_REDIRECTS => {
                    // The owner node, authenticated by the node that named
                    // it: go there now, and from now on.
                    redirects += 1;
                    self.state.home = Some(crate::store::Home { server, server_key });
                    if let Err(e) = self.store.save_state(&self.state) {
                        let _ = emit(&self.events, Event::Stopped { reason: ClientError::from(e).to_string() }).await;
                        return;
                    }
                    continue;
                }
                Err(e) => {
                    redirects = 0;
                    if self.state.home.is_some() && matches!(e, ClientError::Io(_) | ClientError::Timeout) {
                        // The home node does not answer: ask the configured
                        // server next time, which redirects to the owner
                        // (perhaps a new one) or says to retry later.
                        self.state.home = None;
                    }
                    if !emit(&self.events, Event::Disconnected { reason: e.to_string() }).await {
                        return;
                    }
                }
            }
            let delay = self.config.backoff.delay(attempt, &mut rng);
            attempt = attempt.saturating_add(1);
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            tokio::select! {
                _ = &mut sleep => {}
                end = self.offline_commands() => {
                    if let End::Closed(done) = end { finish(done); }
                    return;
                }
            }
        }
    }

    /// Takes commands while there is no connection: sends go to the outbox.
    /// Returns only when the app closes the client (or drops it).
    async fn offline_commands(&mut self) -> End {
        loop {
            match self.cmds.recv().await {
                None => return End::Closed(None),
                Some(Cmd::Close(done)) => return End::Closed(Some(done)),
                Some(Cmd::Send(send, reply)) => {
                    let _ = reply.send(self.enqueue(send));
                }
                Some(Cmd::Trust(account, device, reply)) => {
                    let _ = reply.send(self.trust(account, device));
                }
                // Not queued: requests are only meaningful online.
                Some(Cmd::Raw(_)) => {}
                // Queued: sent once connected.
                Some(Cmd::Call(msg, reply)) => {
                    self.add_call(msg, Some(reply));
                }
            }
        }
    }

    /// Numbers a request and keeps it until answered; returns it to send.
    fn add_call(&mut self, mut msg: Message, reply: Option<oneshot::Sender<Result<Message, ClientError>>>) -> Message {
        let req = self.next_req;
        self.next_req += 1;
        msg.set_request_id(req);
        self.calls.insert(req, Call { msg: msg.clone(), reply, deferred: None, sent: false });
        msg
    }

    /// A connection ended: requests that were sent on it and must not be
    /// repeated (creating a group twice makes two groups) fail with
    /// [`ClientError::Offline`], since their answer will not come; the
    /// others go again on the next connection.
    fn drop_unrepeatable_calls(&mut self) {
        let lost: Vec<u64> =
            self.calls.iter().filter(|(_, c)| c.sent && !repeatable(&c.msg)).map(|(req, _)| *req).collect();
        for req in lost {
            if let Some(Call { reply: Some(reply), .. }) = self.calls.remove(&req) {
                let _ = reply.send(Err(ClientError::Offline));
            }
        }
    }

    /// What a new connection must be sent besides the outbox: the
    /// presence subscription in force, then every unanswered request.
    fn calls_to_send(&mut self) -> Vec<Message> {
        let resubscribe =
            !self.watching.is_empty() && !self.calls.values().any(|c| matches!(c.msg, Message::PresenceSubscribe(_)));
        if resubscribe {
            let m = pb::PresenceSubscribe { accounts: self.watching.clone(), req: 0 };
            self.add_call(m.into(), None);
        }
        self.calls
            .values_mut()
            .map(|c| {
                c.deferred = None;
                c.sent = true;
                c.msg.clone()
            })
            .collect()
    }

    /// An answer to request `req`; `Ok(true)` when it was one of ours.
    fn answer_call(&mut self, req: u64, m: &Message) -> bool {
        let Some(call) = self.calls.get_mut(&req) else { return false };
        if let Message::Error(e) = m {
            let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
            if matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal) {
                // Not final: again after the pause, on this connection.
                let refusals = call.deferred.map_or(0, |d| d.refusals) + 1;
                let at = Instant::now() + retry_delay(e.retry_after_secs, refusals);
                call.deferred = Some(Deferred { at, refusals });
                return true;
            }
        }
        let Some(call) = self.calls.remove(&req) else { return false };
        let result = match m {
            Message::Error(e) => {
                Err(ClientError::Refused(pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified)))
            }
            other => Ok(other.clone()),
        };
        if let (Ok(_), Message::PresenceSubscribe(s)) = (&result, &call.msg) {
            self.watching = s.accounts.clone();
        }
        if let Some(reply) = call.reply {
            let _ = reply.send(result);
        }
        true
    }

    /// Takes a message from the app: into the outbox as it is, or (with
    /// encryption) into `pending` until it is sealed. Returns its id.
    fn enqueue(&mut self, mut send: pb::Send) -> Result<u64, ClientError> {
        send.id = self.state.next_id;
        self.state.next_id += 1;
        // The counter first: an id must never be reused for another
        // message, even if the app dies between the two writes.
        self.store.save_state(&self.state)?;
        if let Some(e2e) = &mut self.e2e {
            e2e.stash(&mut *self.store, &send)?;
            self.pending.insert(send.id, send.clone());
            return Ok(send.id);
        }
        self.store.put_outbox(&send)?;
        self.outbox.insert(send.id, send.clone());
        self.out.push(send.clone().into());
        Ok(send.id)
    }

    fn trust(&mut self, account: u64, device: u32) -> Result<bool, ClientError> {
        match &mut self.e2e {
            Some(e2e) => Ok(e2e.trust(&mut *self.store, account, device)?),
            None => Ok(false),
        }
    }

    /// Seals pending messages in order, as far as their keys allow: each
    /// goes to the outbox and the wire; the first that waits for keys
    /// stops the rest (so messages keep their order), after its fetches
    /// are queued to send.
    async fn seal_pending(&mut self) -> Result<(), End> {
        if self.e2e.is_none() {
            return Ok(());
        }
        if self.reseal_at.is_some_and(|at| at > Instant::now()) {
            return Ok(());
        }
        self.reseal_at = None;
        let ids: Vec<u64> = self.pending.keys().copied().filter(|id| !self.outbox.contains_key(id)).collect();
        for id in ids {
            let plain = self.pending[&id].clone();
            let e2e = self.e2e.as_mut().expect("checked above");
            let sealed = e2e.seal(&mut *self.store, &plain).map_err(|e| End::Lost(e.into()))?;
            match sealed {
                Sealed::Ready(send) => {
                    if Message::from(send.clone()).encoded_len() > pipit_protocol::limits::MAX_PACKET_LEN {
                        // One ciphertext per device made it too large for a
                        // frame: it could never be sent.
                        self.drop_pending(id)?;
                        if !emit(&self.events, Event::SendFailed { id, code: pb::ErrorCode::TooLarge }).await {
                            return Err(End::Closed(None));
                        }
                        continue;
                    }
                    self.store.put_outbox(&send).map_err(|e| End::Lost(e.into()))?;
                    self.outbox.insert(id, send.clone());
                    self.out.push(send.into());
                }
                Sealed::Wait(requests) => {
                    for m in requests {
                        match m {
                            // A send of the end-to-end layer's own (group keys
                            // that go ahead of a message): an id, the outbox.
                            Message::Send(mut internal) => {
                                internal.id = self.state.next_id;
                                self.state.next_id += 1;
                                self.store.save_state(&self.state).map_err(|e| End::Lost(e.into()))?;
                                self.store.put_outbox(&internal).map_err(|e| End::Lost(e.into()))?;
                                self.outbox.insert(internal.id, internal.clone());
                                self.out.push(internal.into());
                            }
                            other => self.out.push(other),
                        }
                    }
                    break;
                }
                Sealed::Fail(code) => {
                    self.drop_pending(id)?;
                    if !emit(&self.events, Event::SendFailed { id, code }).await {
                        return Err(End::Closed(None));
                    }
                }
            }
        }
        Ok(())
    }

    /// With encryption, an outbox entry without a plaintext behind it is
    /// one of the end-to-end layer's own sends (group keys ahead of a
    /// message): the app never hears of it.
    fn is_internal(&self, id: u64) -> bool {
        self.e2e.is_some() && !self.pending.contains_key(&id) && self.outbox.contains_key(&id)
    }

    /// The server has a message, or refused it for good: its plaintext
    /// goes.
    fn drop_pending(&mut self, id: u64) -> Result<(), End> {
        self.reseals.remove(&id);
        if self.pending.remove(&id).is_some() {
            if let Some(e2e) = &mut self.e2e {
                e2e.unstash(&mut *self.store, id).map_err(|e| End::Lost(e.into()))?;
            }
        }
        Ok(())
    }

    fn hello(&self) -> Hello {
        let user_agent = concat!("pipit-client/", env!("CARGO_PKG_VERSION")).to_string();
        if self.state.account == 0 {
            Hello::Register(pb::Register {
                invite: Bytes::copy_from_slice(self.config.invite.as_bytes()),
                device_name: self.config.device_name.clone(),
                keepalive_secs: self.config.keepalive_secs,
                user_agent,
            })
        } else {
            Hello::Login(pb::Login {
                account: self.state.account,
                device: self.state.device,
                acked_through: self.state.acked_through,
                keepalive_secs: self.config.keepalive_secs,
                user_agent,
            })
        }
    }

    fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            server_key: self.state.home.as_ref().map(|h| h.server_key).or(self.state.server_key),
            accept_new_server_key: self.config.accept_server_key_change,
            timeout: self.config.connect_timeout,
            local_ip: None,
        }
    }

    /// Records what a login taught us: the server key to pin, our ids.
    fn connected(&mut self, conn: Connection) -> Result<Connection, ClientError> {
        let login = conn.login().clone();
        let mut changed = false;
        // The key this connection authenticated belongs to the home node
        // when there is one, else to the configured server.
        let first_contact = self.state.home.is_none() && self.state.server_key.is_none();
        let pinned = match &mut self.state.home {
            Some(home) => &mut home.server_key,
            None => self.state.server_key.get_or_insert(*conn.server_key()),
        };
        // Trust on first use: pin what XX authenticated.
        if first_contact || *pinned != *conn.server_key() {
            *pinned = *conn.server_key();
            changed = true;
        }
        // A rotated key arrives inside the session made with the old one.
        if let Some(k) = PublicKey::from_slice(&login.new_server_key) {
            *pinned = k;
            changed = true;
        }
        if self.state.account == 0 {
            self.state.account = login.account;
            self.state.device = login.device;
            changed = true;
        }
        if changed {
            self.store.save_state(&self.state)?;
        }
        Ok(conn)
    }

    async fn online(&mut self, mut conn: Connection) -> End {
        let login = conn.login().clone();
        let features = login.features().collect();
        if !emit(
            &self.events,
            Event::Connected { account: login.account, device: login.device, pending: login.pending, features },
        )
        .await
        {
            return End::Closed(None);
        }
        // Everything goes again below; pauses asked on an old connection
        // do not carry over.
        self.deferred.clear();
        self.out.clear();
        self.reseal_at = None;
        if let Some(e2e) = &mut self.e2e {
            match e2e.on_login(&mut *self.store, &login) {
                Ok(requests) => self.out.extend(requests),
                Err(e) => return End::Lost(e.into()),
            }
        }
        // Everything not yet confirmed goes again, same ids, in order; then
        // the presence subscription and the unanswered requests.
        let mut unsent: Vec<Message> = self.outbox.values().cloned().map(Message::from).collect();
        unsent.extend(self.calls_to_send());
        if !unsent.is_empty() {
            self.stats.resent.fetch_add(unsent.len() as u64, Ordering::Relaxed);
            self.out.extend(unsent);
        }
        let interval = Duration::from_secs(u64::from(login.keepalive_secs.max(1)));
        let mut ka = Keepalive::client(interval, self.config.response_timeout, Instant::now());
        let mut ack_due = false;
        let mut seal_due = true;
        loop {
            if std::mem::take(&mut seal_due) {
                if let Err(end) = self.seal_pending().await {
                    return end;
                }
            }
            if !self.out.is_empty() {
                let out = std::mem::take(&mut self.out);
                if let Err(e) = conn.send(&out).await {
                    return End::Lost(e);
                }
                ka.on_send(Instant::now());
            }
            // Coalesce: ack once everything already received is handled.
            if ack_due && !conn.has_buffered() {
                let ack = pb::Ack { through: self.state.acked_through, ids: vec![] };
                if let Err(e) = conn.send(&[ack.into()]).await {
                    return End::Lost(e);
                }
                ka.on_send(Instant::now());
                if let Err(e) = self.store.save_state(&self.state) {
                    return End::Lost(e.into());
                }
                ack_due = false;
            }
            let deadline = tokio::time::Instant::from_std(ka.next_deadline());
            let retry_at = self
                .deferred
                .values()
                .map(|d| d.at)
                .chain(self.calls.values().filter_map(|c| c.deferred.map(|d| d.at)))
                .min();
            let reseal_at = self.reseal_at;
            tokio::select! {
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(reseal_at.unwrap_or_else(Instant::now))),
                    if reseal_at.is_some() =>
                {
                    self.reseal_at = None;
                    seal_due = true;
                }
                _ = tokio::time::sleep_until(tokio::time::Instant::from_std(retry_at.unwrap_or_else(Instant::now))),
                    if retry_at.is_some() =>
                {
                    let now = Instant::now();
                    let due: Vec<Message> = self
                        .deferred
                        .iter_mut()
                        .filter(|(id, d)| d.at <= now && self.outbox.contains_key(id))
                        .map(|(id, d)| {
                            // Parked until the server answers this attempt.
                            d.at = now + MAX_RETRY_DELAY * 4;
                            Message::from(self.outbox[id].clone())
                        })
                        .collect();
                    self.deferred.retain(|id, _| self.outbox.contains_key(id));
                    let mut due = due;
                    for c in self.calls.values_mut() {
                        if let Some(d) = &mut c.deferred {
                            if d.at <= now {
                                d.at = now + MAX_RETRY_DELAY * 4;
                                due.push(c.msg.clone());
                            }
                        }
                    }
                    if !due.is_empty() {
                        self.stats.deferred.fetch_add(due.len() as u64, Ordering::Relaxed);
                        if let Err(e) = conn.send(&due).await {
                            return End::Lost(e);
                        }
                        ka.on_send(Instant::now());
                    }
                }
                cmd = self.cmds.recv() => {
                    match cmd {
                        None => return End::Closed(None),
                        Some(Cmd::Close(done)) => return End::Closed(Some(done)),
                        Some(Cmd::Send(send, reply)) => {
                            let _ = reply.send(self.enqueue(send));
                            seal_due = true;
                        }
                        Some(Cmd::Trust(account, device, reply)) => {
                            let _ = reply.send(self.trust(account, device));
                            seal_due = true;
                        }
                        Some(Cmd::Raw(msgs)) => self.out.extend(msgs),
                        Some(Cmd::Call(msg, reply)) => {
                            let m = self.add_call(msg, Some(reply));
                            if let Some(c) = m.request_id().and_then(|req| self.calls.get_mut(&req)) {
                                c.sent = true;
                            }
                            self.out.push(m);
                        }
                    }
                }
                got = conn.next() => {
                    ka.on_receive(Instant::now());
                    match got {
                        Err(e) => return End::Lost(e),
                        Ok(Received::Keepalive) => {}
                        Ok(Received::Message(m)) => match self.handle(m).await {
                            Ok(h) => {
                                ack_due |= h.ack;
                                seal_due |= h.seal;
                            }
                            Err(end) => return end,
                        },
                    }
                }
                _ = tokio::time::sleep_until(deadline) => {
                    match ka.poll(Instant::now()) {
                        KeepaliveAction::Wait => {}
                        KeepaliveAction::SendPing => {
                            if let Err(e) = conn.keepalive().await {
                                return End::Lost(e);
                            }
                        }
                        KeepaliveAction::Dead => return End::Lost(ClientError::Timeout),
                    }
                }
            }
        }
    }

    /// Handles one server message.
    async fn handle(&mut self, m: Message) -> Result<Handled, End> {
        let lost = |e: crate::StoreError| End::Lost(e.into());
        let inbox = match &m {
            Message::Deliver(d) => Some(d.inbox),
            Message::Receipt(r) => Some(r.inbox),
            Message::Expired(e) => Some(e.inbox),
            Message::GroupInfo(g) if g.inbox != 0 => Some(g.inbox),
            _ => None,
        };
        if let Some(id) = inbox {
            if id <= self.state.acked_through {
                // Redelivered after a reconnect: processed already. Ack
                // again so the server forgets it.
                self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(Handled { ack: true, seal: false });
            }
        }
        if let Some(e2e) = &mut self.e2e {
            if m.answered_request().is_some_and(|req| e2e.owns(req)) {
                let answered = e2e.on_answer(&mut *self.store, m).map_err(lost)?;
                if answered.published {
                    self.stats.keys_published.fetch_add(1, Ordering::Relaxed);
                }
                self.out.extend(answered.send);
                if let Some(secs) = answered.retry_after {
                    self.reseal_at = Some(Instant::now() + retry_delay(secs, 1));
                }
                for ev in answered.events {
                    if !emit(&self.events, ev).await {
                        return Err(End::Closed(None));
                    }
                }
                return Ok(Handled { ack: false, seal: true });
            }
        }
        if let Some(req) = m.answered_request() {
            if self.answer_call(req, &m) {
                return Ok(Handled::default());
            }
        }
        let events = match m {
            Message::Deliver(d) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                match &mut self.e2e {
                    None => vec![Event::Message(d)],
                    Some(e2e) => {
                        let events = e2e.decrypt(&mut *self.store, d).map_err(lost)?;
                        let unreadable = events.iter().filter(|e| matches!(e, Event::Undecryptable { .. })).count();
                        self.stats.undecryptable.fetch_add(unreadable as u64, Ordering::Relaxed);
                        events
                    }
                }
            }
            Message::KeysStatus(k) => {
                if let Some(e2e) = &mut self.e2e {
                    let upload = e2e.on_keys_status(&mut *self.store, k.one_time_left).map_err(lost)?;
                    self.out.extend(upload);
                }
                return Ok(Handled::default());
            }
            Message::Receipt(r) => vec![Event::Receipt(r)],
            Message::Expired(e) => vec![Event::Expired(e)],
            Message::GroupInfo(g) if g.inbox != 0 => {
                // A change notice (an inbox entry): the end-to-end layer
                // learns the members (a new Megolm session when they
                // changed), then the app.
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_group_info(&mut *self.store, &g).map_err(lost)?;
                }
                vec![Event::Group(g)]
            }
            Message::Sent(s) => {
                self.deferred.remove(&s.id);
                let internal = self.is_internal(s.id);
                let Some(sealed) = self.outbox.remove(&s.id) else {
                    // A second answer to a resent message: already reported.
                    return Ok(Handled::default());
                };
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_sent(&mut *self.store, &sealed).map_err(lost)?;
                }
                self.store.remove_outbox(s.id).map_err(lost)?;
                self.drop_pending(s.id)?;
                if internal {
                    return Ok(Handled { ack: false, seal: true });
                }
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                vec![Event::Sent(s)]
            }
            Message::Error(e) if e.id != 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                if matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal) {
                    // Not stored, not final: it stays in the outbox and goes
                    // again on this connection after the pause the server
                    // asked for, longer with each refusal in a row. Dropping
                    // the connection instead would turn an overloaded server
                    // into a reconnect storm.
                    if self.outbox.contains_key(&e.id) {
                        let refusals = self.deferred.get(&e.id).map_or(0, |d| d.refusals) + 1;
                        let at = Instant::now() + retry_delay(e.retry_after_secs, refusals);
                        self.deferred.insert(e.id, Deferred { at, refusals });
                    }
                    return Ok(Handled::default());
                }
                // Final (NOT_SUPPORTED, ID_REUSED, NOT_FOUND, ...): the
                // message leaves the outbox and the app is told why.
                self.deferred.remove(&e.id);
                let internal = self.is_internal(e.id);
                if let Some(sealed) = self.outbox.remove(&e.id) {
                    self.store.remove_outbox(e.id).map_err(lost)?;
                    if let Some(e2e) = &mut self.e2e {
                        e2e.on_send_failed(&sealed);
                    }
                }
                self.drop_pending(e.id)?;
                if internal {
                    return Ok(Handled { ack: false, seal: true });
                }
                vec![Event::SendFailed { id: e.id, code }]
            }
            Message::Error(e) if e.req == 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                return Err(End::Lost(ClientError::Refused(code)));
            }
            Message::DeviceMismatch(m) => {
                self.deferred.remove(&m.id);
                let internal = self.is_internal(m.id);
                if let Some(sealed) = self.outbox.remove(&m.id) {
                    self.store.remove_outbox(m.id).map_err(lost)?;
                    if let Some(e2e) = &mut self.e2e {
                        e2e.on_send_failed(&sealed);
                    }
                }
                if internal {
                    // Group keys for devices that are no longer members:
                    // the layer learns the devices and shares again.
                    if let Some(e2e) = &mut self.e2e {
                        let fetches = e2e.on_mismatch(&mut *self.store, &m).map_err(lost)?;
                        self.out.extend(fetches);
                    }
                    return Ok(Handled { ack: false, seal: true });
                }
                let reseals = self.reseals.entry(m.id).or_default();
                *reseals += 1;
                match &mut self.e2e {
                    Some(e2e) if self.pending.contains_key(&m.id) && *reseals <= MAX_RESEALS => {
                        // Nothing was stored: the same message, encrypted for
                        // the devices there are now, goes under the same id.
                        let fetches = e2e.on_mismatch(&mut *self.store, &m).map_err(lost)?;
                        self.out.extend(fetches);
                        return Ok(Handled { ack: false, seal: true });
                    }
                    _ => {
                        self.drop_pending(m.id)?;
                        vec![Event::SendFailed { id: m.id, code: pb::ErrorCode::DeviceMismatch }]
                    }
                }
            }
            Message::Presence(p) => vec![Event::Presence(p)],
            Message::Typing(t) => vec![Event::Typing(t)],
            Message::GroupInfo(g) => {
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_group_info(&mut *self.store, &g).map_err(lost)?;
                }
                vec![Event::Other(g.into())]
            }
            other => vec![Event::Other(other)],
        };
        // Hand it over before acking: an ack means "processed".
        for event in events {
            if !emit(&self.events, event).await {
                return Err(End::Closed(None));
            }
        }
        if let Some(id) = inbox {
            self.state.acked_through = id;
            return Ok(Handled { ack: true, seal: false });
        }
        Ok(Handled::default())
    }
}

/// What handling one server message made due.
#[derive(Debug, Default, Clone, Copy)]
struct Handled {
    /// An ack.
    ack: bool,
    /// Sealing pending messages again (keys arrived).
    seal: bool,
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

/// Hands an event to the app; false when the app has dropped the stream.
/// A free function so that only the sender is borrowed across the await
/// (the store need not be `Sync`).
async fn emit(events: &mpsc::Sender<Event>, e: Event) -> bool {
    events.send(e).await.is_ok()
}

async fn dial(
    server: String,
    identity: StaticKeypair,
    hello: Hello,
    opts: ConnectOptions,
) -> Result<Connection, ClientError> {
    Connection::connect(server.as_str(), &identity, hello, &opts).await
}

fn finish(done: Option<oneshot::Sender<()>>) {
    if let Some(d) = done {
        let _ = d.send(());
    }
}

use rand::SeedableRng as _;
