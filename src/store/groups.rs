//! `groups`: each group's record (name, version, members with the group
//! seq at which they joined and, for a member whose removal is still being
//! fanned out, left), by group id. `group_members`: which groups an
//! account belongs to, by account then group, for listing them. The
//! writer caches records: it is their only writer.

use std::sync::Arc;

use bytes::Bytes;
use prost::Message as _;

use super::overlay::Lookup;
use super::{StorageError, Store, Table, Txn};

/// A group as stored.
#[derive(Clone, PartialEq, prost::Message)]
pub struct GroupRecord {
    /// The group id, from 1.
    #[prost(uint64, tag = "1")]
    pub id: u64,
    /// Its name, at most `MAX_NAME_LEN` bytes.
    #[prost(bytes = "bytes", tag = "2")]
    pub name: Bytes,
    /// Bumped by every change.
    #[prost(uint64, tag = "3")]
    pub version: u64,
    /// Members sorted by account, then by `joined`. An account appears
    /// twice only while its removal (`left` set) is still being fanned out
    /// and it was added again.
    #[prost(message, repeated, tag = "4")]
    pub members: Vec<Member>,
    /// When the group was created, seconds since the Unix epoch.
    #[prost(uint64, tag = "5")]
    pub created: u64,
}

/// One membership of one account.
#[derive(Clone, PartialEq, Eq, prost::Message)]
pub struct Member {
    /// The account.
    #[prost(uint64, tag = "1")]
    pub account: u64,
    /// The group seq of the change that added it.
    #[prost(uint64, tag = "2")]
    pub joined: u64,
    /// The group seq of the change that removed it; 0 while it is a
    /// member. Kept only until the fan-out has passed that seq.
    #[prost(uint64, tag = "3")]
    pub left: u64,
    /// Whether it may add and remove members.
    #[prost(bool, tag = "4")]
    pub admin: bool,
}

impl GroupRecord {
    /// Current members (not removed), in account order.
    pub fn current(&self) -> impl Iterator<Item = &Member> + '_ {
        self.members.iter().filter(|m| m.left == 0)
    }

    /// The current membership of `account`, if any.
    pub fn member(&self, account: u64) -> Option<&Member> {
        let start = self.members.partition_point(|m| m.account < account);
        self.members[start..].iter().take_while(|m| m.account == account).find(|m| m.left == 0)
    }

    /// Keeps `members` in the order the fan-out walks them.
    pub fn sort(&mut self) {
        self.members.sort_by_key(|m| (m.account, m.joined));
    }
}

fn decode(v: &[u8]) -> Result<GroupRecord, StorageError> {
    GroupRecord::decode(v).map_err(|_| StorageError::Corrupt("groups"))
}

fn membership_key(account: u64, group: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&account.to_be_bytes());
    k[8..].copy_from_slice(&group.to_be_bytes());
    k
}

impl Store {
    /// A group's record.
    pub fn group(&self, id: u64) -> Result<Option<GroupRecord>, StorageError> {
        self.get(Table::Groups, &id.to_be_bytes())?.map(|v| decode(&v)).transpose()
    }

    /// Up to `limit` ids of the groups `account` is a member of, greater
    /// than `after`, in order.
    pub fn groups_of(&self, account: u64, after: u64, limit: usize) -> Result<Vec<u64>, StorageError> {
        let prefix = account.to_be_bytes();
        let mut out = Vec::new();
        for item in self.scan_from(Table::GroupMembers, &membership_key(account, after.saturating_add(1))) {
            let (k, _) = item?;
            if !k.starts_with(&prefix) || out.len() >= limit {
                break;
            }
            let id = k.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes);
            out.push(id.ok_or(StorageError::Corrupt("group_members"))?);
        }
        Ok(out)
    }
}

impl Txn<'_> {
    /// A group's record as this round sees it.
    pub fn group(&mut self, id: u64) -> Result<Option<Arc<GroupRecord>>, StorageError> {
        if let Lookup::Known(v) = self.state.groups.get(&id) {
            return Ok(v);
        }
        let found = self.store.group(id)?.map(Arc::new);
        self.state.groups.remember(id, found.clone());
        Ok(found)
    }

    /// Stores a group's record.
    pub fn put_group(&mut self, g: GroupRecord) {
        self.put(Table::Groups, &g.id.to_be_bytes(), &g.encode_to_vec());
        self.state.groups.set(g.id, Some(Arc::new(g)));
    }

    /// Deletes a group's record (its last member has gone).
    pub fn delete_group(&mut self, id: u64) {
        self.delete(Table::Groups, &id.to_be_bytes());
        self.state.groups.set(id, None);
    }

    /// Records that `account` is a member of `group`.
    pub fn put_membership(&mut self, account: u64, group: u64) {
        self.put(Table::GroupMembers, &membership_key(account, group), &[]);
    }

    /// Records that `account` is no longer a member of `group`.
    pub fn delete_membership(&mut self, account: u64, group: u64) {
        self.delete(Table::GroupMembers, &membership_key(account, group));
    }
}
