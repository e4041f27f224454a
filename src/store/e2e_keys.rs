//! The end-to-end key directory: two tables.
//!
//! - `e2e_keys`: per device, its published identity, its signed prekey and
//!   the bounds of its one-time prekey stock (a queue: `head` is the next
//!   slot to hand out, `tail` the next to fill), and the highest one-time
//!   prekey id it has uploaded.
//! - `one_time_keys`: the stock itself, by device and slot. A hand-out
//!   deletes the slot and moves `head` in the same writer operation that
//!   answers the fetch, so a key goes out at most once, in one synced
//!   commit, before the answer leaves.
//!
//! Slots are the server's own numbers, in upload order, so every hand-out
//! is a point read: no scan, and concurrent fetches in one round each take
//! the next slot through the overlays.

use std::sync::Arc;

use super::overlay::Lookup;
use super::{addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

const IDENTITY: usize = 64;
const KEY: usize = 32;
const SIGNATURE: usize = 64;
const RECORD_V1: u8 = 1;
const RECORD_LEN: usize = 1 + IDENTITY + 4 + KEY + SIGNATURE + 8 + 8 + 4 + 1;

/// A device's published keys and the bounds of its one-time stock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRecord {
    /// Ed25519 key then Curve25519 key.
    pub identity: [u8; IDENTITY],
    /// The signed prekey's id.
    pub signed_id: u32,
    /// The signed prekey.
    pub signed_key: [u8; KEY],
    /// Its signature by the identity.
    pub signature: [u8; SIGNATURE],
    /// The next slot to hand out.
    pub head: u64,
    /// The next slot to fill: `tail - head` keys are in stock.
    pub tail: u64,
    /// The highest one-time prekey id taken from this device, if any: a
    /// key whose id is not above it is a retry and is not stored again.
    pub max_id: Option<u32>,
}

impl KeyRecord {
    /// One-time prekeys in stock.
    pub fn stock(&self) -> u64 {
        self.tail - self.head
    }

    fn encode(&self) -> [u8; RECORD_LEN] {
        let mut v = [0u8; RECORD_LEN];
        let mut at = 0;
        let mut put = |b: &[u8]| {
            v[at..at + b.len()].copy_from_slice(b);
            at += b.len();
        };
        put(&[RECORD_V1]);
        put(&self.identity);
        put(&self.signed_id.to_be_bytes());
        put(&self.signed_key);
        put(&self.signature);
        put(&self.head.to_be_bytes());
        put(&self.tail.to_be_bytes());
        put(&self.max_id.unwrap_or(0).to_be_bytes());
        put(&[u8::from(self.max_id.is_some())]);
        v
    }

    fn decode(v: &[u8]) -> Result<Self, StorageError> {
        let corrupt = || StorageError::Corrupt("e2e_keys");
        if v.len() != RECORD_LEN || v[0] != RECORD_V1 {
            return Err(corrupt());
        }
        let mut at = 1;
        let mut take = |n: usize| {
            let s = &v[at..at + n];
            at += n;
            s
        };
        let identity = take(IDENTITY).try_into().map_err(|_| corrupt())?;
        let signed_id = u32::from_be_bytes(take(4).try_into().map_err(|_| corrupt())?);
        let signed_key = take(KEY).try_into().map_err(|_| corrupt())?;
        let signature = take(SIGNATURE).try_into().map_err(|_| corrupt())?;
        let head = u64::from_be_bytes(take(8).try_into().map_err(|_| corrupt())?);
        let tail = u64::from_be_bytes(take(8).try_into().map_err(|_| corrupt())?);
        let max = u32::from_be_bytes(take(4).try_into().map_err(|_| corrupt())?);
        let has_max = take(1)[0] != 0;
        if head > tail {
            return Err(corrupt());
        }
        Ok(Self { identity, signed_id, signed_key, signature, head, tail, max_id: has_max.then_some(max) })
    }
}

/// One stocked one-time prekey: the device's id for it and the key.
pub type OneTimeKey = (u32, [u8; KEY]);

fn slot_key(addr: DeviceAddr, slot: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..12].copy_from_slice(&addr_key(addr));
    k[12..].copy_from_slice(&slot.to_be_bytes());
    k
}

fn decode_slot(v: &[u8]) -> Result<OneTimeKey, StorageError> {
    let corrupt = || StorageError::Corrupt("one_time_keys");
    if v.len() != 4 + KEY {
        return Err(corrupt());
    }
    let id = u32::from_be_bytes(v[..4].try_into().map_err(|_| corrupt())?);
    Ok((id, v[4..].try_into().map_err(|_| corrupt())?))
}

impl Store {
    /// A device's published keys.
    pub fn key_record(&self, addr: DeviceAddr) -> Result<Option<KeyRecord>, StorageError> {
        self.get(Table::E2eKeys, &addr_key(addr))?.map(|v| KeyRecord::decode(&v)).transpose()
    }

    /// Every one-time prekey in stock for `addr` (tests, admin), in
    /// hand-out order.
    pub fn one_time_keys(&self, addr: DeviceAddr) -> Result<Vec<OneTimeKey>, StorageError> {
        let prefix = addr_key(addr);
        let mut out = Vec::new();
        for item in self.scan_from(Table::OneTimeKeys, &prefix) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            out.push(decode_slot(&v)?);
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// A device's key record as this round sees it.
    pub fn key_record(&mut self, addr: DeviceAddr) -> Result<Option<Arc<KeyRecord>>, StorageError> {
        if let Lookup::Known(v) = self.state.e2e_keys.get(&addr) {
            return Ok(v);
        }
        Ok(self.store.key_record(addr)?.map(Arc::new))
    }

    /// Stores a device's key record.
    pub fn put_key_record(&mut self, addr: DeviceAddr, r: KeyRecord) {
        self.put(Table::E2eKeys, &addr_key(addr), &r.encode());
        self.state.e2e_keys.set(addr, Some(Arc::new(r)));
    }

    /// Slot `slot` of `addr`'s stock, as this round sees it.
    pub fn one_time_key(&mut self, addr: DeviceAddr, slot: u64) -> Result<Option<OneTimeKey>, StorageError> {
        if let Lookup::Known(v) = self.state.one_time_keys.get(&(addr, slot)) {
            return Ok(v);
        }
        self.store.get(Table::OneTimeKeys, &slot_key(addr, slot))?.map(|v| decode_slot(&v)).transpose()
    }

    /// Fills slot `slot` of `addr`'s stock.
    pub fn put_one_time_key(&mut self, addr: DeviceAddr, slot: u64, key: OneTimeKey) {
        let mut v = [0u8; 4 + KEY];
        v[..4].copy_from_slice(&key.0.to_be_bytes());
        v[4..].copy_from_slice(&key.1);
        self.put(Table::OneTimeKeys, &slot_key(addr, slot), &v);
        self.state.one_time_keys.set((addr, slot), Some(key));
    }

    /// Empties slot `slot` of `addr`'s stock (a hand-out).
    pub fn delete_one_time_key(&mut self, addr: DeviceAddr, slot: u64) {
        self.delete(Table::OneTimeKeys, &slot_key(addr, slot));
        self.state.one_time_keys.set((addr, slot), None);
    }

    /// Forgets everything `addr` published: its record and the slots
    /// `from..to` of its stock (a new identity, or an unlinked device).
    pub fn delete_keys(&mut self, addr: DeviceAddr, slots: std::ops::Range<u64>) {
        for slot in slots.clone() {
            self.state.one_time_keys.set((addr, slot), None);
        }
        if !slots.is_empty() {
            self.delete_range(Table::OneTimeKeys, &slot_key(addr, slots.start), &slot_key(addr, slots.end));
        }
    }

    /// Deletes a device's key record.
    pub fn delete_key_record(&mut self, addr: DeviceAddr) {
        self.delete(Table::E2eKeys, &addr_key(addr));
        self.state.e2e_keys.set(addr, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_damage_is_an_error() {
        let r = KeyRecord {
            identity: [1; 64],
            signed_id: 9,
            signed_key: [2; 32],
            signature: [3; 64],
            head: 4,
            tail: 7,
            max_id: Some(40),
        };
        assert_eq!(KeyRecord::decode(&r.encode()).unwrap(), r);
        let none = KeyRecord { max_id: None, ..r.clone() };
        assert_eq!(KeyRecord::decode(&none.encode()).unwrap(), none);
        assert!(KeyRecord::decode(&r.encode()[1..]).is_err());
        let backwards = KeyRecord { head: 8, ..r };
        assert!(KeyRecord::decode(&backwards.encode()).is_err());
    }
}
