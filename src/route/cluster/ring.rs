//! The ring: which node owns an account, by consistent hashing over the
//! node list, and the owner-local account ids that need no coordination.
//!
//! The ring is mpchash's multi-probe consistent hashing (Appleton and
//! O'Reilly, 2015): one position per node and 23 probes per key give an
//! even spread without virtual nodes, so a ring of a few nodes is a few
//! entries, and adding a node moves only the keys it takes over. Positions
//! are seeded xxh3 of the node id and of the key, the same in every process
//! on every machine; `placement_is_stable` pins them so that an upgrade of
//! the crate that would move accounts fails a test instead of a cluster.

use std::hash::{Hash, Hasher};

use mpchash::HashRing;

/// Node slots: an account id's residue modulo this names the node that
/// created it, so at most this many nodes ever join one cluster.
pub const MAX_NODES: u64 = 1_024;

/// Candidate ids tried per node in the list before an allocation gives
/// up: each candidate is owned by this node with probability about 1/n,
/// so failing after 64·n tries happens with probability about e^-64.
const TRIES_PER_NODE: u64 = 64;

/// A node on the ring: placed by its id alone; `index` finds it in the
/// node list without a string compare.
#[derive(Clone)]
struct Point {
    id: String,
    index: usize,
}

impl Hash for Point {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// An account id as the ring hashes it: its big-endian bytes alone
/// (`u64::hash` writes native-endian bytes, and arrays a length prefix of
/// native width), so placement never depends on the machine.
struct Key(u64);

impl Hash for Key {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write(&self.0.to_be_bytes());
    }
}

/// The consistent-hash ring over one version of the node list.
#[derive(Clone)]
pub struct Ring {
    ring: HashRing<Point>,
    len: usize,
}

impl std::fmt::Debug for Ring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ring").field("nodes", &self.len).finish()
    }
}

impl Ring {
    /// A ring over `ids` (the node list, in any order).
    pub fn new<'a>(ids: impl IntoIterator<Item = &'a str>) -> Self {
        let ring = HashRing::new();
        let mut len = 0;
        for (index, id) in ids.into_iter().enumerate() {
            ring.add(Point { id: id.to_string(), index });
            len += 1;
        }
        Self { ring, len }
    }

    /// The index (in the list the ring was built from) of the node that
    /// owns `account`; `None` for an empty ring.
    pub fn owner(&self, account: u64) -> Option<usize> {
        self.ring.node(&Key(account)).map(|t| t.node().index)
    }

    /// Each node's share of the account ids (by index in the list),
    /// estimated from `samples` evenly spread ids: what an operator reads
    /// to see how balanced the ring is.
    pub fn shares(&self, samples: u64) -> Vec<f64> {
        let mut counts = vec![0u64; self.len];
        let step = u64::MAX / samples.max(1);
        for i in 0..samples {
            if let Some(o) = self.owner(i.wrapping_mul(step).wrapping_add(1)) {
                counts[o] += 1;
            }
        }
        counts.into_iter().map(|c| c as f64 / samples.max(1) as f64).collect()
    }

    /// Nodes on the ring.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the ring has no node.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The next account id for the node at `me` (its index in the ring's list)
/// with slot `slot`: `k · MAX_NODES + slot` for the next `k` from `next`
/// whose owner on the ring is this node.
///
/// Unique cluster-wide without asking anyone: slots are unique per node
/// (handed out once, under a compare-and-swap in etcd) and `next` never
/// repeats on one node, so two nodes never produce the same id. Owned by
/// its creator: an id is taken only if the ring places it here. `None`
/// after the bounded number of candidates (practically never; the caller
/// answers "retry later").
pub fn owned_id<E>(
    ring: &Ring,
    me: usize,
    slot: u32,
    mut next: impl FnMut() -> Result<u64, E>,
) -> Result<Option<u64>, E> {
    let tries = TRIES_PER_NODE * ring.len().max(1) as u64;
    for _ in 0..tries {
        let k = next()?;
        let Some(id) = k.checked_mul(MAX_NODES).and_then(|v| v.checked_add(u64::from(slot))) else {
            return Ok(None);
        };
        if id != 0 && ring.owner(id) == Some(me) {
            return Ok(Some(id));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

    #[test]
    fn placement_is_stable() {
        // Pinned: every node of a cluster, whatever its build, must agree,
        // and a dependency upgrade must not move accounts. If this fails,
        // placement changed: do not ship it without a migration.
        let ring = Ring::new(["n1", "n2", "n3"]);
        let owners: Vec<usize> = (1..=12u64).map(|a| ring.owner(a * 1_024).unwrap()).collect();
        assert_eq!(owners, PINNED);
        // Order of the list does not matter, only the ids.
        let shuffled = Ring::new(["n3", "n1", "n2"]);
        let names = ["n1", "n2", "n3"];
        let shuffled_names = ["n3", "n1", "n2"];
        for a in 1..200u64 {
            assert_eq!(names[ring.owner(a).unwrap()], shuffled_names[shuffled.owner(a).unwrap()]);
        }
    }

    const PINNED: [usize; 12] = [2, 1, 0, 0, 2, 0, 2, 0, 0, 0, 0, 2];

    #[test]
    fn spread_is_even_and_a_new_node_moves_only_its_share() {
        let three = Ring::new(["n1", "n2", "n3"]);
        let four = Ring::new(["n1", "n2", "n3", "n4"]);
        let mut counts = [0usize; 3];
        let mut moved = 0;
        let n = 30_000u64;
        for a in 1..=n {
            let o3 = three.owner(a).unwrap();
            counts[o3] += 1;
            let o4 = four.owner(a).unwrap();
            if o4 != o3 {
                // Only to the new node, never between old ones.
                assert_eq!(o4, 3, "account {a} moved between old nodes");
                moved += 1;
            }
        }
        for c in counts {
            assert!(c as u64 > n / 3 * 7 / 10 && (c as u64) < n / 3 * 13 / 10, "uneven: {counts:?}");
        }
        assert!(moved as u64 > n / 4 / 2 && (moved as u64) < n / 4 * 2, "moved {moved}");
    }

    #[test]
    fn shares_add_up_and_are_even() {
        let shares = Ring::new(["n1", "n2", "n3"]).shares(4_096);
        assert!((shares.iter().sum::<f64>() - 1.0).abs() < 1e-9, "{shares:?}");
        assert!(shares.iter().all(|s| (0.25..0.42).contains(s)), "{shares:?}");
        assert!(Ring::new([]).shares(10).is_empty());
    }

    #[test]
    fn owned_ids_are_unique_across_nodes_and_owned_by_their_creator() {
        let names = ["a", "b", "c"];
        let ring = Ring::new(names);
        let mut seen = HashSet::new();
        for (me, slot) in [(0usize, 0u32), (1, 1), (2, 2)] {
            let mut k = 1u64;
            for _ in 0..500 {
                let id = owned_id::<()>(&ring, me, slot, || {
                    k += 1;
                    Ok(k - 1)
                })
                .unwrap()
                .unwrap();
                assert_eq!(ring.owner(id), Some(me));
                assert_eq!(id % MAX_NODES, u64::from(slot));
                assert!(seen.insert(id), "id {id} given twice");
            }
        }
    }

    #[test]
    fn allocation_gives_up_after_bounded_tries() {
        // A node that is not on the ring owns nothing.
        let ring = Ring::new(["a", "b"]);
        let mut calls = 0;
        let r = owned_id::<()>(&ring, 7, 0, || {
            calls += 1;
            Ok(calls)
        })
        .unwrap();
        assert_eq!(r, None);
        assert_eq!(calls, 128);
    }
}
