//! `push_tokens`: each device's push token, by device. Value: platform
//! (1 byte, a `pb::PushPlatform`), registration time (8), then the token
//! itself (opaque to the server: the pushkey for a Matrix push gateway, or
//! a UnifiedPush endpoint URL).

use bytes::Bytes;

use super::overlay::Lookup;
use super::{addr_key, be_u64, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

/// A device's registered push token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushRecord {
    /// `pb::PushPlatform` as its number.
    pub platform: i32,
    /// When the device registered it (seconds since the Unix epoch): the
    /// Matrix `pushkey_ts`.
    pub registered: u64,
    /// The token.
    pub token: Bytes,
}

fn decode(v: &[u8]) -> Result<PushRecord, StorageError> {
    if v.len() < 9 {
        return Err(StorageError::Corrupt("push_tokens"));
    }
    Ok(PushRecord {
        platform: i32::from(v[0]),
        registered: be_u64(&v[1..9], "push_tokens")?,
        token: Bytes::copy_from_slice(&v[9..]),
    })
}

impl Store {
    /// The push token of `addr`, if it registered one.
    pub fn push_token(&self, addr: DeviceAddr) -> Result<Option<PushRecord>, StorageError> {
        self.get(Table::PushTokens, &addr_key(addr))?.map(|v| decode(&v)).transpose()
    }
}

impl Txn<'_> {
    /// The push token of `addr` as this round sees it.
    pub fn push_token(&mut self, addr: DeviceAddr) -> Result<Option<PushRecord>, StorageError> {
        if let Lookup::Known(v) = self.state.push_tokens.get(&addr) {
            return Ok(v);
        }
        self.store.push_token(addr)
    }

    /// Stores `addr`'s token, replacing any other.
    pub fn put_push_token(&mut self, addr: DeviceAddr, record: PushRecord) {
        let platform = u8::try_from(record.platform).unwrap_or(0);
        let mut v = Vec::with_capacity(9 + record.token.len());
        v.push(platform);
        v.extend_from_slice(&record.registered.to_be_bytes());
        v.extend_from_slice(&record.token);
        self.put(Table::PushTokens, &addr_key(addr), &v);
        self.state.push_tokens.set(addr, Some(record));
    }

    /// Forgets `addr`'s token.
    pub fn delete_push_token(&mut self, addr: DeviceAddr) {
        self.delete(Table::PushTokens, &addr_key(addr));
        self.state.push_tokens.set(addr, None);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_record_round_trips_and_a_short_one_is_corrupt() {
        let r = PushRecord { platform: 2, registered: 1_700_000_000, token: Bytes::from_static(b"tok") };
        let mut v = vec![2u8];
        v.extend_from_slice(&r.registered.to_be_bytes());
        v.extend_from_slice(b"tok");
        assert_eq!(decode(&v).unwrap(), r);
        assert!(decode(&v[..8]).is_err());
    }
}
