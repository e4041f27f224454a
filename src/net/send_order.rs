//! A connection's held conversations: once a send is refused for now
//! (`UNAVAILABLE`, `INTERNAL`), every later send of the same conversation
//! on the same connection is refused too, until the refused one comes
//! again (SPEC.md 5.1). A client pipelines its sends; without this, a
//! later message already on the wire when the refusal left could be
//! stored ahead of the refused one (the storage queue had room again a
//! moment later), and the recipient would read them out of order.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use pipit_protocol::message::pb;

/// A conversation as a sender sees it (the protocol's one definition,
/// shared with the client library's order rule).
pub(super) use pipit_protocol::message::Conversation as Conv;

/// A conversation held by one refused send.
#[derive(Debug, Clone, Copy)]
struct Held {
    id: u64,
    code: pb::ErrorCode,
    retry_after_secs: u32,
    since: Instant,
}

/// How long a refused send holds its conversation if the client never
/// sends it again (a client that gave up on it): longer than the longest
/// pause the reference client makes (300 s and a quarter of jitter).
const HOLD_MAX: Duration = Duration::from_secs(600);

/// Conversations one connection may hold: a bound on its memory. Past it
/// a refusal holds nothing (that conversation's order is then the
/// client's alone to keep).
const MAX_HELD: usize = 1024;

/// The refusal a send gets without being tried: the one that holds its
/// conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Refusal {
    pub(super) code: pb::ErrorCode,
    pub(super) retry_after_secs: u32,
}

/// Per connection.
#[derive(Debug, Default)]
pub(super) struct SendOrder {
    held: HashMap<Conv, Held>,
    /// The conversation of each send waiting for storage, to hold it if
    /// storage refuses it later.
    waiting: HashMap<u64, Conv>,
}

impl SendOrder {
    /// Before `send` is tried: `Some` refuses it at once, because an
    /// earlier send of its conversation was refused and has not come
    /// again. The refused one itself (or an earlier one) goes through.
    pub(super) fn check(&mut self, send: &pb::Send, now: Instant) -> Option<Refusal> {
        let conv = Conv::of(send);
        let h = *self.held.get(&conv)?;
        if send.id < h.id {
            // An earlier one: nothing it could overtake.
            return None;
        }
        if send.id == h.id || now.duration_since(h.since) > HOLD_MAX {
            // It comes again: tried; refused again, it holds again.
            self.held.remove(&conv);
            return None;
        }
        Some(Refusal { code: h.code, retry_after_secs: h.retry_after_secs })
    }

    /// `send` was refused for now: it holds its conversation.
    pub(super) fn refused(&mut self, conv: Conv, id: u64, code: pb::ErrorCode, retry_after_secs: u32, now: Instant) {
        self.hold(conv, id, code, retry_after_secs, now);
    }

    fn hold(&mut self, conv: Conv, id: u64, code: pb::ErrorCode, retry_after_secs: u32, now: Instant) {
        if self.held.len() >= MAX_HELD && !self.held.contains_key(&conv) {
            self.held.retain(|_, h| now.duration_since(h.since) <= HOLD_MAX);
            if self.held.len() >= MAX_HELD {
                return;
            }
        }
        let h = self.held.entry(conv).or_insert(Held { id, code, retry_after_secs, since: now });
        if id <= h.id {
            *h = Held { id, code, retry_after_secs, since: now };
        }
    }

    /// `send` waits for storage; its answer goes through
    /// [`SendOrder::answered`].
    pub(super) fn waits(&mut self, conv: Conv, id: u64) {
        self.waiting.insert(id, conv);
    }

    /// An answer leaves the connection: a send's refusal for now, when
    /// storage gave it, holds its conversation.
    pub(super) fn answered(&mut self, answer: &pb::Error, now: Instant) {
        let Some(conv) = self.waiting.remove(&answer.id) else { return };
        let code = pb::ErrorCode::try_from(answer.code).unwrap_or(pb::ErrorCode::Unspecified);
        if for_now(code) {
            self.hold(conv, answer.id, code, answer.retry_after_secs.max(1), now);
        }
    }

    /// Any other answer to a send that waited (`Sent`, `DeviceMismatch`).
    pub(super) fn done(&mut self, id: u64) {
        self.waiting.remove(&id);
    }
}

/// Refusals that are not final: the client sends the same message again.
pub(super) fn for_now(code: pb::ErrorCode) -> bool {
    matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn send(id: u64, to: u64) -> pb::Send {
        pb::Send { id, to, ..Default::default() }
    }

    #[test]
    fn a_refused_send_holds_later_ones_of_its_conversation_until_it_comes_again() {
        let now = Instant::now();
        let mut o = SendOrder::default();
        assert_eq!(o.check(&send(1, 7), now), None);
        o.refused(Conv::Peer(7), 1, pb::ErrorCode::Unavailable, 1, now);
        let r = o.check(&send(2, 7), now).expect("held");
        assert_eq!((r.code, r.retry_after_secs), (pb::ErrorCode::Unavailable, 1));
        assert_eq!(o.check(&send(3, 8), now), None, "another conversation goes on");
        assert_eq!(o.check(&send(1, 7), now), None, "the refused one is tried again");
        assert_eq!(o.check(&send(2, 7), now), None, "and then the rest");
    }

    #[test]
    fn a_refusal_from_storage_holds_too_and_the_hold_ends_in_time() {
        let now = Instant::now();
        let mut o = SendOrder::default();
        let g = pb::Send { id: 5, group: 3, ..Default::default() };
        o.waits(Conv::of(&g), 5);
        o.answered(&pb::Error { id: 5, code: pb::ErrorCode::Unavailable as i32, ..Default::default() }, now);
        let later = pb::Send { id: 6, group: 3, ..Default::default() };
        assert!(o.check(&later, now).is_some());
        assert!(o.check(&later, now + HOLD_MAX + Duration::from_secs(1)).is_none(), "a client that gave up");
        // A final refusal holds nothing.
        o.waits(Conv::Peer(7), 9);
        o.answered(&pb::Error { id: 9, code: pb::ErrorCode::NotFound as i32, ..Default::default() }, now);
        assert!(o.check(&send(10, 7), now).is_none());
    }
}
