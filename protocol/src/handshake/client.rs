//! The client's side: IK with a known server key, XX on first contact,
//! and the retry with the current key when the cached one is stale.

use super::*;

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
