//! One client connection: the I/O driver around the protocol crate.
//!
//! The task runs on the shard that accepted the socket. It drives the
//! sans-IO handshake, answers the hello, then loops: read frames, hand
//! sends to the storage writer, forward durable "Sent" answers, deliver
//! inbox entries within the window, and coalesce everything it has to say
//! into as few frames and `write` calls as possible per turn.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use pipit_protocol::handshake::{Hello, ServerHandshake, ServerStep};
use pipit_protocol::keepalive::{negotiate_interval, Keepalive, KeepaliveAction};
use pipit_protocol::limits::{MAX_INVITE_LEN, MAX_NAME_LEN};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{Message, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::oneshot;

use crate::registry::{ConnHandle, Mailbox, Push};
use crate::server::Shared;
use crate::storage::{unix_now, Acked, DeviceAddr, Op, SendFailure, Store};

/// Why a connection ended. Logged; the peer saw at most a coarse code.
#[derive(Debug, thiserror::Error)]
pub enum ConnError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed.
    #[error("closed by peer")]
    Closed,
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] pipit_protocol::HandshakeError),
    /// The peer broke the protocol after the handshake.
    #[error("protocol: {0}")]
    Protocol(#[from] pipit_protocol::Error),
    /// The peer stayed silent too long.
    #[error("timed out")]
    Timeout,
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] crate::storage::StorageError),
    /// Refused at login (code sent to the peer).
    #[error("login refused: {0:?}")]
    Refused(pb::ErrorCode),
}

/// Serves one accepted socket until it closes.
pub async fn run(stream: TcpStream, shared: Arc<Shared>) {
    metrics::gauge!("pipit_connections").increment(1.0);
    let result = serve(stream, &shared).await;
    metrics::gauge!("pipit_connections").decrement(1.0);
    match result {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(ConnError::Io(e)) => tracing::debug!(error = %e, "connection i/o error"),
        Err(e) => tracing::debug!(error = %e, "connection closed"),
    }
}

fn error(code: pb::ErrorCode) -> Message {
    pb::Error { code: code as i32, ..Default::default() }.into()
}

async fn read_some(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ConnError> {
    use tokio::io::AsyncReadExt;
    buf.reserve(1024);
    match stream.read_buf(buf).await? {
        0 => Err(ConnError::Closed),
        n => {
            metrics::counter!("pipit_bytes_in_total").increment(n as u64);
            Ok(())
        }
    }
}

async fn write_out(stream: &mut TcpStream, out: &mut BytesMut) -> Result<(), ConnError> {
    if !out.is_empty() {
        stream.write_all(out).await?;
        metrics::counter!("pipit_bytes_out_total").increment(out.len() as u64);
        out.clear();
    }
    Ok(())
}

fn handshake_metric(pattern: &'static str, result: &'static str) {
    metrics::counter!("pipit_handshakes_total", "pattern" => pattern, "result" => result).increment(1);
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, crate::storage::StorageError> + Send + 'static,
) -> Result<T, ConnError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|_| ConnError::Storage(crate::storage::StorageError::Stopped))?
        .map_err(ConnError::from)
}

/// A connection past its handshake and login.
struct Established {
    stream: TcpStream,
    session: Session,
    inbuf: BytesMut,
    conn: Conn,
    keepalive: Duration,
}

async fn serve(stream: TcpStream, shared: &Arc<Shared>) -> Result<(), ConnError> {
    // The handshake and the login hold state an established connection no
    // longer needs; run them in their own allocation so it is freed once
    // they are done instead of sizing every idle connection's future.
    let Established { stream, session, inbuf, mut conn, keepalive } = Box::pin(establish(stream, shared)).await?;
    let result = conn.run(stream, session, inbuf, keepalive).await;
    shared.registry.remove(conn.addr, conn.handle.id);
    result
}

async fn establish(mut stream: TcpStream, shared: &Arc<Shared>) -> Result<Established, ConnError> {
    let cfg = &shared.config;
    let started = Instant::now();
    let deadline = tokio::time::Instant::from_std(started + cfg.handshake_timeout());
    let mut hs = ServerHandshake::new(shared.keys.clone(), started, cfg.handshake_timeout());
    let mut inbuf = BytesMut::new();
    let mut out = BytesMut::new();

    // Handshake: bounded in time and in bytes (the protocol crate caps
    // handshake frames at 1 KiB).
    let accepted = loop {
        match tokio::time::timeout_at(deadline, read_some(&mut stream, &mut inbuf)).await {
            Err(_) => {
                handshake_metric("unknown", "timeout");
                return Err(ConnError::Timeout);
            }
            Ok(r) => r?,
        }
        match hs.read(&mut inbuf, Instant::now(), &mut out) {
            Ok(ServerStep::NeedMore(next)) => {
                hs = next;
                write_out(&mut stream, &mut out).await?;
            }
            Ok(ServerStep::Accepted(a)) => break *a,
            Err(e) => {
                let _ = write_out(&mut stream, &mut out).await;
                handshake_metric("unknown", "error");
                return Err(e.into());
            }
        }
    };
    let pattern = accepted.pattern.as_str();

    // Who is this?
    let (addr, proposed_keepalive, acked_through) = match &accepted.hello {
        Hello::Login(l) => {
            let store = shared.store.clone();
            let key = accepted.client_key;
            match blocking(move || store.device_by_key(&key)).await? {
                Some(addr) => (addr, l.keepalive_secs, l.acked_through),
                None => {
                    handshake_metric(pattern, "unknown_device");
                    let _ = accepted.finish(&[error(pb::ErrorCode::UnknownDevice)], &mut out);
                    let _ = write_out(&mut stream, &mut out).await;
                    return Err(ConnError::Refused(pb::ErrorCode::UnknownDevice));
                }
            }
        }
        Hello::Register(r) => {
            let refuse = |code| Err(code);
            let verdict = if r.device_name.len() > MAX_NAME_LEN
                || r.invite.len() > MAX_INVITE_LEN
                || r.user_agent.len() > MAX_NAME_LEN
            {
                refuse(pb::ErrorCode::TooLarge)
            } else {
                let (tx, rx) = oneshot::channel();
                let op = Op::Register {
                    key: accepted.client_key,
                    name: r.device_name.clone(),
                    invite: r.invite.clone(),
                    reply: tx,
                };
                match shared.writer.submit(op) {
                    Err(_) => refuse(pb::ErrorCode::Unavailable),
                    Ok(()) => rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)),
                }
            };
            match verdict {
                Ok(addr) => (addr, r.keepalive_secs, 0),
                Err(code) => {
                    handshake_metric(pattern, "refused");
                    let _ = accepted.finish(&[error(code)], &mut out);
                    let _ = write_out(&mut stream, &mut out).await;
                    return Err(ConnError::Refused(code));
                }
            }
        }
    };
    let keepalive_secs = negotiate_interval(
        proposed_keepalive,
        cfg.keepalive_min_secs,
        cfg.keepalive_max_secs,
        cfg.keepalive_default_secs,
    );
    let window = cfg.delivery_window as usize;

    // Become the device's connection before reading the inbox, so that
    // every entry committed from now on is pushed to us, and every earlier
    // one is in the read below.
    let handle = ConnHandle { id: shared.next_conn_id(), mailbox: Arc::new(Mailbox::new(window * 2)) };
    let conn_id = handle.id;
    if let Some(old) = shared.registry.insert(addr, handle.clone()) {
        old.mailbox.kick.notify_one();
    }
    let mut conn = match Conn::login(shared, addr, handle, window, acked_through).await {
        Ok(c) => c,
        Err(e) => {
            shared.registry.remove(addr, conn_id);
            return Err(e);
        }
    };
    let login_ok: Message = pb::LoginOk {
        account: addr.account,
        device: addr.device,
        server_time: unix_now(),
        keepalive_secs,
        pending: conn.initial_pending,
        new_server_key: if accepted.retired_key {
            bytes::Bytes::copy_from_slice(shared.keys.current().public().as_bytes())
        } else {
            bytes::Bytes::new()
        },
        window: window as u32,
    }
    .into();
    let mut first = vec![login_ok];
    first.append(&mut conn.outq);
    let session = match accepted.finish(&first, &mut out) {
        Ok(s) => s,
        Err(e) => {
            shared.registry.remove(addr, conn.handle.id);
            return Err(e.into());
        }
    };
    handshake_metric(pattern, "ok");
    metrics::histogram!("pipit_handshake_seconds").record(started.elapsed().as_secs_f64());
    tracing::debug!(device = %addr, pattern, "logged in");
    if let Err(e) = write_out(&mut stream, &mut out).await {
        shared.registry.remove(addr, conn.handle.id);
        return Err(e);
    }
    Ok(Established { stream, session, inbuf, conn, keepalive: Duration::from_secs(u64::from(keepalive_secs)) })
}

/// An answer that becomes ready later (a send made durable, a read done).
type Answer = futures_util::future::BoxFuture<'static, Message>;

struct Conn {
    shared: Arc<Shared>,
    addr: DeviceAddr,
    handle: ConnHandle,
    window: usize,
    /// Highest inbox id handed to the client (or known to be acked).
    cursor: u64,
    /// Deliveries sent and not yet acked, in inbox order.
    inflight: VecDeque<Acked>,
    /// The inbox holds entries past `cursor` that were not pushed to us
    /// (window full, channel overflow): read them from storage.
    behind: bool,
    /// Requests waiting for storage, answered in order.
    pending: FuturesOrdered<Answer>,
    /// Messages to send at the end of this turn.
    outq: Vec<Message>,
    initial_pending: u32,
}

fn acked_meta(own_account: u64, id: u64, m: &Message) -> Acked {
    match m {
        Message::Deliver(d) if d.from != own_account && d.group == 0 && d.peer == 0 => {
            Acked { id, sender: d.from, seq: d.seq }
        }
        _ => Acked { id, sender: 0, seq: 0 },
    }
}

impl Conn {
    async fn login(
        shared: &Arc<Shared>,
        addr: DeviceAddr,
        handle: ConnHandle,
        window: usize,
        acked_through: u64,
    ) -> Result<Self, ConnError> {
        let store = shared.store.clone();
        let (acked, to_send, cursor, behind) =
            blocking(move || login_inbox(&store, addr, acked_through, window)).await?;
        if !acked.is_empty() {
            let _ = shared.writer.submit(Op::Ack { device: addr, acked });
        }
        let mut inflight = VecDeque::with_capacity(to_send.len());
        let mut outq = Vec::with_capacity(to_send.len() + 1);
        for (id, m) in to_send {
            inflight.push_back(acked_meta(addr.account, id, &m));
            outq.push(m);
        }
        let messages = outq.iter().filter(|m| matches!(m, Message::Deliver(_))).count();
        metrics::counter!("pipit_messages_delivered_total").increment(messages as u64);
        Ok(Self {
            shared: shared.clone(),
            addr,
            handle,
            window,
            cursor,
            initial_pending: inflight.len() as u32,
            inflight,
            behind,
            pending: FuturesOrdered::new(),
            outq,
        })
    }

    async fn run(
        &mut self,
        mut stream: TcpStream,
        mut session: Session,
        mut inbuf: BytesMut,
        keepalive: Duration,
    ) -> Result<(), ConnError> {
        let mut ka = Keepalive::server(keepalive, Instant::now());
        let mut out = BytesMut::new();
        let shutdown = self.shared.shutdown.clone();
        let mailbox = self.handle.mailbox.clone();
        let max_pending = self.shared.config.max_pending_sends;
        // Process bytes that arrived with the hello (pipelined frames).
        self.process_input(&mut session, &mut inbuf, &mut out)?;
        loop {
            self.flush(&mut session, &mut stream, &mut out).await?;
            if inbuf.is_empty() && inbuf.capacity() > 0 {
                // Idle connections hold no read buffer.
                inbuf = BytesMut::new();
            }
            let ka_deadline = tokio::time::Instant::from_std(ka.next_deadline());
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    self.outq.push(error(pb::ErrorCode::ShuttingDown));
                    self.drain_pending().await;
                    self.flush(&mut session, &mut stream, &mut out).await?;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                _ = mailbox.kick.notified() => {
                    self.outq.push(error(pb::ErrorCode::Replaced));
                    self.drain_pending().await;
                    self.flush(&mut session, &mut stream, &mut out).await?;
                    return Ok(());
                }
                Some(answer) = self.pending.next(), if !self.pending.is_empty() => {
                    self.outq.push(answer);
                }
                _ = mailbox.ready.notified() => {
                    for push in mailbox.take() {
                        self.push(push);
                    }
                }
                // Wait for readability rather than in a read call, so an idle
                // connection holds no buffer. Stop reading while too many
                // sends wait for storage: TCP pushes back on the client.
                r = stream.readable(), if self.pending.len() < max_pending => {
                    r?;
                    inbuf.reserve(4096);
                    match stream.try_read_buf(&mut inbuf) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => {
                            metrics::counter!("pipit_bytes_in_total").increment(n as u64);
                            ka.on_receive(Instant::now());
                            self.process_input(&mut session, &mut inbuf, &mut out)?;
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                _ = tokio::time::sleep_until(ka_deadline) => {
                    if ka.poll(Instant::now()) == KeepaliveAction::Dead {
                        self.outq.push(error(pb::ErrorCode::Timeout));
                        self.flush(&mut session, &mut stream, &mut out).await?;
                        return Err(ConnError::Timeout);
                    }
                }
            }
            // Coalesce whatever else is ready into this turn's write.
            for _ in 0..1024 {
                match self.pending.next().now_or_never() {
                    Some(Some(answer)) => self.outq.push(answer),
                    _ => break,
                }
            }
            for push in mailbox.take() {
                self.push(push);
            }
            if mailbox.overflow.swap(false, Ordering::AcqRel) {
                self.behind = true;
            }
            if self.behind && self.inflight.len() < self.window {
                self.catch_up().await?;
            }
        }
    }

    async fn drain_pending(&mut self) {
        // Answer sends already handed to storage: they will be durable
        // shortly, and a "Sent" now saves the client a retry.
        let deadline = tokio::time::sleep(Duration::from_secs(2));
        tokio::pin!(deadline);
        while !self.pending.is_empty() {
            tokio::select! {
                Some(answer) = self.pending.next() => self.outq.push(answer),
                _ = &mut deadline => break,
            }
        }
    }

    async fn flush(
        &mut self,
        session: &mut Session,
        stream: &mut TcpStream,
        out: &mut BytesMut,
    ) -> Result<(), ConnError> {
        if !self.outq.is_empty() {
            let frames = session.seal(&self.outq, out)?;
            metrics::counter!("pipit_frames_out_total").increment(frames as u64);
            self.outq.clear();
        }
        write_out(stream, out).await
    }

    fn process_input(
        &mut self,
        session: &mut Session,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), ConnError> {
        while let Some(incoming) = session.open(inbuf)? {
            metrics::counter!("pipit_frames_in_total").increment(1);
            match incoming {
                Incoming::Keepalive => session.write_keepalive(out),
                Incoming::Messages(msgs) => {
                    for m in msgs {
                        self.handle_message(m);
                    }
                }
            }
        }
        Ok(())
    }

    fn handle_message(&mut self, m: Message) {
        match m {
            Message::Send(send) => self.send(send),
            Message::Ack(ack) => self.ack(&ack),
            Message::Receipt(r) if r.kind == pb::ReceiptKind::Read as i32 && r.group == 0 => {
                let _ = self.shared.writer.submit(Op::Read { from: self.addr, peer: r.peer, through: r.through });
            }
            Message::Ping(p) => self.outq.push(pb::Pong { id: p.id }.into()),
            Message::LinkDevice(l) => self.link(l),
            Message::DeviceListRequest(d) => self.device_list(d),
            // At most once by definition: nothing to do for a kind this
            // server does not route yet.
            Message::Typing(_) | Message::Pong(_) | Message::Receipt(_) => {}
            other => {
                // Valid kinds this server version does not serve yet:
                // answer the request so the client does not wait.
                let req = request_id(&other);
                self.outq.push(pb::Error { code: pb::ErrorCode::Unavailable as i32, req, ..Default::default() }.into());
            }
        }
    }

    fn send(&mut self, send: pb::Send) {
        let id = send.id;
        let (tx, rx) = oneshot::channel();
        let op = Op::Send { from: self.addr, send, received: Instant::now(), reply: tx };
        if self.shared.writer.submit(op).is_err() {
            // Storage is saturated or stopping: nothing was stored; the
            // client keeps the message in its outbox and retries.
            self.outq.push(
                pb::Error { code: pb::ErrorCode::Unavailable as i32, id, retry_after_secs: 1, ..Default::default() }
                    .into(),
            );
            return;
        }
        self.pending.push_back(
            async move {
                match rx.await.unwrap_or(Err(SendFailure::Code(pb::ErrorCode::Unavailable))) {
                    Ok(sent) => {
                        metrics::counter!("pipit_messages_sent_total").increment(1);
                        sent.into()
                    }
                    Err(SendFailure::Code(code)) => pb::Error { code: code as i32, id, ..Default::default() }.into(),
                    Err(SendFailure::Mismatch(m)) => m.into(),
                }
            }
            .boxed(),
        );
    }

    fn link(&mut self, req: pb::LinkDevice) {
        let fail = |code: pb::ErrorCode| -> Message {
            pb::Error { code: code as i32, req: req.req, ..Default::default() }.into()
        };
        let Some(key) = pipit_protocol::PublicKey::from_slice(&req.key) else {
            self.outq.push(fail(pb::ErrorCode::BadRequest));
            return;
        };
        if req.name.len() > MAX_NAME_LEN {
            self.outq.push(fail(pb::ErrorCode::TooLarge));
            return;
        }
        let (tx, rx) = oneshot::channel();
        if self.shared.writer.submit(Op::Link { account: self.addr.account, key, name: req.name, reply: tx }).is_err() {
            self.outq.push(fail(pb::ErrorCode::Unavailable));
            return;
        }
        let r = req.req;
        self.pending.push_back(
            async move {
                match rx.await.unwrap_or(Err(pb::ErrorCode::Unavailable)) {
                    Ok(device) => pb::Linked { req: r, device }.into(),
                    Err(code) => pb::Error { code: code as i32, req: r, ..Default::default() }.into(),
                }
            }
            .boxed(),
        );
    }

    fn device_list(&mut self, req: pb::DeviceListRequest) {
        let account = if req.account == 0 { self.addr.account } else { req.account };
        let foreign = account != self.addr.account;
        let store = self.shared.store.clone();
        let r = req.req;
        self.pending.push_back(
            async move {
                let read = tokio::task::spawn_blocking(move || store.account(account)).await;
                match read {
                    Ok(Ok(Some(mut list))) => {
                        list.req = r;
                        if foreign {
                            // Other accounts see device numbers and keys
                            // (for end-to-end encryption), not names.
                            for d in &mut list.devices {
                                d.name.clear();
                                d.last_seen = 0;
                            }
                        }
                        list.into()
                    }
                    Ok(Ok(None)) => {
                        pb::Error { code: pb::ErrorCode::NotFound as i32, req: r, ..Default::default() }.into()
                    }
                    _ => pb::Error { code: pb::ErrorCode::Internal as i32, req: r, ..Default::default() }.into(),
                }
            }
            .boxed(),
        );
    }

    fn ack(&mut self, ack: &pb::Ack) {
        let mut acked = Vec::new();
        self.inflight.retain(|a| {
            if a.id <= ack.through || ack.ids.contains(&a.id) {
                acked.push(*a);
                false
            } else {
                true
            }
        });
        if !acked.is_empty() {
            let _ = self.shared.writer.submit(Op::Ack { device: self.addr, acked });
        }
    }

    fn deliver(&mut self, id: u64, m: Message) {
        self.inflight.push_back(acked_meta(self.addr.account, id, &m));
        self.cursor = id;
        if matches!(m, Message::Deliver(_)) {
            metrics::counter!("pipit_messages_delivered_total").increment(1);
        }
        self.outq.push(m);
    }

    fn push(&mut self, (id, m): Push) {
        if id <= self.cursor {
            return;
        }
        if id == self.cursor + 1 && !self.behind && self.inflight.len() < self.window {
            self.deliver(id, *m);
        } else {
            // A gap or a full window: the entry is in the inbox; read it
            // from there when the window opens.
            self.behind = true;
        }
    }

    async fn catch_up(&mut self) -> Result<(), ConnError> {
        let want = self.window - self.inflight.len();
        let (store, addr, after) = (self.shared.store.clone(), self.addr, self.cursor);
        let entries = blocking(move || store.inbox_after(addr, after, want)).await?;
        self.behind = entries.len() == want;
        for (id, m) in entries {
            self.deliver(id, m);
        }
        Ok(())
    }
}

type LoginInbox = (Vec<Acked>, Vec<(u64, Message)>, u64, bool);

/// Reads a device's inbox at login: entries the login already acked, and
/// up to `window` to send. Runs on a blocking thread.
fn login_inbox(
    store: &Store,
    addr: DeviceAddr,
    acked_through: u64,
    window: usize,
) -> Result<LoginInbox, crate::storage::StorageError> {
    // Read the counter first: entries below it are committed and in the
    // scan below; later ones reach us as pushes.
    let next = store.inbox_next(addr)?;
    let mut acked = Vec::new();
    let mut send = Vec::new();
    let mut after = 0;
    let mut behind = false;
    'scan: loop {
        let chunk = store.inbox_after(addr, after, 1024)?;
        let full = chunk.len() == 1024;
        for (id, m) in chunk {
            after = id;
            if id <= acked_through {
                acked.push(acked_meta(addr.account, id, &m));
            } else if send.len() < window {
                send.push((id, m));
            } else {
                behind = true;
                break 'scan;
            }
        }
        if !full {
            break;
        }
    }
    let cursor = match send.last() {
        Some((id, _)) => *id,
        None => acked.last().map_or(0, |a| a.id).max(next - 1),
    };
    Ok((acked, send, cursor, behind))
}

fn request_id(m: &Message) -> u64 {
    match m {
        Message::GroupCreate(x) => x.req,
        Message::GroupAdd(x) => x.req,
        Message::GroupRemove(x) => x.req,
        Message::GroupLeave(x) => x.req,
        Message::GroupListRequest(x) => x.req,
        Message::KeysUpload(x) => x.req,
        Message::KeysFetch(x) => x.req,
        Message::LinkDevice(x) => x.req,
        Message::DeviceListRequest(x) => x.req,
        Message::UnlinkDevice(x) => x.req,
        Message::InviteCreate(x) => x.req,
        _ => 0,
    }
}
