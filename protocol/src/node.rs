//! Node links: how two nodes of a cluster talk, sans-IO (SPEC.md 14).
//!
//! A link is one TCP connection, opened by either node to the other's
//! link address. It starts with the preamble `b"pnl"` and the version,
//! then one Noise KK handshake: both nodes know each other's static key
//! from the node list, so the dialer proves it holds its key and the
//! acceptor proves it holds its own in one round trip, and neither key
//! can be a stranger's. The dialer's first frame names its public key in
//! plaintext so that the acceptor can pick it (or refuse it, before any
//! cryptography) from the node list; the Noise message that follows only
//! decrypts if the dialer holds the matching private key.
//!
//! After the handshake both directions carry frames as the device
//! protocol does (2-byte length, Noise transport, a zero-length keepalive);
//! each encrypted frame holds one `NodePacket` (`node.proto`). Noise's
//! nonces make every frame valid once, in order: a forged, replayed,
//! reordered or dropped frame fails to decrypt and the link must close.
//!
//! Nothing here reads a clock or a socket: the driver (`net/` in the
//! server) bounds handshake time, reconnects and keeps the link alive.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use prost::Message as _;

use crate::frame::{Frame, FrameDecoder, KEEPALIVE, LEN_PREFIX};
use crate::keys::{PublicKey, StaticKeypair};
use crate::limits::{KEY_LEN, MAX_FRAME_LEN, MAX_PACKET_LEN, TAG_LEN};
use crate::noise::{builder, Pattern};

/// The node-link messages, generated from `node.proto`.
#[allow(missing_docs, clippy::all)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pipit.node.v1.rs"));
}

/// The first three bytes of every node link (devices use `b"pip"`).
pub const MAGIC: [u8; 3] = *b"pnl";

/// The node-link protocol version, in the preamble and the prologue.
pub const VERSION: u8 = 1;

/// The dialer's handshake frame: kind, its static public key, Noise KK
/// message 1 (`e, es, ss`) with a `NodeHello`.
pub const KIND_INIT: u8 = 0x11;

/// The acceptor's handshake frame: kind, Noise KK message 2 (`e, ee, se`)
/// with a `NodeHello`.
pub const KIND_REPLY: u8 = 0x12;

/// Longest handshake frame body: a hello is small, so anything longer is
/// refused from its length prefix alone.
pub const MAX_HANDSHAKE_FRAME_LEN: usize = 512;

/// Longest node id in a hello (the server's config allows 64).
pub const MAX_NODE_ID_LEN: usize = 64;

/// Requests in flight a node accepts on a link when its hello names none.
pub const DEFAULT_MAX_IN_FLIGHT: u32 = 256;

/// Noise KK message 1 without payload: `e` (32) and the payload's tag.
const INIT_NOISE_MIN: usize = KEY_LEN + TAG_LEN;

/// Why a node link failed. Every variant ends the link.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LinkError {
    /// The bytes are not a node link (wrong magic).
    #[error("not a pipit node link")]
    BadPreamble,
    /// The peer speaks a node-link version this one does not.
    #[error("unsupported node-link version {0}")]
    UnsupportedVersion(u8),
    /// A frame longer than allowed, or a handshake frame of the wrong kind
    /// or size.
    #[error("malformed node-link frame: {0}")]
    Malformed(&'static str),
    /// Noise rejected a handshake message: not the key it claims, a stale
    /// key, or tampering.
    #[error("node-link handshake rejected: {0}")]
    Handshake(snow::Error),
    /// A transport frame did not decrypt: forged, replayed, reordered or
    /// cut.
    #[error("node-link frame failed to decrypt (forged or replayed)")]
    Decrypt,
    /// A hello or packet did not decode or broke a limit.
    #[error("bad node-link message: {0}")]
    Decode(String),
    /// A packet too large for one frame; nothing was written.
    #[error("node packet of {0} bytes exceeds one frame")]
    TooLarge(usize),
    /// Local misconfiguration (a key of the wrong size, a failed RNG).
    #[error("node-link misconfigured: {0}")]
    Config(snow::Error),
}

impl From<crate::error::FrameError> for LinkError {
    fn from(e: crate::error::FrameError) -> Self {
        match e {
            crate::error::FrameError::BadPreamble => LinkError::BadPreamble,
            _ => LinkError::Malformed("frame too long"),
        }
    }
}

fn preamble() -> [u8; 4] {
    [MAGIC[0], MAGIC[1], MAGIC[2], VERSION]
}

/// Checks a hello's fields against the limits.
fn check_hello(h: &pb::NodeHello) -> Result<(), LinkError> {
    if h.node_id.is_empty() || h.node_id.len() > MAX_NODE_ID_LEN {
        return Err(LinkError::Decode(format!("node id of {} bytes", h.node_id.len())));
    }
    Ok(())
}

fn decode_hello(b: &[u8]) -> Result<pb::NodeHello, LinkError> {
    let h = pb::NodeHello::decode(b).map_err(|e| LinkError::Decode(e.to_string()))?;
    check_hello(&h)?;
    Ok(h)
}

/// Decodes one node packet's plaintext.
pub fn decode_packet(plain: Bytes) -> Result<pb::NodePacket, LinkError> {
    pb::NodePacket::decode(plain).map_err(|e| LinkError::Decode(e.to_string()))
}

fn write_frame(kind: u8, parts: &[&[u8]], out: &mut BytesMut) {
    let len = 1 + parts.iter().map(|p| p.len()).sum::<usize>();
    debug_assert!(len <= MAX_HANDSHAKE_FRAME_LEN);
    out.put_u16(len as u16);
    out.put_u8(kind);
    for p in parts {
        out.put_slice(p);
    }
}

/// The dialing side of a link, waiting for the acceptor's reply.
pub struct LinkDialer {
    // Boxed: a handshake state is large and a dialer moves through
    // `DialStep` by value.
    hs: Box<snow::HandshakeState>,
    remote: PublicKey,
}

impl std::fmt::Debug for LinkDialer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkDialer").field("remote", &self.remote).finish_non_exhaustive()
    }
}

/// What a dialer's read produced.
#[derive(Debug)]
pub enum DialStep {
    /// More bytes are needed.
    NeedMore(LinkDialer),
    /// The link is up: the acceptor's hello and the session.
    Established(pb::NodeHello, LinkSession),
}

impl LinkDialer {
    /// Starts a link from `local` to the node whose key is `remote`:
    /// appends the preamble and the first handshake frame to `out`.
    pub fn dial(
        local: &StaticKeypair,
        remote: &PublicKey,
        hello: &pb::NodeHello,
        out: &mut BytesMut,
    ) -> Result<Self, LinkError> {
        check_hello(hello)?;
        let p = preamble();
        let mut hs = builder(Pattern::KK, local.private_bytes())
            .and_then(|b| b.remote_public_key(remote.as_bytes()).map_err(crate::error::HandshakeError::Config))
            .and_then(|b| b.prologue(&p).map_err(crate::error::HandshakeError::Config))
            .map_err(|_| LinkError::Malformed("local key"))?
            .build_initiator()
            .map_err(LinkError::Config)?;
        let payload = hello.encode_to_vec();
        let mut msg = vec![0u8; INIT_NOISE_MIN + payload.len()];
        let n = hs.write_message(&payload, &mut msg).map_err(LinkError::Config)?;
        msg.truncate(n);
        out.put_slice(&p);
        write_frame(KIND_INIT, &[local.public().as_bytes(), &msg], out);
        Ok(Self { hs: Box::new(hs), remote: *remote })
    }

    /// Reads the acceptor's reply from `input`.
    pub fn read(mut self, input: &mut BytesMut) -> Result<DialStep, LinkError> {
        let Some(frame) = FrameDecoder::new(MAX_HANDSHAKE_FRAME_LEN).decode(input)? else {
            return Ok(DialStep::NeedMore(self));
        };
        let Frame::Data(body) = frame else {
            return Err(LinkError::Malformed("keepalive during the handshake"));
        };
        if body[0] != KIND_REPLY {
            return Err(LinkError::Malformed("not a handshake reply"));
        }
        let mut payload = vec![0u8; body.len()];
        let n = self.hs.read_message(&body[1..], &mut payload).map_err(LinkError::Handshake)?;
        let hello = decode_hello(&payload[..n])?;
        let transport = self.hs.into_transport_mode().map_err(LinkError::Handshake)?;
        Ok(DialStep::Established(hello, LinkSession::new(transport, self.remote)))
    }
}

/// The accepting side of a link, before it has the dialer's first frame.
#[derive(Debug, Default)]
pub struct LinkAcceptor {
    preamble_read: bool,
}

/// A dialer's first frame, read but not yet trusted: the caller checks
/// the key it claims against the node list, then accepts or drops it.
#[derive(Debug)]
pub struct LinkOffer {
    claimed: PublicKey,
    noise: Bytes,
}

impl LinkAcceptor {
    /// A link that has just been accepted.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads the preamble and the dialer's first frame. `Ok(None)`: more
    /// bytes are needed.
    pub fn read(&mut self, input: &mut BytesMut) -> Result<Option<LinkOffer>, LinkError> {
        if !self.preamble_read {
            let have = input.len().min(MAGIC.len());
            if input[..have] != MAGIC[..have] {
                return Err(LinkError::BadPreamble);
            }
            if input.len() < MAGIC.len() + 1 {
                return Ok(None);
            }
            let version = input[MAGIC.len()];
            if version != VERSION {
                return Err(LinkError::UnsupportedVersion(version));
            }
            input.advance(MAGIC.len() + 1);
            self.preamble_read = true;
        }
        let Some(frame) = FrameDecoder::new(MAX_HANDSHAKE_FRAME_LEN).decode(input)? else {
            return Ok(None);
        };
        let Frame::Data(body) = frame else {
            return Err(LinkError::Malformed("keepalive during the handshake"));
        };
        if body[0] != KIND_INIT {
            return Err(LinkError::Malformed("not a handshake init"));
        }
        if body.len() < 1 + KEY_LEN + INIT_NOISE_MIN {
            return Err(LinkError::Malformed("handshake init too short"));
        }
        let claimed = PublicKey::from_slice(&body[1..1 + KEY_LEN]).ok_or(LinkError::Malformed("key"))?;
        Ok(Some(LinkOffer { claimed, noise: body.slice(1 + KEY_LEN..) }))
    }
}

impl LinkOffer {
    /// The key the dialer says it holds (not yet proven).
    pub fn claimed_key(&self) -> &PublicKey {
        &self.claimed
    }

    /// Completes the handshake as `local`, for a dialer whose claimed key
    /// the caller found in the node list: fails unless the dialer holds
    /// that key's private half and dialed `local`'s public key. Appends
    /// the reply (with `hello`) to `out`.
    pub fn accept(
        self,
        local: &StaticKeypair,
        hello: &pb::NodeHello,
        out: &mut BytesMut,
    ) -> Result<(pb::NodeHello, LinkSession), LinkError> {
        check_hello(hello)?;
        let p = preamble();
        let mut hs = builder(Pattern::KK, local.private_bytes())
            .and_then(|b| b.remote_public_key(self.claimed.as_bytes()).map_err(crate::error::HandshakeError::Config))
            .and_then(|b| b.prologue(&p).map_err(crate::error::HandshakeError::Config))
            .map_err(|_| LinkError::Malformed("local key"))?
            .build_responder()
            .map_err(LinkError::Config)?;
        let mut payload = vec![0u8; self.noise.len()];
        let n = hs.read_message(&self.noise, &mut payload).map_err(LinkError::Handshake)?;
        let theirs = decode_hello(&payload[..n])?;
        let mine = hello.encode_to_vec();
        let mut msg = vec![0u8; KEY_LEN + TAG_LEN + mine.len()];
        let n = hs.write_message(&mine, &mut msg).map_err(LinkError::Config)?;
        msg.truncate(n);
        write_frame(KIND_REPLY, &[&msg], out);
        let transport = hs.into_transport_mode().map_err(LinkError::Handshake)?;
        Ok((theirs, LinkSession::new(transport, self.claimed)))
    }
}

/// What one incoming link frame carried.
#[derive(Debug, Clone, PartialEq)]
pub enum LinkIncoming {
    /// A keepalive (two bytes); a node sends its own on its interval and
    /// never answers one.
    Keepalive,
    /// One packet.
    Packet(pb::NodePacket),
}

/// An established link: encrypted packets both ways.
pub struct LinkSession {
    transport: snow::TransportState,
    remote: PublicKey,
    decoder: FrameDecoder,
}

impl std::fmt::Debug for LinkSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSession").field("remote", &self.remote).finish_non_exhaustive()
    }
}

impl LinkSession {
    fn new(transport: snow::TransportState, remote: PublicKey) -> Self {
        Self { transport, remote, decoder: FrameDecoder::new(MAX_FRAME_LEN) }
    }

    /// The other node's key, as the handshake proved it.
    pub fn remote_key(&self) -> &PublicKey {
        &self.remote
    }

    /// Encrypts `packet` as one frame appended to `out`; a packet larger
    /// than a frame is an error and writes nothing.
    pub fn seal(&mut self, packet: &pb::NodePacket, out: &mut BytesMut) -> Result<(), LinkError> {
        let len = packet.encoded_len();
        if len > MAX_PACKET_LEN {
            return Err(LinkError::TooLarge(len));
        }
        let plain = packet.encode_to_vec();
        let body = len + TAG_LEN;
        let start = out.len();
        out.reserve(LEN_PREFIX + body);
        out.put_u16(body as u16);
        out.resize(start + LEN_PREFIX + body, 0);
        let n = self
            .transport
            .write_message(&plain, &mut out[start + LEN_PREFIX..])
            .expect("a packet within MAX_PACKET_LEN always encrypts");
        debug_assert_eq!(n, body);
        Ok(())
    }

    /// Appends a keepalive frame.
    pub fn write_keepalive(&self, out: &mut BytesMut) {
        out.extend_from_slice(&KEEPALIVE);
    }

    /// Takes the next frame off `input`. `Ok(None)`: more bytes are
    /// needed. Any error ends the link.
    pub fn open(&mut self, input: &mut BytesMut) -> Result<Option<LinkIncoming>, LinkError> {
        match self.decoder.decode(input)? {
            None => Ok(None),
            Some(Frame::Keepalive) => Ok(Some(LinkIncoming::Keepalive)),
            Some(Frame::Data(body)) => {
                if body.len() < TAG_LEN {
                    return Err(LinkError::Decrypt);
                }
                let mut plain = vec![0u8; body.len() - TAG_LEN];
                let n = self.transport.read_message(&body, &mut plain).map_err(|_| LinkError::Decrypt)?;
                plain.truncate(n);
                decode_packet(Bytes::from(plain)).map(|p| Some(LinkIncoming::Packet(p)))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(id: &str) -> pb::NodeHello {
        pb::NodeHello { node_id: id.into(), epoch: 7, max_in_flight: 0 }
    }

    /// Dials from `a` to `b`, believing `b`'s key is `b_key`.
    fn link(a: &StaticKeypair, b: &StaticKeypair, b_key: &PublicKey) -> Result<(LinkSession, LinkSession), LinkError> {
        let mut wire = BytesMut::new();
        let dialer = LinkDialer::dial(a, b_key, &hello("a"), &mut wire)?;
        // Byte by byte: partial input is never an error.
        let mut acc = LinkAcceptor::new();
        let mut input = BytesMut::new();
        let mut offer = None;
        for byte in wire.split().iter() {
            input.put_u8(*byte);
            if let Some(o) = acc.read(&mut input)? {
                offer = Some(o);
            }
        }
        let offer = offer.expect("a whole init");
        assert_eq!(offer.claimed_key(), a.public());
        let (theirs, b_side) = offer.accept(b, &hello("b"), &mut wire)?;
        assert_eq!(theirs.node_id, "a");
        let DialStep::Established(h, a_side) = dialer.read(&mut wire)? else { panic!("need more") };
        assert_eq!((h.node_id.as_str(), h.epoch), ("b", 7));
        Ok((a_side, b_side))
    }

    fn ping(id: u64) -> pb::NodePacket {
        pb::NodePacket { ping: vec![pb::LinkPing { id }], ..Default::default() }
    }

    #[test]
    fn two_known_keys_link_up_and_exchange_packets_both_ways() {
        let (a, b) = (StaticKeypair::generate(), StaticKeypair::generate());
        let (mut a_side, mut b_side) = link(&a, &b, b.public()).unwrap();
        assert_eq!(a_side.remote_key(), b.public());
        assert_eq!(b_side.remote_key(), a.public());
        let mut wire = BytesMut::new();
        a_side.seal(&ping(1), &mut wire).unwrap();
        a_side.write_keepalive(&mut wire);
        a_side.seal(&ping(2), &mut wire).unwrap();
        assert_eq!(b_side.open(&mut wire).unwrap(), Some(LinkIncoming::Packet(ping(1))));
        assert_eq!(b_side.open(&mut wire).unwrap(), Some(LinkIncoming::Keepalive));
        assert_eq!(b_side.open(&mut wire).unwrap(), Some(LinkIncoming::Packet(ping(2))));
        assert_eq!(b_side.open(&mut wire).unwrap(), None);
        let pong = pb::NodePacket { pong: vec![pb::LinkPong { id: 2 }], ..Default::default() };
        b_side.seal(&pong, &mut wire).unwrap();
        assert_eq!(a_side.open(&mut wire).unwrap(), Some(LinkIncoming::Packet(pong)));
    }

    #[test]
    fn a_dialer_without_the_private_key_it_claims_is_rejected() {
        let (a, b, mallory) = (StaticKeypair::generate(), StaticKeypair::generate(), StaticKeypair::generate());
        // Mallory claims a's key but holds only her own private key.
        let mut wire = BytesMut::new();
        LinkDialer::dial(&mallory, b.public(), &hello("a"), &mut wire).unwrap();
        // Rewrite the claimed key in the init frame (after preamble, length, kind).
        wire[4 + 2 + 1..4 + 2 + 1 + KEY_LEN].copy_from_slice(a.public().as_bytes());
        let offer = LinkAcceptor::new().read(&mut wire).unwrap().unwrap();
        assert_eq!(offer.claimed_key(), a.public());
        let mut out = BytesMut::new();
        assert!(matches!(offer.accept(&b, &hello("b"), &mut out), Err(LinkError::Handshake(_))));
        assert!(out.is_empty(), "nothing is answered");
    }

    #[test]
    fn a_dialer_with_a_stale_key_for_the_acceptor_is_rejected() {
        let (a, b, old_b) = (StaticKeypair::generate(), StaticKeypair::generate(), StaticKeypair::generate());
        assert!(matches!(link(&a, &b, old_b.public()), Err(LinkError::Handshake(_))));
    }

    #[test]
    fn forged_replayed_and_reordered_frames_are_errors() {
        let (a, b) = (StaticKeypair::generate(), StaticKeypair::generate());
        let (mut a_side, mut b_side) = link(&a, &b, b.public()).unwrap();
        let mut first = BytesMut::new();
        a_side.seal(&ping(1), &mut first).unwrap();
        let mut second = BytesMut::new();
        a_side.seal(&ping(2), &mut second).unwrap();
        // Reordered: the second before the first.
        assert!(matches!(b_side.open(&mut second.clone()), Err(LinkError::Decrypt)));
        // In order works (a failed open does not advance the nonce).
        assert_eq!(b_side.open(&mut first.clone()).unwrap(), Some(LinkIncoming::Packet(ping(1))));
        // Replayed: the first again.
        assert!(matches!(b_side.open(&mut first.clone()), Err(LinkError::Decrypt)));
        // Forged: a flipped bit.
        let mut forged = second.clone();
        let last = forged.len() - 1;
        forged[last] ^= 1;
        assert!(matches!(b_side.open(&mut forged), Err(LinkError::Decrypt)));
    }

    #[test]
    fn a_device_preamble_or_another_version_is_refused_at_once() {
        assert!(matches!(LinkAcceptor::new().read(&mut BytesMut::from(&b"pip\x01"[..])), Err(LinkError::BadPreamble)));
        assert!(matches!(
            LinkAcceptor::new().read(&mut BytesMut::from(&b"pnl\x02"[..])),
            Err(LinkError::UnsupportedVersion(2))
        ));
        // An over-long handshake frame is refused from its length alone.
        let mut b = BytesMut::from(&b"pnl\x01\x02\x01"[..]);
        assert!(matches!(LinkAcceptor::new().read(&mut b), Err(LinkError::Malformed(_))));
    }

    #[test]
    fn an_oversized_packet_writes_nothing() {
        let (a, b) = (StaticKeypair::generate(), StaticKeypair::generate());
        let (mut a_side, _) = link(&a, &b, b.public()).unwrap();
        let big = pb::NodePacket { ping: vec![pb::LinkPing { id: u64::MAX }; 7_000], ..Default::default() };
        let mut out = BytesMut::new();
        assert!(matches!(a_side.seal(&big, &mut out), Err(LinkError::TooLarge(_))));
        assert!(out.is_empty());
    }
}
