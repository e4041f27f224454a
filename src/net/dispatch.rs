//! From message kind to the service that handles it, and from the
//! service's answer back to a message. One arm per kind; the rules live
//! in `crate::service`.
//!
//! What every kind gets back (SPEC.md 7.1): a request answers with its
//! `req`, a `Send` with its `id`, a `Ping` with a `Pong`; `Ack`, `Receipt`,
//! `Typing` and `Pong` are never answered. A request whose id is 0 could
//! not be told apart from a connection-level error, so it ends the
//! connection with `BAD_REQUEST`.

use pipit_protocol::limits::MAX_NAME_LEN;
use pipit_protocol::message::pb;
use pipit_protocol::Message;

use super::connection::Conn;
use super::send_order::Conv;
use crate::commit::SubmitError;
use crate::route::Watcher;
use crate::service::groups::Change;
use crate::service::keys::FetchRefused;
use crate::service::messaging::SendFailure;

pub(super) fn req_error(code: pb::ErrorCode, req: u64) -> Message {
    pb::Error { code: code as i32, req, ..Default::default() }.into()
}

fn send_error(code: pb::ErrorCode, id: u64) -> Message {
    pb::Error { code: code as i32, id, ..Default::default() }.into()
}

/// A request's answer: `Done`, or its error (with a pause before the
/// retry when the server failed, which is not final).
fn done_or(result: Result<(), pb::ErrorCode>, req: u64) -> Message {
    match result {
        Ok(()) => pb::Done { req }.into(),
        Err(code) => {
            let retry_after_secs = if code == pb::ErrorCode::Internal { OVERLOAD_RETRY_AFTER_SECS } else { 0 };
            pb::Error { code: code as i32, req, retry_after_secs, ..Default::default() }.into()
        }
    }
}

/// The answer to a request the writer did not take (its queue full, or
/// storage short of room): nothing was done; the client sends it again
/// after the pause.
pub(super) fn unavailable(req: u64, reason: SubmitError) -> Message {
    pb::Error {
        code: pb::ErrorCode::Unavailable as i32,
        req,
        retry_after_secs: crate::service::retry_after(reason),
        ..Default::default()
    }
    .into()
}

/// The `reason` label of `pipit_sends_refused_total` for a send the
/// writer did not take.
fn refusal_reason(reason: SubmitError) -> &'static str {
    match reason {
        SubmitError::Full => "storage_queue",
        SubmitError::NoRoom => "storage_low",
        SubmitError::Stopped => "stopping",
    }
}

/// Seconds a client waits before repeating what an overloaded server
/// refused. Short: the storage queue drains in milliseconds; the client
/// backs off further on repeated refusals.
const OVERLOAD_RETRY_AFTER_SECS: u32 = 1;

impl Conn {
    /// Handles one message from the client, in wire order.
    pub(super) fn dispatch(&mut self, m: Message) {
        if m.request_id() == Some(0) || m.send_id() == Some(0) {
            self.closing = Some(pb::ErrorCode::BadRequest);
            return;
        }
        if let Message::Send(s) = &m {
            // Exactly one recipient, checked first: a malformed send is
            // BAD_REQUEST whatever features the server offers, and costs
            // the writer nothing.
            if (s.to == 0) == (s.group == 0) {
                self.answer_now(send_error(pb::ErrorCode::BadRequest, s.id));
                return;
            }
        }
        if let Some(f) = m.feature() {
            if !self.ctx.services.features.offers(f) {
                // Final, unlike UNAVAILABLE: this server does not do it.
                if let Some(req) = m.request_id() {
                    self.answer_now(req_error(pb::ErrorCode::NotSupported, req));
                } else if let Some(id) = m.send_id() {
                    self.answer_now(send_error(pb::ErrorCode::NotSupported, id));
                }
                // Typing and group receipts are never answered.
                return;
            }
        }
        match m {
            Message::Send(send) => self.send(send),
            Message::Ack(ack) => self.ack(&ack),
            Message::Receipt(r) if r.kind == pb::ReceiptKind::Read as i32 && r.group == 0 && r.peer != 0 => {
                let op = self.ctx.services.receipts.read(self.addr, r.peer, r.through);
                self.submit(op);
            }
            Message::Receipt(r) if r.kind == pb::ReceiptKind::Read as i32 && r.group != 0 => {
                let op = self.ctx.services.groups.read(self.addr, r.group, r.through);
                self.submit(op);
            }
            Message::GroupCreate(g) => self.group_create(g),
            Message::GroupAdd(g) => self.group_change(g.req, g.group, Change::Add(g.members)),
            Message::GroupRemove(g) => self.group_change(g.req, g.group, Change::Remove(g.members)),
            Message::GroupLeave(g) => self.group_change(g.req, g.group, Change::Leave),
            Message::GroupListRequest(g) => self.group_list(g),
            Message::Ping(p) => self.answer_now(pb::Pong { id: p.id }.into()),
            Message::LinkDevice(l) => self.link(l),
            Message::DeviceListRequest(d) => self.device_list(d),
            Message::PresenceSubscribe(s) => self.subscribe(s),
            Message::PrivacySet(p) => self.privacy(p),
            Message::PushToken(t) => self.push_token(t),
            Message::Typing(t) => {
                let now = std::time::Instant::now();
                if let Some(group) = self.ctx.services.typing.relay(&mut self.typing, self.addr, &t, now) {
                    tokio::spawn(group);
                }
            }
            Message::UnlinkDevice(u) => self.unlink(u),
            Message::KeysUpload(u) => self.keys_upload(u),
            Message::KeysFetch(f) => self.keys_fetch(f),
            // Never answered: a receipt this server cannot use, a pong.
            Message::Pong(_) | Message::Receipt(_) => {}
            other => {
                // A kind of an offered feature with no arm here yet: still
                // answer, so the client does not wait for ever.
                tracing::warn!(kind = other.kind(), "offered feature without a handler");
                if let Some(req) = other.request_id() {
                    self.answer_now(req_error(pb::ErrorCode::NotSupported, req));
                }
            }
        }
    }

    fn send(&mut self, send: pb::Send) {
        let id = send.id;
        let now = std::time::Instant::now();
        if let Some(held) = self.send_order.check(&send, now) {
            // An earlier send of this conversation was refused for now and
            // has not come again: this one must not overtake it.
            metrics::counter!("pipit_sends_refused_total", "reason" => "held").increment(1);
            let e =
                pb::Error { code: held.code as i32, id, retry_after_secs: held.retry_after_secs, ..Default::default() };
            self.answer_now(e.into());
            return;
        }
        // What this send holds until it is durable: its payloads (each a
        // slice of the frame it came in).
        let bytes = send.payload.len() + send.per_device.iter().map(|c| c.payload.len()).sum::<usize>();
        let conv = Conv::of(&send);
        match self.ctx.services.messaging.send(self.addr, send) {
            Err(reason) => {
                // Storage is saturated, without room, or stopping: nothing
                // was stored; the client keeps the message in its outbox
                // and retries after the time it is told.
                metrics::counter!("pipit_sends_refused_total", "reason" => refusal_reason(reason)).increment(1);
                let retry_after_secs = crate::service::retry_after(reason);
                self.send_order.refused(conv, id, pb::ErrorCode::Unavailable, retry_after_secs, now);
                self.answer_now(
                    pb::Error { code: pb::ErrorCode::Unavailable as i32, id, retry_after_secs, ..Default::default() }
                        .into(),
                );
            }
            Ok(durable) => {
                self.send_order.waits(conv, id);
                self.answer_later_holding(bytes, async move {
                    match durable.await {
                        Ok(sent) => {
                            metrics::counter!("pipit_messages_sent_total").increment(1);
                            sent.into()
                        }
                        Err(SendFailure::Code(code)) => {
                            let retry_after_secs =
                                if code == pb::ErrorCode::Internal { OVERLOAD_RETRY_AFTER_SECS } else { 0 };
                            pb::Error { code: code as i32, id, retry_after_secs, ..Default::default() }.into()
                        }
                        Err(SendFailure::Mismatch(m)) => m.into(),
                        Err(SendFailure::Unavailable { retry_after_secs }) => pb::Error {
                            code: pb::ErrorCode::Unavailable as i32,
                            id,
                            retry_after_secs,
                            ..Default::default()
                        }
                        .into(),
                    }
                })
            }
        }
    }

    fn link(&mut self, req: pb::LinkDevice) {
        let r = req.req;
        let Some(key) = pipit_protocol::PublicKey::from_slice(&req.key) else {
            self.answer_now(req_error(pb::ErrorCode::BadRequest, r));
            return;
        };
        if req.name.len() > MAX_NAME_LEN {
            self.answer_now(req_error(pb::ErrorCode::TooLarge, r));
            return;
        }
        match self.ctx.services.accounts.link(self.addr, key, req.name) {
            Err(reason) => self.answer_now(unavailable(r, reason)),
            Ok(linked) => self.answer_later(async move {
                match linked.await {
                    Ok(device) => pb::Linked { req: r, device }.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }

    fn device_list(&mut self, req: pb::DeviceListRequest) {
        let account = if req.account == 0 { self.addr.account } else { req.account };
        let foreign = account != self.addr.account;
        let accounts = self.ctx.services.accounts.clone();
        let r = req.req;
        self.answer_later(async move {
            match accounts.device_list(account).await {
                Ok(Some(mut list)) => {
                    list.req = r;
                    if foreign {
                        // Other accounts see device numbers and keys (for
                        // end-to-end encryption), not names.
                        for d in &mut list.devices {
                            d.name.clear();
                            d.last_seen = 0;
                        }
                    }
                    list.into()
                }
                Ok(None) => req_error(pb::ErrorCode::NotFound, r),
                Err(_) => req_error(pb::ErrorCode::Internal, r),
            }
        });
    }

    fn subscribe(&mut self, req: pb::PresenceSubscribe) {
        let r = req.req;
        let mailbox = self.handle.mailbox.clone();
        let watcher = self.watcher.get_or_insert_with(|| Watcher::new(mailbox)).clone();
        self.watch_seq += 1;
        let seq = self.watch_seq;
        let presence = self.ctx.services.presence.clone();
        self.answer_later(async move { done_or(presence.subscribe(watcher, seq, req.accounts).await, r) });
    }

    fn privacy(&mut self, req: pb::PrivacySet) {
        let r = req.req;
        match self.ctx.services.presence.set_privacy(self.addr.account, req) {
            Err(reason) => self.answer_now(unavailable(r, reason)),
            Ok(stored) => self.answer_later(async move { done_or(stored.await, r) }),
        }
    }

    fn push_token(&mut self, req: pb::PushToken) {
        let r = req.req;
        match self.ctx.services.push.set_token(self.addr, req.platform, req.token) {
            Err(reason) => self.answer_now(unavailable(r, reason)),
            Ok(stored) => self.answer_later(async move { done_or(stored.await, r) }),
        }
    }

    fn unlink(&mut self, req: pb::UnlinkDevice) {
        let r = req.req;
        match self.ctx.services.accounts.unlink(self.addr, req.device) {
            Err(_) => self.answer_now(busy(r)),
            Ok(done) => self.answer_later(async move {
                match done.await {
                    Ok(()) => pb::Done { req: r }.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }

    fn keys_upload(&mut self, upload: pb::KeysUpload) {
        let r = upload.req;
        // Lengths, counts, order and the signed prekey's signature: all
        // checkable here, off the writer thread.
        if let Err(e) = pipit_protocol::e2e::check_upload(&upload) {
            let code = match e {
                pipit_protocol::e2e::KeyError::TooMany => pb::ErrorCode::TooLarge,
                _ => pb::ErrorCode::BadRequest,
            };
            tracing::debug!(device = %self.addr, error = %e, "key upload refused");
            self.answer_now(req_error(code, r));
            return;
        }
        match self.ctx.services.keys.upload(self.addr, upload) {
            Err(_) => self.answer_now(busy(r)),
            Ok(stored) => self.answer_later(async move {
                match stored.await {
                    Ok(()) => pb::Done { req: r }.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }

    fn keys_fetch(&mut self, fetch: pb::KeysFetch) {
        let r = fetch.req;
        match self.ctx.services.keys.fetch(self.addr, fetch) {
            Err(FetchRefused::RateLimited(secs)) => {
                metrics::counter!("pipit_keys_fetch_rate_limited_total").increment(1);
                self.answer_now(
                    pb::Error {
                        code: pb::ErrorCode::RateLimited as i32,
                        req: r,
                        retry_after_secs: secs,
                        ..Default::default()
                    }
                    .into(),
                );
            }
            Err(_) => self.answer_now(busy(r)),
            Ok(result) => self.answer_later(async move {
                match result.await {
                    Ok(keys) => keys.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }
}

/// A request the writer had no room for: nothing done; retry shortly.
fn busy(req: u64) -> Message {
    pb::Error {
        code: pb::ErrorCode::Unavailable as i32,
        req,
        retry_after_secs: OVERLOAD_RETRY_AFTER_SECS,
        ..Default::default()
    }
    .into()
}
