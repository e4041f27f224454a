//! `outbound`: a cluster node's queue per other node of what must be
//! forwarded there (a send to an account that node owns), durable before
//! the sender is told "sent" and deleted only once that node has
//! acknowledged it. Key: the destination's slot, then the entry id (both
//! big-endian, so a scan reads one destination's queue in order); value:
//! the encoded forward.

use bytes::Bytes;

use super::{StorageError, Store, Table, Txn};

fn key(slot: u32, entry: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&slot.to_be_bytes());
    k[4..].copy_from_slice(&entry.to_be_bytes());
    k
}

impl Store {
    /// Up to `limit` entries for `slot` after `after`, in order, and at
    /// most about `max_bytes` of them (at least one).
    pub fn outbound_after(
        &self,
        slot: u32,
        after: u64,
        limit: usize,
        max_bytes: usize,
    ) -> Result<Vec<(u64, Bytes)>, StorageError> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = key(slot, after.saturating_add(1));
        for item in self.scan_from(Table::Outbound, &start) {
            let (k, v) = item?;
            if k.len() != 12 || k[..4] != slot.to_be_bytes() || out.len() >= limit {
                break;
            }
            if !out.is_empty() && bytes + v.len() > max_bytes {
                break;
            }
            bytes += v.len();
            let entry = u64::from_be_bytes(k[4..].try_into().map_err(|_| StorageError::Corrupt("outbound"))?);
            out.push((entry, Bytes::copy_from_slice(&v)));
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// Queues entry `entry` for the node with `slot`.
    pub fn put_outbound(&mut self, slot: u32, entry: u64, forward: &[u8]) {
        self.put(Table::Outbound, &key(slot, entry), forward);
    }

    /// Deletes entry `entry` for the node with `slot` (acknowledged).
    pub fn delete_outbound(&mut self, slot: u32, entry: u64) {
        self.delete(Table::Outbound, &key(slot, entry));
    }
}
