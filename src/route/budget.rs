//! The server's memory budget: one count of the bytes that peers make the
//! server hold in transient buffers (read buffers and partial frames,
//! sends waiting for storage, outbound buffers, mailbox pushes), against
//! one limit for the whole server.
//!
//! Limits per connection alone do not bound a server: 128 accounts each
//! within their own limits flooding 60 KB sends held 2 GiB. With one
//! budget, a connection that holds more than [`Budget::heavy`] bytes
//! stops reading while the server is over its limit (TCP then pushes
//! back on that client), and a mailbox that would take the server over
//! drops the push (the entry is durable; its connection reads it from the
//! inbox later). Light connections, the ones with a few small messages in
//! flight, keep going: the heaviest senders wait first.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use crate::model::LogGate;

/// The shared count and its limit.
#[derive(Debug)]
pub struct Budget {
    /// What it bounds, for logs and metrics.
    name: &'static str,
    used: AtomicUsize,
    limit: usize,
    heavy: usize,
    /// Times a connection stopped reading or a push was dropped because
    /// of the budget (metrics, admin).
    hits: AtomicU64,
}

/// A connection holding at least this many bytes is heavy: it stops
/// reading while the server is over budget. One full frame, so a client
/// with a few ordinary messages in flight never waits for the budget.
pub const HEAVY_BYTES: usize = 64 * 1024;

static LOG: LogGate = LogGate::new(10_000);

impl Budget {
    /// The memory budget: `limit` bytes.
    pub fn new(limit: usize) -> Arc<Self> {
        Self::named("memory", limit)
    }

    /// A budget of `limit` bytes for `name` (in logs and the metric's
    /// `budget` label).
    pub fn named(name: &'static str, limit: usize) -> Arc<Self> {
        Arc::new(Self { name, used: AtomicUsize::new(0), limit, heavy: HEAVY_BYTES, hits: AtomicU64::new(0) })
    }

    /// Bytes held now.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// The limit.
    pub fn limit(&self) -> usize {
        self.limit
    }

    /// Whether the server holds more than its limit.
    pub fn over(&self) -> bool {
        self.used() > self.limit
    }

    /// Whether a holder of `held` bytes must stop taking more now.
    pub fn must_wait(&self, held: usize) -> bool {
        held >= self.heavy && self.over()
    }

    /// What it bounds (in logs and the metric's `budget` label).
    pub fn name(&self) -> &'static str {
        self.name
    }

    /// The first of `holds` (a budget and what the holder holds against
    /// it) that makes the holder wait: the one to count and log, so the
    /// log names the bound that was reached with its own figures.
    pub fn first_to_wait<'a>(holds: &[(&'a Arc<Budget>, usize)]) -> Option<&'a Arc<Budget>> {
        holds.iter().find(|(b, held)| b.must_wait(*held)).map(|(b, _)| *b)
    }

    /// Times the budget made a connection wait or dropped a push.
    pub fn hits(&self) -> u64 {
        self.hits.load(Ordering::Relaxed)
    }

    /// Counts, logs (at most once per 10 s) and meters one hit.
    pub fn hit(&self, what: &'static str) {
        self.hits.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("pipit_memory_budget_hits_total", "budget" => self.name, "what" => what).increment(1);
        if let Some(suppressed) = LOG.open() {
            tracing::warn!(
                budget = self.name,
                used = self.used(),
                limit = self.limit,
                what,
                suppressed,
                "budget reached: the heaviest connections stop reading until it frees"
            );
        }
    }

    fn add(&self, n: usize) {
        self.used.fetch_add(n, Ordering::Relaxed);
    }

    fn sub(&self, n: usize) {
        self.used.fetch_sub(n, Ordering::Relaxed);
    }

    /// Takes `n` bytes for as long as the returned charge lives.
    pub fn charge(self: &Arc<Self>, n: usize) -> Charge {
        self.add(n);
        Charge { budget: self.clone(), bytes: n }
    }

    /// Takes `n` bytes unless that would take the server over its limit.
    pub fn try_charge(self: &Arc<Self>, n: usize) -> Option<Charge> {
        let before = self.used.fetch_add(n, Ordering::Relaxed);
        if before + n > self.limit {
            self.sub(n);
            return None;
        }
        Some(Charge { budget: self.clone(), bytes: n })
    }
}

/// Bytes taken from a [`Budget`], given back on drop.
#[derive(Debug)]
pub struct Charge {
    budget: Arc<Budget>,
    bytes: usize,
}

impl Charge {
    /// The bytes this charge holds.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Makes the charge `n` bytes (a buffer grew or shrank).
    pub fn set(&mut self, n: usize) {
        if n > self.bytes {
            self.budget.add(n - self.bytes);
        } else {
            self.budget.sub(self.bytes - n);
        }
        self.bytes = n;
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.budget.sub(self.bytes);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn charges_count_against_one_limit_and_heavy_holders_wait_first() {
        let b = Budget::new(100 * 1024);
        let mut c = b.charge(10);
        c.set(90 * 1024);
        assert_eq!(b.used(), 90 * 1024);
        assert!(!b.over());
        assert!(b.try_charge(20 * 1024).is_none(), "would go over");
        let d = b.charge(20 * 1024);
        assert!(b.over());
        assert!(b.must_wait(HEAVY_BYTES), "a heavy holder waits");
        assert!(!b.must_wait(1024), "a light one does not");
        drop(d);
        c.set(0);
        assert_eq!(b.used(), 0);
        drop(c);
        assert_eq!(b.used(), 0);
    }

    #[test]
    fn the_bound_that_was_reached_is_the_one_named() {
        // The memory budget far from its limit, the queued-sends bound
        // over it: the reader waits because of the second, and that is
        // the one counted and logged (not "memory used=4 MB limit=3 GB").
        let memory = Budget::new(3 << 30);
        let queued = Budget::named("storage_queue", 4 << 20);
        let _m = memory.charge(4 << 20);
        let _q = queued.charge(5 << 20);
        let hit = Budget::first_to_wait(&[(&memory, 5 << 20), (&queued, 5 << 20)]).expect("must wait");
        assert_eq!((hit.name(), hit.used(), hit.limit()), ("storage_queue", 5 << 20, 4 << 20));
        assert!(Budget::first_to_wait(&[(&memory, 5 << 20), (&queued, 1024)]).is_none(), "a light holder goes on");
    }
}
