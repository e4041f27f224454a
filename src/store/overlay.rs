//! Read-your-writes for the writer: a typed view of what this round has
//! written but not yet committed, undoable per operation, over an optional
//! bounded cache of committed values.
//!
//! The writer thread is the only writer of every table, so a value it
//! cached after a successful commit stays exact until it writes it again.

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
    /// The current operation's writes: each key with its round entry from
    /// before the write, to put back if the operation fails.
    undo: Vec<(K, Option<Option<V>>)>,
}

impl<K: Eq + Hash + Clone, V: Clone> Overlay<K, V> {
    /// An overlay caching up to `cache_max` committed values (0: none).
    pub(crate) fn new(cache_max: usize) -> Self {
        Self { committed: HashMap::new(), cache_max, round: HashMap::new(), undo: Vec::new() }
    }

    pub(crate) fn get(&self, k: &K) -> Lookup<V> {
        match self.round.get(k).or_else(|| self.committed.get(k)) {
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

    /// The round is over: what it wrote is now durable (`ok`) or was
    /// never written.
    pub(crate) fn round_done(&mut self, ok: bool) {
        debug_assert!(self.undo.is_empty());
        if !ok || self.cache_max == 0 {
            self.round.clear();
            return;
        }
        if self.committed.len() + self.round.len() > self.cache_max {
            self.committed.clear();
        }
        self.committed.extend(self.round.drain());
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
        o.round_done(false);
        assert_eq!(known(&o, 1), None, "a failed commit forgets the round");
        o.set(1, Some(12));
        o.op_commit();
        o.round_done(true);
        assert_eq!(known(&o, 1), Some(Some(12)), "a committed value is cached");
    }
}
