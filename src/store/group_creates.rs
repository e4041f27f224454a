//! `group_creates`: the answer each `GroupCreate` with an id got, by
//! creating device and create id, so that a retry after a lost answer
//! gets the same group instead of a second one (the `dedup` rule of
//! sends, applied to group creation). Records go after the same time as
//! dedup records.

use bytes::Bytes;
use pipit_protocol::message::pb;
use prost::Message as _;

use super::overlay::Lookup;
use super::{addr_from_key, addr_key, be_u64, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

/// What a create was answered, and a digest of what it asked.
#[derive(Debug, Clone, PartialEq)]
pub struct CreateRecord {
    /// Server time of the create (for expiry).
    pub time: u64,
    /// Digest of the name and member list, to tell a retry from a reused
    /// id.
    pub digest: [u8; 8],
    /// The answer, without its `req` (each retry has its own).
    pub answer: pb::GroupInfo,
}

fn key(from: DeviceAddr, id: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..12].copy_from_slice(&addr_key(from));
    k[12..].copy_from_slice(&id.to_be_bytes());
    k
}

/// Value: time (8), digest (8), then the `GroupInfo` protobuf.
fn decode(v: &[u8]) -> Result<CreateRecord, StorageError> {
    let corrupt = || StorageError::Corrupt("group_creates");
    if v.len() < 16 {
        return Err(corrupt());
    }
    let time = be_u64(&v[..8], "group_creates")?;
    let digest = v[8..16].try_into().map_err(|_| corrupt())?;
    let answer = pb::GroupInfo::decode(Bytes::copy_from_slice(&v[16..])).map_err(|_| corrupt())?;
    Ok(CreateRecord { time, digest, answer })
}

impl Store {
    /// Create records from `from` on (inclusive), in key order: device,
    /// then create id; for sweeps that resume where they stopped.
    pub fn group_creates_scan(
        &self,
        from: Option<(DeviceAddr, u64)>,
    ) -> impl Iterator<Item = Result<((DeviceAddr, u64), CreateRecord), StorageError>> + '_ {
        let start = from.map(|(a, id)| key(a, id).to_vec()).unwrap_or_default();
        self.scan_from(Table::GroupCreates, &start).map(|item| {
            let (k, v) = item?;
            let addr = addr_from_key(&k).ok_or(StorageError::Corrupt("group_creates"))?;
            let id = k.get(12..20).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            Ok(((addr, id.ok_or(StorageError::Corrupt("group_creates"))?), decode(&v)?))
        })
    }
}

impl Txn<'_> {
    /// The record of create `id` from `from`, if one was stored.
    pub fn group_create(&mut self, from: DeviceAddr, id: u64) -> Result<Option<CreateRecord>, StorageError> {
        if let Lookup::Known(v) = self.state.group_creates.get(&(from, id)) {
            return Ok(v);
        }
        self.store.get(Table::GroupCreates, &key(from, id))?.map(|v| decode(&v)).transpose()
    }

    /// Records the answer to create `id` from `from`.
    pub fn put_group_create(&mut self, from: DeviceAddr, id: u64, r: CreateRecord) {
        let len = 16 + r.answer.encoded_len();
        self.put_with(Table::GroupCreates, &key(from, id), len, |buf| {
            buf.extend_from_slice(&r.time.to_be_bytes());
            buf.extend_from_slice(&r.digest);
            r.answer.encode_raw(buf);
        });
        self.state.group_creates.set((from, id), Some(r));
    }

    /// Forgets create `id` from `from`.
    pub fn delete_group_create(&mut self, from: DeviceAddr, id: u64) {
        self.delete(Table::GroupCreates, &key(from, id));
        self.state.group_creates.set((from, id), None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_short_one_is_corrupt() {
        let answer = pb::GroupInfo { group: 7, members: vec![1, 2], admins: vec![1], version: 1, ..Default::default() };
        let r = CreateRecord { time: 1_700_000_000, digest: [9; 8], answer };
        let mut v = r.time.to_be_bytes().to_vec();
        v.extend_from_slice(&r.digest);
        r.answer.encode_raw(&mut v);
        assert_eq!(decode(&v).unwrap(), r);
        assert!(decode(&v[..15]).is_err());
    }
}
