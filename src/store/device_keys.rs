//! `keys`: which device a Noise static key belongs to. A device's key is
//! its identity, so this is how a login finds its account.

use pipit_protocol::PublicKey;

use super::overlay::Lookup;
use super::{addr_from_key, addr_key, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

impl Store {
    /// The device a static key belongs to.
    pub fn device_by_key(&self, key: &PublicKey) -> Result<Option<DeviceAddr>, StorageError> {
        match self.get(Table::DeviceKeys, key.as_bytes())? {
            None => Ok(None),
            Some(v) => addr_from_key(&v).map(Some).ok_or(StorageError::Corrupt("keys")),
        }
    }
}

impl Txn<'_> {
    /// The device a static key belongs to, as this round sees it.
    pub fn device_by_key(&mut self, key: &PublicKey) -> Result<Option<DeviceAddr>, StorageError> {
        if let Lookup::Known(v) = self.state.device_keys.get(key) {
            return Ok(v);
        }
        self.store.device_by_key(key)
    }

    /// Records that `key` is device `addr`.
    pub fn put_device_key(&mut self, key: PublicKey, addr: DeviceAddr) {
        self.put(Table::DeviceKeys, key.as_bytes(), &addr_key(addr));
        self.state.device_keys.set(key, Some(addr));
    }

    /// Forgets `key`: its device can no longer log in.
    pub fn delete_device_key(&mut self, key: PublicKey) {
        self.delete(Table::DeviceKeys, key.as_bytes());
        self.state.device_keys.set(key, None);
    }
}
