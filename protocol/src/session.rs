//! An established session: encrypted transport frames in both directions.
//!
//! A [`Session`] exists only once a handshake has completed (the handshake
//! types in [`crate::handshake`] hand it out), so nothing can send
//! application data before the peer is authenticated.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{Error, MessageError};
use crate::frame::{Frame, FrameDecoder, KEEPALIVE, LEN_PREFIX};
use crate::keys::PublicKey;
use crate::limits::{MAX_FRAME_LEN, MAX_MESSAGES_PER_PACKET, MAX_PACKET_LEN, TAG_LEN};
use crate::message::{decode_packet, Message};
pub use crate::role::Role;

/// What one incoming frame carried.
#[derive(Debug, Clone, PartialEq)]
pub enum Incoming {
    /// A zero-length keepalive frame. A server answers it with
    /// [`Session::write_keepalive`]; a client takes it as the pong.
    Keepalive,
    /// The messages of one encrypted frame, in the order they were written.
    Messages(Vec<Message>),
}

/// The transport phase of a connection.
pub struct Session {
    transport: snow::TransportState,
    role: Role,
    remote: PublicKey,
    decoder: FrameDecoder,
}

impl std::fmt::Debug for Session {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Session").field("role", &self.role).field("remote", &self.remote).finish_non_exhaustive()
    }
}

impl Session {
    pub(crate) fn new(transport: snow::TransportState, role: Role, remote: PublicKey) -> Self {
        Self { transport, role, remote, decoder: FrameDecoder::new(MAX_FRAME_LEN) }
    }

    /// This side's role.
    pub fn role(&self) -> Role {
        self.role
    }

    /// The peer's static public key, as authenticated by the handshake: for
    /// a server, the device's identity.
    pub fn remote_key(&self) -> &PublicKey {
        &self.remote
    }

    /// Encrypts `messages` into as few frames as fit and appends them to
    /// `out`. Messages are packed in order; each frame holds as many as fit
    /// in [`MAX_PACKET_LEN`] bytes of plaintext.
    ///
    /// Returns the number of frames written. A message that alone exceeds a
    /// frame is an error, and nothing is written for it or after it.
    pub fn seal(&mut self, messages: &[Message], out: &mut BytesMut) -> Result<usize, Error> {
        let mut frames = 0;
        let mut rest = messages;
        while !rest.is_empty() {
            let mut len = 0;
            let mut n = 0;
            for m in rest {
                let l = m.encoded_len();
                // A packet of more messages is malformed (SPEC.md 4): a
                // backlog of small sends would close the connection.
                if len + l > MAX_PACKET_LEN || n == MAX_MESSAGES_PER_PACKET {
                    break;
                }
                len += l;
                n += 1;
            }
            if n == 0 {
                return Err(MessageError::TooLarge { len: rest[0].encoded_len() }.into());
            }
            let mut plain = Vec::with_capacity(len);
            crate::message::encode_packet(&rest[..n], &mut plain);
            self.seal_plaintext(&plain, out);
            frames += 1;
            rest = &rest[n..];
        }
        Ok(frames)
    }

    /// Encrypts arbitrary bytes as one frame, whether or not they are a
    /// valid packet: for conformance checkers and tests that must send what
    /// a correct peer never would. Longer than [`MAX_PACKET_LEN`] is an
    /// error and writes nothing.
    pub fn seal_raw(&mut self, plain: &[u8], out: &mut BytesMut) -> Result<(), Error> {
        if plain.len() > MAX_PACKET_LEN {
            return Err(MessageError::TooLarge { len: plain.len() }.into());
        }
        self.seal_plaintext(plain, out);
        Ok(())
    }

    /// Encrypts one packet's plaintext (at most [`MAX_PACKET_LEN`] bytes)
    /// as one frame.
    pub(crate) fn seal_plaintext(&mut self, plain: &[u8], out: &mut BytesMut) {
        debug_assert!(plain.len() <= MAX_PACKET_LEN);
        let body = plain.len() + TAG_LEN;
        let start = out.len();
        out.reserve(LEN_PREFIX + body);
        out.put_u16(body as u16);
        out.resize(start + LEN_PREFIX + body, 0);
        let written = self
            .transport
            .write_message(plain, &mut out[start + LEN_PREFIX..])
            .expect("a packet within MAX_PACKET_LEN always encrypts");
        debug_assert_eq!(written, body);
    }

    /// Appends a keepalive frame (two bytes).
    pub fn write_keepalive(&self, out: &mut BytesMut) {
        out.extend_from_slice(&KEEPALIVE);
    }

    /// Takes the next frame off `input`, decrypts and decodes it.
    ///
    /// `Ok(None)`: more bytes are needed. Any error means the connection
    /// must close: the stream can no longer be trusted or resynchronised.
    pub fn open(&mut self, input: &mut BytesMut) -> Result<Option<Incoming>, Error> {
        match self.decoder.decode(input)? {
            None => Ok(None),
            Some(Frame::Keepalive) => Ok(Some(Incoming::Keepalive)),
            Some(Frame::Data(body)) => self.open_body(&body).map(Some),
        }
    }

    fn open_body(&mut self, body: &[u8]) -> Result<Incoming, Error> {
        if body.len() < TAG_LEN {
            return Err(Error::Decrypt);
        }
        let mut plain = vec![0u8; body.len() - TAG_LEN];
        let n = self.transport.read_message(body, &mut plain).map_err(|_| Error::Decrypt)?;
        plain.truncate(n);
        let messages = decode_packet(Bytes::from(plain))?;
        let sender = self.role.peer();
        if let Some(bad) = messages.iter().find(|m| !m.allowed_in_session_from(sender)) {
            return Err(MessageError::WrongDirection { kind: bad.kind(), sender: sender.name() }.into());
        }
        Ok(Incoming::Messages(messages))
    }
}
