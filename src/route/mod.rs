//! Where things go that never pass through the commit: which connection
//! holds which device, how a new inbox entry reaches it (its mailbox, or
//! a push wake-up when it has none), who watches whose presence, typing
//! notices, and the memory budget that bounds what waits in between;
//! in a cluster, which node owns which account (`cluster`).

pub mod budget;
pub mod cluster;
pub mod mailbox;
pub mod presence;
pub mod registry;

pub use budget::{Budget, Charge};
pub use mailbox::{Events, Mailbox, Push};
pub use presence::{Stored, Watcher};
pub use registry::{ConnHandle, Leaving, Registry};

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::model::DeviceAddr;

/// Where the writer hands inbox entries once they are durable.
pub trait Deliveries: Send + Sync + 'static {
    /// Entry `id` of `to`'s inbox, `msg`, is durable.
    fn push(&self, to: DeviceAddr, id: u64, msg: Message);

    /// New entries of `to`'s inbox are durable; its connection should read
    /// them from storage (for entries too large to copy to every online
    /// member, such as a big group's change notice). Default: nothing.
    fn nudge(&self, to: DeviceAddr) {
        let _ = to;
    }

    /// A notice for `to`'s connection that is not an inbox entry (a
    /// `KeysStatus`): sent at most once, dropped when the device is offline
    /// or its mailbox is full, never stored.
    fn notify(&self, _to: DeviceAddr, _msg: Message) {}

    /// `to` no longer exists (it was unlinked): its connection, if any, is
    /// told `code` and closed.
    fn disconnect(&self, _to: DeviceAddr, _code: pb::ErrorCode) {}
}

/// Where a message for a device with no connection goes: the push
/// wake-up queue. Called on the writer thread: must never block.
pub trait Wakeups: Send + Sync + 'static {
    /// A message waits for `to`, which has no connection.
    fn wake(&self, to: DeviceAddr);
}
