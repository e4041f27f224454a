//! `privacy`: each account's privacy settings, by account id, as a
//! `pb::PrivacySet` (its `req` always 0): protobuf, so a later setting is
//! a new field and old records still decode. An account with every
//! setting at its default has no record.

use pipit_protocol::message::pb;
use prost::Message as _;

use super::{StorageError, Store, Table, Txn};

impl Store {
    /// `account`'s privacy settings (the defaults when it set none).
    pub fn privacy(&self, account: u64) -> Result<pb::PrivacySet, StorageError> {
        match self.get(Table::Privacy, &account.to_be_bytes())? {
            None => Ok(pb::PrivacySet::default()),
            Some(v) => pb::PrivacySet::decode(&*v).map_err(|_| StorageError::Corrupt("privacy")),
        }
    }
}

impl Txn<'_> {
    /// Stores `account`'s privacy settings.
    pub fn put_privacy(&mut self, account: u64, mut settings: pb::PrivacySet) {
        settings.req = 0;
        let key = account.to_be_bytes();
        if settings == pb::PrivacySet::default() {
            self.delete(Table::Privacy, &key);
        } else {
            self.put(Table::Privacy, &key, &settings.encode_to_vec());
        }
    }
}
