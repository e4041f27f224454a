//! Each device's inbox: appending an entry (inside a writer operation),
//! and reading it (at login, and when a connection has fallen behind what
//! was pushed to it).

use std::sync::Arc;

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use super::receipts::{acked_meta, Acked};
use crate::model::DeviceAddr;
use crate::route::Deliveries;
use crate::store::counters::Counter;
use crate::store::inbox::set_inbox_id;
use crate::store::queued_receipts::ReceiptSlot;
use crate::store::{StorageError, Store, Txn};

/// Inbox entries an operation wrote, handed to their devices' connections
/// once they are durable, never before.
#[derive(Default)]
pub(crate) struct Pushes {
    entries: Vec<(DeviceAddr, u64, Message)>,
    /// Devices told to read new entries from storage instead.
    nudges: Vec<DeviceAddr>,
}

impl Pushes {
    /// Entry `id` of `addr`'s inbox, to hand over once durable.
    pub(crate) fn add(&mut self, addr: DeviceAddr, id: u64, msg: Message) {
        self.entries.push((addr, id, msg));
    }

    /// `addr` has new entries to read from storage once durable.
    pub(crate) fn nudge(&mut self, addr: DeviceAddr) {
        self.nudges.push(addr);
    }

    pub(crate) fn release(self, to: &dyn Deliveries) {
        for (addr, id, msg) in self.entries {
            to.push(addr, id, msg);
        }
        for addr in self.nudges {
            to.nudge(addr);
        }
    }
}

/// Appends `msg` to `to`'s inbox under its next inbox id.
pub(crate) fn enqueue(
    txn: &mut Txn<'_>,
    to: DeviceAddr,
    msg: Message,
    pushes: &mut Pushes,
) -> Result<(), StorageError> {
    append(txn, to, msg, pushes).map(drop)
}

/// Appends receipt `r` to `to`'s inbox and deletes the receipt queued
/// there before for the same conversation and kind (1:1: the same peer;
/// group: the same message), which `r` covers: a 1:1 receipt is
/// cumulative, a group count replaces the one before. However many
/// receipts a device misses, it finds at most one per conversation and
/// kind waiting. The new one goes at the end, never in the old one's
/// place: the old one may already be on its way to a connected device,
/// which would ack it and lose the new content with it.
pub(crate) fn enqueue_receipt(
    txn: &mut Txn<'_>,
    to: DeviceAddr,
    r: pb::Receipt,
    pushes: &mut Pushes,
) -> Result<(), StorageError> {
    let slot = ReceiptSlot { kind: r.kind as u8, group: r.group, about: if r.group == 0 { r.peer } else { r.seq } };
    if let Some(old) = txn.queued_receipt(to, slot)? {
        // Gone already if acked or expired; deleting it again is harmless.
        txn.delete_inbox(to, old);
    }
    let id = append(txn, to, r.into(), pushes)?;
    txn.put_queued_receipt(to, slot, id);
    Ok(())
}

fn append(txn: &mut Txn<'_>, to: DeviceAddr, mut msg: Message, pushes: &mut Pushes) -> Result<u64, StorageError> {
    let id = txn.next(Counter::InboxNext(to))?;
    set_inbox_id(&mut msg, id);
    txn.put_inbox(to, id, &msg);
    pushes.add(to, id, msg);
    Ok(id)
}

/// What a device finds in its inbox when it logs in.
#[derive(Debug, Default)]
pub struct LoginInbox {
    /// Entries the login itself acknowledged (`Login.acked_through`).
    pub acked: Vec<Acked>,
    /// Up to a window of entries to send now, in order.
    pub send: Vec<(u64, Message)>,
    /// The highest inbox id handed out or acknowledged: later entries
    /// arrive as pushes.
    pub cursor: u64,
    /// More entries wait past `send`.
    pub behind: bool,
    /// Entries waiting after those the login acknowledged, counted up to
    /// [`PENDING_COUNT_CAP`]: what `LoginOk.pending` reports.
    pub depth: usize,
}

/// Where counting an inbox at login stops. Past a window the count reads
/// keys only, but a login should not walk a month of someone's traffic to
/// report a number; "10,000 or more" is as useful as the exact figure.
pub const PENDING_COUNT_CAP: usize = 10_000;

/// Reads inboxes for the network layer (on blocking threads).
#[derive(Clone)]
pub struct InboxReader {
    store: Arc<Store>,
}

impl InboxReader {
    pub(crate) fn new(store: Arc<Store>) -> Self {
        Self { store }
    }

    /// The inbox at login: what `acked_through` acknowledged and up to
    /// `window` entries to send.
    pub async fn at_login(
        &self,
        addr: DeviceAddr,
        acked_through: u64,
        window: usize,
    ) -> Result<LoginInbox, StorageError> {
        let store = self.store.clone();
        super::blocking(move || login_inbox(&store, addr, acked_through, window)).await
    }

    /// Up to `limit` entries after `after`.
    pub async fn after(&self, addr: DeviceAddr, after: u64, limit: usize) -> Result<Vec<(u64, Message)>, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.inbox_after(addr, after, limit)).await
    }

    /// Entries waiting for a device (admin).
    pub async fn depth(&self, addr: DeviceAddr) -> Result<usize, StorageError> {
        let store = self.store.clone();
        super::blocking(move || store.inbox_depth(addr)).await
    }

    /// Entries waiting in all inboxes, estimated (metrics).
    pub fn estimate(&self) -> u64 {
        self.store.inbox_estimate()
    }
}

fn login_inbox(store: &Store, addr: DeviceAddr, acked_through: u64, window: usize) -> Result<LoginInbox, StorageError> {
    // Read the counter first: entries below it are committed and in the
    // scan below; later ones reach the connection as pushes.
    let next = store.counter(Counter::InboxNext(addr))?;
    let mut out = LoginInbox::default();
    let mut after = 0;
    'scan: loop {
        let chunk = store.inbox_after(addr, after, 1024)?;
        let full = chunk.len() == 1024;
        for (id, m) in chunk {
            after = id;
            if id <= acked_through {
                out.acked.push(acked_meta(addr.account, id, &m));
            } else if out.send.len() < window {
                out.send.push((id, m));
            } else {
                out.behind = true;
                break 'scan;
            }
        }
        if !full {
            break;
        }
    }
    out.cursor = match out.send.last() {
        Some((id, _)) => *id,
        None => out.acked.last().map_or(0, |a| a.id).max(next - 1),
    };
    out.depth = out.send.len();
    if out.behind {
        out.depth += store.inbox_count_after(addr, out.cursor, PENDING_COUNT_CAP.saturating_sub(out.depth))?;
    }
    Ok(out)
}
