//! Groups from the app's side: create, add, remove, leave, list, send.
//! Group messages arrive as [`Event::Message`](crate::Event::Message) with
//! `group` set, changes as [`Event::Group`](crate::Event::Group) in order
//! with them, and receipts as [`Event::Receipt`](crate::Event::Receipt)
//! with `group`, `seq` and `count` (how many members received or read that
//! message).
//!
//! Requests wait for a connection and are sent again after a reconnect
//! until answered. A create carries a create id that the library gives
//! it once and keeps across reconnects, so a create sent again after its
//! answer was lost gets the group the first one made, not a second group
//! (SPEC.md 5.6). Adding someone already in, or removing someone already
//! out, changes nothing, so those are safe to repeat.

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::{Client, ClientError};

/// `Done` is success; an `Error` is the server's refusal.
fn done(answer: Message) -> Result<(), ClientError> {
    match answer {
        Message::Done(_) => Ok(()),
        other => Err(refusal(other)),
    }
}

fn refusal(answer: Message) -> ClientError {
    match answer {
        Message::Error(e) => {
            ClientError::Refused(pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified))
        }
        _ => ClientError::Refused(pb::ErrorCode::Unspecified),
    }
}

impl Client {
    /// Creates a group of this account (its first admin) and `members`.
    /// Safe across reconnects: the request keeps its create id, so the
    /// server makes one group however often it has to be sent.
    pub async fn create_group(&self, name: &str, members: &[u64]) -> Result<pb::GroupInfo, ClientError> {
        // The create id is given by the task, from the saved id counter.
        let name = Bytes::copy_from_slice(name.as_bytes());
        let req = pb::GroupCreate { req: 0, name, members: members.to_vec(), id: 0 };
        match self.call(req.into()).await? {
            Message::GroupInfo(g) => Ok(g),
            other => Err(refusal(other)),
        }
    }

    /// Adds members (admins only).
    pub async fn add_members(&self, group: u64, members: &[u64]) -> Result<(), ClientError> {
        done(self.call(pb::GroupAdd { req: 0, group, members: members.to_vec() }.into()).await?)
    }

    /// Removes members (admins only).
    pub async fn remove_members(&self, group: u64, members: &[u64]) -> Result<(), ClientError> {
        done(self.call(pb::GroupRemove { req: 0, group, members: members.to_vec() }.into()).await?)
    }

    /// Leaves a group.
    pub async fn leave_group(&self, group: u64) -> Result<(), ClientError> {
        done(self.call(pb::GroupLeave { req: 0, group }.into()).await?)
    }

    /// Every group this account is in (as many requests as pages).
    pub async fn groups(&self) -> Result<Vec<pb::GroupInfo>, ClientError> {
        let mut all = Vec::new();
        let mut after = 0;
        loop {
            let page = match self.call(pb::GroupListRequest { req: 0, after }.into()).await? {
                Message::GroupList(l) => l,
                other => return Err(refusal(other)),
            };
            after = page.groups.last().map_or(after, |g| g.group);
            all.extend(page.groups);
            if !page.more {
                return Ok(all);
            }
        }
    }

    /// Queues a group message: with encryption on (the default), one
    /// Megolm ciphertext for every member device, its session key shared
    /// pairwise to devices that lack it; otherwise the payload as it is.
    /// Like [`Client::send`], it survives reconnects in the outbox.
    pub async fn send_group(&self, group: u64, payload: impl Into<Bytes>) -> Result<u64, ClientError> {
        self.queue(pb::Send { group, payload: payload.into(), ..Default::default() }).await
    }

    /// [`Client::send_group`] with a ciphertext for some devices besides
    /// (the sender key, for devices that lack it); each arrives there as
    /// `Deliver.device_payload`. `account` must be set in each.
    pub async fn send_group_with_keys(
        &self,
        group: u64,
        payload: impl Into<Bytes>,
        per_device: Vec<pb::DeviceCiphertext>,
    ) -> Result<u64, ClientError> {
        self.queue(pb::Send { group, payload: payload.into(), per_device, ..Default::default() }).await
    }

    /// Tells the group's senders this account read up to `through`.
    pub async fn mark_group_read(&self, group: u64, through: u64) -> Result<(), ClientError> {
        let r = pb::Receipt { kind: pb::ReceiptKind::Read as i32, group, through, ..Default::default() };
        self.request(vec![r.into()]).await
    }
}
