//! The queue between the storage writer (and presence, typing) and one
//! connection: see `registry.rs` for why it is shaped so. It sits below
//! the registry and presence, which both hand it updates.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use pipit_protocol::limits::MAX_PRESENCE_SUBSCRIPTIONS;
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::Notify;

use super::budget::{Budget, Charge};

/// A new inbox entry for a connection: its inbox id and the message. Id 0
/// is a notice that is no inbox entry (a `KeysStatus`), sent as it is.
pub type Push = (u64, Box<Message>);

/// Most typing notices waiting for one connection; more are dropped (they
/// are at most once, and a newer one says the same).
pub const TYPING_SLOT: usize = 16;

/// Most presence updates waiting for one connection: one per watched
/// account, twice the protocol's limit so a replaced subscription's last
/// updates fit beside the new one's.
pub const PRESENCE_SLOT: usize = 2 * MAX_PRESENCE_SUBSCRIPTIONS;

/// What waits for a connection besides inbox entries.
#[derive(Debug, Default)]
pub struct Events {
    /// The latest presence of each account that changed, in the order they
    /// first changed.
    pub presence: Vec<pb::Presence>,
    /// Typing notices, oldest first.
    pub typing: VecDeque<pb::Typing>,
}

#[derive(Debug)]
struct Queue {
    pushes: VecDeque<Push>,
    /// Allocated on the first event, released when the connection takes
    /// them: idle connections pay one pointer.
    events: Option<Box<Events>>,
    /// The pushes' bytes, charged to the server's memory budget.
    charge: Charge,
}

/// The queue between the storage writer (and presence, typing) and one
/// connection.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<Queue>,
    capacity: usize,
    budget: Arc<Budget>,
    /// Wakes the connection when something was pushed (or dropped).
    pub ready: Notify,
    /// Set when a push was dropped because the mailbox was full: the
    /// connection must read its inbox to catch up.
    pub overflow: AtomicBool,
    /// Wakes the connection when another login of the same device
    /// replaces it, or the device is unlinked.
    pub kick: Notify,
    /// The code the connection closes with when kicked: `REPLACED`, or
    /// `UNKNOWN_DEVICE` for an unlinked device.
    pub kick_code: AtomicI32,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` pushes, and nothing that would
    /// take the server over its memory `budget`.
    pub fn new(capacity: usize, budget: Arc<Budget>) -> Self {
        Self {
            queue: Mutex::new(Queue { pushes: VecDeque::new(), events: None, charge: budget.charge(0) }),
            capacity,
            budget,
            ready: Notify::new(),
            overflow: AtomicBool::new(false),
            kick: Notify::new(),
            kick_code: AtomicI32::new(pb::ErrorCode::Replaced as i32),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a push, or flags overflow when the mailbox is full or the
    /// server is over its memory budget. Never blocks on the connection.
    pub fn push(&self, p: Push) {
        let bytes = p.1.encoded_len();
        {
            let mut q = self.lock();
            let over_budget = self.budget.used() + bytes > self.budget.limit();
            if q.pushes.len() < self.capacity && !over_budget {
                q.pushes.push_back(p);
                let held = q.charge.bytes() + bytes;
                q.charge.set(held);
            } else {
                if over_budget {
                    self.budget.hit("mailbox");
                }
                self.overflow.store(true, Ordering::Release);
            }
        }
        self.ready.notify_one();
    }

    /// Tells the connection to read its inbox from storage.
    pub fn nudge(&self) {
        self.overflow.store(true, Ordering::Release);
        self.ready.notify_one();
    }

    /// Closes the connection with `code`.
    pub fn kick(&self, code: pb::ErrorCode) {
        self.kick_code.store(code as i32, Ordering::Release);
        self.kick.notify_one();
    }

    /// The code a kicked connection closes with.
    pub fn kick_code(&self) -> pb::ErrorCode {
        pb::ErrorCode::try_from(self.kick_code.load(Ordering::Acquire)).unwrap_or(pb::ErrorCode::Replaced)
    }

    /// Takes every push queued, in order, and releases the queue's memory.
    pub fn take(&self) -> VecDeque<Push> {
        let mut q = self.lock();
        q.charge.set(0);
        std::mem::take(&mut q.pushes)
    }

    /// Takes the waiting presence updates and typing notices.
    pub fn take_events(&self) -> Option<Box<Events>> {
        self.lock().events.take()
    }

    /// Queues `p`, replacing an older update of the same account. False
    /// when the slot is full and `p` was dropped.
    pub(crate) fn presence(&self, p: pb::Presence) -> bool {
        let kept = {
            let mut q = self.lock();
            let ev = q.events.get_or_insert_with(Box::default);
            if let Some(old) = ev.presence.iter_mut().find(|o| o.account == p.account) {
                *old = p;
                true
            } else if ev.presence.len() < PRESENCE_SLOT {
                ev.presence.push(p);
                true
            } else {
                false
            }
        };
        self.ready.notify_one();
        kept
    }

    /// Queues a typing notice; false when the slot is full and it was
    /// dropped.
    pub(crate) fn typing(&self, t: pb::Typing) -> bool {
        {
            let mut q = self.lock();
            let ev = q.events.get_or_insert_with(Box::default);
            if ev.typing.len() >= TYPING_SLOT {
                return false;
            }
            ev.typing.push_back(t);
        }
        self.ready.notify_one();
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_mailbox_drops_and_flags_and_an_empty_one_holds_nothing() {
        let budget = Budget::new(1 << 20);
        let m = Mailbox::new(2, budget.clone());
        for id in 1..=3 {
            m.push((id, Box::new(pb::Ping { id }.into())));
        }
        assert!(m.overflow.load(Ordering::Acquire));
        assert!(budget.used() > 0, "pushes count against the budget");
        let got: Vec<u64> = m.take().into_iter().map(|(id, _)| id).collect();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(m.lock().pushes.capacity(), 0, "taking releases the buffer");
        assert_eq!(budget.used(), 0, "and gives its bytes back");
        assert!(m.lock().events.is_none(), "no events slot until an event");
        m.overflow.store(false, Ordering::Release);
        m.nudge();
        assert!(m.overflow.load(Ordering::Acquire), "a nudge sends the connection to storage");
        assert!(m.take().is_empty());
    }

    #[test]
    fn presence_coalesces_per_account_and_typing_is_bounded() {
        let m = Mailbox::new(2, Budget::new(1 << 20));
        for online in [true, false, true] {
            assert!(m.presence(pb::Presence { account: 7, online, last_seen: 0 }));
        }
        assert!(m.presence(pb::Presence { account: 8, online: false, last_seen: 5 }));
        for _ in 0..TYPING_SLOT {
            assert!(m.typing(pb::Typing { peer: 7, typing: true, ..Default::default() }));
        }
        assert!(!m.typing(pb::Typing { peer: 7, typing: false, ..Default::default() }), "full");
        let ev = m.take_events().unwrap();
        let accounts: Vec<(u64, bool)> = ev.presence.iter().map(|p| (p.account, p.online)).collect();
        assert_eq!(accounts, vec![(7, true), (8, false)], "the latest state of each account");
        assert_eq!(ev.typing.len(), TYPING_SLOT);
        assert!(m.take_events().is_none(), "taken, and the slot released");
        for account in 0..PRESENCE_SLOT as u64 {
            assert!(m.presence(pb::Presence { account, ..Default::default() }));
        }
        assert!(!m.presence(pb::Presence { account: 1 << 40, ..Default::default() }), "bounded");
    }

    #[test]
    fn a_push_that_would_go_over_budget_is_dropped_and_flagged() {
        let budget = Budget::new(100);
        let m = Mailbox::new(8, budget.clone());
        let big = pb::Deliver { payload: bytes::Bytes::from(vec![0u8; 200]), ..Default::default() };
        m.push((1, Box::new(big.into())));
        assert!(m.overflow.load(Ordering::Acquire));
        assert!(m.take().is_empty());
        assert_eq!(budget.hits(), 1);
    }
}
