//! `group_bodies`: what a group entry says, stored once however many
//! members it reaches. Two kinds of key:
//!
//! - group (8) seq (8): the body, a packet of one `Deliver` (a message) or
//!   one `GroupInfo` (a change notice), without an inbox id. Inbox entries
//!   refer to it; [`Counter::BodyRefs`] counts them, and the body goes
//!   when the count reaches zero.
//! - group (8) seq (8) account (8) device (4): a ciphertext for that one
//!   device (a sender key), waiting for the fan-out to copy it into the
//!   device's inbox entry.

use bytes::Bytes;
use pipit_protocol::message::{decode_packet, encode_packet};
use pipit_protocol::Message;

use super::counters::Counter;
use super::{addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

fn body_key(group: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn extra_key(group: u64, seq: u64, addr: DeviceAddr) -> [u8; 28] {
    let mut k = [0u8; 28];
    k[..16].copy_from_slice(&body_key(group, seq));
    k[16..].copy_from_slice(&addr_key(addr));
    k
}

/// The packet key byte a stored `GroupInfo` starts with (field 21, length
/// delimited: the varint 0xaa 0x01); a `Deliver` starts with 0x1a.
const GROUP_INFO_FIRST_BYTE: u8 = 0xaa;

/// What [`Store::group_body_stats`] counted.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct BodyStats {
    /// Message bodies.
    pub messages: u64,
    /// Change notice bodies.
    pub notices: u64,
    /// Per-device ciphertexts waiting for their fan-out.
    pub extras: u64,
    /// Bytes of keys and values of all of them.
    pub bytes: u64,
}

impl Store {
    /// The body of entry `seq` of `group`.
    pub fn group_body(&self, group: u64, seq: u64) -> Result<Option<Message>, StorageError> {
        let Some(v) = self.get(Table::GroupBodies, &body_key(group, seq))? else {
            return Ok(None);
        };
        let mut msgs = decode_packet(Bytes::copy_from_slice(&v)).map_err(|_| StorageError::Corrupt("group_bodies"))?;
        match (msgs.pop(), msgs.is_empty()) {
            (Some(m @ (Message::Deliver(_) | Message::GroupInfo(_))), true) => Ok(Some(m)),
            _ => Err(StorageError::Corrupt("group_bodies")),
        }
    }

    /// Counts the bodies stored for `group` (every group: `None`). A scan:
    /// for admin and tests.
    pub fn group_body_stats(&self, group: Option<u64>) -> Result<BodyStats, StorageError> {
        let prefix: Vec<u8> = group.map(|g| g.to_be_bytes().to_vec()).unwrap_or_default();
        let mut s = BodyStats::default();
        for item in self.scan_from(Table::GroupBodies, &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            s.bytes += (k.len() + v.len()) as u64;
            match (k.len(), v.first()) {
                (16, Some(&GROUP_INFO_FIRST_BYTE)) => s.notices += 1,
                (16, _) => s.messages += 1,
                _ => s.extras += 1,
            }
        }
        Ok(s)
    }
}

impl Txn<'_> {
    /// Stores the body of entry `seq` of `group`: a `Deliver` or a
    /// `GroupInfo`.
    pub fn put_group_body(&mut self, group: u64, seq: u64, body: &Message) {
        self.put_with(Table::GroupBodies, &body_key(group, seq), body.encoded_len(), |buf| {
            encode_packet(std::slice::from_ref(body), buf)
        });
    }

    /// Stores a ciphertext for one device, for the fan-out of `seq`.
    pub fn put_group_extra(&mut self, group: u64, seq: u64, addr: DeviceAddr, payload: &[u8]) {
        self.put(Table::GroupBodies, &extra_key(group, seq, addr), payload);
    }

    /// Takes the ciphertext waiting for `addr`, if any. Only the fan-out
    /// of `seq` reads these, one step at a time, so the committed state is
    /// current once the round in flight is written.
    pub fn take_group_extra(&mut self, group: u64, seq: u64, addr: DeviceAddr) -> Result<Option<Bytes>, StorageError> {
        self.settle_now();
        let key = extra_key(group, seq, addr);
        let Some(v) = self.store.get(Table::GroupBodies, &key)? else {
            return Ok(None);
        };
        let payload = Bytes::copy_from_slice(&v);
        self.delete(Table::GroupBodies, &key);
        Ok(Some(payload))
    }

    /// Deletes every ciphertext still waiting for the fan-out of `seq`
    /// (devices that left before it reached them).
    pub fn delete_group_extras(&mut self, group: u64, seq: u64) -> Result<(), StorageError> {
        self.settle_now();
        let prefix = body_key(group, seq);
        let mut doomed = Vec::new();
        for item in self.store.scan_from(Table::GroupBodies, &prefix) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            if k.len() > prefix.len() {
                doomed.push(k);
            }
        }
        for k in doomed {
            self.delete(Table::GroupBodies, &k);
        }
        Ok(())
    }

    /// Adds `n` references to a body.
    pub fn add_group_body_refs(&mut self, group: u64, seq: u64, n: u64) -> Result<(), StorageError> {
        let c = Counter::BodyRefs { group, seq };
        let v = self.counter(c)?;
        self.set_counter(c, v + n);
        Ok(())
    }

    /// Drops one reference to a body; the last one deletes it.
    pub fn release_group_body(&mut self, group: u64, seq: u64) -> Result<(), StorageError> {
        let c = Counter::BodyRefs { group, seq };
        match self.counter(c)? {
            0 => {
                // A bug or a damaged record; refusing would fail the ack
                // that got here, again on every retry.
                tracing::warn!(group, seq, "a group body reference was released twice");
                Ok(())
            }
            1 => {
                self.delete_counter(c);
                self.delete(Table::GroupBodies, &body_key(group, seq));
                Ok(())
            }
            n => {
                self.set_counter(c, n - 1);
                Ok(())
            }
        }
    }
}
