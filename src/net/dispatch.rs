//! From message kind to the service that handles it, and from the
//! service's answer back to a message. One arm per kind; the rules live
//! in `crate::service`.

use pipit_protocol::limits::MAX_NAME_LEN;
use pipit_protocol::message::pb;
use pipit_protocol::Message;

use super::connection::Conn;
use crate::service::messaging::SendFailure;

fn req_error(code: pb::ErrorCode, req: u64) -> Message {
    pb::Error { code: code as i32, req, ..Default::default() }.into()
}

impl Conn {
    /// Handles one message from the client, in wire order.
    pub(super) fn dispatch(&mut self, m: Message) {
        match m {
            Message::Send(send) => self.send(send),
            Message::Ack(ack) => self.ack(&ack),
            Message::Receipt(r) if r.kind == pb::ReceiptKind::Read as i32 && r.group == 0 => {
                let op = self.ctx.services.receipts.read(self.addr, r.peer, r.through);
                self.submit(op);
            }
            Message::Ping(p) => self.outq.push(pb::Pong { id: p.id }.into()),
            Message::LinkDevice(l) => self.link(l),
            Message::DeviceListRequest(d) => self.device_list(d),
            // At most once by definition: nothing to do for a kind this
            // server does not route yet.
            Message::Typing(_) | Message::Pong(_) | Message::Receipt(_) => {}
            other => {
                // Valid kinds this server version does not serve yet:
                // answer the request so the client does not wait.
                self.outq.push(req_error(pb::ErrorCode::Unavailable, request_id(&other)));
            }
        }
    }

    fn send(&mut self, send: pb::Send) {
        let id = send.id;
        // What this send holds until it is durable: its payloads (each a
        // slice of the frame it came in).
        let bytes = send.payload.len() + send.per_device.iter().map(|c| c.payload.len()).sum::<usize>();
        match self.ctx.services.messaging.send(self.addr, send) {
            Err(reason) => {
                // Storage is saturated, without room, or stopping: nothing
                // was stored; the client keeps the message in its outbox
                // and retries after the time it is told.
                self.outq.push(
                    pb::Error {
                        code: pb::ErrorCode::Unavailable as i32,
                        id,
                        retry_after_secs: crate::service::retry_after(reason),
                        ..Default::default()
                    }
                    .into(),
                );
            }
            Ok(durable) => self.answer_later_holding(bytes, async move {
                match durable.await {
                    Ok(sent) => {
                        metrics::counter!("pipit_messages_sent_total").increment(1);
                        sent.into()
                    }
                    Err(SendFailure::Code(code)) => pb::Error { code: code as i32, id, ..Default::default() }.into(),
                    Err(SendFailure::Mismatch(m)) => m.into(),
                    Err(SendFailure::Unavailable { retry_after_secs }) => pb::Error {
                        code: pb::ErrorCode::Unavailable as i32,
                        id,
                        retry_after_secs,
                        ..Default::default()
                    }
                    .into(),
                }
            }),
        }
    }

    fn link(&mut self, req: pb::LinkDevice) {
        let r = req.req;
        let Some(key) = pipit_protocol::PublicKey::from_slice(&req.key) else {
            self.outq.push(req_error(pb::ErrorCode::BadRequest, r));
            return;
        };
        if req.name.len() > MAX_NAME_LEN {
            self.outq.push(req_error(pb::ErrorCode::TooLarge, r));
            return;
        }
        match self.ctx.services.accounts.link(self.addr.account, key, req.name) {
            Err(reason) => self.outq.push(
                pb::Error {
                    code: pb::ErrorCode::Unavailable as i32,
                    req: r,
                    retry_after_secs: crate::service::retry_after(reason),
                    ..Default::default()
                }
                .into(),
            ),
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
}

fn request_id(m: &Message) -> u64 {
    match m {
        Message::GroupCreate(x) => x.req,
        Message::GroupAdd(x) => x.req,
        Message::GroupRemove(x) => x.req,
        Message::GroupLeave(x) => x.req,
        Message::GroupListRequest(x) => x.req,
        Message::KeysUpload(x) => x.req,
        Message::KeysFetch(x) => x.req,
        Message::LinkDevice(x) => x.req,
        Message::DeviceListRequest(x) => x.req,
        Message::UnlinkDevice(x) => x.req,
        Message::InviteCreate(x) => x.req,
        _ => 0,
    }
}
