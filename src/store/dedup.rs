//! `dedup`: the answer each stored message got, by sending device and
//! client message id, so a retried send gets the original `Sent` and is
//! never stored twice. Records live as long as messages may wait.

use super::overlay::Lookup;
use super::{addr_from_key, addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

/// What a stored message was answered, and a digest of what it said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupRecord {
    /// Its sequence number.
    pub seq: u64,
    /// Server time of the `Sent`.
    pub time: u64,
    /// Digest of the content, to tell a retry from a reused id. `None` in
    /// records written before digests were kept (16-byte values).
    pub digest: Option<[u8; 8]>,
}

fn key(from: DeviceAddr, id: u64) -> [u8; 20] {
    let mut k = [0u8; 20];
    k[..12].copy_from_slice(&addr_key(from));
    k[12..].copy_from_slice(&id.to_be_bytes());
    k
}

fn decode(v: &[u8]) -> Result<DedupRecord, StorageError> {
    let corrupt = || StorageError::Corrupt("dedup");
    if v.len() < 16 {
        return Err(corrupt());
    }
    let seq = u64::from_be_bytes(v[..8].try_into().map_err(|_| corrupt())?);
    let time = u64::from_be_bytes(v[8..16].try_into().map_err(|_| corrupt())?);
    let digest = match v.len() {
        16 => None,
        24 => Some(v[16..24].try_into().map_err(|_| corrupt())?),
        _ => return Err(corrupt()),
    };
    Ok(DedupRecord { seq, time, digest })
}

impl Store {
    /// Dedup records from `from` on (inclusive), in key order: sending
    /// device, then client id; for sweeps that resume where they stopped.
    pub fn dedup_scan(
        &self,
        from: Option<(DeviceAddr, u64)>,
    ) -> impl Iterator<Item = Result<((DeviceAddr, u64), DedupRecord), StorageError>> + '_ {
        let start = from.map(|(a, id)| key(a, id).to_vec()).unwrap_or_default();
        self.scan_from(Table::Dedup, &start).map(|item| {
            let (k, v) = item?;
            let addr = addr_from_key(&k).ok_or(StorageError::Corrupt("dedup"))?;
            let id = k.get(12..20).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            Ok(((addr, id.ok_or(StorageError::Corrupt("dedup"))?), decode(&v)?))
        })
    }
}

impl Txn<'_> {
    /// The record of `(from, id)`, if that message was stored.
    pub fn dedup(&mut self, from: DeviceAddr, id: u64) -> Result<Option<DedupRecord>, StorageError> {
        if let Lookup::Known(v) = self.state.dedup.get(&(from, id)) {
            return Ok(v);
        }
        self.store.get(Table::Dedup, &key(from, id))?.map(|v| decode(&v)).transpose()
    }

    /// Records the answer to `(from, id)`.
    pub fn put_dedup(&mut self, from: DeviceAddr, id: u64, r: DedupRecord) {
        let mut v = [0u8; 24];
        v[..8].copy_from_slice(&r.seq.to_be_bytes());
        v[8..16].copy_from_slice(&r.time.to_be_bytes());
        let len = match r.digest {
            Some(d) => {
                v[16..].copy_from_slice(&d);
                24
            }
            None => 16,
        };
        self.put(Table::Dedup, &key(from, id), &v[..len]);
        self.state.dedup.set((from, id), Some(r));
    }

    /// Forgets `(from, id)`.
    pub fn delete_dedup(&mut self, from: DeviceAddr, id: u64) {
        self.delete(Table::Dedup, &key(from, id));
        self.state.dedup.set((from, id), None);
    }
}
