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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use super::mailbox::Mailbox;
use super::presence::{AccountPresence, Stored, Watcher};
use super::{Deliveries, Wakeups};
use crate::model::DeviceAddr;

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

/// Presence, held in each account's entry (`AccountPresence`, driven from
/// here under the account's lock; the rules are in `presence.rs`).
impl Registry {
    /// The grace period of departure `l` is over: unless a connection came
    /// back meanwhile, the account's watchers learn it went offline.
    /// Returns its last seen (`l.at`), to be made durable.
    pub fn grace_over(&self, l: Leaving) -> Option<u64> {
        let mut s = self.stripe(l.account);
        let acc = s.get_mut(&l.account)?;
        if !acc.conns.is_empty() || !acc.presence.grace_over(l.account, l.generation, l.at) {
            return None;
        }
        if acc.is_idle() {
            s.remove(&l.account);
        }
        Some(l.at)
    }

    /// Replaces `w`'s subscriptions with the accounts of `stored` (sorted,
    /// distinct, all existing) and queues each one's current state for it.
    /// `seq` orders a connection's requests: an older one that finishes
    /// late changes nothing.
    pub fn watch(&self, w: &Arc<Watcher>, seq: u64, stored: &[Stored]) {
        w.resubscribe(
            seq,
            stored,
            |a| self.drop_watcher(a, w),
            |s| {
                let mut stripe = self.stripe(s.account);
                let acc = stripe.entry(s.account).or_default();
                let online = acc.is_online();
                acc.presence.watch(s, online, w);
            },
        );
    }

    /// Ends all of `w`'s subscriptions (its connection closed), for good.
    pub fn unwatch(&self, w: &Arc<Watcher>) {
        w.end(|a| self.drop_watcher(a, w));
    }

    fn drop_watcher(&self, account: u64, w: &Arc<Watcher>) {
        let mut s = self.stripe(account);
        let Some(acc) = s.get_mut(&account) else { return };
        acc.presence.unwatch(w);
        if acc.is_idle() {
            s.remove(&account);
        }
    }

    /// `account` changed whether it hides its last seen: an offline
    /// account's watchers see the change at once. Kept for an account
    /// that is here (its device sent the change) even when nobody watches
    /// it yet, so a subscription whose storage read came just before the
    /// change cannot show the old setting.
    pub fn set_hidden(&self, account: u64, hidden: bool) {
        let mut s = self.stripe(account);
        let Some(acc) = s.get_mut(&account) else { return };
        let online = acc.is_online();
        acc.presence.set_hidden(account, hidden, online);
    }

    /// Accounts with an entry (online, leaving or watched): for tests and
    /// memory figures.
    pub fn accounts_tracked(&self) -> usize {
        (0..self.stripe_count()).map(|i| self.stripe_at(i).len()).sum()
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
    use crate::route::Budget;

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
}
