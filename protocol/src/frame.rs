//! Framing: how the byte stream on a TCP connection splits into frames.
//!
//! A connection starts with the client's 4-byte preamble, `b"pip"` and the
//! protocol version. After it, both directions carry frames: a 2-byte
//! big-endian length, then that many bytes. A zero-length frame is the
//! keepalive (a ping from the client, the pong from the server); it costs
//! two bytes, the least a frame can.
//!
//! The decoder rejects a length above its limit before it buffers or
//! allocates anything for the body, and "not enough bytes yet" is
//! `Ok(None)`, never an error.

use bytes::{Buf, BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::limits::{MAX_FRAME_LEN, PREAMBLE_LEN};

/// The first three bytes of every pipit connection.
pub const MAGIC: [u8; 3] = *b"pip";

/// Bytes of the length prefix.
pub const LEN_PREFIX: usize = 2;

/// The keepalive frame: a frame of length zero.
pub const KEEPALIVE: [u8; LEN_PREFIX] = [0, 0];

/// The preamble a client writes first, naming `version`.
pub fn preamble(version: u8) -> [u8; PREAMBLE_LEN] {
    [MAGIC[0], MAGIC[1], MAGIC[2], version]
}

/// Reads the preamble from the front of `input`.
///
/// Returns the version once all four bytes are there, `Ok(None)` while they
/// are not, and an error as soon as a byte disagrees with the magic (so an
/// HTTP request or TLS hello is refused on its first byte).
pub fn read_preamble(input: &mut BytesMut) -> Result<Option<u8>, FrameError> {
    let have = input.len().min(MAGIC.len());
    if input[..have] != MAGIC[..have] {
        return Err(FrameError::BadPreamble);
    }
    if input.len() < PREAMBLE_LEN {
        return Ok(None);
    }
    let version = input[MAGIC.len()];
    input.advance(PREAMBLE_LEN);
    Ok(Some(version))
}

/// One frame off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// A zero-length frame: keepalive.
    Keepalive,
    /// A frame body: a handshake message or an encrypted packet.
    Data(Bytes),
}

/// Splits a byte stream into frames, enforcing a length limit.
#[derive(Debug, Clone, Copy)]
pub struct FrameDecoder {
    max_len: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    /// A decoder that accepts frame bodies of up to `max_len` bytes
    /// (at most [`MAX_FRAME_LEN`]).
    pub fn new(max_len: usize) -> Self {
        Self { max_len: max_len.min(MAX_FRAME_LEN) }
    }

    /// The largest body this decoder accepts.
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Takes the next whole frame off the front of `input`.
    ///
    /// `Ok(None)` means more bytes are needed; `input` is left untouched
    /// then. An over-long length is an error before any body byte is read.
    pub fn decode(&self, input: &mut BytesMut) -> Result<Option<Frame>, FrameError> {
        if input.len() < LEN_PREFIX {
            return Ok(None);
        }
        let len = usize::from(u16::from_be_bytes([input[0], input[1]]));
        if len > self.max_len {
            return Err(FrameError::TooLong { len, max: self.max_len });
        }
        if len == 0 {
            input.advance(LEN_PREFIX);
            return Ok(Some(Frame::Keepalive));
        }
        if input.len() < LEN_PREFIX + len {
            // Reserve only what this frame still needs, and only once the
            // length has passed the limit check above.
            input.reserve(LEN_PREFIX + len - input.len());
            return Ok(None);
        }
        input.advance(LEN_PREFIX);
        Ok(Some(Frame::Data(input.split_to(len).freeze())))
    }
}

/// Appends a frame with body `body` to `out`.
///
/// # Panics
/// If `body` is longer than [`MAX_FRAME_LEN`]: callers size their bodies
/// from the limits in this crate, so a longer one is a bug here, not input.
pub fn encode(body: &[u8], out: &mut BytesMut) {
    let len = u16::try_from(body.len()).expect("frame body within MAX_FRAME_LEN");
    out.reserve(LEN_PREFIX + body.len());
    out.put_u16(len);
    out.put_slice(body);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn partial_input_is_not_an_error() {
        let d = FrameDecoder::default();
        let mut b = BytesMut::from(&[0u8][..]);
        assert_eq!(d.decode(&mut b), Ok(None));
        b.extend_from_slice(&[3, 1, 2]);
        assert_eq!(d.decode(&mut b), Ok(None));
        assert_eq!(b.len(), 4, "a partial frame stays in the buffer");
        b.extend_from_slice(&[3]);
        assert_eq!(d.decode(&mut b), Ok(Some(Frame::Data(Bytes::from_static(&[1, 2, 3])))));
        assert!(b.is_empty());
    }

    #[test]
    fn oversized_length_is_rejected_before_buffering() {
        let d = FrameDecoder::new(100);
        let mut b = BytesMut::from(&[0x01, 0x00][..]); // 256
        let cap = b.capacity();
        assert_eq!(d.decode(&mut b), Err(FrameError::TooLong { len: 256, max: 100 }));
        assert_eq!(b.capacity(), cap, "nothing was reserved for the body");
    }

    #[test]
    fn keepalive_is_two_bytes() {
        let d = FrameDecoder::default();
        let mut b = BytesMut::from(&KEEPALIVE[..]);
        assert_eq!(d.decode(&mut b), Ok(Some(Frame::Keepalive)));
        assert!(b.is_empty());
    }

    #[test]
    fn frames_round_trip_back_to_back() {
        let mut out = BytesMut::new();
        encode(b"hello", &mut out);
        out.extend_from_slice(&KEEPALIVE);
        encode(&[7u8; 300], &mut out);
        let d = FrameDecoder::default();
        assert_eq!(d.decode(&mut out).unwrap(), Some(Frame::Data(Bytes::from_static(b"hello"))));
        assert_eq!(d.decode(&mut out).unwrap(), Some(Frame::Keepalive));
        assert_eq!(d.decode(&mut out).unwrap(), Some(Frame::Data(Bytes::from(vec![7u8; 300]))));
        assert_eq!(d.decode(&mut out).unwrap(), None);
    }

    #[test]
    fn preamble_rejects_garbage_on_the_first_byte() {
        let mut b = BytesMut::from(&b"G"[..]);
        assert_eq!(read_preamble(&mut b), Err(FrameError::BadPreamble));
        let mut b = BytesMut::from(&b"pi"[..]);
        assert_eq!(read_preamble(&mut b), Ok(None));
        b.extend_from_slice(&[b'p', 1, 0xAA]);
        assert_eq!(read_preamble(&mut b), Ok(Some(1)));
        assert_eq!(&b[..], &[0xAA]);
    }
}
