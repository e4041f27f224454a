//! `fanout`: durable fan-out jobs, by group (8) and seq (8). A job exists
//! from the commit that stored a group entry's body until the commit that
//! wrote its last member's inbox entries; its cursor moves in the same
//! commits as the entries it covers, so a restart resumes exactly where the
//! last commit left it. Jobs of one group run one at a time in seq order:
//! the first key of a group is its running job.

use prost::Message as _;

use super::{StorageError, Store, Table, Txn};

/// One group entry still being fanned out.
#[derive(Clone, PartialEq, prost::Message)]
pub struct FanoutJob {
    /// Every member account below this one has its entries.
    #[prost(uint64, tag = "1")]
    pub cursor: u64,
    /// Member accounts still to walk (for gauges and admin).
    #[prost(uint64, tag = "2")]
    pub remaining: u64,
    /// When the entry became durable, milliseconds since the Unix epoch.
    #[prost(uint64, tag = "3")]
    pub created_ms: u64,
    /// A change notice (`GroupInfo`) rather than a message.
    #[prost(bool, tag = "4")]
    pub notice: bool,
    /// The sending account, or the account that made the change.
    #[prost(uint64, tag = "5")]
    pub from: u64,
    /// The sending device (messages only).
    #[prost(uint32, tag = "6")]
    pub from_device: u32,
    /// Server time of the entry, seconds since the Unix epoch.
    #[prost(uint64, tag = "7")]
    pub time: u64,
    /// Per-device ciphertexts waiting in `group_bodies`.
    #[prost(uint32, tag = "8")]
    pub extras: u32,
    /// Member accounts reached so far, the sender's own excluded.
    #[prost(uint64, tag = "9")]
    pub recipients: u64,
    /// Inbox entries written so far.
    #[prost(uint64, tag = "10")]
    pub entries: u64,
}

fn key(group: u64, seq: u64) -> [u8; 16] {
    let mut k = [0u8; 16];
    k[..8].copy_from_slice(&group.to_be_bytes());
    k[8..].copy_from_slice(&seq.to_be_bytes());
    k
}

fn parse_key(k: &[u8]) -> Result<(u64, u64), StorageError> {
    let corrupt = || StorageError::Corrupt("fanout");
    let g = k.get(..8).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(corrupt)?;
    let s = k.get(8..16).and_then(|b| b.try_into().ok()).map(u64::from_be_bytes).ok_or_else(corrupt)?;
    Ok((g, s))
}

fn decode(v: &[u8]) -> Result<FanoutJob, StorageError> {
    FanoutJob::decode(v).map_err(|_| StorageError::Corrupt("fanout"))
}

/// Fan-out work not done yet.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backlog {
    /// Jobs.
    pub jobs: u64,
    /// Member accounts those jobs still have to reach.
    pub members: u64,
}

impl Store {
    /// The job of entry `seq` of `group`.
    pub fn fanout_job(&self, group: u64, seq: u64) -> Result<Option<FanoutJob>, StorageError> {
        self.get(Table::Fanout, &key(group, seq))?.map(|v| decode(&v)).transpose()
    }

    /// The running job (the lowest seq) of up to `limit` groups, starting
    /// with the first group after `after` and wrapping around, so that
    /// successive calls share the work among groups.
    pub fn fanout_heads(&self, after: u64, limit: usize) -> Result<Vec<(u64, u64)>, StorageError> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut from = after.saturating_add(1);
        let mut wrapped = false;
        while out.len() < limit {
            let first = self.scan_from(Table::Fanout, &key(from, 0)).next().transpose()?;
            match first {
                Some((k, _)) => {
                    let (g, s) = parse_key(&k)?;
                    if wrapped && g > after {
                        break;
                    }
                    if out.iter().any(|(og, _)| *og == g) {
                        break;
                    }
                    out.push((g, s));
                    match g.checked_add(1) {
                        Some(next) => from = next,
                        None => break,
                    }
                }
                None if !wrapped && after > 0 => {
                    wrapped = true;
                    from = 0;
                }
                None => break,
            }
        }
        Ok(out)
    }

    /// What is left to fan out for `group` (every group: `None`), reading
    /// at most `scan_limit` jobs.
    pub fn fanout_backlog(&self, group: Option<u64>, scan_limit: usize) -> Result<Backlog, StorageError> {
        let prefix: Vec<u8> = group.map(|g| g.to_be_bytes().to_vec()).unwrap_or_default();
        let mut b = Backlog::default();
        for item in self.scan_from(Table::Fanout, &prefix).take(scan_limit) {
            let (k, v) = item?;
            if !k.starts_with(&prefix) {
                break;
            }
            b.jobs += 1;
            b.members += decode(&v)?.remaining;
        }
        Ok(b)
    }
}

impl Txn<'_> {
    /// Stores (or moves on) the job of entry `seq` of `group`.
    pub fn put_fanout_job(&mut self, group: u64, seq: u64, job: &FanoutJob) {
        self.put(Table::Fanout, &key(group, seq), &job.encode_to_vec());
    }

    /// The job is done.
    pub fn delete_fanout_job(&mut self, group: u64, seq: u64) {
        self.delete(Table::Fanout, &key(group, seq));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::TxnState;

    #[test]
    fn heads_are_the_first_job_of_each_group_and_wrap_around() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut state = TxnState::default();
        let mut txn = Txn::begin(&store, &mut state);
        for (g, s) in [(3, 7), (3, 8), (5, 2), (9, 1), (9, 4)] {
            txn.put_fanout_job(g, s, &FanoutJob { remaining: 2, ..Default::default() });
        }
        txn.op_commit();
        txn.commit(false).unwrap();
        assert_eq!(store.fanout_heads(0, 10).unwrap(), vec![(3, 7), (5, 2), (9, 1)]);
        assert_eq!(store.fanout_heads(3, 2).unwrap(), vec![(5, 2), (9, 1)]);
        assert_eq!(store.fanout_heads(5, 10).unwrap(), vec![(9, 1), (3, 7), (5, 2)]);
        assert_eq!(store.fanout_heads(9, 10).unwrap(), vec![(3, 7), (5, 2), (9, 1)]);
        assert_eq!(store.fanout_backlog(None, 100).unwrap(), Backlog { jobs: 5, members: 10 });
        assert_eq!(store.fanout_backlog(Some(9), 100).unwrap(), Backlog { jobs: 2, members: 4 });
    }
}
