//! `accounts`: each account's device list (`pb::DeviceList`), by account
//! id. Cached by the writer, which is its only writer.

use std::sync::Arc;

use pipit_protocol::message::pb;
use prost::Message as _;

use super::overlay::Lookup;
use super::{StorageError, Store, Table, Txn};

fn decode(v: &[u8]) -> Result<pb::DeviceList, StorageError> {
    pb::DeviceList::decode(v).map_err(|_| StorageError::Corrupt("accounts"))
}

impl Store {
    /// An account's device list.
    pub fn account(&self, account: u64) -> Result<Option<pb::DeviceList>, StorageError> {
        self.get(Table::Accounts, &account.to_be_bytes())?.map(|v| decode(&v)).transpose()
    }

    /// Whether `account` exists, without decoding its device list.
    pub fn account_exists(&self, account: u64) -> Result<bool, StorageError> {
        Ok(self.get(Table::Accounts, &account.to_be_bytes())?.is_some())
    }

    /// Up to `limit` accounts, in id order (admin).
    pub fn accounts(&self, limit: usize) -> Result<Vec<pb::DeviceList>, StorageError> {
        let mut out = Vec::new();
        for item in self.scan_from(Table::Accounts, &[]).take(limit) {
            let (_, v) = item?;
            out.push(decode(&v)?);
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// An account's device list as this round sees it.
    pub fn account(&mut self, account: u64) -> Result<Option<Arc<pb::DeviceList>>, StorageError> {
        if let Lookup::Known(v) = self.state.accounts.get(&account) {
            return Ok(v);
        }
        let found = self.store.account(account)?.map(Arc::new);
        self.state.accounts.remember(account, found.clone());
        Ok(found)
    }

    /// Stores an account's device list.
    pub fn put_account(&mut self, list: pb::DeviceList) {
        self.put(Table::Accounts, &list.account.to_be_bytes(), &list.encode_to_vec());
        self.state.accounts.set(list.account, Some(Arc::new(list)));
    }
}
