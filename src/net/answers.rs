//! The wire errors a connection answers with, built in one place (issue
//! 20: every `pb::Error` and retry pause should come from here; what
//! `dispatch.rs` builds is still to move).

use pipit_protocol::message::pb;
use pipit_protocol::Message;

/// A connection-level error message (no `req`, no `id`): the server closes
/// after it.
pub(super) fn error(code: pb::ErrorCode) -> Message {
    pb::Error { code: code as i32, ..Default::default() }.into()
}

/// A connection-level error that tells the client when to try again.
pub(super) fn retry_later(code: pb::ErrorCode, retry_after_secs: u32) -> Message {
    pb::Error { code: code as i32, retry_after_secs, ..Default::default() }.into()
}
