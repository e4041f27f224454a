//! Client errors.

use pipit_protocol::message::pb;
use pipit_protocol::PublicKey;

/// Client errors. None of them panics the library; a server or network
/// can only cause these.
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
    /// The app's store failed; nothing was sent.
    #[error("store: {0}")]
    Store(#[from] crate::store::StoreError),
    /// A message too large for one frame; nothing was queued.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its encoded size.
        len: usize,
        /// The most one message may take.
        max: usize,
    },
    /// The client has stopped.
    #[error("client stopped")]
    Stopped,
    /// Not connected, or the connection dropped before the answer came: a
    /// request is not queued across reconnects. Retry once connected.
    #[error("not connected")]
    Offline,
    /// The server answered the request with an error; it changed nothing.
    #[error("request refused: {0:?}")]
    Rejected(pb::ErrorCode),
}

impl ClientError {
    /// Errors that reconnecting cannot fix: the library stops instead of
    /// retrying.
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ClientError::ServerKeyChanged { .. }
                | ClientError::Refused(
                    pb::ErrorCode::UnknownDevice
                        | pb::ErrorCode::RegistrationClosed
                        | pb::ErrorCode::InvalidInvite
                        | pb::ErrorCode::UnsupportedVersion
                        | pb::ErrorCode::Forbidden
                )
                | ClientError::Store(_)
        )
    }
}
