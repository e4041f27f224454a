//! Which connection holds which device, and how the storage writer hands
//! new inbox entries to it.
//!
//! Each online device has one [`Mailbox`]: a small bounded queue into its
//! connection task (on whichever shard accepted it). The writer pushes
//! without ever blocking; a full mailbox drops the push, because the entry
//! is durable in the inbox already, and flags the connection, which then
//! reads its inbox to catch up. That keeps memory bounded per connection
//! however slow its link. An idle mailbox holds no buffer at all: most
//! connections are idle, and a per-connection channel that preallocates
//! its slots would cost more than the rest of the connection.
//!
//! Presence and typing are not inbox entries (no inbox id, never acked,
//! outside the delivery window): they wait in a separate slot of the
//! mailbox that coalesces presence to the latest state per account and
//! keeps only a few typing notices, so a slow reader costs a bounded
//! amount whatever happens around it.
//!
//! The registry is keyed by account, so one lock covers all of an
//! account's connections and its presence (`presence.rs`): whether the
//! account is online is derived from its connections under the same lock
//! that publishes the change.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use pipit_protocol::limits::MAX_PRESENCE_SUBSCRIPTIONS;
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::Notify;

use super::budget::{Budget, Charge};
use super::presence::AccountPresence;
use super::{Deliveries, Wakeups};
use crate::model::DeviceAddr;

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

/// How to reach one connection.
#[derive(Clone, Debug)]
pub struct ConnHandle {
    /// Unique per connection, so a closing connection removes only itself.
    pub id: u64,
    /// Its mailbox.
    pub mailbox: Arc<Mailbox>,
}

/// One account's connected devices and its presence.
#[derive(Default)]
pub(super) struct Account {
    /// The connection of each online device; most accounts have one.
    pub(super) conns: Vec<(u32, ConnHandle)>,
    pub(super) presence: AccountPresence,
}

impl Account {
    /// Online as watchers see it: a device is connected, or the last one
    /// left less than the grace period ago.
    pub(super) fn is_online(&self) -> bool {
        !self.conns.is_empty() || self.presence.leaving != 0
    }

    /// Holds nothing worth keeping: the entry can go.
    pub(super) fn is_idle(&self) -> bool {
        !self.is_online() && !self.presence.is_watched()
    }
}

pub(super) type Stripe = HashMap<u64, Account>;

const STRIPES: usize = 64;

/// The last device of an account left: it is still shown online until
/// [`Registry::grace_over`] with this generation, unless one reconnects.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "schedule grace_over, or the account stays online for watchers"]
pub struct Leaving {
    /// The account.
    pub account: u64,
    /// Which departure this is: a reconnect and a new departure make an
    /// older grace period moot.
    pub generation: u64,
    /// When the last connection left (seconds): the account's last seen.
    pub at: u64,
}

/// Online devices and their accounts' presence, striped by account to
/// keep lock hold times short across shards.
pub struct Registry {
    stripes: Vec<Mutex<Stripe>>,
    generations: AtomicU64,
    /// Where an inbox entry goes when its device has no connection.
    wakeups: OnceLock<Arc<dyn Wakeups>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect(),
            generations: AtomicU64::new(0),
            wakeups: OnceLock::new(),
        }
    }
}

impl Registry {
    pub(super) fn stripe(&self, account: u64) -> std::sync::MutexGuard<'_, Stripe> {
        // Account ids are sequential: their low bits spread evenly.
        self.stripes[(account % STRIPES as u64) as usize].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(super) fn stripe_count(&self) -> usize {
        self.stripes.len()
    }

    pub(super) fn stripe_at(&self, i: usize) -> std::sync::MutexGuard<'_, Stripe> {
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Sends wake-ups for devices without a connection to `w` (set once,
    /// at start).
    pub fn set_wakeups(&self, w: Arc<dyn Wakeups>) {
        let _ = self.wakeups.set(w);
    }

    /// Makes `handle` the device's connection; returns the one it replaces.
    /// The account's watchers learn that it came online, unless it never
    /// looked offline (a reconnect within the grace period).
    pub fn insert(&self, addr: DeviceAddr, handle: ConnHandle) -> Option<ConnHandle> {
        let mut s = self.stripe(addr.account);
        let acc = s.entry(addr.account).or_default();
        let was_online = acc.is_online();
        acc.presence.leaving = 0;
        let old = match acc.conns.iter_mut().find(|(d, _)| *d == addr.device) {
            Some((_, h)) => Some(std::mem::replace(h, handle)),
            None => {
                acc.conns.push((addr.device, handle));
                None
            }
        };
        if !was_online {
            acc.presence.publish(addr.account, true);
        }
        old
    }

    /// Removes the device's entry if it is still connection `id`. When
    /// that was the account's last connection (at `now`, seconds), the
    /// account starts leaving: see [`Leaving`].
    pub fn remove(&self, addr: DeviceAddr, id: u64, now: u64) -> Option<Leaving> {
        let mut s = self.stripe(addr.account);
        let acc = s.get_mut(&addr.account)?;
        let before = acc.conns.len();
        acc.conns.retain(|(d, h)| !(*d == addr.device && h.id == id));
        if acc.conns.len() == before || !acc.conns.is_empty() {
            return None;
        }
        if acc.conns.capacity() > 0 {
            acc.conns = Vec::new();
        }
        let generation = self.generations.fetch_add(1, Ordering::Relaxed) + 1;
        acc.presence.left(generation, now);
        Some(Leaving { account: addr.account, generation, at: now })
    }

    /// Whether the device is online here.
    pub fn is_online(&self, addr: DeviceAddr) -> bool {
        self.stripe(addr.account).get(&addr.account).is_some_and(|a| a.conns.iter().any(|(d, _)| *d == addr.device))
    }

    /// Online devices (admin).
    pub fn online(&self) -> usize {
        self.stripes
            .iter()
            .map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).values().map(|a| a.conns.len()).sum::<usize>())
            .sum()
    }

    /// Hands `t` to every connected device of `account`; returns how many
    /// took it (0: offline, or every one's slot was full).
    pub fn relay_typing(&self, account: u64, t: &pb::Typing) -> usize {
        let s = self.stripe(account);
        let Some(acc) = s.get(&account) else {
            return 0;
        };
        acc.conns.iter().filter(|(_, h)| h.mailbox.typing(*t)).count()
    }
}

impl Deliveries for Registry {
    fn push(&self, to: DeviceAddr, id: u64, msg: Message) {
        let mailbox = self
            .stripe(to.account)
            .get(&to.account)
            .and_then(|a| a.conns.iter().find(|(d, _)| *d == to.device))
            .map(|(_, h)| h.mailbox.clone());
        match mailbox {
            Some(m) => m.push((id, Box::new(msg))),
            // Messages from others wake a sleeping device; receipts,
            // expiry notices and copies of what its own account sent
            // wait for its next connection.
            None if matches!(&msg, Message::Deliver(d) if d.from != to.account) => {
                if let Some(w) = self.wakeups.get() {
                    w.wake(to);
                }
            }
            None => {}
        }
    }

    fn nudge(&self, to: DeviceAddr) {
        let mailbox = self
            .stripe(to.account)
            .get(&to.account)
            .and_then(|a| a.conns.iter().find(|(d, _)| *d == to.device))
            .map(|(_, h)| h.mailbox.clone());
        if let Some(m) = mailbox {
            m.nudge();
        }
    }

    fn notify(&self, to: DeviceAddr, msg: Message) {
        self.push(to, 0, msg);
    }

    fn disconnect(&self, to: DeviceAddr, code: pb::ErrorCode) {
        // Kicked, the connection ends and leaves the registry the way every
        // connection does (presence included).
        let mailbox = self
            .stripe(to.account)
            .get(&to.account)
            .and_then(|a| a.conns.iter().find(|(d, _)| *d == to.device))
            .map(|(_, h)| h.mailbox.clone());
        if let Some(m) = mailbox {
            m.kick(code);
        }
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
    fn an_account_is_online_from_its_first_device_until_its_last_leaves() {
        let r = Registry::default();
        let h = |id| ConnHandle { id, mailbox: Arc::new(Mailbox::new(1, Budget::new(1 << 20))) };
        assert!(r.insert(DeviceAddr::new(5, 0), h(1)).is_none());
        assert!(r.insert(DeviceAddr::new(5, 1), h(2)).is_none());
        let replaced = r.insert(DeviceAddr::new(5, 0), h(3)).unwrap();
        assert_eq!(replaced.id, 1);
        assert_eq!(r.remove(DeviceAddr::new(5, 0), 1, 10), None, "a replaced connection removes nothing");
        assert_eq!(r.remove(DeviceAddr::new(5, 0), 3, 10), None, "device 1 is still here");
        let leaving = r.remove(DeviceAddr::new(5, 1), 2, 11).unwrap();
        assert_eq!(leaving.account, 5);
        assert_eq!(r.online(), 0);
        assert!(r.stripe(5).get(&5).unwrap().is_online(), "online for watchers until the grace is over");
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
