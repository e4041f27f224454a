//! `queued_receipts`: for each device, conversation and receipt kind, the
//! inbox id of the latest receipt queued for it. A later receipt covers
//! an earlier one (1:1 receipts are cumulative, a group count replaces
//! the one before), so the earlier one is deleted from the inbox when the
//! later one is queued, and a device back from a long absence spends its
//! window on messages, not on receipts that one covers.
//!
//! Key: account (8) device (4) kind (1) group (8) about (8), where
//! `about` is the peer of a 1:1 conversation (group 0) or the message's
//! seq in a group. Value: inbox id (8). The id may name an entry already
//! acked or expired: deleting it again is harmless, and ids are never
//! given twice.

use super::overlay::Lookup;
use super::{addr_key, be_u64, StorageError, Table, Txn};
use crate::model::DeviceAddr;

/// Committed slots the writer keeps in memory: every receipt reads one.
pub(super) const CACHE_MAX: usize = 1 << 16;

/// What a receipt is about: one slot per device holds its latest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ReceiptSlot {
    /// The receipt kind (`pb::ReceiptKind` as its number).
    pub kind: u8,
    /// The group, or 0 for a 1:1 conversation.
    pub group: u64,
    /// The 1:1 peer, or the group message's seq.
    pub about: u64,
}

fn key(addr: DeviceAddr, s: ReceiptSlot) -> [u8; 29] {
    let mut k = [0u8; 29];
    k[..12].copy_from_slice(&addr_key(addr));
    k[12] = s.kind;
    k[13..21].copy_from_slice(&s.group.to_be_bytes());
    k[21..].copy_from_slice(&s.about.to_be_bytes());
    k
}

impl Txn<'_> {
    /// The inbox id of the latest receipt queued for `addr` in slot `s`.
    pub fn queued_receipt(&mut self, addr: DeviceAddr, s: ReceiptSlot) -> Result<Option<u64>, StorageError> {
        if let Lookup::Known(v) = self.state.queued_receipts.get(&(addr, s)) {
            return Ok(v);
        }
        let found = self.store.get(Table::QueuedReceipts, &key(addr, s))?.map(|v| be_u64(&v, "queued_receipts"));
        let found = found.transpose()?;
        self.state.queued_receipts.remember((addr, s), found);
        Ok(found)
    }

    /// Records that inbox entry `id` of `addr` is now slot `s`'s receipt.
    pub fn put_queued_receipt(&mut self, addr: DeviceAddr, s: ReceiptSlot, id: u64) {
        self.put(Table::QueuedReceipts, &key(addr, s), &id.to_be_bytes());
        self.state.queued_receipts.set((addr, s), Some(id));
    }

    /// Forgets slot `s` of `addr`: no receipt for it will follow.
    pub fn delete_queued_receipt(&mut self, addr: DeviceAddr, s: ReceiptSlot) {
        self.delete(Table::QueuedReceipts, &key(addr, s));
        self.state.queued_receipts.set((addr, s), None);
    }

    /// Forgets every slot of an unlinked device (whose number is never
    /// given again, so no later read can meet a cached slot of it).
    pub fn delete_queued_receipts_of(&mut self, addr: DeviceAddr) {
        let from = addr_key(addr);
        let mut to = [0u8; 13];
        to[..12].copy_from_slice(&from);
        // Every key of the device is `from` followed by a kind byte; a
        // 13th byte of 0xff after it is past any kind in use.
        to[12] = 0xff;
        self.delete_range(Table::QueuedReceipts, &from, &to);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_group_by_device_so_an_unlink_covers_them_with_one_range() {
        let a = DeviceAddr::new(7, 1);
        let s = ReceiptSlot { kind: 2, group: 0, about: 9 };
        let k = key(a, s);
        assert_eq!(&k[..12], &addr_key(a));
        assert!(k[..] < [&addr_key(a)[..], &[0xff]].concat()[..]);
        assert!(key(DeviceAddr::new(7, 2), s)[..] > [&addr_key(a)[..], &[0xff]].concat()[..]);
    }
}
