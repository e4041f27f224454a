//! Requests the task numbers, sends (again after a reconnect) until they
//! are answered, and answers.

use std::time::Instant;

use pipit_protocol::message::pb;
use pipit_protocol::Message;
use tokio::sync::oneshot;

use crate::ClientError;

use super::task::{retry_delay, Deferred, Task};

pub(super) struct Call {
    pub(super) msg: Message,
    /// `None` for the library's own (a subscription sent again).
    pub(super) reply: Option<oneshot::Sender<Result<Message, ClientError>>>,
    /// Not before this (the server asked for a pause), on this connection.
    pub(super) deferred: Option<Deferred>,
    /// Written to a connection (so it may have been acted on).
    pub(super) sent: bool,
}

/// Whether a request may be sent again when its answer was lost with a
/// connection. Every request sets a state or reads one, or creates
/// something under an id of ours that the server deduplicates (a
/// `GroupCreate` with its create id: a second copy gets the first one's
/// group). A create without an id would make a second group.
fn repeatable(m: &Message) -> bool {
    !matches!(m, Message::GroupCreate(g) if g.id == 0)
}

impl Task {
    /// Numbers a request and keeps it until answered; returns it to send
    /// (`None`: the store failed, and the caller has been told).
    ///
    /// A `GroupCreate` also gets its create id here, once: the copy kept
    /// for sending again after a reconnect carries the same id, so the
    /// server answers a retry with the group the first copy made.
    pub(super) fn add_call(
        &mut self,
        mut msg: Message,
        reply: Option<oneshot::Sender<Result<Message, ClientError>>>,
    ) -> Option<Message> {
        if let Message::GroupCreate(g) = &mut msg {
            if g.id == 0 {
                // From the message ids' counter, saved before use like
                // theirs: an id never goes to two different creates.
                g.id = self.state.next_id;
                self.state.next_id += 1;
                if let Err(e) = self.store.save_state(&self.state) {
                    if let Some(reply) = reply {
                        let _ = reply.send(Err(e.into()));
                    }
                    return None;
                }
            }
        }
        let req = self.next_req;
        self.next_req += 1;
        msg.set_request_id(req);
        self.calls.insert(req, Call { msg: msg.clone(), reply, deferred: None, sent: false });
        Some(msg)
    }

    /// A connection ended: requests that were sent on it and must not be
    /// repeated (a create without an id; this library gives every create
    /// one) fail with [`ClientError::Offline`], since their answer will
    /// not come; the others go again on the next connection.
    pub(super) fn drop_unrepeatable_calls(&mut self) {
        let lost: Vec<u64> =
            self.calls.iter().filter(|(_, c)| c.sent && !repeatable(&c.msg)).map(|(req, _)| *req).collect();
        for req in lost {
            if let Some(Call { reply: Some(reply), .. }) = self.calls.remove(&req) {
                let _ = reply.send(Err(ClientError::Offline));
            }
        }
    }

    /// What a new connection must be sent besides the outbox: the
    /// presence subscription in force, then every unanswered request.
    pub(super) fn calls_to_send(&mut self) -> Vec<Message> {
        let resubscribe =
            !self.watching.is_empty() && !self.calls.values().any(|c| matches!(c.msg, Message::PresenceSubscribe(_)));
        if resubscribe {
            let m = pb::PresenceSubscribe { accounts: self.watching.clone(), req: 0 };
            // Not a create: nothing to store, so it is always added.
            let _ = self.add_call(m.into(), None);
        }
        self.calls
            .values_mut()
            .map(|c| {
                c.deferred = None;
                c.sent = true;
                c.msg.clone()
            })
            .collect()
    }

    /// An answer to request `req`; `Ok(true)` when it was one of ours.
    pub(super) fn answer_call(&mut self, req: u64, m: &Message) -> bool {
        let Some(call) = self.calls.get_mut(&req) else { return false };
        if let Message::Error(e) = m {
            let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
            if matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal) {
                // Not final: again after the pause, on this connection.
                let refusals = call.deferred.map_or(0, |d| d.refusals) + 1;
                let at = Instant::now() + retry_delay(e.retry_after_secs, refusals);
                call.deferred = Some(Deferred { at, refusals });
                return true;
            }
        }
        let Some(call) = self.calls.remove(&req) else { return false };
        let result = match m {
            Message::Error(e) => {
                Err(ClientError::Refused(pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified)))
            }
            other => Ok(other.clone()),
        };
        if let (Ok(_), Message::PresenceSubscribe(s)) = (&result, &call.msg) {
            self.watching = s.accounts.clone();
        }
        if let Some(reply) = call.reply {
            let _ = reply.send(result);
        }
        true
    }
}
