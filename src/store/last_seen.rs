//! `last_seen`: when each account was last online, by account id. Written
//! when an account goes offline, at most once per configured granularity
//! (`service::presence`), so a flapping link costs no write per connect.

use super::{be_u64, StorageError, Store, Table, Txn};

impl Store {
    /// When `account` was last seen online; 0 when never recorded.
    pub fn last_seen(&self, account: u64) -> Result<u64, StorageError> {
        Ok(self
            .get(Table::LastSeen, &account.to_be_bytes())?
            .map(|v| be_u64(&v, "last_seen"))
            .transpose()?
            .unwrap_or(0))
    }
}

impl Txn<'_> {
    /// Records that `account` was last seen at `time`. No read-back in the
    /// writer, so no overlay: only connections read it.
    pub fn put_last_seen(&mut self, account: u64, time: u64) {
        self.put(Table::LastSeen, &account.to_be_bytes(), &time.to_be_bytes());
    }
}
