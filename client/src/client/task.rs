//! The background task that owns the connection and the store: the
//! reconnect loop, commands while offline, and the loop of one connection
//! (keepalive, coalesced acks, deferred resends).

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pipit_protocol::keepalive::{Keepalive, KeepaliveAction};
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use rand::SeedableRng as _;
use tokio::sync::{mpsc, oneshot};

use crate::connection::{Connection, Received};
use crate::e2e::E2e;
use crate::store::{State, Store};
use crate::ClientError;

use super::calls::Call;
use super::connect::dial;
use super::order::Lanes;
use super::{Cmd, Config, Event, Stats};

pub(super) struct Task {
    pub(super) config: Config,
    pub(super) store: Box<dyn Store>,
    pub(super) state: State,
    /// Mirror of the store's outbox, in id order.
    pub(super) outbox: BTreeMap<u64, pb::Send>,
    pub(super) events: mpsc::Sender<Event>,
    pub(super) cmds: mpsc::Receiver<Cmd>,
    pub(super) stats: Arc<Stats>,
    /// Outbox entries the server asked us to send again later, on this
    /// connection: when, and how often in a row it has refused them.
    pub(super) deferred: BTreeMap<u64, Deferred>,
    /// Requests waiting for their answer, by the `req` given them.
    pub(super) calls: BTreeMap<u64, Call>,
    pub(super) next_req: u64,
    /// The presence subscription in force, sent again on every new
    /// connection.
    pub(super) watching: Vec<u64>,
    /// The end-to-end layer; `None` with encryption off.
    pub(super) e2e: Option<E2e>,
    /// Messages the app sent, as plaintext, in id order, until the server
    /// has them: each is sealed (encrypted) once its keys are in, then
    /// waits in the outbox as sealed. Kept (encrypted) in the store.
    pub(super) pending: BTreeMap<u64, pb::Send>,
    /// When to try sealing again after a busy server's refusal.
    pub(super) reseal_at: Option<Instant>,
    /// How often each message was sealed again after a DeviceMismatch.
    pub(super) reseals: BTreeMap<u64, u32>,
    /// What handling a message gave to send.
    pub(super) out: Vec<Message>,
    /// `Connected`, held on a device's first login until its keys are on
    /// the server: an app that tells a peer "I am here" on `Connected`
    /// must not let the peer find no keys (its message would be withheld
    /// from this device for good).
    pub(super) held_connected: Option<Event>,
    /// Which outbox entries may be written now: per conversation, nothing
    /// goes past a send the server refused for now.
    pub(super) lanes: Lanes,
}

#[derive(Debug, Clone, Copy)]
pub(super) struct Deferred {
    pub(super) at: Instant,
    pub(super) refusals: u32,
}

/// The longest pause before sending a refused message again, whatever
/// the server asks: a bound on how long a busy server can park a message.
const MAX_RETRY_DELAY: Duration = Duration::from_secs(300);

/// Sealed bytes the task lets wait for the socket before it keeps further
/// messages back (as messages, cheap: their payloads are shared with the
/// outbox): a few frames, so a server that stops reading costs little.
const MAX_UNWRITTEN: usize = 256 * 1024;

/// Redirects followed in a row before the client pauses as after any
/// failed connect.
const MAX_REDIRECTS: u32 = 3;

/// The pause before the `refusals`-th attempt of a send the server refused
/// for now: at least what it asked (at least a second), doubling with each
/// refusal in a row, capped, plus up to a quarter of jitter so refused
/// clients do not come back in step.
pub(super) fn retry_delay(retry_after_secs: u32, refusals: u32) -> Duration {
    let base = Duration::from_secs(u64::from(retry_after_secs.max(1)));
    let d = base.saturating_mul(1 << refusals.saturating_sub(1).min(10)).min(MAX_RETRY_DELAY);
    let jitter = rand::Rng::random_range(&mut rand::rng(), 0..=d.as_millis() as u64 / 4);
    d + Duration::from_millis(jitter)
}

pub(super) enum End {
    /// The app closed the client.
    Closed(Option<oneshot::Sender<()>>),
    /// The connection failed; reconnect.
    Lost(ClientError),
}

impl Task {
    pub(super) async fn run(mut self) {
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
                    let _ = self.add_call(msg, Some(reply));
                }
            }
        }
    }

    fn trust(&mut self, account: u64, device: u32) -> Result<bool, ClientError> {
        match &mut self.e2e {
            Some(e2e) => Ok(e2e.trust(&mut *self.store, account, device)?),
            None => Ok(false),
        }
    }

    async fn online(&mut self, mut conn: Connection) -> End {
        let login = conn.login().clone();
        let features = login.features().collect();
        let connected =
            Event::Connected { account: login.account, device: login.device, pending: login.pending, features };
        // Everything goes again below; pauses asked on an old connection
        // do not carry over.
        self.deferred.clear();
        self.lanes.reset();
        self.out.clear();
        self.reseal_at = None;
        self.held_connected = None;
        if let Some(e2e) = &mut self.e2e {
            let first = !e2e.published();
            match e2e.on_login(&mut *self.store, &login) {
                Ok(requests) => {
                    if first && !requests.is_empty() {
                        self.held_connected = Some(connected.clone());
                    }
                    self.out.extend(requests);
                }
                Err(e) => return End::Lost(e.into()),
            }
        }
        if self.held_connected.is_none() && !emit(&self.events, connected).await {
            return End::Closed(None);
        }
        // Everything not yet confirmed goes again, same ids, in order; then
        // the presence subscription and the unanswered requests.
        let unsent: Vec<pb::Send> = self.outbox.values().cloned().collect();
        let calls = self.calls_to_send();
        if !unsent.is_empty() || !calls.is_empty() {
            self.stats.resent.fetch_add((unsent.len() + calls.len()) as u64, Ordering::Relaxed);
        }
        for send in &unsent {
            self.offer(send);
        }
        self.out.extend(calls);
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
            // Written while the connection reads (`conn.next`), never
            // awaited here: a server that stops reading must not stop the
            // app's sends from landing in the outbox. Past a bound of
            // unwritten bytes the rest waits here, as messages.
            if !self.out.is_empty() && conn.unwritten() < MAX_UNWRITTEN {
                let out = std::mem::take(&mut self.out);
                if let Err(e) = conn.queue_out(&out) {
                    return End::Lost(e);
                }
                ka.on_send(Instant::now());
            }
            // Coalesce: ack once everything already received is handled.
            if ack_due && !conn.has_buffered() {
                let ack = pb::Ack { through: self.state.acked_through, ids: vec![] };
                if let Err(e) = conn.queue_out(&[ack.into()]) {
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
                        if let Err(e) = conn.queue_out(&due) {
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
                            if let Some(m) = self.add_call(msg, Some(reply)) {
                                if let Some(c) = m.request_id().and_then(|req| self.calls.get_mut(&req)) {
                                    c.sent = true;
                                }
                                self.out.push(m);
                            }
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
                        KeepaliveAction::SendPing => conn.queue_keepalive(),
                        KeepaliveAction::Dead => return End::Lost(ClientError::Timeout),
                    }
                }
            }
        }
    }
}

/// Hands an event to the app; false when the app has dropped the stream.
/// A free function so that only the sender is borrowed across the await
/// (the store need not be `Sync`).
pub(super) async fn emit(events: &mpsc::Sender<Event>, e: Event) -> bool {
    events.send(e).await.is_ok()
}

fn finish(done: Option<oneshot::Sender<()>>) {
    if let Some(d) = done {
        let _ = d.send(());
    }
}
