//! Group requests from a connection: from message to the groups service
//! and from its answer back to a message. The rules live in
//! `crate::service::groups`.

use pipit_protocol::limits::{MAX_GROUP_MEMBERS, MAX_NAME_LEN};
use pipit_protocol::message::pb;

use super::connection::Conn;
use super::dispatch::{req_error, unavailable};
use crate::service::groups::Change;

impl Conn {
    pub(super) fn group_create(&mut self, req: pb::GroupCreate) {
        let r = req.req;
        if req.name.len() > MAX_NAME_LEN || req.members.len() > MAX_GROUP_MEMBERS {
            self.answer_now(req_error(pb::ErrorCode::TooLarge, r));
            return;
        }
        match self.ctx.services.groups.create(self.addr, req.id, req.name, req.members) {
            Err(reason) => self.answer_now(unavailable(r, reason)),
            Ok(created) => self.answer_later(async move {
                match created.await {
                    Ok(info) => pb::GroupInfo { req: r, ..info }.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }

    /// `GroupAdd`, `GroupRemove` and `GroupLeave`: answered with `Done`.
    pub(super) fn group_change(&mut self, r: u64, group: u64, change: Change) {
        if let Change::Add(list) | Change::Remove(list) = &change {
            if list.len() > MAX_GROUP_MEMBERS {
                self.answer_now(req_error(pb::ErrorCode::TooLarge, r));
                return;
            }
        }
        match self.ctx.services.groups.change(self.addr, group, change) {
            Err(reason) => self.answer_now(unavailable(r, reason)),
            Ok(changed) => self.answer_later(async move {
                match changed.await {
                    Ok(()) => pb::Done { req: r }.into(),
                    Err(code) => req_error(code, r),
                }
            }),
        }
    }

    pub(super) fn group_list(&mut self, req: pb::GroupListRequest) {
        let groups = self.ctx.services.groups.clone();
        let (r, account) = (req.req, self.addr.account);
        self.answer_later(async move {
            match groups.list(account, req.after).await {
                Ok(list) => pb::GroupList { req: r, ..list }.into(),
                Err(_) => req_error(pb::ErrorCode::Internal, r),
            }
        });
    }
}
