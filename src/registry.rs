//! Which connection holds which device, and how the storage writer hands
//! new inbox entries to it.
//!
//! Each online device has one [`ConnHandle`]: a bounded channel into its
//! connection task (on whichever shard accepted it). The writer pushes
//! with `try_send`; a full channel never blocks the writer: the entry is
//! durable in the inbox already, so the push is dropped, the connection is
//! flagged, and it reads the inbox to catch up. That keeps memory bounded
//! per connection however slow its link.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use pipit_protocol::Message;
use tokio::sync::{mpsc, Notify};

use crate::storage::{Deliveries, DeviceAddr};

/// A new inbox entry for a connection: its inbox id and the message,
/// boxed so an idle connection's channel block stays small.
pub type Push = (u64, Box<Message>);

/// How to reach one connection.
#[derive(Clone)]
pub struct ConnHandle {
    /// Unique per connection, so a closing connection removes only itself.
    pub id: u64,
    /// New inbox entries.
    pub tx: mpsc::Sender<Push>,
    /// Set when a push was dropped because `tx` was full: the connection
    /// must read its inbox to catch up.
    pub overflow: Arc<AtomicBool>,
    /// Wakes the connection when another login of the same device
    /// replaces it.
    pub kick: Arc<Notify>,
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
    fn push(&self, to: DeviceAddr, id: u64, msg: &Message) {
        let handle = self.stripe(to).get(&to).cloned();
        if let Some(h) = handle {
            if h.tx.try_send((id, Box::new(msg.clone()))).is_err() {
                h.overflow.store(true, Ordering::Release);
            }
        }
    }
}
