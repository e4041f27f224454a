//! `group_receipts`: for each group message, how many members have
//! received and read it, and how much of that its sender was told. Two
//! kinds of key:
//!
//! - `r` group (8) seq (8): the counts (fixed 37 bytes, below).
//! - `d` group (8) seq (8): empty; present while the counts changed since
//!   the sender was last told, so a flush finds them without a scan of
//!   every message, and finds them again after a restart.

use super::overlay::Lookup;
use super::{StorageError, Store, Table, Txn};

const RECORD: u8 = b'r';
const DIRTY: u8 = b'd';
const LEN: usize = 37;

/// One group message's receipt counts.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct GroupCounts {
    /// The sending account.
    pub sender: u64,
    /// Server time of the message, seconds since the Unix epoch.
    pub time: u64,
    /// Member accounts the fan-out reached (sender excluded); final once
    /// `fanned_out`.
    pub recipients: u32,
    /// Members with at least one device that acknowledged it.
    pub delivered: u32,
    /// Members that read it.
    pub read: u32,
    /// `delivered` as last told to the sender.
    pub told_delivered: u32,
    /// `read` as last told to the sender.
    pub told_read: u32,
    /// The fan-out is complete.
    pub fanned_out: bool,
}

impl GroupCounts {
    /// The sender has not been told the current counts.
    pub fn dirty(&self) -> bool {
        self.delivered != self.told_delivered || self.read != self.told_read
    }

    fn encode(&self) -> [u8; LEN] {
        let mut v = [0u8; LEN];
        v[..8].copy_from_slice(&self.sender.to_be_bytes());
        v[8..16].copy_from_slice(&self.time.to_be_bytes());
        v[16..20].copy_from_slice(&self.recipients.to_be_bytes());
        v[20..24].copy_from_slice(&self.delivered.to_be_bytes());
        v[24..28].copy_from_slice(&self.read.to_be_bytes());
        v[28..32].copy_from_slice(&self.told_delivered.to_be_bytes());
        v[32..36].copy_from_slice(&self.told_read.to_be_bytes());
        v[36] = u8::from(self.fanned_out);
        v
    }

    fn decode(v: &[u8]) -> Result<Self, StorageError> {
        if v.len() != LEN {
            return Err(StorageError::Corrupt("group_receipts"));
        }
        let u64_at = |i: usize| u64::from_be_bytes(v[i..i + 8].try_into().expect("8 bytes"));
        let u32_at = |i: usize| u32::from_be_bytes(v[i..i + 4].try_into().expect("4 bytes"));
        Ok(Self {
            sender: u64_at(0),
            time: u64_at(8),
            recipients: u32_at(16),
            delivered: u32_at(20),
            read: u32_at(24),
            told_delivered: u32_at(28),
            told_read: u32_at(32),
            fanned_out: v[36] != 0,
        })
    }
}

fn key(kind: u8, group: u64, seq: u64) -> [u8; 17] {
    let mut k = [0u8; 17];
    k[0] = kind;
    k[1..9].copy_from_slice(&group.to_be_bytes());
    k[9..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Result<(u64, u64), StorageError> {
    let corrupt = || StorageError::Corrupt("group_receipts");
    let g = k.get(1..9).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(corrupt)?;
    let s = k.get(9..17).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(corrupt)?;
    Ok((g, s))
}

impl Store {
    /// The counts of message `seq` of `group`.
    pub fn group_counts(&self, group: u64, seq: u64) -> Result<Option<GroupCounts>, StorageError> {
        self.get(Table::GroupReceipts, &key(RECORD, group, seq))?.map(|v| GroupCounts::decode(&v)).transpose()
    }

    /// Up to `limit` messages whose sender has not been told their counts.
    pub fn dirty_group_counts(&self, limit: usize) -> Result<Vec<(u64, u64)>, StorageError> {
        let mut out = Vec::new();
        for item in self.scan_from(Table::GroupReceipts, &[DIRTY]) {
            let (k, _) = item?;
            if k.first() != Some(&DIRTY) || out.len() >= limit {
                break;
            }
            out.push(parse_key(&k)?);
        }
        Ok(out)
    }

    /// Seqs of the messages of `group` from `from` to `to` (inclusive)
    /// that have counts, at most `limit` of them.
    pub fn group_counts_between(&self, group: u64, from: u64, to: u64, limit: usize) -> Result<Vec<u64>, StorageError> {
        let mut out = Vec::new();
        for item in self.scan_from(Table::GroupReceipts, &key(RECORD, group, from)) {
            let (k, _) = item?;
            let (g, s) = match k.first() {
                Some(&RECORD) => parse_key(&k)?,
                _ => break,
            };
            if g != group || s > to || out.len() >= limit {
                break;
            }
            out.push(s);
        }
        Ok(out)
    }

    /// Every message's counts from `from` on (inclusive), in key order;
    /// for sweeps that resume where they stopped.
    pub fn group_counts_scan(
        &self,
        from: Option<(u64, u64)>,
    ) -> impl Iterator<Item = Result<((u64, u64), GroupCounts), StorageError>> + '_ {
        let (g, s) = from.unwrap_or((0, 0));
        self.scan_from(Table::GroupReceipts, &key(RECORD, g, s))
            .take_while(|item| item.as_ref().map_or(true, |(k, _)| k.first() == Some(&RECORD)))
            .map(|item| {
                let (k, v) = item?;
                Ok((parse_key(&k)?, GroupCounts::decode(&v)?))
            })
    }
}

impl Txn<'_> {
    /// The counts of message `seq` of `group`, as this round sees them.
    pub fn group_counts(&mut self, group: u64, seq: u64) -> Result<Option<GroupCounts>, StorageError> {
        if let Lookup::Known(v) = self.state.group_counts.get(&(group, seq)) {
            return Ok(v);
        }
        let found = self.store.group_counts(group, seq)?;
        self.state.group_counts.remember((group, seq), found);
        Ok(found)
    }

    /// Stores the counts; keeps the dirty index in step with them.
    pub fn put_group_counts(&mut self, group: u64, seq: u64, c: GroupCounts) -> Result<(), StorageError> {
        let was_dirty = self.group_counts(group, seq)?.is_some_and(|old| old.dirty());
        self.put(Table::GroupReceipts, &key(RECORD, group, seq), &c.encode());
        self.state.group_counts.set((group, seq), Some(c));
        match (was_dirty, c.dirty()) {
            (false, true) => self.put(Table::GroupReceipts, &key(DIRTY, group, seq), &[]),
            (true, false) => self.delete(Table::GroupReceipts, &key(DIRTY, group, seq)),
            _ => {}
        }
        Ok(())
    }

    /// Forgets a message's counts.
    pub fn delete_group_counts(&mut self, group: u64, seq: u64) {
        self.delete(Table::GroupReceipts, &key(RECORD, group, seq));
        self.delete(Table::GroupReceipts, &key(DIRTY, group, seq));
        self.state.group_counts.set((group, seq), None);
    }
}
