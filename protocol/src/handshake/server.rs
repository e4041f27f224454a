//! The server's side: the responder for IK and XX, the stale-key
//! `Retry`, and the accepted handshake that seals the first reply.

use super::*;
use crate::noise::builder_ready;
use crate::resolver::ReadyKey;

/// The server's static keys: the current one and any retired ones that
/// returning devices may still have cached. Each is loaded into X25519
/// once, here, not by every handshake.
#[derive(Debug, Clone)]
pub struct ServerKeys {
    current: StaticKeypair,
    /// The current key, then the retired ones, loaded.
    ready: Vec<ReadyKey>,
}

impl ServerKeys {
    /// Keys with no retired ones.
    pub fn new(current: StaticKeypair) -> Self {
        let ready = vec![ReadyKey::new(current.private_bytes())];
        Self { current, ready }
    }

    /// Adds keys that IK may still be attempted with. A device using one
    /// is logged in and told the current key inside the session.
    pub fn with_retired(mut self, retired: Vec<StaticKeypair>) -> Self {
        self.ready.truncate(1);
        self.ready.extend(retired.iter().map(|k| ReadyKey::new(k.private_bytes())));
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
                            let mut b = builder_ready(Pattern::XX, &self.keys.ready[0])?
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
        let mut last = None;
        for (i, key) in self.keys.ready.iter().enumerate() {
            let mut b = builder_ready(Pattern::IK, key)?.prologue(&p).map_err(HandshakeError::Config)?;
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
