//! Noise handshakes: IK for returning devices, XX for first contact, and a
//! retry for a device whose cached server key is stale.
//!
//! Each state is a type consumed by value, in the manner of rustls: only a
//! finished handshake yields a [`Session`], so no application data can be
//! sent or accepted before the peer is authenticated.
//!
//! | pattern | client → server | server → client | first app message at the client |
//! |---|---|---|---|
//! | IK | preamble + `IkInit` (login inside) | `IkReply` (login result and queued messages inside) | after 1 round trip |
//! | XX | preamble + `XxInit`; then `XxFinish` (login inside) | `XxReply`; then transport frames | after 2 round trips |
//! | stale key | preamble + `IkInit` | `Retry` (current key); then as IK | after 2 round trips |
//!
//! Handshake frames are ordinary frames whose first byte is a
//! [`HandshakeKind`]. Cipher suite: `25519_ChaChaPoly_BLAKE2s`, which is
//! fast on phones without AES instructions. The prologue is the 4-byte
//! connection preamble, binding the protocol version into the handshake.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::error::{HandshakeError, MessageError};
use crate::frame::{self, preamble, read_preamble, Frame, FrameDecoder};
use crate::keys::{PublicKey, StaticKeypair};
use crate::limits::{KEY_LEN, MAX_CLIENT_HANDSHAKE_FRAME_LEN, MAX_FRAME_LEN, MAX_HANDSHAKE_RETRIES, TAG_LEN};
use crate::message::{decode_packet, encode_packet, packet_len, pb, Message, Origin};
use crate::noise::builder;
pub use crate::noise::Pattern;
use crate::role::Role;
use crate::session::Session;
use crate::VERSION;

/// The first byte of every handshake frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
#[non_exhaustive]
pub enum HandshakeKind {
    /// Client: IK message 1 (`e, es, s, ss`), payload: Login or Register.
    IkInit = 1,
    /// Server: IK message 2 (`e, ee, se`), payload: the server's first packet.
    IkReply = 2,
    /// Client: XX message 1 (`e`), empty payload.
    XxInit = 3,
    /// Server: XX message 2 (`e, ee, s, es`), empty payload (reserved:
    /// clients ignore it).
    XxReply = 4,
    /// Client: XX message 3 (`s, se`), payload: Login or Register.
    XxFinish = 5,
    /// Server, plaintext: "I could not decrypt your IK message; my static key
    /// is these 32 bytes". The client may send `IkInit` again, once.
    Retry = 6,
    /// Server, plaintext: one byte, an `ErrorCode`; the server then closes.
    /// Unauthenticated, so only advisory.
    Refuse = 7,
}

impl HandshakeKind {
    fn from_u8(b: u8) -> Option<Self> {
        use HandshakeKind::*;
        Some(match b {
            1 => IkInit,
            2 => IkReply,
            3 => XxInit,
            4 => XxReply,
            5 => XxFinish,
            6 => Retry,
            7 => Refuse,
            _ => return None,
        })
    }
}

/// The handshake payload of a client: what it asks for.
#[derive(Debug, Clone, PartialEq)]
pub enum Hello {
    /// Log in an existing device.
    Login(pb::Login),
    /// Create an account with this device.
    Register(pb::Register),
}

impl Hello {
    fn to_message(&self) -> Message {
        match self {
            Hello::Login(l) => l.clone().into(),
            Hello::Register(r) => r.clone().into(),
        }
    }

    fn decode(payload: Bytes) -> Result<Self, MessageError> {
        let mut msgs = decode_packet(payload)?;
        if msgs.len() != 1 {
            return Err(MessageError::Malformed("a handshake payload holds exactly one Login or Register".into()));
        }
        match msgs.pop() {
            Some(Message::Login(l)) => Ok(Hello::Login(l)),
            Some(Message::Register(r)) => Ok(Hello::Register(r)),
            Some(m) => Err(MessageError::WrongDirection { kind: m.kind(), sender: "client handshake" }),
            None => unreachable!("length checked above"),
        }
    }

    fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        encode_packet(&[self.to_message()], &mut v);
        v
    }
}

fn prologue() -> [u8; 4] {
    preamble(VERSION)
}

fn put_handshake_frame(kind: HandshakeKind, body: &[u8], out: &mut BytesMut) {
    let mut b = Vec::with_capacity(1 + body.len());
    b.push(kind as u8);
    b.extend_from_slice(body);
    frame::encode(&b, out);
}

/// Reads one handshake frame and splits off its kind byte.
fn next_handshake_frame(
    decoder: &FrameDecoder,
    input: &mut BytesMut,
) -> Result<Option<(HandshakeKind, Bytes)>, HandshakeError> {
    match decoder.decode(input)? {
        None => Ok(None),
        Some(Frame::Keepalive) => Err(crate::error::FrameError::EmptyHandshakeFrame.into()),
        Some(Frame::Data(mut body)) => {
            let kind_byte = body[0];
            let kind = HandshakeKind::from_u8(kind_byte).ok_or(HandshakeError::UnexpectedKind(kind_byte))?;
            let _ = bytes::Buf::get_u8(&mut body);
            Ok(Some((kind, body)))
        }
    }
}

/// Writes the Noise message for `payload` and frames it as `kind`.
fn write_message(
    hs: &mut snow::HandshakeState,
    kind: HandshakeKind,
    payload: &[u8],
    out: &mut BytesMut,
) -> Result<(), HandshakeError> {
    // Worst case overhead of one message in these patterns: e + s + two tags.
    let mut msg = vec![0u8; payload.len() + 2 * KEY_LEN + 2 * TAG_LEN];
    let n = hs.write_message(payload, &mut msg).map_err(HandshakeError::Config)?;
    put_handshake_frame(kind, &msg[..n], out);
    Ok(())
}

fn read_message(hs: &mut snow::HandshakeState, body: &[u8]) -> Result<Bytes, HandshakeError> {
    let mut payload = vec![0u8; body.len()];
    let n = hs.read_message(body, &mut payload).map_err(HandshakeError::Crypto)?;
    payload.truncate(n);
    Ok(Bytes::from(payload))
}

fn remote_static(hs: &snow::HandshakeState) -> Result<PublicKey, HandshakeError> {
    hs.get_remote_static().and_then(PublicKey::from_slice).ok_or(HandshakeError::Malformed("remote static key"))
}

/// Decodes what the server sent inside the handshake and checks each kind
/// is one a server may send.
fn server_messages(payload: Bytes) -> Result<Vec<Message>, HandshakeError> {
    let msgs = decode_packet(payload)?;
    if let Some(m) = msgs.iter().find(|m| !m.allowed_in_session_from(Role::Server)) {
        return Err(MessageError::WrongDirection { kind: m.kind(), sender: "server" }.into());
    }
    Ok(msgs)
}

// ------------------------------------------------------------------ client

/// Starts a client handshake.
#[derive(Debug)]
pub struct ClientHandshake;

impl ClientHandshake {
    /// Starts IK with a server key the device already has; `hello` rides in
    /// the first flight. Writes the preamble and `IkInit` to `out`.
    pub fn ik(
        local: &StaticKeypair,
        server: &PublicKey,
        hello: Hello,
        out: &mut BytesMut,
    ) -> Result<AwaitIkReply, HandshakeError> {
        out.extend_from_slice(&preamble(VERSION));
        AwaitIkReply::start(local.clone(), server, hello, 0, None, out)
    }

    /// Like [`ClientHandshake::ik`] with a fixed ephemeral key. Only for
    /// reproducing test vectors: a reused ephemeral key forfeits forward
    /// secrecy, so it exists only with the `testing` feature.
    #[cfg(feature = "testing")]
    pub fn ik_with_fixed_ephemeral(
        local: &StaticKeypair,
        server: &PublicKey,
        hello: Hello,
        ephemeral: &[u8; KEY_LEN],
        out: &mut BytesMut,
    ) -> Result<AwaitIkReply, HandshakeError> {
        out.extend_from_slice(&preamble(VERSION));
        AwaitIkReply::start(local.clone(), server, hello, 0, Some(ephemeral), out)
    }

    /// Starts XX for first contact. Writes the preamble and `XxInit`.
    pub fn xx(local: &StaticKeypair, out: &mut BytesMut) -> Result<AwaitXxReply, HandshakeError> {
        Self::xx_inner(local, None, out)
    }

    /// XX with a fixed ephemeral key, for test vectors only.
    #[cfg(feature = "testing")]
    pub fn xx_with_fixed_ephemeral(
        local: &StaticKeypair,
        ephemeral: &[u8; KEY_LEN],
        out: &mut BytesMut,
    ) -> Result<AwaitXxReply, HandshakeError> {
        Self::xx_inner(local, Some(ephemeral), out)
    }

    fn xx_inner(
        local: &StaticKeypair,
        ephemeral: Option<&[u8; KEY_LEN]>,
        out: &mut BytesMut,
    ) -> Result<AwaitXxReply, HandshakeError> {
        let p = prologue();
        let mut b = builder(Pattern::XX, local.private_bytes())?.prologue(&p).map_err(HandshakeError::Config)?;
        if let Some(e) = ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = b.build_initiator().map_err(HandshakeError::Config)?;
        out.extend_from_slice(&p);
        write_message(&mut hs, HandshakeKind::XxInit, &[], out)?;
        Ok(AwaitXxReply { hs: Box::new(hs), decoder: FrameDecoder::new(MAX_FRAME_LEN) })
    }
}

/// A client that sent `IkInit` and waits for the server.
pub struct AwaitIkReply {
    hs: Box<snow::HandshakeState>,
    local: StaticKeypair,
    server: PublicKey,
    hello: Hello,
    retries: u8,
    decoder: FrameDecoder,
}

/// What the server answered to `IkInit`.
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum IkStep {
    /// Not a whole frame yet; call `read` again with more bytes.
    NeedMore(AwaitIkReply),
    /// The session is up. `messages` is what the server put in its reply:
    /// the login result and the first queued deliveries.
    Established {
        /// The transport session.
        session: Session,
        /// The server's first packet, in order.
        messages: Vec<Message>,
    },
    /// The server could not use the key we had; it offers its current one.
    Retry(RetryOffer),
}

impl std::fmt::Debug for AwaitIkReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitIkReply").field("server", &self.server).finish_non_exhaustive()
    }
}

impl AwaitIkReply {
    fn start(
        local: StaticKeypair,
        server: &PublicKey,
        hello: Hello,
        retries: u8,
        ephemeral: Option<&[u8; KEY_LEN]>,
        out: &mut BytesMut,
    ) -> Result<Self, HandshakeError> {
        let p = prologue();
        let mut b = builder(Pattern::IK, local.private_bytes())?
            .remote_public_key(server.as_bytes())
            .and_then(|b| b.prologue(&p))
            .map_err(HandshakeError::Config)?;
        if let Some(e) = ephemeral {
            b = b.fixed_ephemeral_key_for_testing_only(e);
        }
        let mut hs = b.build_initiator().map_err(HandshakeError::Config)?;
        write_message(&mut hs, HandshakeKind::IkInit, &hello.encode(), out)?;
        Ok(Self { hs: Box::new(hs), local, server: *server, hello, retries, decoder: FrameDecoder::new(MAX_FRAME_LEN) })
    }

    /// Feeds bytes from the server.
    pub fn read(mut self, input: &mut BytesMut) -> Result<IkStep, HandshakeError> {
        let Some((kind, body)) = next_handshake_frame(&self.decoder, input)? else {
            return Ok(IkStep::NeedMore(self));
        };
        match kind {
            HandshakeKind::IkReply => {
                let payload = read_message(&mut self.hs, &body)?;
                let messages = server_messages(payload)?;
                let transport = self.hs.into_transport_mode().map_err(HandshakeError::Crypto)?;
                Ok(IkStep::Established { session: Session::new(transport, Role::Client, self.server), messages })
            }
            HandshakeKind::Retry => {
                if self.retries >= MAX_HANDSHAKE_RETRIES {
                    return Err(HandshakeError::TooManyRetries);
                }
                let key = PublicKey::from_slice(&body).ok_or(HandshakeError::Malformed("retry key"))?;
                Ok(IkStep::Retry(RetryOffer {
                    server_key: key,
                    local: self.local,
                    hello: self.hello,
                    retries: self.retries + 1,
                }))
            }
            HandshakeKind::Refuse => Err(HandshakeError::Refused(refuse_code(&body))),
            other => Err(HandshakeError::UnexpectedKind(other as u8)),
        }
    }
}

fn refuse_code(body: &[u8]) -> i32 {
    body.first().map_or(0, |&b| i32::from(b))
}

/// The server's offer to retry IK with its current static key.
///
/// The key arrives unauthenticated: it becomes trusted only by the IK
/// handshake that follows, exactly as a key learned through XX. A client
/// that pins server keys checks [`RetryOffer::server_key`] first and may
/// refuse.
#[derive(Debug)]
pub struct RetryOffer {
    server_key: PublicKey,
    local: StaticKeypair,
    hello: Hello,
    retries: u8,
}

impl RetryOffer {
    /// The key the server says it has now.
    pub fn server_key(&self) -> &PublicKey {
        &self.server_key
    }

    /// Sends `IkInit` again (no preamble) with the offered key.
    pub fn retry(self, out: &mut BytesMut) -> Result<AwaitIkReply, HandshakeError> {
        AwaitIkReply::start(self.local, &self.server_key, self.hello, self.retries, None, out)
    }

    /// [`RetryOffer::retry`] with a fixed ephemeral key, for test vectors.
    #[cfg(feature = "testing")]
    pub fn retry_with_fixed_ephemeral(
        self,
        ephemeral: &[u8; KEY_LEN],
        out: &mut BytesMut,
    ) -> Result<AwaitIkReply, HandshakeError> {
        AwaitIkReply::start(self.local, &self.server_key, self.hello, self.retries, Some(ephemeral), out)
    }
}

/// A client that sent `XxInit` and waits for `XxReply`.
pub struct AwaitXxReply {
    hs: Box<snow::HandshakeState>,
    decoder: FrameDecoder,
}

impl std::fmt::Debug for AwaitXxReply {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AwaitXxReply").finish_non_exhaustive()
    }
}

/// What the server answered to `XxInit`.
#[derive(Debug)]
pub enum XxStep {
    /// Not a whole frame yet.
    NeedMore(AwaitXxReply),
    /// The server proved its static key; check it, then finish.
    ServerKnown(XxServerKnown),
}

impl AwaitXxReply {
    /// Feeds bytes from the server.
    pub fn read(mut self, input: &mut BytesMut) -> Result<XxStep, HandshakeError> {
        let Some((kind, body)) = next_handshake_frame(&self.decoder, input)? else {
            return Ok(XxStep::NeedMore(self));
        };
        match kind {
            HandshakeKind::XxReply => {
                // The payload is reserved (SPEC.md 3.1): a server sends it
                // empty, and a client ignores whatever a later revision may
                // put there. It is still authenticated by read_message.
                let _reserved = read_message(&mut self.hs, &body)?;
                let server_key = remote_static(&self.hs)?;
                Ok(XxStep::ServerKnown(XxServerKnown { hs: self.hs, server_key }))
            }
            HandshakeKind::Refuse => Err(HandshakeError::Refused(refuse_code(&body))),
            other => Err(HandshakeError::UnexpectedKind(other as u8)),
        }
    }
}

/// XX after message 2: the server's static key is known and proven.
pub struct XxServerKnown {
    hs: Box<snow::HandshakeState>,
    server_key: PublicKey,
}

impl std::fmt::Debug for XxServerKnown {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("XxServerKnown").field("server_key", &self.server_key).finish_non_exhaustive()
    }
}

impl XxServerKnown {
    /// The server's static key: pin it, or compare it with a pinned one
    /// before calling [`XxServerKnown::finish`].
    pub fn server_key(&self) -> &PublicKey {
        &self.server_key
    }

    /// Sends `XxFinish` with `hello` and returns the session. The server's
    /// answer to `hello` arrives as the session's first frame.
    pub fn finish(mut self, hello: Hello, out: &mut BytesMut) -> Result<Session, HandshakeError> {
        write_message(&mut self.hs, HandshakeKind::XxFinish, &hello.encode(), out)?;
        let transport = self.hs.into_transport_mode().map_err(HandshakeError::Crypto)?;
        Ok(Session::new(transport, Role::Client, self.server_key))
    }
}

// ------------------------------------------------------------------ server

/// The server's static keys: the current one and any retired ones that
/// returning devices may still have cached.
#[derive(Debug, Clone)]
pub struct ServerKeys {
    current: StaticKeypair,
    retired: Vec<StaticKeypair>,
}

impl ServerKeys {
    /// Keys with no retired ones.
    pub fn new(current: StaticKeypair) -> Self {
        Self { current, retired: Vec::new() }
    }

    /// Adds keys that IK may still be attempted with. A device using one
    /// is logged in and told the current key inside the session.
    pub fn with_retired(mut self, retired: Vec<StaticKeypair>) -> Self {
        self.retired = retired;
        self
    }

    /// The current key.
    pub fn current(&self) -> &StaticKeypair {
        &self.current
    }
}

enum ServerState {
    Preamble,
    AwaitInit,
    AwaitXxFinish(Box<snow::HandshakeState>),
}

/// The server's side of one connection's handshake.
pub struct ServerHandshake {
    keys: Arc<ServerKeys>,
    state: ServerState,
    retries: u8,
    deadline: Instant,
    decoder: FrameDecoder,
    #[cfg(feature = "testing")]
    ephemeral: Option<[u8; KEY_LEN]>,
}

impl std::fmt::Debug for ServerHandshake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerHandshake").field("deadline", &self.deadline).finish_non_exhaustive()
    }
}

/// What a server handshake did with the bytes it was given.
#[derive(Debug)]
pub enum ServerStep {
    /// Waiting for more bytes (anything to send is already in `out`).
    NeedMore(ServerHandshake),
    /// The client is authenticated; answer its hello. Boxed: it holds a
    /// whole session, and connections wait in `NeedMore` far more often.
    Accepted(Box<Accepted>),
}

impl ServerHandshake {
    /// A handshake for a connection accepted at `now`, which must finish
    /// within `timeout`.
    pub fn new(keys: Arc<ServerKeys>, now: Instant, timeout: Duration) -> Self {
        Self {
            keys,
            state: ServerState::Preamble,
            retries: 0,
            deadline: now + timeout,
            decoder: FrameDecoder::new(MAX_CLIENT_HANDSHAKE_FRAME_LEN),
            #[cfg(feature = "testing")]
            ephemeral: None,
        }
    }

    /// The fixed ephemeral key a test vector asked for, if any.
    fn fixed_ephemeral(&self) -> Option<[u8; KEY_LEN]> {
        #[cfg(feature = "testing")]
        return self.ephemeral;
        #[cfg(not(feature = "testing"))]
        None
    }

    /// Uses a fixed ephemeral key, for test vectors only.
    #[cfg(feature = "testing")]
    pub fn with_fixed_ephemeral(mut self, ephemeral: [u8; KEY_LEN]) -> Self {
        self.ephemeral = Some(ephemeral);
        self
    }

    /// When the handshake times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Feeds bytes from the client; anything to send back is appended to
    /// `out` (also on some errors: a `Refuse` frame the driver should send
    /// before closing).
    pub fn read(
        mut self,
        input: &mut BytesMut,
        now: Instant,
        out: &mut BytesMut,
    ) -> Result<ServerStep, HandshakeError> {
        if now >= self.deadline {
            return Err(HandshakeError::Timeout);
        }
        loop {
            match std::mem::replace(&mut self.state, ServerState::Preamble) {
                ServerState::Preamble => match read_preamble(input)? {
                    None => {
                        self.state = ServerState::Preamble;
                        return Ok(ServerStep::NeedMore(self));
                    }
                    Some(v) if v != VERSION => {
                        refuse(pb::ErrorCode::UnsupportedVersion, out);
                        return Err(HandshakeError::UnsupportedVersion(v));
                    }
                    Some(_) => self.state = ServerState::AwaitInit,
                },
                ServerState::AwaitInit => {
                    let Some((kind, body)) = next_handshake_frame(&self.decoder, input)? else {
                        self.state = ServerState::AwaitInit;
                        return Ok(ServerStep::NeedMore(self));
                    };
                    match kind {
                        HandshakeKind::IkInit => match self.read_ik(&body)? {
                            Some(accepted) => return Ok(ServerStep::Accepted(Box::new(accepted))),
                            None => {
                                put_handshake_frame(HandshakeKind::Retry, self.keys.current.public().as_bytes(), out);
                                self.state = ServerState::AwaitInit;
                            }
                        },
                        HandshakeKind::XxInit => {
                            let p = prologue();
                            let mut b = builder(Pattern::XX, self.keys.current.private_bytes())?
                                .prologue(&p)
                                .map_err(HandshakeError::Config)?;
                            let fixed = self.fixed_ephemeral();
                            if let Some(e) = &fixed {
                                b = b.fixed_ephemeral_key_for_testing_only(e);
                            }
                            let mut hs = b.build_responder().map_err(HandshakeError::Config)?;
                            let payload = read_message(&mut hs, &body)?;
                            if !payload.is_empty() {
                                // Anything here would be unauthenticated plaintext.
                                return Err(HandshakeError::Malformed("XX message 1 carries a payload"));
                            }
                            write_message(&mut hs, HandshakeKind::XxReply, &[], out)?;
                            self.state = ServerState::AwaitXxFinish(Box::new(hs));
                        }
                        other => return Err(HandshakeError::UnexpectedKind(other as u8)),
                    }
                }
                ServerState::AwaitXxFinish(mut hs) => {
                    let Some((kind, body)) = next_handshake_frame(&self.decoder, input)? else {
                        self.state = ServerState::AwaitXxFinish(hs);
                        return Ok(ServerStep::NeedMore(self));
                    };
                    if kind != HandshakeKind::XxFinish {
                        return Err(HandshakeError::UnexpectedKind(kind as u8));
                    }
                    let payload = read_message(&mut hs, &body)?;
                    let client_key = remote_static(&hs)?;
                    let hello = Hello::decode(payload)?;
                    let transport = hs.into_transport_mode().map_err(HandshakeError::Crypto)?;
                    return Ok(ServerStep::Accepted(Box::new(Accepted {
                        client_key,
                        hello,
                        pattern: Pattern::XX,
                        retired_key: false,
                        responder: Responder::Xx(Session::new(transport, Role::Server, client_key)),
                    })));
                }
            }
        }
    }

    /// Tries the current key, then each retired one. `Ok(None)`: no key
    /// decrypts, and a retry is allowed.
    fn read_ik(&mut self, body: &[u8]) -> Result<Option<Accepted>, HandshakeError> {
        let p = prologue();
        let keys = std::iter::once(&self.keys.current).chain(self.keys.retired.iter());
        let mut last = None;
        for (i, key) in keys.enumerate() {
            let mut b = builder(Pattern::IK, key.private_bytes())?.prologue(&p).map_err(HandshakeError::Config)?;
            let fixed = self.fixed_ephemeral();
            if let Some(e) = &fixed {
                b = b.fixed_ephemeral_key_for_testing_only(e);
            }
            let mut hs = b.build_responder().map_err(HandshakeError::Config)?;
            match read_message(&mut hs, body) {
                Ok(payload) => {
                    let client_key = remote_static(&hs)?;
                    let hello = Hello::decode(payload)?;
                    return Ok(Some(Accepted {
                        client_key,
                        hello,
                        pattern: Pattern::IK,
                        retired_key: i > 0,
                        responder: Responder::Ik(Box::new(hs)),
                    }));
                }
                Err(e) => last = Some(e),
            }
        }
        if self.retries >= MAX_HANDSHAKE_RETRIES {
            return Err(last.unwrap_or(HandshakeError::TooManyRetries));
        }
        self.retries += 1;
        Ok(None)
    }
}

/// Appends a plaintext `Refuse` frame carrying `code`.
pub fn refuse(code: pb::ErrorCode, out: &mut BytesMut) {
    put_handshake_frame(HandshakeKind::Refuse, &[code as i32 as u8], out);
}

enum Responder {
    Ik(Box<snow::HandshakeState>),
    Xx(Session),
}

/// An authenticated client waiting for the server's answer.
pub struct Accepted {
    /// The device's static key: its identity.
    pub client_key: PublicKey,
    /// What it asked for.
    pub hello: Hello,
    /// How it authenticated.
    pub pattern: Pattern,
    /// True when IK used a retired server key: tell the device the current
    /// one (`LoginOk.new_server_key`).
    pub retired_key: bool,
    responder: Responder,
}

impl std::fmt::Debug for Accepted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Accepted")
            .field("client_key", &self.client_key)
            .field("pattern", &self.pattern)
            .field("hello", &self.hello)
            .finish_non_exhaustive()
    }
}

/// The most packet plaintext an `IkReply` carries: a frame less the kind
/// byte, the ephemeral key and the tag.
pub const IK_REPLY_MAX_PACKET: usize = MAX_FRAME_LEN - 1 - KEY_LEN - TAG_LEN;

impl Accepted {
    /// Answers the hello with `reply` (a login result, queued deliveries)
    /// and returns the session.
    ///
    /// With IK the leading messages that fit ride inside `IkReply`, so the
    /// device has them one round trip after connecting; the rest follow as
    /// transport frames in the same write. With XX all of them are
    /// transport frames.
    pub fn finish(self, reply: &[Message], out: &mut BytesMut) -> Result<Session, crate::Error> {
        match self.responder {
            Responder::Ik(mut hs) => {
                let mut fit = 0;
                let mut len = 0;
                for m in reply {
                    let l = m.encoded_len();
                    if len + l > IK_REPLY_MAX_PACKET {
                        break;
                    }
                    len += l;
                    fit += 1;
                }
                let mut payload = Vec::with_capacity(packet_len(&reply[..fit]));
                encode_packet(&reply[..fit], &mut payload);
                write_message(&mut hs, HandshakeKind::IkReply, &payload, out)?;
                let transport = hs.into_transport_mode().map_err(HandshakeError::Crypto)?;
                let mut session = Session::new(transport, Role::Server, self.client_key);
                session.seal(&reply[fit..], out)?;
                Ok(session)
            }
            Responder::Xx(mut session) => {
                session.seal(reply, out)?;
                Ok(session)
            }
        }
    }
}

/// Whether a message may appear in a client's handshake payload.
pub fn is_hello(m: &Message) -> bool {
    m.origin() == Origin::ClientHello
}
