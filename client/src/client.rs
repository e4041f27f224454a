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
        /// Deliveries waiting at login.
        pending: u32,
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
    Message(pb::Deliver),
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
}

enum Cmd {
    Send(pb::Send, oneshot::Sender<Result<u64, ClientError>>),
    Raw(Vec<Message>),
    Close(oneshot::Sender<()>),
}

/// Handle to a running client. Dropping it stops the client.
pub struct Client {
    cmds: mpsc::Sender<Cmd>,
    stats: Arc<Stats>,
    identity: PublicKey,
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
        let (cmd_tx, cmd_rx) = mpsc::channel(64);
        let (ev_tx, ev_rx) = mpsc::channel(config.event_buffer.max(1));
        let stats = Arc::new(Stats::default());
        let identity = *state.identity.public();
        let task =
            Task { config, store: Box::new(store), state, outbox, events: ev_tx, cmds: cmd_rx, stats: stats.clone() };
        tokio::spawn(task.run());
        Ok((Client { cmds: cmd_tx, stats, identity }, Events { rx: ev_rx }))
    }

    /// This device's public key (what another device links).
    pub fn identity(&self) -> &PublicKey {
        &self.identity
    }

    /// Counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    /// Queues a 1:1 message. Returns its client id once it is in the
    /// outbox (durable if the store is); the `Sent` event follows when the
    /// server has it, after however many reconnects that takes.
    pub async fn send(&self, to: u64, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        // Room for the largest id the counter will reach.
        let send = pb::Send { id: u64::MAX, to, payload: payload.into(), ..Default::default() };
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

    /// Sends other protocol messages (requests, typing) if connected; they
    /// are not queued across reconnects.
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
        loop {
            // Dial without borrowing the task, so the app's sends keep
            // landing in the outbox while a slow connect is under way.
            let dial =
                dial(self.config.server.clone(), self.state.identity.clone(), self.hello(), self.connect_options());
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
                    logins += 1;
                    if logins > 1 {
                        self.stats.reconnects.fetch_add(1, Ordering::Relaxed);
                    }
                    match self.online(conn).await {
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
                Err(e) => {
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
                    let _ = reply.send(self.enqueue(send).map(|s| s.id));
                }
                // Not queued: requests are only meaningful online.
                Some(Cmd::Raw(_)) => {}
            }
        }
    }

    fn enqueue(&mut self, mut send: pb::Send) -> Result<pb::Send, ClientError> {
        send.id = self.state.next_id;
        self.state.next_id += 1;
        // The counter first: an id must never be reused for another
        // message, even if the app dies between the two writes.
        self.store.save_state(&self.state)?;
        self.store.put_outbox(&send)?;
        self.outbox.insert(send.id, send.clone());
        Ok(send)
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
            server_key: self.state.server_key,
            accept_new_server_key: self.config.accept_server_key_change,
            timeout: self.config.connect_timeout,
            local_ip: None,
        }
    }

    /// Records what a login taught us: the server key to pin, our ids.
    fn connected(&mut self, conn: Connection) -> Result<Connection, ClientError> {
        let login = conn.login().clone();
        let mut changed = false;
        // Trust on first use: pin what XX authenticated.
        if self.state.server_key != Some(*conn.server_key()) {
            self.state.server_key = Some(*conn.server_key());
            changed = true;
        }
        // A rotated key arrives inside the session made with the old one.
        if let Some(k) = PublicKey::from_slice(&login.new_server_key) {
            self.state.server_key = Some(k);
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
        if !emit(
            &self.events,
            Event::Connected { account: login.account, device: login.device, pending: login.pending },
        )
        .await
        {
            return End::Closed(None);
        }
        // Everything not yet confirmed goes again, same ids, in order.
        let unsent: Vec<Message> = self.outbox.values().cloned().map(Message::from).collect();
        if !unsent.is_empty() {
            self.stats.resent.fetch_add(unsent.len() as u64, Ordering::Relaxed);
            if let Err(e) = conn.send(&unsent).await {
                return End::Lost(e);
            }
        }
        let interval = Duration::from_secs(u64::from(login.keepalive_secs.max(1)));
        let mut ka = Keepalive::client(interval, self.config.response_timeout, Instant::now());
        let mut ack_due = false;
        loop {
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
            tokio::select! {
                cmd = self.cmds.recv() => {
                    let out = match cmd {
                        None => return End::Closed(None),
                        Some(Cmd::Close(done)) => return End::Closed(Some(done)),
                        Some(Cmd::Send(send, reply)) => match self.enqueue(send) {
                            Ok(send) => {
                                let _ = reply.send(Ok(send.id));
                                vec![Message::from(send)]
                            }
                            Err(e) => {
                                let _ = reply.send(Err(e));
                                continue;
                            }
                        },
                        Some(Cmd::Raw(msgs)) => msgs,
                    };
                    if let Err(e) = conn.send(&out).await {
                        return End::Lost(e);
                    }
                    ka.on_send(Instant::now());
                }
                got = conn.next() => {
                    ka.on_receive(Instant::now());
                    match got {
                        Err(e) => return End::Lost(e),
                        Ok(Received::Keepalive) => {}
                        Ok(Received::Message(m)) => match self.handle(m).await {
                            Ok(ack) => ack_due |= ack,
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

    /// Handles one server message; `Ok(true)` when an ack is now due.
    async fn handle(&mut self, m: Message) -> Result<bool, End> {
        let inbox = match &m {
            Message::Deliver(d) => Some(d.inbox),
            Message::Receipt(r) => Some(r.inbox),
            Message::Expired(e) => Some(e.inbox),
            _ => None,
        };
        if let Some(id) = inbox {
            if id <= self.state.acked_through {
                // Redelivered after a reconnect: processed already. Ack
                // again so the server forgets it.
                self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(true);
            }
        }
        let event = match m {
            Message::Deliver(d) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                Event::Message(d)
            }
            Message::Receipt(r) => Event::Receipt(r),
            Message::Expired(e) => Event::Expired(e),
            Message::Sent(s) => {
                if self.outbox.remove(&s.id).is_none() {
                    // A second answer to a resent message: already reported.
                    return Ok(false);
                }
                self.store.remove_outbox(s.id).map_err(|e| End::Lost(e.into()))?;
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                Event::Sent(s)
            }
            Message::Error(e) if e.id != 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                if matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal) {
                    // Not stored; it stays in the outbox and goes again on
                    // the next connection.
                    return Err(End::Lost(ClientError::Refused(code)));
                }
                if self.outbox.remove(&e.id).is_some() {
                    self.store.remove_outbox(e.id).map_err(|e| End::Lost(e.into()))?;
                }
                Event::SendFailed { id: e.id, code }
            }
            Message::Error(e) if e.req == 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                return Err(End::Lost(ClientError::Refused(code)));
            }
            Message::DeviceMismatch(m) => {
                if self.outbox.remove(&m.id).is_some() {
                    self.store.remove_outbox(m.id).map_err(|e| End::Lost(e.into()))?;
                }
                Event::SendFailed { id: m.id, code: pb::ErrorCode::DeviceMismatch }
            }
            Message::Presence(p) => Event::Presence(p),
            Message::Typing(t) => Event::Typing(t),
            other => Event::Other(other),
        };
        // Hand it over before acking: an ack means "processed".
        if !emit(&self.events, event).await {
            return Err(End::Closed(None));
        }
        if let Some(id) = inbox {
            self.state.acked_through = id;
            return Ok(true);
        }
        Ok(false)
    }
}

/// Refuses a message that could never be sent: it would fail on every
/// connection and, in the outbox, be retried forever.
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
