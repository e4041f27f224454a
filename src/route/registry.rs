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

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pipit_protocol::Message;
use tokio::sync::Notify;

use super::budget::{Budget, Charge};
use super::Deliveries;
use crate::model::DeviceAddr;

/// A new inbox entry for a connection: its inbox id and the message.
pub type Push = (u64, Box<Message>);

/// The queue between the storage writer and one connection.
#[derive(Debug)]
pub struct Mailbox {
    /// The pushes, and their bytes charged to the server's budget.
    queue: Mutex<(VecDeque<Push>, Charge)>,
    capacity: usize,
    budget: Arc<Budget>,
    /// Wakes the connection when something was pushed (or dropped).
    pub ready: Notify,
    /// Set when a push was dropped because the mailbox was full: the
    /// connection must read its inbox to catch up.
    pub overflow: AtomicBool,
    /// Wakes the connection when another login of the same device
    /// replaces it.
    pub kick: Notify,
}

impl Mailbox {
    /// A mailbox holding at most `capacity` pushes, and nothing that would
    /// take the server over its memory `budget`.
    pub fn new(capacity: usize, budget: Arc<Budget>) -> Self {
        Self {
            queue: Mutex::new((VecDeque::new(), budget.charge(0))),
            capacity,
            budget,
            ready: Notify::new(),
            overflow: AtomicBool::new(false),
            kick: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, (VecDeque<Push>, Charge)> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a push, or flags overflow when the mailbox is full or the
    /// server is over its memory budget. Never blocks on the connection.
    pub fn push(&self, p: Push) {
        let bytes = p.1.encoded_len();
        {
            let mut q = self.lock();
            let over_budget = self.budget.used() + bytes > self.budget.limit();
            if q.0.len() < self.capacity && !over_budget {
                q.0.push_back(p);
                let held = q.1.bytes() + bytes;
                q.1.set(held);
            } else {
                if over_budget {
                    self.budget.hit("mailbox");
                }
                self.overflow.store(true, Ordering::Release);
            }
        }
        self.ready.notify_one();
    }

    /// Takes everything queued, in order, and releases the queue's memory.
    pub fn take(&self) -> VecDeque<Push> {
        let mut q = self.lock();
        q.1.set(0);
        std::mem::take(&mut q.0)
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

const STRIPES: usize = 64;

/// Online devices, striped to keep lock hold times short across shards.
pub struct Registry {
    stripes: Vec<Mutex<HashMap<DeviceAddr, ConnHandle>>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self { stripes: (0..STRIPES).map(|_| Mutex::new(HashMap::new())).collect() }
    }
}

impl Registry {
    fn stripe(&self, addr: DeviceAddr) -> std::sync::MutexGuard<'_, HashMap<DeviceAddr, ConnHandle>> {
        let i = (addr.account as usize ^ (addr.device as usize).rotate_left(7)) % STRIPES;
        self.stripes[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes `handle` the device's connection; returns the one it replaces.
    pub fn insert(&self, addr: DeviceAddr, handle: ConnHandle) -> Option<ConnHandle> {
        self.stripe(addr).insert(addr, handle)
    }

    /// Removes the device's entry if it is still connection `id`.
    pub fn remove(&self, addr: DeviceAddr, id: u64) {
        let mut s = self.stripe(addr);
        if s.get(&addr).is_some_and(|h| h.id == id) {
            s.remove(&addr);
        }
    }

    /// Whether the device is online here.
    pub fn is_online(&self, addr: DeviceAddr) -> bool {
        self.stripe(addr).contains_key(&addr)
    }

    /// Online devices (admin).
    pub fn online(&self) -> usize {
        self.stripes.iter().map(|s| s.lock().unwrap_or_else(|p| p.into_inner()).len()).sum()
    }
}

impl Deliveries for Registry {
    fn push(&self, to: DeviceAddr, id: u64, msg: Message) {
        let mailbox = self.stripe(to).get(&to).map(|h| h.mailbox.clone());
        if let Some(m) = mailbox {
            m.push((id, Box::new(msg)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipit_protocol::message::pb;

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
        assert_eq!(m.lock().0.capacity(), 0, "taking releases the buffer");
        assert_eq!(budget.used(), 0, "and gives its bytes back");
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
