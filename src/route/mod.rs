//! Where things go that never pass through the commit: which connection
//! holds which device, and how a new inbox entry reaches it. Later:
//! presence, and the router that chooses between a local mailbox, another
//! node and a push wake-up.

pub mod registry;

pub use registry::{ConnHandle, Mailbox, Push, Registry};

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::model::DeviceAddr;

/// Where the writer hands inbox entries once they are durable.
pub trait Deliveries: Send + Sync + 'static {
    /// Entry `id` of `to`'s inbox, `msg`, is durable.
    fn push(&self, to: DeviceAddr, id: u64, msg: Message);

    /// A notice for `to`'s connection that is not an inbox entry (a
    /// `KeysStatus`): sent at most once, dropped when the device is offline
    /// or its mailbox is full, never stored.
    fn notify(&self, _to: DeviceAddr, _msg: Message) {}

    /// `to` no longer exists (it was unlinked): its connection, if any, is
    /// told `code` and closed.
    fn disconnect(&self, _to: DeviceAddr, _code: pb::ErrorCode) {}
}
