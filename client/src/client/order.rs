//! Per-conversation order under refusals: when the server refuses a send
//! for now (`UNAVAILABLE`, `RATE_LIMITED`, `INTERNAL`), nothing later in
//! the same conversation goes until that one is accepted, so the
//! recipient never sees a message ahead of an earlier one from the same
//! device. Other conversations carry on.
//!
//! Sans-IO: it decides which outbox ids may be written; the task writes
//! them and reports the answers. The server keeps its side of the bargain
//! (a send later in a conversation than one it refused for now on the
//! same connection is refused too, SPEC.md 5.1), so the messages that were
//! already on the wire when the refusal came cannot overtake it either.

use std::collections::{BTreeMap, BTreeSet};

/// A conversation, as the server numbers it (the protocol's one
/// definition, shared with the server's order rule).
pub(super) use pipit_protocol::message::Conversation as Conv;

/// Once a conversation's window has grown to this after a refusal, it no
/// longer limits: back to plain pipelining.
const WINDOW_OPEN: usize = 1024;

/// One conversation's sends on this connection.
#[derive(Debug, Default)]
struct Lane {
    /// The earliest message the server refused for now: it alone goes
    /// again (after the pause it was told) until it is accepted.
    held: Option<u64>,
    /// Written on this connection and not answered yet.
    unanswered: BTreeSet<u64>,
    /// Waiting behind `held` or the window, in id order.
    waiting: BTreeSet<u64>,
    /// Since a refusal, how many may be unanswered at once: grows by one
    /// with each message accepted (doubling each round trip) until
    /// [`WINDOW_OPEN`], so a server that just recovered is not handed the
    /// whole backlog at once; halved by a refusal while it grows.
    window: Option<usize>,
}

impl Lane {
    fn room(&self) -> bool {
        self.held.is_none() && self.window.is_none_or(|w| self.unanswered.len() < w)
    }

    fn idle(&self) -> bool {
        self.held.is_none() && self.unanswered.is_empty() && self.waiting.is_empty() && self.window.is_none()
    }

    /// Moves what may go now from `waiting` to `unanswered`.
    fn release(&mut self, into: &mut Vec<u64>) {
        while self.room() {
            let Some(id) = self.waiting.pop_first() else { break };
            self.unanswered.insert(id);
            into.push(id);
        }
    }
}

/// What to do with a message the server refused for now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Refused {
    /// Send it again after the pause (it holds its conversation). When it
    /// took the place of a later held one, that one no longer waits for a
    /// pause of its own.
    Retry { instead_of: Option<u64> },
    /// It waits behind the held one; no pause of its own.
    Wait,
}

/// Every conversation's lane on the current connection.
#[derive(Debug, Default)]
pub(super) struct Lanes {
    lanes: BTreeMap<Conv, Lane>,
}

impl Lanes {
    /// A new connection: everything in the outbox goes again, in order,
    /// and what was held on the old one is not held on this one.
    pub(super) fn reset(&mut self) {
        self.lanes.clear();
    }

    /// Message `id` is ready to go: `true` to write it now, `false` when
    /// it waits (an earlier one in its conversation was refused for now).
    pub(super) fn ready(&mut self, conv: Conv, id: u64) -> bool {
        let lane = self.lanes.entry(conv).or_default();
        if lane.room() && lane.waiting.is_empty() {
            lane.unanswered.insert(id);
            return true;
        }
        lane.waiting.insert(id);
        false
    }

    /// The server refused `id` for now.
    pub(super) fn refused(&mut self, conv: Conv, id: u64) -> Refused {
        let lane = self.lanes.entry(conv).or_default();
        let was_open = lane.held.is_none();
        lane.unanswered.remove(&id);
        let verdict = match lane.held {
            Some(h) if h == id => Refused::Retry { instead_of: None },
            Some(h) if h < id => {
                lane.waiting.insert(id);
                return Refused::Wait;
            }
            Some(h) => {
                lane.waiting.insert(h);
                lane.held = Some(id);
                Refused::Retry { instead_of: Some(h) }
            }
            None => {
                lane.held = Some(id);
                Refused::Retry { instead_of: None }
            }
        };
        if was_open {
            // From one message again after a refusal out of the blue (the
            // backlog may be large); half the window after one while it
            // was growing back.
            lane.window = Some(lane.window.map_or(1, |w| (w / 2).max(1)));
        }
        verdict
    }

    /// `id` was answered: stored (`accepted`), or refused for good (it
    /// leaves the outbox, or goes again only once resealed). Returns the
    /// ids that may go now, in order.
    pub(super) fn answered(&mut self, conv: Conv, id: u64, accepted: bool) -> Vec<u64> {
        let mut go = Vec::new();
        let Some(lane) = self.lanes.get_mut(&conv) else { return go };
        lane.unanswered.remove(&id);
        lane.waiting.remove(&id);
        if lane.held == Some(id) {
            lane.held = None;
        }
        if accepted {
            lane.window = lane.window.map(|w| w + 1).filter(|w| *w < WINDOW_OPEN);
        }
        lane.release(&mut go);
        if lane.idle() {
            self.lanes.remove(&conv);
        }
        go
    }

    /// Whether anything of `conv` waits (for tests and stats).
    #[cfg(test)]
    fn waiting(&self, conv: Conv) -> usize {
        self.lanes.get(&conv).map_or(0, |l| l.waiting.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: Conv = Conv::Peer(7);
    const B: Conv = Conv::Group(9);

    #[test]
    fn without_refusals_everything_goes_at_once() {
        let mut l = Lanes::default();
        assert!((1..=100).all(|id| l.ready(A, id)));
        for id in 1..=100 {
            assert!(l.answered(A, id, true).is_empty());
        }
        assert!(l.lanes.is_empty(), "nothing kept for an idle conversation");
    }

    #[test]
    fn a_refusal_holds_every_later_send_of_its_conversation_only() {
        let mut l = Lanes::default();
        for id in 1..=5 {
            assert!(l.ready(A, id));
        }
        assert!(l.ready(B, 6));
        assert_eq!(l.refused(A, 2), Refused::Retry { instead_of: None });
        // Already on the wire: the server refuses them too; they wait,
        // without pauses of their own.
        assert_eq!(l.refused(A, 3), Refused::Wait);
        assert_eq!(l.refused(A, 4), Refused::Wait);
        // New ones wait as well; another conversation goes on.
        assert!(!l.ready(A, 7));
        assert!(l.ready(B, 8));
        assert!(l.answered(A, 1, true).is_empty(), "1 was before the refusal");
        assert_eq!(l.refused(A, 5), Refused::Wait);
        assert_eq!(l.waiting(A), 4);
        // Refused again when retried: still held.
        assert_eq!(l.refused(A, 2), Refused::Retry { instead_of: None });
        // Accepted: the rest go in order, a few first, more with each one
        // accepted.
        let first = l.answered(A, 2, true);
        assert!(!first.is_empty() && first[0] == 3, "{first:?}");
        let mut sent: Vec<u64> = first;
        let mut i = 0;
        while i < sent.len() {
            let id = sent[i];
            sent.extend(l.answered(A, id, true));
            i += 1;
        }
        assert_eq!(sent, vec![3, 4, 5, 7]);
        assert_eq!(l.waiting(A), 0);
    }

    #[test]
    fn an_earlier_refusal_takes_over_the_hold() {
        let mut l = Lanes::default();
        for id in 1..=3 {
            assert!(l.ready(A, id));
        }
        assert_eq!(l.refused(A, 3), Refused::Retry { instead_of: None });
        // A resealed message (an earlier id) comes back after a later one
        // was held.
        assert_eq!(l.refused(A, 1), Refused::Retry { instead_of: Some(3) });
        assert_eq!(l.answered(A, 2, true), Vec::<u64>::new(), "still held by 1");
        assert_eq!(l.answered(A, 1, true), vec![3]);
    }

    #[test]
    fn a_final_failure_of_the_held_one_lets_the_rest_go() {
        let mut l = Lanes::default();
        assert!(l.ready(A, 1));
        assert_eq!(l.refused(A, 1), Refused::Retry { instead_of: None });
        assert!(!l.ready(A, 2));
        assert_eq!(l.answered(A, 1, false), vec![2]);
    }

    #[test]
    fn the_window_grows_back_to_plain_pipelining() {
        let mut l = Lanes::default();
        assert!(l.ready(A, 1));
        l.refused(A, 1);
        for id in 2..=3000 {
            assert!(!l.ready(A, id));
        }
        let mut inflight: std::collections::VecDeque<u64> = l.answered(A, 1, true).into();
        let mut most = 0;
        while let Some(id) = inflight.pop_front() {
            inflight.extend(l.answered(A, id, true));
            most = most.max(inflight.len());
        }
        assert!(most >= WINDOW_OPEN - 1, "{most}");
        assert!(l.ready(A, 3001), "open again");
        assert!(l.lanes.get(&A).is_some_and(|lane| lane.window.is_none()));
    }

    #[test]
    fn a_new_connection_forgets_the_holds() {
        let mut l = Lanes::default();
        assert!(l.ready(A, 1));
        l.refused(A, 1);
        assert!(!l.ready(A, 2));
        l.reset();
        assert!(l.ready(A, 1) && l.ready(A, 2));
    }
}
