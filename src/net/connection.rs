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

use super::{ConnCtx, ConnError};
use crate::model::DeviceAddr;
use crate::route::{ConnHandle, Push};
use crate::service::receipts::{acked_meta, Acked};
use crate::service::Submission;

/// Serves one accepted socket until it closes.
pub(super) async fn run(stream: TcpStream, ctx: &Arc<ConnCtx>) {
    metrics::gauge!("pipit_connections").increment(1.0);
    let result = serve(stream, ctx).await;
    metrics::gauge!("pipit_connections").decrement(1.0);
    match result {
        Ok(()) | Err(ConnError::Closed) => {}
        Err(ConnError::Io(e)) => tracing::debug!(error = %e, "connection i/o error"),
        Err(e) => tracing::debug!(error = %e, "connection closed"),
    }
}

async fn serve(stream: TcpStream, ctx: &Arc<ConnCtx>) -> Result<(), ConnError> {
    // The handshake and the login hold state an established connection no
    // longer needs; run them in their own allocation so it is freed once
    // they are done instead of sizing every idle connection's future.
    let super::handshake::Established { stream, session, inbuf, mut conn, keepalive } =
        Box::pin(super::handshake::establish(stream, ctx)).await?;
    let result = conn.run(stream, session, inbuf, keepalive).await;
    ctx.registry.remove(conn.addr, conn.handle.id);
    result
}

/// A connection-level error message (no `req`, no `id`): the server closes
/// after it.
pub(super) fn error(code: pb::ErrorCode) -> Message {
    pb::Error { code: code as i32, ..Default::default() }.into()
}

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
        metrics::counter!("pipit_bytes_out_total").increment(written as u64);
        out.clear();
    }
    Ok(())
}

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
        let mut inflight = VecDeque::with_capacity(inbox.send.len());
        let mut outq = Vec::with_capacity(inbox.send.len() + 1);
        for (id, m) in inbox.send {
            inflight.push_back(acked_meta(addr.account, id, &m));
            outq.push(m);
        }
        let messages = outq.iter().filter(|m| matches!(m, Message::Deliver(_))).count();
        metrics::counter!("pipit_messages_delivered_total").increment(messages as u64);
        let mut conn = Self {
            ctx: ctx.clone(),
            addr,
            handle,
            window,
            cursor: inbox.cursor,
            inflight,
            behind: inbox.behind,
            pending: FuturesOrdered::new(),
            stalled: VecDeque::new(),
            outq,
            closing: None,
        };
        if !inbox.acked.is_empty() {
            conn.ack_entries(inbox.acked);
        }
        conn
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
        let shutdown = self.ctx.shutdown.clone();
        let mailbox = self.handle.mailbox.clone();
        let writer = self.ctx.services.writer.clone();
        let max_pending = self.ctx.cfg.max_pending_sends;
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
            let ka_deadline = tokio::time::Instant::from_std(ka.next_deadline());
            let reading = self.pending.len() < max_pending && self.stalled.is_empty();
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
                    self.outq.push(answer);
                }
                _ = mailbox.ready.notified() => {
                    for push in mailbox.take() {
                        self.push(push);
                    }
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

    /// Answers requests already handed to storage before closing: they
    /// will be durable shortly, and an answer now saves the client a retry.
    async fn drain_pending(&mut self) {
        let deadline = tokio::time::sleep(self.ctx.cfg.shutdown_grace);
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
        write_out(stream, out, self.ctx.cfg.write_timeout).await
    }

    fn process_input(
        &mut self,
        session: &mut Session,
        inbuf: &mut BytesMut,
        out: &mut BytesMut,
    ) -> Result<(), ConnError> {
        while self.closing.is_none() {
            let Some(incoming) = session.open(inbuf)? else { break };
            metrics::counter!("pipit_frames_in_total").increment(1);
            match incoming {
                Incoming::Keepalive => session.write_keepalive(out),
                Incoming::Messages(msgs) => {
                    for m in msgs {
                        if self.closing.is_some() {
                            return Ok(());
                        }
                        self.dispatch(m);
                    }
                }
            }
        }
        Ok(())
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
        self.inflight.push_back(acked_meta(self.addr.account, id, &m));
        self.cursor = id;
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
        self.pending.push_back(answer.boxed());
    }

    /// Answers a request that needs no waiting. Answers keep the order of
    /// their requests (SPEC.md 4), so this one queues behind any that
    /// still wait for storage.
    pub(super) fn answer_now(&mut self, answer: Message) {
        if self.pending.is_empty() {
            self.outq.push(answer);
        } else {
            self.pending.push_back(futures_util::future::ready(answer).boxed());
        }
    }
}
