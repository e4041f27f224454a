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
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex};

use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::Notify;

use super::Deliveries;
use crate::model::DeviceAddr;

/// A new inbox entry for a connection: its inbox id and the message. Id 0
/// is a notice that is no inbox entry (a `KeysStatus`), sent as it is.
pub type Push = (u64, Box<Message>);

/// The queue between the storage writer and one connection.
#[derive(Debug)]
pub struct Mailbox {
    queue: Mutex<VecDeque<Push>>,
    capacity: usize,
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
    /// A mailbox holding at most `capacity` pushes.
    pub fn new(capacity: usize) -> Self {
        Self {
            queue: Mutex::new(VecDeque::new()),
            capacity,
            ready: Notify::new(),
            overflow: AtomicBool::new(false),
            kick: Notify::new(),
            kick_code: AtomicI32::new(pb::ErrorCode::Replaced as i32),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Push>> {
        self.queue.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds a push, or flags overflow when full. Never blocks on the
    /// connection.
    pub fn push(&self, p: Push) {
        {
            let mut q = self.lock();
            if q.len() < self.capacity {
                q.push_back(p);
            } else {
                self.overflow.store(true, Ordering::Release);
            }
        }
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

    /// Takes everything queued, in order, and releases the queue's memory.
    pub fn take(&self) -> VecDeque<Push> {
        std::mem::take(&mut *self.lock())
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

    fn notify(&self, to: DeviceAddr, msg: Message) {
        self.push(to, 0, msg);
    }

    fn disconnect(&self, to: DeviceAddr, code: pb::ErrorCode) {
        let handle = self.stripe(to).remove(&to);
        if let Some(h) = handle {
            h.mailbox.kick(code);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_mailbox_drops_and_flags_and_an_empty_one_holds_nothing() {
        let m = Mailbox::new(2);
        for id in 1..=3 {
            m.push((id, Box::new(pb::Ping { id }.into())));
        }
        assert!(m.overflow.load(Ordering::Acquire));
        let got: Vec<u64> = m.take().into_iter().map(|(id, _)| id).collect();
        assert_eq!(got, vec![1, 2]);
        assert_eq!(m.lock().capacity(), 0, "taking releases the buffer");
    }
}
