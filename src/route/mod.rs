//! Where things go that never pass through the commit: which connection
//! holds which device, how a new inbox entry reaches it, and the memory
//! budget that bounds what waits in between. Later:
//! presence, and the router that chooses between a local mailbox, another
//! node and a push wake-up.

pub mod budget;
pub mod registry;

pub use budget::{Budget, Charge};
pub use registry::{ConnHandle, Mailbox, Push, Registry};

use pipit_protocol::Message;

use crate::model::DeviceAddr;

/// Where the writer hands inbox entries once they are durable.
pub trait Deliveries: Send + Sync + 'static {
    /// Entry `id` of `to`'s inbox, `msg`, is durable.
    fn push(&self, to: DeviceAddr, id: u64, msg: Message);
}
