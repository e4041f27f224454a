//! Read-your-writes for the writer: a typed view of what this round has
//! written but not yet committed, undoable per operation, over what the
//! round before it wrote (still being synced: the writer applies the next
//! round meanwhile), over an optional bounded cache of committed values.
//!
//! The writer thread is the only writer of every table, so a value it
//! cached after a successful commit stays exact until it writes it again.
//! For the same reason a key missing from every layer reads correctly from
//! the database even while the previous round is still being written:
//! everything that round wrote to a table with an overlay is in `pending`.

use std::collections::HashMap;
use std::hash::Hash;

/// What the overlay knows about a key.
pub(crate) enum Lookup<V> {
    /// Written (or deleted, `None`) in this round, or cached as committed.
    Known(Option<V>),
    /// Read it from the database (and [`Overlay::remember`] it).
    Miss,
}

pub(crate) struct Overlay<K, V> {
    /// Durable values; empty when `cache_max` is 0.
    committed: HashMap<K, Option<V>>,
    cache_max: usize,
    /// Written in this round, not yet committed.
    round: HashMap<K, Option<V>>,
    /// Written by the previous round, whose commit is in flight: not yet
    /// in the database, not yet known to be durable.
    pending: HashMap<K, Option<V>>,
    /// The current operation's writes: each key with its round entry from
    /// before the write, to put back if the operation fails.
    undo: Vec<(K, Option<Option<V>>)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Overlay<K, V> {
    /// An overlay caching up to `cache_max` committed values (0: none).
    pub(crate) fn new(cache_max: usize) -> Self {
        Self { committed: HashMap::new(), cache_max, round: HashMap::new(), pending: HashMap::new(), undo: Vec::new() }
    }

    pub(crate) fn get(&self, k: &K) -> Lookup<V> {
        match self.round.get(k).or_else(|| self.pending.get(k)).or_else(|| self.committed.get(k)) {
            Some(v) => Lookup::Known(v.clone()),
            None => Lookup::Miss,
        }
    }

    /// Caches a value just read from the database.
    pub(crate) fn remember(&mut self, k: K, v: Option<V>) {
        if self.cache_max == 0 {
            return;
        }
        if self.committed.len() >= self.cache_max {
            // Bounded by clearing: the next reads go to RocksDB's own
            // block cache, which is sized for this.
            self.committed.clear();
        }
        self.committed.insert(k, v);
    }

    /// Records a write (`None`: a delete) by the current operation.
    pub(crate) fn set(&mut self, k: K, v: Option<V>) {
        let before = self.round.insert(k.clone(), v);
        self.undo.push((k, before));
    }

    pub(crate) fn op_commit(&mut self) {
        self.undo.clear();
    }

    pub(crate) fn op_rollback(&mut self) {
        while let Some((k, before)) = self.undo.pop() {
            match before {
                Some(v) => {
                    self.round.insert(k, v);
                }
                None => {
                    self.round.remove(&k);
                }
            }
        }
    }

    /// The round is written out: its values stay readable (as `pending`)
    /// until [`Overlay::pending_done`] says how the write went. At most one
    /// round is pending.
    pub(crate) fn seal(&mut self) {
        debug_assert!(self.undo.is_empty());
        debug_assert!(self.pending.is_empty(), "one round in flight at a time");
        // Swapping keeps both maps' allocations for the next rounds.
        std::mem::swap(&mut self.round, &mut self.pending);
    }

    /// The pending round's write is over: durable (`ok`) or never written.
    /// After a failure the open round was built on values that do not
    /// exist; the caller drops it too ([`Overlay::abandon`]).
    pub(crate) fn pending_done(&mut self, ok: bool) {
        if !ok || self.cache_max == 0 {
            self.pending.clear();
            return;
        }
        if self.committed.len() + self.pending.len() > self.cache_max {
            self.committed.clear();
        }
        self.committed.extend(self.pending.drain());
    }

    /// Forgets everything the open round wrote, as if it never ran.
    pub(crate) fn abandon(&mut self) {
        self.undo.clear();
        self.round.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(o: &Overlay<u8, u64>, k: u8) -> Option<Option<u64>> {
        match o.get(&k) {
            Lookup::Known(v) => Some(v),
            Lookup::Miss => None,
        }
    }

    #[test]
    fn a_rolled_back_operation_leaves_no_trace_and_a_failed_round_none_either() {
        let mut o = Overlay::new(10);
        o.set(1, Some(10));
        o.op_commit();
        o.set(1, Some(11));
        o.set(2, Some(20));
        o.set(2, None);
        o.op_rollback();
        assert_eq!(known(&o, 1), Some(Some(10)));
        assert_eq!(known(&o, 2), None);
        o.seal();
        o.pending_done(false);
        assert_eq!(known(&o, 1), None, "a failed commit forgets the round");
        o.set(1, Some(12));
        o.op_commit();
        o.seal();
        o.pending_done(true);
        assert_eq!(known(&o, 1), Some(Some(12)), "a committed value is cached");
    }

    #[test]
    fn the_round_in_flight_stays_readable_under_the_next_and_goes_with_its_failure() {
        let mut o = Overlay::new(0);
        o.set(1, Some(10));
        o.set(2, Some(20));
        o.op_commit();
        o.seal();
        // The next round reads what the round in flight wrote, and its
        // own writes win.
        assert_eq!(known(&o, 1), Some(Some(10)));
        o.set(2, None);
        o.op_commit();
        assert_eq!(known(&o, 2), Some(None));
        o.pending_done(true);
        assert_eq!(known(&o, 1), None, "durable: read from the database now (no cache)");
        assert_eq!(known(&o, 2), Some(None));
        o.seal();
        o.set(3, Some(30));
        o.op_commit();
        // The write in flight fails: the open round was built on it.
        o.pending_done(false);
        o.abandon();
        assert_eq!(known(&o, 2), None);
        assert_eq!(known(&o, 3), None);
    }
}
