//! `inbox`: each device's durable queue of what it has not acked yet,
//! by device and strictly increasing inbox id. A value is a packet holding
//! one `Deliver`, `Receipt` or `Expired` (stamped with its inbox id, which
//! the key carries too).

use bytes::Bytes;
use pipit_protocol::message::{decode_packet, encode_packet};
use pipit_protocol::Message;

use super::{addr_from_key, addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

fn key(addr: DeviceAddr, id: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..12].copy_from_slice(&addr_key(addr));
    k[12..].copy_from_slice(&id.to_be_bytes());
    k
}

fn id_of(k: &[u8]) -> Result<u64, StorageError> {
    k.get(12..20).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or(StorageError::Corrupt("inbox"))
}

/// Stamps an inbox entry with its id; false for kinds that are not inbox
/// entries.
pub fn set_inbox_id(m: &mut Message, id: u64) -> bool {
    match m {
        Message::Deliver(d) => d.inbox = id,
        Message::Receipt(r) => r.inbox = id,
        Message::Expired(e) => e.inbox = id,
        _ => return false,
    }
    true
}

/// When an entry was made (0 for kinds that carry no time).
pub fn entry_time(m: &Message) -> u64 {
    match m {
        Message::Deliver(d) => d.time,
        Message::Receipt(r) => r.time,
        _ => 0,
    }
}

fn decode_entry(v: &[u8], id: u64) -> Result<Message, StorageError> {
    let mut msgs = decode_packet(Bytes::copy_from_slice(v)).map_err(|_| StorageError::Corrupt("inbox"))?;
    let mut m = msgs.pop().ok_or(StorageError::Corrupt("inbox"))?;
    if !set_inbox_id(&mut m, id) {
        return Err(StorageError::Corrupt("inbox"));
    }
    Ok(m)
}

/// One entry found by [`Store::inbox_scan`].
#[derive(Debug)]
pub struct InboxItem {
    /// Whose inbox.
    pub addr: DeviceAddr,
    /// Its inbox id.
    pub id: u64,
    /// The entry, or why it does not decode.
    pub entry: Result<Message, StorageError>,
}

impl Store {
    /// Up to `limit` entries of `addr` with id greater than `after`, in
    /// order, each with its inbox id filled in.
    pub fn inbox_after(&self, addr: DeviceAddr, after: u64, limit: usize) -> Result<Vec<(u64, Message)>, StorageError> {
        let prefix = addr_key(addr);
        let mut out = Vec::new();
        for item in self.scan_from(Table::Inbox, &key(addr, after.saturating_add(1))) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let id = id_of(&k)?;
            out.push((id, decode_entry(&v, id)?));
        }
        Ok(out)
    }

    /// Entries of `addr` with id greater than `after`, counted up to
    /// `cap`. Reads keys only: no entry is decoded or copied.
    pub fn inbox_count_after(&self, addr: DeviceAddr, after: u64, cap: usize) -> Result<usize, StorageError> {
        let prefix = addr_key(addr);
        let mut it = self.db.raw_iterator_cf(self.cf(Table::Inbox));
        it.seek(key(addr, after.saturating_add(1)));
        let mut n = 0;
        while n < cap && it.valid() && it.key().is_some_and(|k| k.starts_with(&prefix)) {
            n += 1;
            it.next();
        }
        it.status()?;
        Ok(n)
    }

    /// Entries waiting in a device's inbox (admin).
    pub fn inbox_depth(&self, addr: DeviceAddr) -> Result<usize, StorageError> {
        let prefix = addr_key(addr);
        let mut n = 0;
        for item in self.scan_from(Table::Inbox, &prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            n += 1;
        }
        Ok(n)
    }

    /// Entries waiting in all inboxes, as RocksDB estimates it (cheap).
    pub fn inbox_estimate(&self) -> u64 {
        self.estimate_keys(Table::Inbox)
    }

    /// Every inbox entry from `from` on (inclusive), in key order; for
    /// sweeps that resume where they stopped.
    pub fn inbox_scan(
        &self,
        from: Option<(DeviceAddr, u64)>,
    ) -> impl Iterator<Item = Result<InboxItem, StorageError>> + '_ {
        let start = from.map(|(a, id)| key(a, id).to_vec()).unwrap_or_default();
        self.scan_from(Table::Inbox, &start).map(|item| {
            let (k, v) = item?;
            let addr = addr_from_key(&k).ok_or(StorageError::Corrupt("inbox"))?;
            let id = id_of(&k)?;
            Ok(InboxItem { addr, id, entry: decode_entry(&v, id) })
        })
    }
}

impl Txn<'_> {
    /// Stores `m` as entry `id` of `addr`'s inbox.
    pub fn put_inbox(&mut self, addr: DeviceAddr, id: u64, m: &Message) {
        self.put_with(Table::Inbox, &key(addr, id), m.encoded_len(), |buf| encode_packet(std::slice::from_ref(m), buf));
    }

    /// Deletes entry `id` of `addr`'s inbox.
    pub fn delete_inbox(&mut self, addr: DeviceAddr, id: u64) {
        self.delete(Table::Inbox, &key(addr, id));
    }

    /// Deletes every entry of `addr`'s inbox (an unlinked device).
    pub fn delete_inbox_all(&mut self, addr: DeviceAddr) {
        self.delete_range(Table::Inbox, &key(addr, 0), &key(addr, u64::MAX));
        // The last id is never handed out (counters stop short of it).
        self.delete(Table::Inbox, &key(addr, u64::MAX));
    }
}
