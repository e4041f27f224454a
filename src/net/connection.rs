//! One client connection after its handshake: the I/O loop. Read frames
//! and hand what they carry to dispatch; forward answers as they become
//! ready; deliver inbox entries within the window; coalesce everything
//! due into as few frames and `write` calls as possible per turn.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures_util::stream::{FuturesOrdered, StreamExt};
use futures_util::FutureExt;
use pipit_protocol::keepalive::{Keepalive, KeepaliveAction};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{Message, Session};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use super::answers::error;
use super::send_order::SendOrder;
use super::{ConnCtx, ConnError};
use crate::model::{DeviceAddr, LogGate};
use crate::route::{Budget, Charge, ConnHandle, Events, Push, Watcher};
use crate::service::receipts::{acked_meta, Acked};
use crate::service::typing::TypingLimiter;
use crate::service::Submission;

/// Most bytes one turn reads: one full frame and its length.
const READ_MAX: usize = pipit_protocol::limits::MAX_FRAME_LEN + 2;

/// How often a connection held back by the memory budget looks again.
const BUDGET_RECHECK: Duration = Duration::from_millis(50);

/// Writes `out` (then clears it). A peer whose socket takes no byte for
/// `timeout` is dropped rather than held forever; a slow one that keeps
/// taking bytes is not (a 2G link needs minutes for a full window).
pub(super) async fn write_out(stream: &mut TcpStream, out: &mut BytesMut, timeout: Duration) -> Result<(), ConnError> {
    let mut written = 0;
    while written < out.len() {
        match tokio::time::timeout(timeout, stream.write(&out[written..])).await {
            Err(_) => {
                metrics::counter!("pipit_write_timeouts_total").increment(1);
                return Err(ConnError::Timeout);
            }
            Ok(Ok(0)) => return Err(ConnError::Closed),
            Ok(Ok(n)) => written += n,
            Ok(Err(e)) => return Err(e.into()),
        }
    }
    if written > 0 {
        metrics::counter!("pipit_transmitted_bytes_total").increment(written as u64);
        out.clear();
    }
    Ok(())
}

/// Messages' worth of queue an idle connection keeps between turns.
const OUTQ_KEEP: usize = 8;
/// Bytes of write buffer an idle connection keeps between turns.
const OUT_KEEP: usize = 1024;

/// An answer that becomes ready later (a send made durable, a read done).
pub(super) type Answer = futures_util::future::BoxFuture<'static, Message>;

/// The state of an established connection.
pub(super) struct Conn {
    pub(super) ctx: Arc<ConnCtx>,
    pub(super) addr: DeviceAddr,
    pub(super) handle: ConnHandle,
    window: usize,
    /// Highest inbox id handed to the client (or known to be acked).
    cursor: u64,
    /// Deliveries sent and not yet acked, in inbox order.
    inflight: VecDeque<Acked>,
    /// The inbox holds entries past `cursor` that were not pushed to us
    /// (window full, mailbox overflow): read them from storage.
    behind: bool,
    /// Requests waiting for storage, answered in order.
    pub(super) pending: FuturesOrdered<Answer>,
    /// The payload bytes of each of `pending`, in the same order.
    pending_sizes: VecDeque<usize>,
    /// Their sum: what this connection holds in the writer's queue.
    pending_bytes: usize,
    /// What this connection holds in buffers and in the writer's queue,
    /// charged to the server's memory budget.
    held: Charge,
    /// `pending_bytes`, charged to the server-wide bound on the writer's
    /// queue.
    queued: Charge,
    /// Acks and read receipts the writer had no room for, in order. While
    /// any wait here the connection reads nothing more, so TCP pushes back
    /// on the client and this holds at most one frame's worth.
    pub(super) stalled: VecDeque<Submission>,
    /// Messages to send at the end of this turn.
    pub(super) outq: Vec<Message>,
    /// Set when the client broke a rule that ends the connection: nothing
    /// after it is processed; earlier answers go out, then this code as a
    /// connection-level error, then the server closes (SPEC.md 7.1).
    pub(super) closing: Option<pb::ErrorCode>,
    /// This connection's presence subscriptions, from its first
    /// `PresenceSubscribe` on.
    pub(super) watcher: Option<Arc<Watcher>>,
    /// Numbers this connection's subscription requests, so a slow one
    /// cannot undo a later one.
    pub(super) watch_seq: u64,
    /// How many typing notices this connection may still send.
    pub(super) typing: TypingLimiter,
    /// Conversations held by a send refused for now: later sends of them
    /// are refused until it comes again.
    pub(super) send_order: SendOrder,
}

impl Conn {
    /// A connection for `addr` whose login read `inbox`.
    pub(super) fn new(
        ctx: &Arc<ConnCtx>,
        addr: DeviceAddr,
        handle: ConnHandle,
        inbox: crate::service::inbox::LoginInbox,
    ) -> Self {
        let window = ctx.cfg.delivery_window;
        let mut conn = Self {
            ctx: ctx.clone(),
            addr,
            handle,
            window,
            cursor: inbox.cursor,
            inflight: VecDeque::with_capacity(inbox.send.len()),
            behind: inbox.behind,
            pending: FuturesOrdered::new(),
            pending_sizes: VecDeque::new(),
            pending_bytes: 0,
            held: ctx.budget.charge(0),
            queued: ctx.queued.charge(0),
            stalled: VecDeque::new(),
            outq: Vec::with_capacity(inbox.send.len() + 1),
            closing: None,
            watcher: None,
            watch_seq: 0,
            typing: ctx.services.typing.limiter(Instant::now()),
            send_order: SendOrder::default(),
        };
        if !inbox.acked.is_empty() {
            conn.ack_entries(inbox.acked);
        }
        for (id, m) in inbox.send {
            conn.deliver(id, m);
        }
        conn.cursor = inbox.cursor;
        conn
    }

    pub(super) async fn run(
        &mut self,
        mut stream: TcpStream,
        mut session: Session,
        mut inbuf: BytesMut,
        keepalive: Duration,
    ) -> Result<(), ConnError> {
        let mut ka = Keepalive::server(keepalive, Instant::now());
        let mut out = BytesMut::new();
        let shutdown = self.ctx.shutdown.clone();
        let mailbox = self.handle.mailbox.clone();
        let writer = self.ctx.services.writer.clone();
        let max_pending = self.ctx.cfg.max_pending_sends;
        let max_pending_bytes = self.ctx.cfg.max_pending_send_bytes;
        let budget = self.ctx.budget.clone();
        // When the frame now in `inbuf` began to arrive (while reading).
        let mut partial_since: Option<Instant> = None;
        let mut budget_wait = false;
        // Process bytes that arrived with the hello (pipelined frames).
        self.process_input(&mut session, &mut inbuf, &mut out)?;
        loop {
            if let Some(code) = self.closing {
                self.drain_pending().await;
                self.outq.push(error(code));
                self.flush(&mut session, &mut stream, &mut out).await?;
                let _ = stream.shutdown().await;
                return Err(ConnError::Refused(code));
            }
            self.flush(&mut session, &mut stream, &mut out).await?;
            if inbuf.is_empty() && inbuf.capacity() > 0 {
                // Idle connections hold no read buffer.
                inbuf = BytesMut::new();
            }
            // Nor what a burst (a window of deliveries, the states of a
            // presence subscription) grew the write side to: kept, it
            // would cost every connection its largest turn for ever.
            if self.outq.capacity() > OUTQ_KEEP {
                self.outq = Vec::new();
            }
            if out.is_empty() && out.capacity() > OUT_KEEP {
                out = BytesMut::new();
            }
            self.recharge(inbuf.capacity());
            let ka_deadline = tokio::time::Instant::from_std(ka.next_deadline());
            // The heaviest connections stop reading while the server is
            // over its memory budget; TCP pushes back on their clients.
            let waits_on =
                Budget::first_to_wait(&[(&budget, self.held.bytes()), (&self.ctx.queued, self.pending_bytes)]);
            let over_budget = waits_on.is_some();
            if let Some(b) = waits_on.filter(|_| !budget_wait) {
                b.hit("read");
            }
            budget_wait = over_budget;
            let reading = self.pending.len() < max_pending
                && self.pending_bytes < max_pending_bytes
                && self.stalled.is_empty()
                && !over_budget;
            if !reading || inbuf.is_empty() {
                // Only time a frame while we let it arrive.
                partial_since = None;
            } else if partial_since.is_none() {
                partial_since = Some(Instant::now());
            }
            let partial_deadline = tokio::time::Instant::from_std(
                partial_since.unwrap_or_else(Instant::now) + self.ctx.cfg.partial_frame_timeout,
            );
            tokio::select! {
                biased;
                // Answers already owed go out before the connection-level
                // error, which is the last thing the client reads.
                _ = shutdown.cancelled() => {
                    self.drain_pending().await;
                    self.outq.push(error(pb::ErrorCode::ShuttingDown));
                    self.flush(&mut session, &mut stream, &mut out).await?;
                    let _ = stream.shutdown().await;
                    return Ok(());
                }
                _ = mailbox.kick.notified() => {
                    // Replaced by a newer login, or unlinked: answers owed
                    // (an unlink's own Done among them) go out first.
                    self.drain_pending().await;
                    self.outq.push(error(mailbox.kick_code()));
                    self.flush(&mut session, &mut stream, &mut out).await?;
                    return Ok(());
                }
                Some(answer) = self.pending.next(), if !self.pending.is_empty() => {
                    self.answered(answer);
                }
                _ = mailbox.ready.notified() => {
                    for push in mailbox.take() {
                        self.push(push);
                    }
                    self.take_events();
                }
                _ = writer.room(), if !self.stalled.is_empty() => {
                    self.retry_stalled();
                }
                // Wait for readability rather than in a read call, so an idle
                // connection holds no buffer. Stop reading while too many
                // sends wait for storage, or an ack or receipt waits for room
                // in the writer's queue: TCP pushes back on the client.
                r = stream.readable(), if reading => {
                    r?;
                    inbuf.reserve(4096);
                    // At most a frame's worth per turn, so a connection
                    // passes the memory budget by at most that much before
                    // it looks at it again.
                    let mut room = bytes::BufMut::limit(&mut inbuf, READ_MAX);
                    match stream.try_read_buf(&mut room) {
                        Ok(0) => return Err(ConnError::Closed),
                        Ok(n) => {
                            metrics::counter!("pipit_received_bytes_total").increment(n as u64);
                            ka.on_receive(Instant::now());
                            if self.process_input(&mut session, &mut inbuf, &mut out)? > 0 {
                                // A new frame, if any, starts its own clock.
                                partial_since = None;
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                        Err(e) => return Err(e.into()),
                    }
                }
                // A frame that stays incomplete holds up to 64 KiB for
                // nothing: a client that sends part of one and stops is
                // closed (it reconnects and sends again).
                _ = tokio::time::sleep_until(partial_deadline), if partial_since.is_some() => {
                    static LOG: LogGate = LogGate::new(10_000);
                    metrics::counter!("pipit_partial_frame_timeouts_total").increment(1);
                    if let Some(suppressed) = LOG.open() {
                        tracing::warn!(device = %self.addr, bytes = inbuf.len(), suppressed, "closed a connection whose frame stayed incomplete");
                    }
                    return Err(ConnError::SlowFrame);
                }
                // Over budget: look again shortly (releases come from every
                // connection and the writer; polling is simpler than
                // waking every waiter on each).
                _ = tokio::time::sleep(BUDGET_RECHECK), if over_budget => {}
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
                    Some(Some(answer)) => self.answered(answer),
                    _ => break,
                }
            }
            for push in mailbox.take() {
                self.push(push);
            }
            self.take_events();
            if mailbox.overflow.swap(false, Ordering::AcqRel) {
                self.behind = true;
            }
            if self.behind && self.inflight.len() < self.window {
                self.catch_up().await?;
            }
        }
    }

    /// Answers requests already handed to storage before closing: they
    /// will be durable shortly, and an answer now saves the client a retry.
    async fn drain_pending(&mut self) {
        let deadline = tokio::time::sleep(self.ctx.cfg.shutdown_grace);
        tokio::pin!(deadline);
        while !self.pending.is_empty() {
            tokio::select! {
                Some(answer) = self.pending.next() => self.answered(answer),
                _ = &mut deadline => break,
            }
        }
    }

    /// Queues the presence updates and typing notices waiting in the
    /// mailbox.
    fn take_events(&mut self) {
        let Some(ev) = self.handle.mailbox.take_events() else { return };
        let Events { presence, typing } = *ev;
        if !presence.is_empty() {
            metrics::counter!("pipit_presence_updates_total").increment(presence.len() as u64);
        }
        self.outq.extend(presence.into_iter().map(Message::from));
        self.outq.extend(typing.into_iter().map(Message::from));
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
        if out.is_empty() {
            return Ok(());
        }
        // What waits for a slow reader's socket counts against the budget
        // until it is written.
        let rest = self.held.bytes();
        self.held.set(rest + out.capacity());
        let written = write_out(stream, out, self.ctx.cfg.write_timeout).await;
        // An idle connection holds no write buffer.
        *out = BytesMut::new();
        self.held.set(rest);
        written
    }

    /// Charges the read buffer and the writer queue's bytes.
    fn recharge(&mut self, inbuf: usize) {
        let n = inbuf + self.pending_bytes;
        if n != self.held.bytes() {
            self.held.set(n);
        }
        if self.pending_bytes != self.queued.bytes() {
            self.queued.set(self.pending_bytes);
        }
    }

    /// An answer that waited is ready: it goes out this turn, and its
    /// send's bytes are no longer held. A subscription's answer comes
    /// after the states it queued, so the client has every watched
    /// account's state by the time it reads `Done`.
    fn answered(&mut self, answer: Message) {
        let n = self.pending_sizes.pop_front().unwrap_or(0);
        self.pending_bytes -= n;
        if self.watcher.is_some() {
            self.take_events();
        }
        match &answer {
            Message::Error(e) if e.id != 0 => self.send_order.answered(e, Instant::now()),
            Message::Sent(s) => self.send_order.done(s.id),
            Message::DeviceMismatch(m) => self.send_order.done(m.id),
            _ => {}
        }
        self.outq.push(answer);
    }

    /// Handles every whole frame in `inbuf`; returns how many.
    fn process_input(
        &mut self,
        session: &mut Session,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<usize, ConnError> {
        let mut frames = 0;
        while self.closing.is_none() {
            let Some(incoming) = session.open(inbuf)? else { break };
            frames += 1;
            metrics::counter!("pipit_frames_in_total").increment(1);
            match incoming {
                Incoming::Keepalive => session.write_keepalive(out),
                Incoming::Messages(msgs) => {
                    for m in msgs {
                        if self.closing.is_some() {
                            return Ok(frames);
                        }
                        self.dispatch(m);
                    }
                }
            }
        }
        Ok(frames)
    }

    /// Queues an ack or receipt for the writer, behind any that already
    /// wait for room (order matters: a later ack may cover an earlier one's
    /// entries).
    pub(super) fn submit(&mut self, op: Submission) {
        if !self.stalled.is_empty() {
            self.stalled.push_back(op);
            return;
        }
        if let Err(op) = op.try_submit(&self.ctx.services.writer) {
            metrics::counter!("pipit_writer_backpressure_total").increment(1);
            self.stalled.push_back(op);
        }
    }

    fn retry_stalled(&mut self) {
        while let Some(op) = self.stalled.pop_front() {
            if let Err(op) = op.try_submit(&self.ctx.services.writer) {
                self.stalled.push_front(op);
                return;
            }
        }
    }

    /// The client acknowledged deliveries: through `through`, and `ids`.
    pub(super) fn ack(&mut self, ack: &pb::Ack) {
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
            self.ack_entries(acked);
        }
    }

    fn ack_entries(&mut self, acked: Vec<Acked>) {
        let op = self.ctx.services.receipts.ack(self.addr, acked);
        self.submit(op);
    }

    fn deliver(&mut self, id: u64, m: Message) {
        self.cursor = id;
        if !m.fits_packet() {
            self.undeliverable(id, &m);
            return;
        }
        self.inflight.push_back(acked_meta(self.addr.account, id, &m));
        if matches!(m, Message::Deliver(_)) {
            metrics::counter!("pipit_messages_delivered_total").increment(1);
        }
        self.outq.push(m);
    }

    fn push(&mut self, (id, m): Push) {
        if id == 0 {
            // A notice, not an inbox entry: no window, no ack.
            self.outq.push(*m);
            return;
        }
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

    /// An entry that cannot be sealed would close this connection now and
    /// at every login after, blocking every entry behind it: move past it,
    /// and have it deleted with an expiry notice to its sender.
    fn undeliverable(&mut self, id: u64, m: &Message) {
        static LOG: LogGate = LogGate::new(10_000);
        metrics::counter!("pipit_undeliverable_total").increment(1);
        if let Some(suppressed) = LOG.open() {
            tracing::warn!(
                device = %self.addr,
                inbox = id,
                bytes = m.encoded_len(),
                suppressed,
                "inbox entry too large to deliver; dropped, and its sender told it expired"
            );
        }
        let op = crate::service::expiry::undeliverable(self.addr, id, m);
        self.submit(op);
    }

    async fn catch_up(&mut self) -> Result<(), ConnError> {
        let want = self.window - self.inflight.len();
        let entries = self.ctx.services.inbox.after(self.addr, self.cursor, want).await?;
        self.behind = entries.len() == want;
        for (id, m) in entries {
            self.deliver(id, m);
        }
        Ok(())
    }

    /// Answers a request later, in order with the others.
    pub(super) fn answer_later(&mut self, answer: impl std::future::Future<Output = Message> + Send + 'static) {
        self.answer_later_holding(0, answer);
    }

    /// [`Conn::answer_later`] for a request that holds `bytes` in the
    /// writer's queue until it is answered.
    pub(super) fn answer_later_holding(
        &mut self,
        bytes: usize,
        answer: impl std::future::Future<Output = Message> + Send + 'static,
    ) {
        self.pending.push_back(answer.boxed());
        self.pending_sizes.push_back(bytes);
        self.pending_bytes += bytes;
    }

    /// Answers a request that needs no waiting. Answers keep the order of
    /// their requests (SPEC.md 4), so this one queues behind any that
    /// still wait for storage.
    pub(super) fn answer_now(&mut self, answer: Message) {
        if self.pending.is_empty() {
            self.outq.push(answer);
        } else {
            self.answer_later_holding(0, futures_util::future::ready(answer));
        }
    }
}
