//! `invites`: single-use registration codes and when they expire.

use super::overlay::Lookup;
use super::{be_u64, StorageError, Table, Txn};

impl Txn<'_> {
    /// When an unused invite code expires; `None` when unknown or used.
    pub fn invite(&mut self, code: &[u8]) -> Result<Option<u64>, StorageError> {
        if let Lookup::Known(v) = self.state.invites.get(&code.to_vec()) {
            return Ok(v);
        }
        self.store.get(Table::Invites, code)?.map(|v| be_u64(&v, "invites")).transpose()
    }

    /// Stores a new code.
    pub fn put_invite(&mut self, code: &[u8], expires: u64) {
        self.put(Table::Invites, code, &expires.to_be_bytes());
        self.state.invites.set(code.to_vec(), Some(expires));
    }

    /// Uses a code up.
    pub fn delete_invite(&mut self, code: &[u8]) {
        self.delete(Table::Invites, code);
        self.state.invites.set(code.to_vec(), None);
    }
}
