//! pipit client library: an async (tokio) driver around `pipit-protocol`.
//!
//! [`Connection`] is one authenticated connection: connect with IK when the
//! server key is known, XX otherwise; then send and receive protocol
//! messages. It never depends on the server or RocksDB, so apps can embed
//! it. Reconnection, the outbox and dedup build on top of it.

use std::collections::VecDeque;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pipit_protocol::handshake::{Hello, IkStep, XxStep};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{ClientHandshake, Message, PublicKey, Session, StaticKeypair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, ToSocketAddrs};

pub use pipit_protocol;

/// Client errors.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// Network error.
    #[error("network: {0}")]
    Io(#[from] std::io::Error),
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] pipit_protocol::HandshakeError),
    /// The server broke the protocol.
    #[error("protocol: {0}")]
    Protocol(#[from] pipit_protocol::Error),
    /// The server refused the login or closed with an error code.
    #[error("server refused: {0:?}")]
    Refused(pb::ErrorCode),
    /// The server presented a key other than the pinned one.
    #[error("server key changed: pinned {pinned}, server offered {offered}")]
    ServerKeyChanged {
        /// The key we trust.
        pinned: PublicKey,
        /// The key the server presented.
        offered: PublicKey,
    },
    /// The server closed the connection.
    #[error("connection closed by the server")]
    Closed,
    /// No answer in time.
    #[error("timed out")]
    Timeout,
}

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
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self { server_key: None, accept_new_server_key: false, timeout: Duration::from_secs(30) }
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
        let mut stream = TcpStream::connect(addr).await?;
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

/// A `Login` hello.
pub fn login(account: u64, device: u32, acked_through: u64) -> Hello {
    Hello::Login(pb::Login { account, device, acked_through, keepalive_secs: 0, user_agent: String::new() })
}

/// A `Register` hello.
pub fn register(invite: &str, device_name: &str) -> Hello {
    Hello::Register(pb::Register {
        invite: Bytes::copy_from_slice(invite.as_bytes()),
        device_name: device_name.into(),
        keepalive_secs: 0,
        user_agent: String::new(),
    })
}
