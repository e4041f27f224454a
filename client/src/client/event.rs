//! What the client reports: [`Event`]s for the app, [`Stats`] counters.

use std::sync::atomic::AtomicU64;

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::e2e::{DeviceIdentity, Undecryptable};

/// What the client reports.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Logged in. With end-to-end encryption, a device's first login is
    /// reported once its keys are on the server (one more round trip), so
    /// that a peer told of the new device can already reach it; or, if
    /// something else arrives first, just before that: it always comes
    /// before any event of its connection.
    Connected {
        /// Account id.
        account: u64,
        /// Device number.
        device: u32,
        /// Inbox entries waiting at login (up to the server's count cap).
        pending: u32,
        /// The optional features this server offers (groups, presence,
        /// ...). Requests of others are answered `NOT_SUPPORTED`.
        features: Vec<pb::Feature>,
    },
    /// The connection dropped; the client reconnects by itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
    /// The client stopped for good (a changed server key, a refused
    /// device): reconnecting cannot help.
    Stopped {
        /// Why.
        reason: String,
    },
    /// A message for this device (or a copy of one this account sent).
    /// With encryption on, `payload` is the decrypted plaintext, checked
    /// to come from `from`/`from_device` and to belong to this
    /// conversation.
    Message(pb::Deliver),
    /// A message this device cannot read (encryption on); it was
    /// acknowledged all the same, so the stream goes on. `message.payload`
    /// is what arrived.
    Undecryptable {
        /// The delivery as it arrived.
        message: pb::Deliver,
        /// Why it cannot be read.
        reason: Undecryptable,
    },
    /// A device's end-to-end identity is not the one this device pinned.
    /// Until the app accepts it ([`Client::trust_identity`](super::Client::trust_identity), ideally after
    /// the people compared it), nothing is encrypted for that device and
    /// nothing from it is believed.
    IdentityChanged {
        /// Its account.
        account: u64,
        /// Its device number.
        device: u32,
        /// The identity pinned before.
        old: Option<DeviceIdentity>,
        /// The identity it shows now.
        new: DeviceIdentity,
    },
    /// A send is durable on the server.
    Sent(pb::Sent),
    /// A send was refused for good and removed from the outbox.
    SendFailed {
        /// Its client id.
        id: u64,
        /// Why.
        code: pb::ErrorCode,
    },
    /// A delivered or read receipt.
    Receipt(pb::Receipt),
    /// A sent message expired undelivered.
    Expired(pb::Expired),
    /// A group this account is in was created or changed (members,
    /// admins, name): its new state, in order with the group's messages.
    Group(pb::GroupInfo),
    /// A watched account's presence.
    Presence(pb::Presence),
    /// Someone is typing.
    Typing(pb::Typing),
    /// Any other server message (answers to requests).
    Other(Message),
}

/// Counters, for apps' diagnostics and for tests.
#[derive(Debug, Default)]
pub struct Stats {
    /// Successful logins after the first.
    pub reconnects: AtomicU64,
    /// Deliveries dropped as already processed.
    pub duplicates_dropped: AtomicU64,
    /// Deliveries handed to the app.
    pub received: AtomicU64,
    /// Sends confirmed durable.
    pub sent: AtomicU64,
    /// Sends transmitted again after a reconnect.
    pub resent: AtomicU64,
    /// Sends the server refused for now (busy, rate limit) and that were
    /// transmitted again after its pause, on the same connection.
    pub deferred: AtomicU64,
    /// Deliveries that could not be decrypted.
    pub undecryptable: AtomicU64,
    /// Uploads of this device's end-to-end keys the server stored.
    pub keys_published: AtomicU64,
}
