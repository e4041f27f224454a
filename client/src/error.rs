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
    #[error("server refused: {} ({})", explain(*.0), .0.as_str_name())]
    Refused(pb::ErrorCode),
    /// The server presented a key other than the pinned one.
    #[error(
        "server key changed: this device trusts {pinned}, the server offered {offered}; if the operator \
         replaced the key without keeping the old one, allow the change, otherwise this may be an impostor"
    )]
    ServerKeyChanged {
        /// The key we trust.
        pinned: PublicKey,
        /// The key the server presented.
        offered: PublicKey,
    },
    /// The account lives on another node of a cluster: connect there,
    /// with IK to the key given (the library does, and remembers it).
    #[error("the account lives on node {server}")]
    Redirected {
        /// `host:port` of the node that owns the account.
        server: String,
        /// That node's static key, learned inside this authenticated
        /// session.
        server_key: PublicKey,
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
    /// The connection dropped after a request that must not be sent twice
    /// (a group create without a create id, which this library no longer
    /// sends) went out and before its answer came: whether it took effect
    /// is unknown. List the groups to find out.
    #[error("the connection dropped before the server answered; check whether it took effect")]
    Offline,
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

/// What an error code means to a person, and what to do about it: for
/// error messages, logs and an app's own text.
pub fn explain(code: pb::ErrorCode) -> &'static str {
    use pb::ErrorCode::*;
    match code {
        Unspecified => "the server gave no reason",
        BadRequest => "the server rejected a malformed request (a bug in the app or the library)",
        UnknownDevice => {
            "this device is not registered on the server (or not under these ids); register again or link it from another device"
        }
        UnsupportedVersion => "the server does not speak this protocol version; update the app",
        RegistrationClosed => "registration on this server needs an invite code; ask its operator for one",
        InvalidInvite => "the invite code is unknown, used or expired; ask for a new one",
        NotFound => "no such account, device or group; check the number",
        Forbidden => "this device is not allowed to do that",
        TooLarge => "over one of the server's limits (too large or too many)",
        RateLimited => "too many requests; the client tries again after the pause the server asked for",
        DeviceMismatch => "the recipient's devices changed; encrypt for the current devices and send again",
        Unavailable => "the server is busy; the client tries again after the pause the server asked for",
        Replaced => "this device logged in on another connection",
        ShuttingDown => "the server is restarting; the client reconnects",
        Timeout => "the server stopped waiting for this device",
        WrongNode => "the account lives on another server node",
        Internal => "the server failed; nothing was stored; the client tries again",
        NotSupported => "this server does not offer that feature",
        IdReused => {
            "the message id was already used for another message (the device's message counter went back, \
             as after restoring a backup); send the message again"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_read_as_sentences_with_the_code() {
        let e = ClientError::Refused(pb::ErrorCode::NotFound);
        assert_eq!(e.to_string(), "server refused: no such account, device or group; check the number (NOT_FOUND)");
        assert!(!e.to_string().contains("NotFound"), "no Debug output");
    }
}
