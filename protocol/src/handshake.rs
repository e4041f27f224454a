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

mod client;
mod server;

pub use client::*;
pub use server::*;

/// Whether a message may appear in a client's handshake payload.
pub fn is_hello(m: &Message) -> bool {
    m.origin() == Origin::ClientHello
}
