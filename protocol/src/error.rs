//! Errors, one enum per layer.
//!
//! Every variant here means the *peer* sent something it must not (or, for
//! [`HandshakeError::Config`], that we are misconfigured). A server closes
//! the connection on any of them; what it tells the peer is a coarse
//! [`crate::message::pb::ErrorCode`], never this text.

use thiserror::Error;

/// Framing errors: the byte stream itself is wrong.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum FrameError {
    /// The declared frame length is larger than this side accepts here.
    #[error("frame of {len} bytes exceeds the limit of {max}")]
    TooLong {
        /// The declared length.
        len: usize,
        /// The limit in force.
        max: usize,
    },
    /// The connection did not start with pipit's preamble.
    #[error("not a pipit connection (bad preamble)")]
    BadPreamble,
    /// A zero-length frame arrived where only a handshake message may.
    #[error("empty frame during the handshake")]
    EmptyHandshakeFrame,
}

/// Message (protobuf) errors, after decryption.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum MessageError {
    /// The bytes are not valid protobuf for the expected message.
    #[error("malformed message: {0}")]
    Malformed(String),
    /// The packet holds more messages than [`crate::limits::MAX_MESSAGES_PER_PACKET`].
    #[error("too many messages in one packet")]
    TooMany,
    /// This side may not receive this kind of message.
    #[error("{kind} may not be sent by the {sender}")]
    WrongDirection {
        /// The message kind.
        kind: &'static str,
        /// Who sent it.
        sender: &'static str,
    },
    /// A single message is too large to fit in one frame.
    #[error("message of {len} bytes does not fit in a frame")]
    TooLarge {
        /// Its encoded length.
        len: usize,
    },
}

/// Handshake errors.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// Framing failed before the handshake could proceed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The peer speaks a protocol version we do not.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// A handshake frame of a kind that is not valid at this point.
    #[error("unexpected handshake frame kind {0:#04x}")]
    UnexpectedKind(u8),
    /// Noise could not process the message: wrong key, tampered or
    /// truncated message, or garbage.
    #[error("handshake message rejected: {0}")]
    Crypto(snow::Error),
    /// The handshake payload did not decode.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The server asked for a retry more often than allowed.
    #[error("too many handshake retries")]
    TooManyRetries,
    /// The server refused the connection in plaintext (unauthenticated).
    #[error("server refused the handshake with code {0}")]
    Refused(i32),
    /// A key or payload is malformed (wrong length).
    #[error("malformed handshake field: {0}")]
    Malformed(&'static str),
    /// The handshake did not finish before its deadline.
    #[error("handshake timed out")]
    Timeout,
    /// Local misconfiguration: a key of the wrong size, a failed RNG.
    #[error("handshake misconfigured: {0}")]
    Config(snow::Error),
}

/// Errors of an established session.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// Framing failed.
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// A frame failed authentication: tampered, replayed, reordered or
    /// truncated.
    #[error("frame failed to decrypt (tampered, replayed or out of order)")]
    Decrypt,
    /// A message failed to decode or was not allowed.
    #[error(transparent)]
    Message(#[from] MessageError),
    /// The handshake failed.
    #[error(transparent)]
    Handshake(#[from] HandshakeError),
}
