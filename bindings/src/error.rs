//! The typed exceptions apps catch.

use pipit_client::{ClientError, StoreError};

/// What a call can fail with. One variant per way an app reacts
/// differently; each carries a human-readable message (the foreign
/// exception's message). Flat: the foreign side gets the variant and the
/// message, not the fields.
#[derive(Debug, thiserror::Error, uniffi::Error)]
#[uniffi(flat_error)]
pub enum PipitError {
    /// The connection failed (network, handshake, a server breaking the
    /// protocol, a timeout). The client retries by itself.
    #[error("network: {reason}")]
    Network {
        /// What happened.
        reason: String,
    },
    /// The server refused this device (unknown device, invalid invite,
    /// registration closed, ...) or a request (not a member of the group,
    /// an account that does not exist, ...). Repeating it does not help.
    #[error("{reason}")]
    Refused {
        /// The server's error code.
        reason: String,
    },
    /// The server presented a key other than the pinned one.
    #[error("{reason}")]
    ServerKeyChanged {
        /// Both keys.
        reason: String,
    },
    /// The storage directory failed (permissions, disk full, a corrupt
    /// file); nothing was sent.
    #[error("storage: {reason}")]
    Storage {
        /// What failed, with the path.
        reason: String,
    },
    /// The message is larger than one frame; nothing was queued.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    TooLarge {
        /// Its encoded size.
        len: u64,
        /// The most one message may take.
        max: u64,
    },
    /// The client has stopped (closed, or stopped for good).
    #[error("client stopped")]
    Stopped,
    /// An argument the app passed is malformed.
    #[error("invalid argument: {reason}")]
    InvalidArgument {
        /// Which one and why.
        reason: String,
    },
    /// A bug: an error this binding does not know yet, or a panic.
    #[error("internal: {reason}")]
    Internal {
        /// What happened.
        reason: String,
    },
}

impl From<ClientError> for PipitError {
    fn from(e: ClientError) -> Self {
        let reason = e.to_string();
        match e {
            ClientError::Io(_)
            | ClientError::Handshake(_)
            | ClientError::Protocol(_)
            | ClientError::Closed
            | ClientError::Timeout => PipitError::Network { reason },
            // The words say what happened and what to do; the code's name
            // ends them, for programs.
            ClientError::Refused(_) => PipitError::Refused { reason },
            // A request whose answer was lost with its connection.
            ClientError::Offline => PipitError::Network { reason },
            ClientError::ServerKeyChanged { .. } => PipitError::ServerKeyChanged { reason },
            ClientError::Store(s) => s.into(),
            ClientError::TooLarge { len, max } => PipitError::TooLarge { len: len as u64, max: max as u64 },
            ClientError::Stopped => PipitError::Stopped,
            _ => PipitError::Internal { reason },
        }
    }
}

impl From<StoreError> for PipitError {
    fn from(e: StoreError) -> Self {
        PipitError::Storage { reason: e.to_string() }
    }
}
