//! Presence by subscription: which connections watch which accounts, and
//! the fan-out of an account's changes to their mailboxes.
//!
//! Nothing here is durable or broadcast. A connection watches at most a
//! few hundred accounts (the chats open on it); an account's watchers
//! live in its registry entry, under the same lock as its connections, so
//! "came online" and "went offline" are decided and published in one
//! step. An account is online from its first connection until its last
//! one has been gone for the grace period (the caller runs the timer and
//! calls [`crate::route::Registry::grace_over`]), so a phone that reconnects after a
//! stall does not flap. Updates land in each watcher's coalescing slot
//! (`Mailbox::presence`), so a slow reader holds at most the latest state
//! per account.
//!
//! A connection's subscription costs one pointer in each watched
//! account's entry and one id in its own list, and nothing once it is
//! gone.

use std::sync::{Arc, Mutex};

use pipit_protocol::message::pb;

use super::mailbox::Mailbox;

/// One connection's subscriptions.
#[derive(Debug)]
pub struct Watcher {
    mailbox: Arc<Mailbox>,
    state: Mutex<WatchState>,
}

#[derive(Debug, Default)]
struct WatchState {
    /// Watched accounts, sorted.
    accounts: Vec<u64>,
    /// The sequence number of the subscription in force: a request that
    /// finished its reads after a later one must not undo it.
    applied: u64,
}

impl Watcher {
    /// Subscriptions delivered to `mailbox`.
    pub fn new(mailbox: Arc<Mailbox>) -> Arc<Self> {
        Arc::new(Self { mailbox, state: Mutex::new(WatchState::default()) })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, WatchState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The accounts watched now.
    pub fn accounts(&self) -> Vec<u64> {
        self.lock().accounts.clone()
    }
}

/// An account's presence beyond its connections. Every connected account
/// has one, so it is small: what only watched accounts need is boxed.
#[derive(Debug, Default)]
pub(super) struct AccountPresence {
    /// Nonzero while the last connection has left and the grace period
    /// runs: the generation [`crate::route::Registry::grace_over`] must name.
    pub(super) leaving: u64,
    /// Watchers and what they are shown; `None` for most accounts.
    watched: Option<Box<Watched>>,
}

#[derive(Debug, Default)]
struct Watched {
    /// When the account was last seen (seconds): when its last connection
    /// left, or what storage said when it was first watched.
    last_seen: u64,
    /// Whether it hides its last seen (`NOBODY`), once known: what
    /// storage said when it was first watched, or its latest `PrivacySet`
    /// while it is here.
    hidden: Option<bool>,
    /// Connections watching it.
    watchers: Vec<Arc<Watcher>>,
}

impl AccountPresence {
    pub(super) fn is_watched(&self) -> bool {
        self.watched.as_ref().is_some_and(|w| !w.watchers.is_empty())
    }

    /// The last connection left at `now`.
    pub(super) fn left(&mut self, generation: u64, now: u64) {
        self.leaving = generation;
        if let Some(w) = &mut self.watched {
            w.last_seen = now;
        }
    }

    /// What a watcher sees.
    fn shown(&self, account: u64, online: bool) -> pb::Presence {
        let w = self.watched.as_deref();
        let hidden = w.is_some_and(|w| w.hidden == Some(true));
        let last_seen = if online || hidden { 0 } else { w.map_or(0, |w| w.last_seen) };
        pb::Presence { account, online, last_seen }
    }

    /// Tells every watcher the account's state.
    pub(super) fn publish(&self, account: u64, online: bool) {
        let Some(w) = &self.watched else { return };
        if w.watchers.is_empty() {
            return;
        }
        let p = self.shown(account, online);
        for x in &w.watchers {
            if !x.mailbox.presence(p) {
                metrics::counter!("pipit_presence_dropped_total").increment(1);
            }
        }
    }
}

/// What storage says about an account, for a new subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stored {
    /// The account.
    pub account: u64,
    /// Its durable last seen (0: never recorded).
    pub last_seen: u64,
    /// Whether it hides its last seen.
    pub hidden: bool,
}

impl Watcher {
    /// Replaces the subscriptions with the accounts of `stored` (sorted,
    /// distinct), unless a later request (`seq`) was applied already: calls
    /// `dropped` for each account no longer watched and `added` for each
    /// one in `stored`. The watcher stays locked throughout, so two
    /// requests of one connection never interleave.
    pub(super) fn resubscribe(
        &self,
        seq: u64,
        stored: &[Stored],
        mut dropped: impl FnMut(u64),
        added: impl FnMut(&Stored),
    ) {
        let mut st = self.lock();
        if seq < st.applied {
            return;
        }
        st.applied = seq;
        let old = std::mem::take(&mut st.accounts);
        for &a in &old {
            if stored.binary_search_by_key(&a, |s| s.account).is_err() {
                dropped(a);
            }
        }
        stored.iter().for_each(added);
        let delta = stored.len() as f64 - old.len() as f64;
        metrics::gauge!("pipit_presence_subscriptions").increment(delta);
        st.accounts = stored.iter().map(|s| s.account).collect();
    }

    /// Ends all subscriptions for good (the connection closed), calling
    /// `dropped` for each account that was watched.
    pub(super) fn end(&self, dropped: impl FnMut(u64)) {
        let mut st = self.lock();
        st.applied = u64::MAX;
        let old = std::mem::take(&mut st.accounts);
        old.iter().copied().for_each(dropped);
        metrics::gauge!("pipit_presence_subscriptions").decrement(old.len() as f64);
    }
}

impl AccountPresence {
    /// The grace period of departure `generation` (left at `at`) is over:
    /// unless a later departure or a return made it moot, the watchers
    /// learn the account went offline. Returns whether they did.
    pub(super) fn grace_over(&mut self, account: u64, generation: u64, at: u64) -> bool {
        if self.leaving != generation {
            return false;
        }
        self.leaving = 0;
        if let Some(w) = &mut self.watched {
            // Watched since it left: what storage said is older.
            w.last_seen = w.last_seen.max(at);
        }
        self.publish(account, false);
        true
    }

    /// `w` watches this account (`online` now), of which storage said
    /// `s`; it is shown the current state at once.
    pub(super) fn watch(&mut self, s: &Stored, online: bool, w: &Arc<Watcher>) {
        let watched = self.watched.get_or_insert_with(Box::default);
        // What memory knows is newer than what was read: a privacy
        // change or a departure since.
        watched.hidden.get_or_insert(s.hidden);
        watched.last_seen = watched.last_seen.max(s.last_seen);
        if !watched.watchers.iter().any(|x| Arc::ptr_eq(x, w)) {
            watched.watchers.push(w.clone());
        }
        if !w.mailbox.presence(self.shown(s.account, online)) {
            metrics::counter!("pipit_presence_dropped_total").increment(1);
        }
    }

    /// `w` no longer watches this account.
    pub(super) fn unwatch(&mut self, w: &Arc<Watcher>) {
        if let Some(watched) = &mut self.watched {
            if let Some(i) = watched.watchers.iter().position(|x| Arc::ptr_eq(x, w)) {
                watched.watchers.swap_remove(i);
            }
            if watched.watchers.is_empty() {
                self.watched = None;
            }
        }
    }

    /// The account changed whether it hides its last seen; an offline
    /// one's watchers see the change at once.
    pub(super) fn set_hidden(&mut self, account: u64, hidden: bool, online: bool) {
        let watched = self.watched.get_or_insert_with(Box::default);
        let changed = watched.hidden != Some(hidden);
        watched.hidden = Some(hidden);
        if changed && !online {
            self.publish(account, false);
        }
    }

    #[cfg(test)]
    pub(super) fn watcher_count(&self) -> usize {
        self.watched.as_ref().map_or(0, |w| w.watchers.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::DeviceAddr;
    use crate::route::registry::{Account, Registry};
    use crate::route::ConnHandle;

    fn conn(id: u64) -> ConnHandle {
        ConnHandle { id, mailbox: Arc::new(Mailbox::new(4, crate::route::Budget::new(1 << 20))) }
    }

    fn seen(m: &Mailbox) -> Vec<(u64, bool, u64)> {
        m.take_events().map_or(Vec::new(), |e| e.presence.iter().map(|p| (p.account, p.online, p.last_seen)).collect())
    }

    fn stored(account: u64, last_seen: u64, hidden: bool) -> Stored {
        Stored { account, last_seen, hidden }
    }

    #[test]
    fn a_watcher_gets_the_state_at_once_then_each_change_and_nothing_after_it_leaves() {
        let r = Registry::default();
        let me = conn(1);
        let w = Watcher::new(me.mailbox.clone());
        r.watch(&w, 1, &[stored(5, 100, false), stored(6, 200, true)]);
        assert_eq!(seen(&me.mailbox), vec![(5, false, 100), (6, false, 0)], "hidden shows 0");
        let a5 = DeviceAddr::new(5, 0);
        assert!(r.insert(a5, conn(2)).is_none());
        assert_eq!(seen(&me.mailbox), vec![(5, true, 0)]);
        let l = r.remove(a5, 2, 300).unwrap();
        assert!(seen(&me.mailbox).is_empty(), "still online during the grace period");
        assert_eq!(r.grace_over(l), Some(300));
        assert_eq!(seen(&me.mailbox), vec![(5, false, 300)]);
        assert_eq!(r.grace_over(l), None, "once");
        r.set_hidden(5, true);
        assert_eq!(seen(&me.mailbox), vec![(5, false, 0)]);
        r.unwatch(&w);
        assert_eq!(r.accounts_tracked(), 0, "nothing is kept for a connection that is gone");
        assert!(r.insert(a5, conn(3)).is_none());
        assert!(seen(&me.mailbox).is_empty());
    }

    #[test]
    fn an_account_watched_while_leaving_shows_when_it_left() {
        let r = Registry::default();
        let me = conn(1);
        let w = Watcher::new(me.mailbox.clone());
        let a = DeviceAddr::new(4, 0);
        assert!(r.insert(a, conn(2)).is_none());
        let l = r.remove(a, 2, 500).unwrap();
        r.watch(&w, 1, &[stored(4, 100, false)]);
        assert_eq!(seen(&me.mailbox), vec![(4, true, 0)], "online during the grace");
        assert_eq!(r.grace_over(l), Some(500));
        assert_eq!(seen(&me.mailbox), vec![(4, false, 500)], "not the older stored value");
    }

    #[test]
    fn a_reconnect_within_the_grace_period_does_not_flap() {
        let r = Registry::default();
        let me = conn(1);
        let w = Watcher::new(me.mailbox.clone());
        let a = DeviceAddr::new(9, 0);
        assert!(r.insert(a, conn(2)).is_none());
        r.watch(&w, 1, &[stored(9, 0, false)]);
        assert_eq!(seen(&me.mailbox), vec![(9, true, 0)]);
        let first = r.remove(a, 2, 50).unwrap();
        assert!(r.insert(a, conn(3)).is_none());
        assert_eq!(r.grace_over(first), None, "came back in time");
        assert!(seen(&me.mailbox).is_empty(), "no offline, no second online");
        let second = r.remove(a, 3, 60).unwrap();
        assert_ne!(second.generation, first.generation);
        assert_eq!(r.grace_over(second), Some(60));
        assert_eq!(seen(&me.mailbox), vec![(9, false, 60)]);
    }

    #[test]
    fn replacing_a_subscription_drops_the_old_accounts_and_a_late_request_changes_nothing() {
        let r = Registry::default();
        let me = conn(1);
        let w = Watcher::new(me.mailbox.clone());
        r.watch(&w, 1, &[stored(1, 0, false), stored(2, 0, false)]);
        r.watch(&w, 3, &[stored(2, 0, false), stored(3, 0, false)]);
        r.watch(&w, 2, &[stored(4, 0, false)]);
        assert_eq!(w.accounts(), vec![2, 3]);
        assert!(r.stripe(1).get(&1).is_none(), "no longer watched, not online: gone");
        assert_eq!(r.stripe(2).get(&2).unwrap().presence.watcher_count(), 1, "watched once, not twice");
        assert!(r.stripe(4).get(&4).is_none());
        r.unwatch(&w);
        r.watch(&w, 4, &[stored(7, 0, false)]);
        assert_eq!(r.accounts_tracked(), 0, "a closed connection cannot subscribe again");
    }

    #[test]
    fn an_unwatched_account_costs_its_connections_and_a_few_words() {
        let r = Registry::default();
        let a = DeviceAddr::new(3, 0);
        assert!(r.insert(a, conn(1)).is_none());
        assert!(std::mem::size_of::<AccountPresence>() <= 16);
        assert!(std::mem::size_of::<Account>() <= 40, "a connection vector and the presence words");
        assert!(r.stripe(3).get(&3).unwrap().presence.watched.is_none());
        let l = r.remove(a, 1, 77).unwrap();
        assert_eq!(r.grace_over(l), Some(77), "the departure carries its time");
        assert_eq!(r.accounts_tracked(), 0);
    }
}
