//! One authenticated connection: connect with IK when the server key is
//! known, XX otherwise; then send and receive protocol messages. The
//! [`crate::Client`] builds reconnection, the outbox and dedup on top.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pipit_protocol::handshake::{Hello, IkStep, XxStep};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{ClientHandshake, Message, PublicKey, Session, StaticKeypair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

use crate::ClientError;

/// How to connect.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// The server key, when known: IK (one round trip); else XX.
    pub server_key: Option<PublicKey>,
    /// Accept a server key other than `server_key` (from a `Retry`).
    /// Off: a changed key is [`ClientError::ServerKeyChanged`].
    pub accept_new_server_key: bool,
    /// Time allowed for connect, handshake and login.
    pub timeout: Duration,
    /// Local address to connect from (load tools spread connections over
    /// several loopback addresses); `None` lets the kernel choose.
    pub local_ip: Option<std::net::IpAddr>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { server_key: None, accept_new_server_key: false, timeout: Duration::from_secs(30), local_ip: None }
    }
}

/// One authenticated connection.
pub struct Connection {
    stream: TcpStream,
    session: Session,
    inbuf: BytesMut,
    out: BytesMut,
    queue: VecDeque<Message>,
    login: pb::LoginOk,
    server_key: PublicKey,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("account", &self.login.account)
            .field("device", &self.login.device)
            .finish_non_exhaustive()
    }
}

fn take_login(messages: Vec<Message>) -> Result<(pb::LoginOk, VecDeque<Message>), ClientError> {
    let mut q: VecDeque<Message> = messages.into();
    match q.pop_front() {
        Some(Message::LoginOk(ok)) => Ok((ok, q)),
        // SPEC.md 3.7: another node owns the account; an `Error` with
        // `WRONG_NODE` follows for clients that do not know `Redirect`.
        Some(Message::Redirect(r)) => {
            let key = PublicKey::from_slice(&r.server_key).ok_or(ClientError::Refused(pb::ErrorCode::WrongNode))?;
            let port = u16::try_from(r.port).ok().filter(|p| *p > 0);
            match port {
                Some(port) if !r.host.is_empty() => {
                    let server = if r.host.contains(':') {
                        format!("[{}]:{port}", r.host)
                    } else {
                        format!("{}:{port}", r.host)
                    };
                    Err(ClientError::Redirected { server, server_key: key })
                }
                _ => Err(ClientError::Refused(pb::ErrorCode::WrongNode)),
            }
        }
        Some(Message::Error(e)) => {
            Err(ClientError::Refused(pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified)))
        }
        Some(_) | None => Err(ClientError::Refused(pb::ErrorCode::Unspecified)),
    }
}

impl Connection {
    /// Connects, authenticates and logs in (or registers) with `hello`.
    pub async fn connect(
        addr: impl ToSocketAddrs,
        identity: &StaticKeypair,
        hello: Hello,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        tokio::time::timeout(opts.timeout, Self::connect_inner(addr, identity, hello, opts))
            .await
            .map_err(|_| ClientError::Timeout)?
    }

    async fn connect_inner(
        addr: impl ToSocketAddrs,
        identity: &StaticKeypair,
        hello: Hello,
        opts: &ConnectOptions,
    ) -> Result<Self, ClientError> {
        let mut stream = match opts.local_ip {
            None => TcpStream::connect(addr).await?,
            Some(ip) => {
                let target = tokio::net::lookup_host(addr)
                    .await?
                    .next()
                    .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "no address"))?;
                let socket =
                    if target.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
                socket.bind(std::net::SocketAddr::new(ip, 0))?;
                socket.connect(target).await?
            }
        };
        stream.set_nodelay(true)?;
        let mut inbuf = BytesMut::with_capacity(4096);
        let mut out = BytesMut::new();
        let (session, first) = match opts.server_key {
            Some(pinned) => {
                let mut hs = ClientHandshake::ik(identity, &pinned, hello, &mut out)?;
                stream.write_all(&out).await?;
                out.clear();
                loop {
                    match hs.read(&mut inbuf)? {
                        IkStep::NeedMore(next) => {
                            hs = next;
                            read_more(&mut stream, &mut inbuf).await?;
                        }
                        IkStep::Established { session, messages } => break (session, messages),
                        IkStep::Retry(offer) => {
                            if *offer.server_key() != pinned && !opts.accept_new_server_key {
                                return Err(ClientError::ServerKeyChanged { pinned, offered: *offer.server_key() });
                            }
                            hs = offer.retry(&mut out)?;
                            stream.write_all(&out).await?;
                            out.clear();
                        }
                    }
                }
            }
            None => {
                let mut hs = ClientHandshake::xx(identity, &mut out)?;
                stream.write_all(&out).await?;
                out.clear();
                let known = loop {
                    match hs.read(&mut inbuf)? {
                        XxStep::NeedMore(next) => {
                            hs = next;
                            read_more(&mut stream, &mut inbuf).await?;
                        }
                        XxStep::ServerKnown(k) => break k,
                    }
                };
                let mut session = known.finish(hello, &mut out)?;
                stream.write_all(&out).await?;
                out.clear();
                let first = loop {
                    match session.open(&mut inbuf)? {
                        Some(Incoming::Messages(m)) => break m,
                        Some(Incoming::Keepalive) => {}
                        None => read_more(&mut stream, &mut inbuf).await?,
                    }
                };
                (session, first)
            }
        };
        let server_key = *session.remote_key();
        let (login, queue) = take_login(first)?;
        Ok(Self { stream, session, inbuf, out, queue, login, server_key })
    }

    /// Gives up the session and keeps only the socket: an idle connection
    /// held open by a load tool needs nothing else.
    pub fn into_stream(self) -> TcpStream {
        self.stream
    }

    /// This end's socket address (for per-socket measurements).
    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.stream.local_addr()
    }

    /// The login result.
    pub fn login(&self) -> &pb::LoginOk {
        &self.login
    }

    /// The server's authenticated static key (pin it).
    pub fn server_key(&self) -> &PublicKey {
        &self.server_key
    }

    /// Sends messages, coalesced into as few frames as fit.
    pub async fn send(&mut self, messages: &[Message]) -> Result<(), ClientError> {
        self.session.seal(messages, &mut self.out)?;
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// Seals messages into the write buffer without waiting for the
    /// socket: [`Connection::next`] writes them while it waits for input,
    /// so a caller that only queues never blocks on a peer that stopped
    /// reading. [`Connection::send`] writes them too, after anything
    /// queued before.
    pub fn queue_out(&mut self, messages: &[Message]) -> Result<(), ClientError> {
        self.session.seal(messages, &mut self.out)?;
        Ok(())
    }

    /// [`Connection::queue_out`] for a keepalive frame.
    pub fn queue_keepalive(&mut self) {
        self.session.write_keepalive(&mut self.out);
    }

    /// Bytes queued and not yet written.
    pub fn unwritten(&self) -> usize {
        self.out.len()
    }

    /// Sends one 1:1 message with a single payload for every device.
    pub async fn send_text(&mut self, id: u64, to: u64, payload: impl Into<Bytes>) -> Result<(), ClientError> {
        self.send(&[pb::Send { id, to, payload: payload.into(), ..Default::default() }.into()]).await
    }

    /// Sends a keepalive frame.
    pub async fn keepalive(&mut self) -> Result<(), ClientError> {
        self.session.write_keepalive(&mut self.out);
        self.stream.write_all(&self.out).await?;
        self.out.clear();
        Ok(())
    }

    /// The next thing from the server: a message, or a keepalive answer;
    /// meanwhile writes what [`Connection::queue_out`] queued, as the
    /// socket takes it. Cancel-safe: bytes read so far stay buffered, and
    /// bytes not yet written stay queued.
    pub async fn next(&mut self) -> Result<Received, ClientError> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                return Ok(Received::Message(m));
            }
            match self.session.open(&mut self.inbuf)? {
                Some(Incoming::Messages(m)) => self.queue.extend(m),
                Some(Incoming::Keepalive) => return Ok(Received::Keepalive),
                None if self.out.is_empty() => read_more(&mut self.stream, &mut self.inbuf).await?,
                None => self.read_or_write().await?,
            }
        }
    }

    /// Waits until the socket can be read or written, and does what it
    /// can of either without blocking.
    async fn read_or_write(&mut self) -> Result<(), ClientError> {
        let would_block = |e: &std::io::Error| e.kind() == std::io::ErrorKind::WouldBlock;
        tokio::select! {
            r = self.stream.readable() => {
                r?;
                self.inbuf.reserve(4096);
                match self.stream.try_read_buf(&mut self.inbuf) {
                    Ok(0) => return Err(ClientError::Closed),
                    Ok(_) => {}
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(e.into()),
                }
            }
            r = self.stream.writable() => {
                r?;
                match self.stream.try_write(&self.out) {
                    Ok(n) => bytes::Buf::advance(&mut self.out, n),
                    Err(e) if would_block(&e) => {}
                    Err(e) => return Err(e.into()),
                }
                if self.out.is_empty() && self.out.capacity() > 1 << 20 {
                    // A burst's buffer is not kept for ever.
                    self.out = BytesMut::new();
                }
            }
        }
        Ok(())
    }

    /// Whether decoded or buffered input is waiting (so a caller can
    /// coalesce its acks until everything already here is handled).
    pub fn has_buffered(&self) -> bool {
        !self.queue.is_empty() || !self.inbuf.is_empty()
    }

    /// The next message from the server. A connection-level `Error`
    /// (no `req`, no `id`) is returned as [`ClientError::Refused`].
    pub async fn recv(&mut self) -> Result<Message, ClientError> {
        loop {
            if let Some(m) = self.queue.pop_front() {
                if let Message::Error(e) = &m {
                    if e.req == 0 && e.id == 0 {
                        return Err(ClientError::Refused(
                            pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified),
                        ));
                    }
                }
                return Ok(m);
            }
            match self.session.open(&mut self.inbuf)? {
                Some(Incoming::Messages(m)) => self.queue.extend(m),
                Some(Incoming::Keepalive) => {}
                None => read_more(&mut self.stream, &mut self.inbuf).await?,
            }
        }
    }

    /// [`Connection::recv`] with a deadline.
    pub async fn recv_timeout(&mut self, t: Duration) -> Result<Message, ClientError> {
        tokio::time::timeout(t, self.recv()).await.map_err(|_| ClientError::Timeout)?
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut) -> Result<(), ClientError> {
    buf.reserve(4096);
    match stream.read_buf(buf).await? {
        0 => Err(ClientError::Closed),
        _ => Ok(()),
    }
}

/// What [`Connection::next`] returns.
#[derive(Debug, Clone, PartialEq)]
pub enum Received {
    /// A protocol message.
    Message(Message),
    /// The server's answer to a keepalive.
    Keepalive,
}
