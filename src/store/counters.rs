//! `counters`: every number the server hands out in order (account ids,
//! inbox ids, sequence numbers) and the receipt high-water marks. The
//! writer is their only writer, so its overlay caches them exactly.

use super::overlay::Lookup;
use super::{be_u64, StorageError, Store, Table, Txn};
use crate::model::DeviceAddr;

/// One counter. Its key bytes are fixed by data already on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Counter {
    /// The next account id (`next_account`).
    NextAccount,
    /// The next inbox id of a device (`i` account device).
    InboxNext(DeviceAddr),
    /// The next sequence number of the 1:1 conversation between two
    /// accounts (`s` low high), the same for both directions.
    Conversation(u64, u64),
    /// The lowest device number an account may give its next device
    /// (`d` account): numbers of unlinked devices are never given again,
    /// since their dedup records and other peers' sessions name them.
    NextDevice(u64),
    /// The highest seq a receipt of `kind` already told `to` about for
    /// its conversation with `peer` (`r` kind to peer).
    ReceiptMark {
        /// The receipt kind.
        kind: u8,
        /// The account told.
        to: u64,
        /// The conversation partner.
        peer: u64,
    },
    /// The next group id (`next_group`).
    NextGroup,
    /// The next sequence number of a group, shared by its messages and
    /// its membership changes (`g` group).
    GroupSeq(u64),
    /// How many inbox entries (plus one while its fan-out runs) still
    /// refer to a group body (`b` group seq). Absent: none.
    BodyRefs {
        /// The group.
        group: u64,
        /// The body's sequence number in the group.
        seq: u64,
    },
    /// The next id of the outbound queue to the node with this slot
    /// (`xo` slot): consecutive from 1.
    OutboundNext(u32),
    /// The highest outbound entry the node with this slot has
    /// acknowledged (`xa` slot); everything up to it is deleted.
    OutboundAcked(u32),
    /// The highest entry forwarded from the node with this slot that this
    /// node applied (`xi` slot): entries arrive and apply in order, so
    /// this one mark dedups them all.
    InboundMark(u32),
    /// The next sequence number of one direction of a 1:1 conversation
    /// whose accounts live on two nodes (`xv` from to): each direction is
    /// numbered by its sender's node (SPEC.md 5.11).
    Direction {
        /// The sending account.
        from: u64,
        /// The receiving account.
        to: u64,
    },
    /// The highest group seq a member has acknowledged (kind DELIVERED)
    /// or read (kind READ) in a group, so that each member counts once per
    /// message (`m` kind member group).
    GroupMark {
        /// The receipt kind.
        kind: u8,
        /// The member account.
        member: u64,
        /// The group.
        group: u64,
    },
}

impl Counter {
    /// The 1:1 conversation between `a` and `b`, in either direction.
    pub fn conversation(a: u64, b: u64) -> Self {
        if a <= b {
            Counter::Conversation(a, b)
        } else {
            Counter::Conversation(b, a)
        }
    }

    fn key(&self) -> Vec<u8> {
        let mut k = Vec::with_capacity(18);
        match *self {
            Counter::NextAccount => k.extend_from_slice(b"next_account"),
            Counter::InboxNext(addr) => {
                k.push(b'i');
                k.extend_from_slice(&addr.account.to_be_bytes());
                k.extend_from_slice(&addr.device.to_be_bytes());
            }
            Counter::Conversation(lo, hi) => {
                k.push(b's');
                k.extend_from_slice(&lo.to_be_bytes());
                k.extend_from_slice(&hi.to_be_bytes());
            }
            Counter::NextDevice(account) => {
                k.push(b'd');
                k.extend_from_slice(&account.to_be_bytes());
            }
            Counter::ReceiptMark { kind, to, peer } => {
                k.push(b'r');
                k.push(kind);
                k.extend_from_slice(&to.to_be_bytes());
                k.extend_from_slice(&peer.to_be_bytes());
            }
            Counter::NextGroup => k.extend_from_slice(b"next_group"),
            Counter::GroupSeq(group) => {
                k.push(b'g');
                k.extend_from_slice(&group.to_be_bytes());
            }
            Counter::BodyRefs { group, seq } => {
                k.push(b'b');
                k.extend_from_slice(&group.to_be_bytes());
                k.extend_from_slice(&seq.to_be_bytes());
            }
            Counter::OutboundNext(slot) => {
                k.extend_from_slice(b"xo");
                k.extend_from_slice(&slot.to_be_bytes());
            }
            Counter::OutboundAcked(slot) => {
                k.extend_from_slice(b"xa");
                k.extend_from_slice(&slot.to_be_bytes());
            }
            Counter::InboundMark(slot) => {
                k.extend_from_slice(b"xi");
                k.extend_from_slice(&slot.to_be_bytes());
            }
            Counter::Direction { from, to } => {
                k.extend_from_slice(b"xv");
                k.extend_from_slice(&from.to_be_bytes());
                k.extend_from_slice(&to.to_be_bytes());
            }
            Counter::GroupMark { kind, member, group } => {
                k.push(b'm');
                k.push(kind);
                k.extend_from_slice(&member.to_be_bytes());
                k.extend_from_slice(&group.to_be_bytes());
            }
        }
        k
    }

    /// The value before anything was stored: ids start at 1, marks and
    /// device numbers at 0.
    fn initial(&self) -> u64 {
        match self {
            Counter::ReceiptMark { .. }
            | Counter::BodyRefs { .. }
            | Counter::GroupMark { .. }
            | Counter::OutboundAcked(_)
            | Counter::InboundMark(_)
            | Counter::NextDevice(_) => 0,
            _ => 1,
        }
    }
}

impl Store {
    /// A counter's committed value.
    pub fn counter(&self, c: Counter) -> Result<u64, StorageError> {
        match self.get(Table::Counters, &c.key())? {
            None => Ok(c.initial()),
            Some(v) => be_u64(&v, "counters"),
        }
    }
}

impl Txn<'_> {
    /// A counter's value as this round sees it.
    pub fn counter(&mut self, c: Counter) -> Result<u64, StorageError> {
        if let Lookup::Known(v) = self.state.counters.get(&c) {
            return Ok(v.unwrap_or(c.initial()));
        }
        let v = self.store.counter(c)?;
        self.state.counters.remember(c, Some(v));
        Ok(v)
    }

    /// Sets a counter.
    pub fn set_counter(&mut self, c: Counter, v: u64) {
        self.put(Table::Counters, &c.key(), &v.to_be_bytes());
        self.state.counters.set(c, Some(v));
    }

    /// Forgets a counter: it reads as its initial value again.
    pub fn delete_counter(&mut self, c: Counter) {
        self.delete(Table::Counters, &c.key());
        self.state.counters.set(c, None);
    }

    /// Hands out the counter's current value and advances it.
    pub fn next(&mut self, c: Counter) -> Result<u64, StorageError> {
        let v = self.counter(c)?;
        self.set_counter(c, v + 1);
        Ok(v)
    }
}
