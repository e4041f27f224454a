//! Where things go that never pass through the commit: which connection
//! holds which device, and how a new inbox entry reaches it. Later:
//! presence, and the router that chooses between a local mailbox, another
//! node and a push wake-up.

pub mod registry;

pub use registry::{ConnHandle, Mailbox, Push, Registry};

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
}
