//! The checker's own view of a connection: the protocol crate's state
//! machines over a socket, plus the ability to send what a correct client
//! never would (raw bytes, raw packet plaintext, crafted handshakes). It
//! deliberately does not use the client library: the checker tests a
//! server against SPEC.md, not against our client.

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pipit_protocol::frame::{self, preamble};
use pipit_protocol::handshake::{Hello, IkStep, XxStep};
use pipit_protocol::message::{encode_packet, pb};
use pipit_protocol::session::Incoming;
use pipit_protocol::{ClientHandshake, Message, PublicKey, Session, StaticKeypair, VERSION};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long to wait for an answer the server owes at once.
pub(crate) const ANSWER: Duration = Duration::from_secs(10);

/// Why a handshake did not give a session.
#[derive(Debug)]
pub(crate) enum Refusal {
    /// The server answered the hello with an error and closed.
    Code(pb::ErrorCode),
    /// The server offered another key (`Retry`).
    Retry(PublicKey),
    /// Anything else: closed, timed out, malformed.
    Other(String),
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::Code(c) => write!(f, "refused with {}", c.as_str_name()),
            Refusal::Retry(k) => write!(f, "told to retry with key {k}"),
            Refusal::Other(s) => f.write_str(s),
        }
    }
}

/// What the next read brought.
#[derive(Debug)]
pub(crate) enum Got {
    /// A message.
    Message(Message),
    /// A keepalive frame.
    Keepalive,
    /// The server closed the connection.
    Closed,
}

/// A plain TCP connection, before or instead of a session.
pub(crate) async fn dial(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = tokio::time::timeout(ANSWER, TcpStream::connect(addr))
        .await
        .map_err(|_| format!("connecting to {addr} timed out"))?
        .map_err(|e| format!("connecting to {addr}: {e}"))?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(s)
}

/// Reads until the server closes, for at most `within`. `Ok(bytes)` when it
/// closed (an orderly close or a reset), with what it sent first.
pub(crate) async fn read_to_close(s: &mut TcpStream, within: Duration) -> Result<Vec<u8>, String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Err(_) => return Err(format!("still open after {within:?} (received {} bytes)", got.len())),
            Ok(Ok(0)) | Ok(Err(_)) => return Ok(got),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

/// A handshake frame: kind byte and body, length-prefixed.
pub(crate) fn handshake_frame(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut b = vec![kind];
    b.extend_from_slice(body);
    let mut out = BytesMut::new();
    frame::encode(&b, &mut out);
    out.to_vec()
}

/// The packet bytes of `msgs`.
pub(crate) fn packet(msgs: &[Message]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_packet(msgs, &mut v);
    v
}

/// A Noise initiator for `pattern` with pipit's prologue, for crafting
/// handshakes the protocol crate would refuse to write.
fn initiator(pattern: &str, local: &StaticKeypair, remote: Option<&PublicKey>) -> snow::HandshakeState {
    let prologue = preamble(VERSION);
    let params: snow::params::NoiseParams = pattern.parse().expect("valid Noise protocol name");
    let mut b = snow::Builder::new(params).local_private_key(local.private_bytes()).expect("32-byte key");
    if let Some(r) = remote {
        b = b.remote_public_key(r.as_bytes()).expect("32-byte key");
    }
    b.prologue(&prologue).and_then(|b| b.build_initiator()).expect("a valid initiator")
}

/// An `IkInit` frame whose payload is `payload`, whatever it holds; with
/// the preamble in front when it opens the connection.
pub(crate) fn crafted_ik(local: &StaticKeypair, server: &PublicKey, payload: &[u8], with_preamble: bool) -> Vec<u8> {
    let mut hs = initiator("Noise_IK_25519_ChaChaPoly_BLAKE2s", local, Some(server));
    let mut msg = vec![0u8; payload.len() + 128];
    let n = hs.write_message(payload, &mut msg).expect("IK message 1");
    let mut out = if with_preamble { preamble(VERSION).to_vec() } else { Vec::new() };
    out.extend_from_slice(&handshake_frame(1, &msg[..n]));
    out
}

/// Sends an `XxInit` (after the preamble when `with_preamble`), reads the
/// `XxReply` that answers it and returns its decrypted payload and the
/// server key it proves.
pub(crate) async fn xx_reply(
    s: &mut TcpStream,
    local: &StaticKeypair,
    with_preamble: bool,
) -> Result<(Vec<u8>, PublicKey), String> {
    let mut hs = initiator("Noise_XX_25519_ChaChaPoly_BLAKE2s", local, None);
    let mut msg = [0u8; 64];
    let n = hs.write_message(&[], &mut msg).map_err(|e| e.to_string())?;
    let mut out = if with_preamble { preamble(VERSION).to_vec() } else { Vec::new() };
    out.extend_from_slice(&handshake_frame(3, &msg[..n]));
    s.write_all(&out).await.map_err(|e| e.to_string())?;
    let mut len = [0u8; 2];
    tokio::time::timeout(ANSWER, s.read_exact(&mut len))
        .await
        .map_err(|_| "no XxReply".to_string())?
        .map_err(|e| format!("reading XxReply: {e}"))?;
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    tokio::time::timeout(ANSWER, s.read_exact(&mut body))
        .await
        .map_err(|_| "XxReply cut short".to_string())?
        .map_err(|e| format!("reading XxReply: {e}"))?;
    if body.first() != Some(&4) {
        return Err(format!("expected an XxReply frame, got kind {:?}", body.first()));
    }
    let mut payload = vec![0u8; body.len()];
    let n = hs.read_message(&body[1..], &mut payload).map_err(|e| format!("XxReply does not decrypt: {e}"))?;
    payload.truncate(n);
    let key = hs.get_remote_static().and_then(PublicKey::from_slice).ok_or("XxReply proves no static key")?;
    Ok((payload, key))
}

/// Reads a `Retry` frame (the first thing the server sends) and returns
/// the key it offers.
pub(crate) async fn read_retry(s: &mut TcpStream) -> Result<PublicKey, String> {
    // 2 length bytes, the kind, 32 key bytes.
    let mut retry = [0u8; 35];
    tokio::time::timeout(ANSWER, s.read_exact(&mut retry))
        .await
        .map_err(|_| "no Retry".to_string())?
        .map_err(|e| format!("reading Retry: {e}"))?;
    if retry[..3] != [0, 33, 6] {
        return Err(format!("expected a Retry frame, got {:02x?}", &retry[..3]));
    }
    PublicKey::from_slice(&retry[3..]).ok_or_else(|| "a Retry without a key".to_string())
}

/// An XX first flight (preamble and `XxInit`) carrying `payload`, which
/// SPEC.md says must be empty.
pub(crate) fn crafted_xx_init(local: &StaticKeypair, payload: &[u8]) -> Vec<u8> {
    let mut hs = initiator("Noise_XX_25519_ChaChaPoly_BLAKE2s", local, None);
    let mut msg = vec![0u8; payload.len() + 64];
    let n = hs.write_message(payload, &mut msg).expect("XX message 1");
    let mut out = preamble(VERSION).to_vec();
    out.extend_from_slice(&handshake_frame(3, &msg[..n]));
    out
}

/// An established session, with the login answer already taken off.
pub(crate) struct Wire {
    stream: TcpStream,
    session: Session,
    inbuf: BytesMut,
    queue: VecDeque<Message>,
    /// The server's answer to the hello.
    pub(crate) login: pb::LoginOk,
    /// The server key the session was made with.
    pub(crate) server_key: PublicKey,
}

fn take_login(first: Vec<Message>) -> Result<(pb::LoginOk, VecDeque<Message>), Refusal> {
    let mut q: VecDeque<Message> = first.into();
    match q.pop_front() {
        Some(Message::LoginOk(ok)) => Ok((ok, q)),
        Some(Message::Error(e)) => Err(Refusal::Code(pb::ErrorCode::try_from(e.code).unwrap_or_default())),
        Some(other) => Err(Refusal::Other(format!("the first message was {}, not LoginOk", other.kind()))),
        None => Err(Refusal::Other("the first packet was empty".into())),
    }
}

async fn read_more(stream: &mut TcpStream, buf: &mut BytesMut, within: Duration) -> Result<(), Refusal> {
    buf.reserve(4096);
    match tokio::time::timeout(within, stream.read_buf(buf)).await {
        Err(_) => Err(Refusal::Other(format!("no answer within {within:?}"))),
        Ok(Ok(0)) => Err(Refusal::Other("the server closed the connection".into())),
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(Refusal::Other(format!("read: {e}"))),
    }
}

async fn write(stream: &mut TcpStream, bytes: &[u8]) -> Result<(), Refusal> {
    stream.write_all(bytes).await.map_err(|e| Refusal::Other(format!("write: {e}")))
}

impl Wire {
    /// IK with `server` as the server's key. Returns the session and how
    /// many `IkInit`s it took (1, or 2 after a `Retry` when `follow_retry`).
    pub(crate) async fn ik(
        addr: SocketAddr,
        local: &StaticKeypair,
        server: &PublicKey,
        hello: Hello,
        follow_retry: bool,
    ) -> Result<(Wire, u32), Refusal> {
        let stream = dial(addr).await.map_err(Refusal::Other)?;
        Self::ik_on(stream, local, server, hello, follow_retry, true).await
    }

    /// IK on a connection already open: from its start (`with_preamble`),
    /// or after the server answered an earlier first message with `Retry`.
    pub(crate) async fn ik_on(
        mut stream: TcpStream,
        local: &StaticKeypair,
        server: &PublicKey,
        hello: Hello,
        follow_retry: bool,
        with_preamble: bool,
    ) -> Result<(Wire, u32), Refusal> {
        let mut out = BytesMut::new();
        let mut hs =
            ClientHandshake::ik(local, server, hello, &mut out).map_err(|e| Refusal::Other(format!("client: {e}")))?;
        if !with_preamble {
            let _ = out.split_to(preamble(VERSION).len());
        }
        write(&mut stream, &out).await?;
        let mut inits = 1;
        let mut inbuf = BytesMut::new();
        loop {
            match hs.read(&mut inbuf) {
                Ok(IkStep::NeedMore(h)) => {
                    hs = h;
                    read_more(&mut stream, &mut inbuf, ANSWER).await?;
                }
                Ok(IkStep::Established { session, messages }) => {
                    let (login, queue) = take_login(messages)?;
                    let server_key = *session.remote_key();
                    return Ok((Wire { stream, session, inbuf, queue, login, server_key }, inits));
                }
                Ok(IkStep::Retry(offer)) if follow_retry => {
                    let mut out = BytesMut::new();
                    hs = offer.retry(&mut out).map_err(|e| Refusal::Other(format!("client: {e}")))?;
                    write(&mut stream, &out).await?;
                    inits += 1;
                }
                Ok(IkStep::Retry(offer)) => return Err(Refusal::Retry(*offer.server_key())),
                Err(e) => return Err(Refusal::Other(format!("handshake: {e}"))),
            }
        }
    }

    /// XX. Returns the session and the key the server proved in `XxReply`.
    pub(crate) async fn xx(addr: SocketAddr, local: &StaticKeypair, hello: Hello) -> Result<Wire, Refusal> {
        let mut stream = dial(addr).await.map_err(Refusal::Other)?;
        let mut out = BytesMut::new();
        let mut hs = ClientHandshake::xx(local, &mut out).map_err(|e| Refusal::Other(format!("client: {e}")))?;
        write(&mut stream, &out).await?;
        let mut inbuf = BytesMut::new();
        let known = loop {
            match hs.read(&mut inbuf) {
                Ok(XxStep::NeedMore(h)) => {
                    hs = h;
                    read_more(&mut stream, &mut inbuf, ANSWER).await?;
                }
                Ok(XxStep::ServerKnown(k)) => break k,
                Err(e) => return Err(Refusal::Other(format!("handshake: {e}"))),
            }
        };
        let mut out = BytesMut::new();
        let mut session = known.finish(hello, &mut out).map_err(|e| Refusal::Other(format!("client: {e}")))?;
        write(&mut stream, &out).await?;
        let first = loop {
            match session.open(&mut inbuf) {
                Ok(Some(Incoming::Messages(m))) => break m,
                Ok(Some(Incoming::Keepalive)) => return Err(Refusal::Other("a keepalive before LoginOk".into())),
                Ok(None) => read_more(&mut stream, &mut inbuf, ANSWER).await?,
                Err(e) => return Err(Refusal::Other(format!("session: {e}"))),
            }
        };
        let (login, queue) = take_login(first)?;
        let server_key = *session.remote_key();
        Ok(Wire { stream, session, inbuf, queue, login, server_key })
    }

    /// Sends messages, packed as few to a frame as fit.
    pub(crate) async fn send(&mut self, msgs: &[Message]) -> Result<(), String> {
        let mut out = BytesMut::new();
        self.session.seal(msgs, &mut out).map_err(|e| e.to_string())?;
        self.send_bytes(&out).await
    }

    /// Sends `plain` as one encrypted frame, valid packet or not.
    pub(crate) async fn send_raw_packet(&mut self, plain: &[u8]) -> Result<(), String> {
        let mut out = BytesMut::new();
        self.session.seal_raw(plain, &mut out).map_err(|e| e.to_string())?;
        self.send_bytes(&out).await
    }

    /// Encrypts `msgs` as one frame and returns its bytes without sending.
    pub(crate) fn seal(&mut self, msgs: &[Message]) -> Result<Vec<u8>, String> {
        let mut out = BytesMut::new();
        self.session.seal(msgs, &mut out).map_err(|e| e.to_string())?;
        Ok(out.to_vec())
    }

    /// Writes raw bytes on the socket.
    pub(crate) async fn send_bytes(&mut self, bytes: &[u8]) -> Result<(), String> {
        self.stream.write_all(bytes).await.map_err(|e| format!("write: {e}"))
    }

    /// The next thing from the server, waiting at most `within`.
    /// `Err` on a timeout or a frame that does not open.
    pub(crate) async fn next(&mut self, within: Duration) -> Result<Got, String> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if let Some(m) = self.queue.pop_front() {
                return Ok(Got::Message(m));
            }
            match self.session.open(&mut self.inbuf) {
                Ok(Some(Incoming::Messages(m))) => self.queue.extend(m),
                Ok(Some(Incoming::Keepalive)) => return Ok(Got::Keepalive),
                Ok(None) => {
                    self.inbuf.reserve(4096);
                    match tokio::time::timeout_at(deadline, self.stream.read_buf(&mut self.inbuf)).await {
                        Err(_) => return Err(format!("nothing from the server within {within:?}")),
                        Ok(Ok(0)) | Ok(Err(_)) => return Ok(Got::Closed),
                        Ok(Ok(_)) => {}
                    }
                }
                Err(e) => return Err(format!("a server frame did not open: {e}")),
            }
        }
    }

    /// The next message; a close or keepalive instead is an error.
    pub(crate) async fn recv(&mut self) -> Result<Message, String> {
        match self.next(ANSWER).await? {
            Got::Message(m) => Ok(m),
            Got::Keepalive => Err("a keepalive where a message was due".into()),
            Got::Closed => Err("the server closed the connection".into()),
        }
    }

    /// Receives until `pick` accepts a message, skipping the others
    /// (deliveries and receipts may come between answers).
    pub(crate) async fn expect<T>(
        &mut self,
        what: &str,
        mut pick: impl FnMut(&Message) -> Option<T>,
    ) -> Result<T, String> {
        loop {
            let m = self.recv().await.map_err(|e| format!("waiting for {what}: {e}"))?;
            if let Some(t) = pick(&m) {
                return Ok(t);
            }
        }
    }

    /// Messages that arrive within `within`, until a quiet gap of that long.
    pub(crate) async fn drain(&mut self, within: Duration) -> Result<Vec<Message>, String> {
        let mut got = Vec::new();
        loop {
            match self.next(within).await {
                Ok(Got::Message(m)) => got.push(m),
                Ok(Got::Keepalive) => {}
                Ok(Got::Closed) => return Err("the server closed the connection".into()),
                Err(_) => return Ok(got),
            }
        }
    }

    /// Waits for the server to close; returns the messages it sent first.
    pub(crate) async fn expect_close(&mut self, within: Duration) -> Result<Vec<Message>, String> {
        let mut got = Vec::new();
        loop {
            match self.next(within).await {
                Ok(Got::Message(m)) => got.push(m),
                Ok(Got::Keepalive) => {}
                Ok(Got::Closed) => return Ok(got),
                // A frame that does not open after the server stopped
                // caring (a reset mid-frame) still means closed.
                Err(e) if e.starts_with("a server frame") => return Ok(got),
                Err(_) => {
                    let kinds: Vec<&str> = got.iter().map(Message::kind).collect();
                    return Err(format!("the connection stayed open for {within:?} (received {kinds:?})"));
                }
            }
        }
    }

    /// A ping round trip: proves the connection is open and everything
    /// sent before it was processed. Returns what arrived before the pong.
    pub(crate) async fn ping(&mut self, id: u64) -> Result<Vec<Message>, String> {
        self.send(&[pb::Ping { id }.into()]).await?;
        let mut before = Vec::new();
        loop {
            match self.recv().await.map_err(|e| format!("waiting for Pong {id}: {e}"))? {
                Message::Pong(p) if p.id == id => return Ok(before),
                m => before.push(m),
            }
        }
    }
}

/// Bytes of a varint.
pub(crate) fn varint(v: u64) -> Vec<u8> {
    let mut out = Vec::new();
    prost::encoding::encode_varint(v, &mut out);
    out
}

/// A raw packet field: key, then `rest` as it is.
pub(crate) fn field(number: u64, wire_type: u64, rest: &[u8]) -> Vec<u8> {
    let mut out = varint(number << 3 | wire_type);
    out.extend_from_slice(rest);
    out
}

/// A length-delimited raw packet field.
pub(crate) fn ld(number: u64, body: &[u8]) -> Vec<u8> {
    let mut rest = varint(body.len() as u64);
    rest.extend_from_slice(body);
    field(number, 2, &rest)
}

/// A payload for tests: `Bytes` of a string.
pub(crate) fn text(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}
