//! `inbox`: each device's durable queue of what it has not acked yet,
//! by device and strictly increasing inbox id. A value is either a packet
//! holding one `Deliver`, `Receipt` or `Expired` (stamped with its inbox
//! id, which the key carries too), or a reference to a group body: a zero
//! byte (never the first byte of a packet: field 0 does not exist) and a
//! [`GroupRef`], a few dozen bytes however large the message. Reads that
//! hand entries to a device resolve references into a full `Deliver` or
//! `GroupInfo`.

use bytes::Bytes;
use pipit_protocol::message::{decode_packet, encode_packet};
use pipit_protocol::Message;
use prost::Message as _;

use super::overlay::Lookup;
use super::{addr_from_key, addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

/// The first byte of a reference entry.
const GROUP_REF: u8 = 0;

/// An inbox entry that refers to a group body (`group_bodies`).
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupRef {
    /// The group.
    #[prost(uint64, tag = "1")]
    pub group: u64,
    /// The body's seq in the group.
    #[prost(uint64, tag = "2")]
    pub seq: u64,
    /// Server time of the entry (for expiry without reading the body).
    #[prost(uint64, tag = "3")]
    pub time: u64,
    /// The sender, or the account that made the change (for receipts and
    /// expiry notices without reading the body).
    #[prost(uint64, tag = "4")]
    pub from: u64,
    /// A change notice (`GroupInfo`) rather than a message.
    #[prost(bool, tag = "5")]
    pub notice: bool,
    /// This device's own ciphertext, delivered beside the shared payload.
    #[prost(bytes = "bytes", tag = "6")]
    pub device_payload: Bytes,
}

/// A stored inbox entry, before references are resolved.
#[derive(Debug, Clone, PartialEq)]
pub enum InboxEntry {
    /// A message stored whole, with its inbox id set.
    Message(Message),
    /// A reference to a group body.
    GroupRef(GroupRef),
}

impl InboxEntry {
    /// When the entry was made (0 for kinds that carry no time).
    pub fn time(&self) -> u64 {
        match self {
            InboxEntry::Message(m) => entry_time(m),
            InboxEntry::GroupRef(r) => r.time,
        }
    }
}

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
        Message::GroupInfo(g) => g.inbox = id,
        _ => return false,
    }
    true
}

/// When an entry was made (0 for kinds that carry no time).
pub fn entry_time(m: &Message) -> u64 {
    match m {
        Message::Deliver(d) => d.time,
        Message::Receipt(r) => r.time,
        Message::GroupInfo(g) => g.time,
        _ => 0,
    }
}

fn decode_raw(v: &[u8], id: u64) -> Result<InboxEntry, StorageError> {
    if let Some(rest) = v.strip_prefix(&[GROUP_REF]) {
        return GroupRef::decode(rest).map(InboxEntry::GroupRef).map_err(|_| StorageError::Corrupt("inbox"));
    }
    let mut msgs = decode_packet(Bytes::copy_from_slice(v)).map_err(|_| StorageError::Corrupt("inbox"))?;
    let mut m = msgs.pop().ok_or(StorageError::Corrupt("inbox"))?;
    if !set_inbox_id(&mut m, id) {
        return Err(StorageError::Corrupt("inbox"));
    }
    Ok(InboxEntry::Message(m))
}

/// The message a device gets for a reference: the body with this entry's
/// inbox id and this device's own ciphertext.
pub fn resolve(body: Message, r: &GroupRef, id: u64) -> Message {
    match body {
        Message::Deliver(mut d) => {
            d.inbox = id;
            d.device_payload = r.device_payload.clone();
            Message::Deliver(d)
        }
        mut other => {
            set_inbox_id(&mut other, id);
            other
        }
    }
}

/// One entry found by [`Store::inbox_scan`].
#[derive(Debug)]
pub struct InboxItem {
    /// Whose inbox.
    pub addr: DeviceAddr,
    /// Its inbox id.
    pub id: u64,
    /// The entry (references unresolved), or why it does not decode.
    pub entry: Result<InboxEntry, StorageError>,
}

impl Store {
    /// Up to `limit` entries of `addr` with id greater than `after`, in
    /// order, each with its inbox id filled in and references resolved.
    pub fn inbox_after(&self, addr: DeviceAddr, after: u64, limit: usize) -> Result<Vec<(u64, Message)>, StorageError> {
        let prefix = addr_key(addr);
        let mut out = Vec::new();
        for item in self.scan_from(Table::Inbox, &key(addr, after.saturating_add(1))) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let id = id_of(&k)?;
            match decode_raw(&v, id)? {
                InboxEntry::Message(m) => out.push((id, m)),
                InboxEntry::GroupRef(r) => match self.group_body(r.group, r.seq)? {
                    Some(body) => out.push((id, resolve(body, &r, id))),
                    None => {
                        // Only a bug can get here (a body goes with its last
                        // reference). Failing would lock the device out of
                        // its inbox; skip the entry instead, loudly.
                        tracing::error!(device = %addr, id, group = r.group, seq = r.seq, "group body missing");
                        metrics::counter!("pipit_storage_errors_total").increment(1);
                    }
                },
            }
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
            Ok(InboxItem { addr, id, entry: decode_raw(&v, id) })
        })
    }
}

impl Txn<'_> {
    /// Stores `m` as entry `id` of `addr`'s inbox.
    pub fn put_inbox(&mut self, addr: DeviceAddr, id: u64, m: &Message) {
        self.put_with(Table::Inbox, &key(addr, id), m.encoded_len(), |buf| encode_packet(std::slice::from_ref(m), buf));
    }

    /// Deletes entry `id` of `addr`'s inbox. Never a group reference:
    /// those go through [`Txn::take_inbox_ref`], whose record of what it
    /// took is what the next round reads while this one is being written.
    pub fn delete_inbox(&mut self, addr: DeviceAddr, id: u64) {
        self.delete(Table::Inbox, &key(addr, id));
    }

    /// Stores a reference to a group body as entry `id` of `addr`'s inbox.
    pub fn put_inbox_ref(&mut self, addr: DeviceAddr, id: u64, r: &GroupRef) {
        self.put_with(Table::Inbox, &key(addr, id), 1 + r.encoded_len(), |buf| {
            buf.push(GROUP_REF);
            r.encode_raw(buf);
        });
        self.state.inbox_refs.set((addr, id), Some(r.clone()));
    }

    /// Deletes entry `id` of `addr`'s inbox if it is a reference and still
    /// there, and returns it; `None` if it is gone (acked twice, say by an
    /// old and a new connection of the device) or not a reference. A body's
    /// reference count may drop once per entry, so this is how it drops.
    pub fn take_inbox_ref(&mut self, addr: DeviceAddr, id: u64) -> Result<Option<GroupRef>, StorageError> {
        let found = match self.state.inbox_refs.get(&(addr, id)) {
            Lookup::Known(v) => v,
            Lookup::Miss => match self.store.get(Table::Inbox, &key(addr, id))? {
                Some(v) => match decode_raw(&v, id)? {
                    InboxEntry::GroupRef(r) => Some(r),
                    InboxEntry::Message(_) => None,
                },
                None => None,
            },
        };
        if found.is_some() {
            self.delete(Table::Inbox, &key(addr, id));
            self.state.inbox_refs.set((addr, id), None);
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Entries come from our own disk, but a damaged one must be an
    /// error, never a panic.
    #[test]
    fn damaged_entries_are_errors_not_panics() {
        let r =
            GroupRef { group: 7, seq: 9, time: 1, from: 3, notice: false, device_payload: Bytes::from_static(b"k") };
        let mut good = vec![GROUP_REF];
        r.encode_raw(&mut good);
        assert_eq!(decode_raw(&good, 1).unwrap(), InboxEntry::GroupRef(r));
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for len in 0..200 {
            let mut v: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            let _ = decode_raw(&v, 1);
            if let Some(b) = v.first_mut() {
                *b = GROUP_REF;
            }
            let _ = decode_raw(&v, 1);
            for cut in 0..good.len() {
                let _ = decode_raw(&good[..cut], 1);
            }
        }
    }
}
