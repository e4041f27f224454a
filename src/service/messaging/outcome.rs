//! What a send gives back besides `Sent`, shared by the 1:1 and the group
//! path. It sits below both so `group_send.rs` need not import the 1:1
//! file that calls it.

use pipit_protocol::message::pb;

/// Why a send was not stored.
#[derive(Debug, Clone, PartialEq)]
pub enum SendFailure {
    /// A coarse error for the client.
    Code(pb::ErrorCode),
    /// Per-device ciphertexts did not match the devices.
    Mismatch(pb::DeviceMismatch),
    /// Not stored for now (the disk was full): retry after this long.
    Unavailable {
        /// Seconds.
        retry_after_secs: u32,
    },
}

/// A short digest of what a `Send` says, kept in its dedup record: a retry
/// repeats the same content, so the same id with another digest is a
/// reused id, answered `ID_REUSED` instead of the original `Sent`.
pub type Digest = [u8; 8];
