//! Megolm: a group's outbound session, sharing its key with member
//! devices over Olm, and opening group messages.

use std::collections::BTreeSet;

use bytes::Bytes;
use pipit_protocol::e2e::{decode_envelope, encode_envelope};
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use prost::Message as _;
use vodozemac::megolm::{GroupSession, InboundGroupSession, MegolmMessage};

use crate::store::{Store, StoreError};

use super::records::{GroupRecord, InboundRecord, OutboundRecord, SEEN_MAX};
use super::{
    decode_content, hex, now, Addr, E2e, Pending, Sealed, Undecryptable, GROUP_SEND_BUDGET, MEGOLM_MAX_AGE_SECS,
    MEGOLM_MAX_MESSAGES,
};

impl E2e {
    /// A group delivery's `device_payload`: an Olm message carrying a
    /// Megolm session for the group.
    pub(super) fn open_key_share(
        &mut self,
        store: &mut dyn Store,
        d: &pb::Deliver,
        share: &[u8],
        events: &mut Vec<crate::Event>,
    ) -> Result<Result<(), Undecryptable>, StoreError> {
        let (kind, e) = match decode_envelope(share) {
            Ok((k @ (pb::E2eKind::Olm | pb::E2eKind::OlmPreKey), e)) => (k, e),
            _ => return Ok(Err(Undecryptable::Damaged)),
        };
        let content = match self.open_olm(store, d, kind, &e.ciphertext, events)? {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        let Some(key) = content.room_key.filter(|k| k.group == d.group && content.group == d.group) else {
            return Ok(Err(Undecryptable::WrongConversation));
        };
        let Ok(session_key) = vodozemac::megolm::SessionKey::from_bytes(&key.session_key) else {
            return Ok(Err(Undecryptable::Damaged));
        };
        let inbound = InboundGroupSession::new(&session_key, vodozemac::megolm::SessionConfig::version_1());
        let sid = session_id_bytes(&inbound.session_id());
        let name = format!("in.{}.{}", d.group, hex(&sid));
        let known = self.vault.get::<InboundRecord>(store, &name)?;
        if known.as_ref().is_some_and(|k| k.sender != (d.from, d.from_device)) {
            // Another member passing on someone else's session as its
            // own: keep it bound to the device that made it.
            return Ok(Err(Undecryptable::Damaged));
        }
        // The same session shared again keeps what was read under it.
        let seen = known.map(|k| k.seen).unwrap_or_default();
        let r = InboundRecord { pickle: inbound.pickle(), sender: (d.from, d.from_device), seen };
        self.vault.put(store, &name, &r)?;
        Ok(Ok(()))
    }

    pub(super) fn open_megolm(
        &mut self,
        store: &mut dyn Store,
        d: &pb::Deliver,
        e: &pb::E2eEnvelope,
    ) -> Result<Result<Bytes, Undecryptable>, StoreError> {
        let name = format!("in.{}.{}", d.group, hex(&e.session));
        let Some(mut rec) = self.vault.get::<InboundRecord>(store, &name)? else {
            return Ok(Err(Undecryptable::NoGroupSession));
        };
        // A session shared by one device decrypts only that device's
        // messages: a member cannot speak in another's name.
        if rec.sender != (d.from, d.from_device) {
            return Ok(Err(Undecryptable::Damaged));
        }
        let Ok(msg) = MegolmMessage::from_bytes(&e.ciphertext) else { return Ok(Err(Undecryptable::Damaged)) };
        let mut inbound = InboundGroupSession::from_pickle(rec.pickle);
        let Ok(plain) = inbound.decrypt(&msg) else { return Ok(Err(Undecryptable::Damaged)) };
        let content = match decode_content(&plain.plaintext) {
            Ok(c) => c,
            Err(r) => return Ok(Err(r)),
        };
        if content.group != d.group || content.to != 0 {
            return Ok(Err(Undecryptable::WrongConversation));
        }
        // Megolm itself decrypts an index any number of times.
        let index = plain.message_index;
        match rec.seen.get(&index) {
            Some(&seq) if seq == d.seq => return Ok(Ok(content.body)),
            Some(_) => return Ok(Err(Undecryptable::Replayed)),
            None if rec.seen.len() >= SEEN_MAX && rec.seen.keys().next().is_some_and(|&oldest| index < oldest) => {
                // Older than anything remembered: cannot tell, so not shown.
                return Ok(Err(Undecryptable::Replayed));
            }
            None => {}
        }
        rec.pickle = inbound.pickle();
        rec.seen.insert(index, d.seq);
        while rec.seen.len() > SEEN_MAX {
            rec.seen.pop_first();
        }
        self.vault.put(store, &name, &rec)?;
        Ok(Ok(content.body))
    }

    /// A group's membership as the server announced it.
    pub(crate) fn on_group_info(&mut self, store: &mut dyn Store, g: &pb::GroupInfo) -> Result<(), StoreError> {
        if g.group == 0 {
            return Ok(());
        }
        let known = match self.groups.get(&g.group) {
            Some(k) => Some(k.clone()),
            None => self.vault.get::<GroupRecord>(store, &format!("grp.{}", g.group))?,
        };
        if known.as_ref().is_some_and(|k| k.version > g.version) {
            return Ok(());
        }
        let r = GroupRecord { members: g.members.clone(), version: g.version };
        self.vault.put(store, &format!("grp.{}", g.group), &r)?;
        self.groups.insert(g.group, r);
        Ok(())
    }

    fn group(&mut self, store: &mut dyn Store, group: u64) -> Result<Option<GroupRecord>, StoreError> {
        if let Some(g) = self.groups.get(&group) {
            return Ok(Some(g.clone()));
        }
        let g = self.vault.get::<GroupRecord>(store, &format!("grp.{group}"))?;
        if let Some(g) = &g {
            self.groups.insert(group, g.clone());
        }
        Ok(g)
    }

    pub(super) fn seal_group(&mut self, store: &mut dyn Store, send: &pb::Send) -> Result<Sealed, StoreError> {
        let Some(group) = self.group(store, send.group)? else {
            if self.listing {
                return Ok(Sealed::Wait(Vec::new()));
            }
            if self.listed {
                // Listed in full and not there: not a group of ours.
                return Ok(Sealed::Fail(pb::ErrorCode::NotFound));
            }
            self.listing = true;
            let req = self.req(Pending::Groups);
            return Ok(Sealed::Wait(vec![pb::GroupListRequest { req, ..Default::default() }.into()]));
        };
        if !group.members.contains(&self.own.0) {
            return Ok(Sealed::Fail(pb::ErrorCode::Forbidden));
        }
        let targets = match self.targets(store, &group.members)? {
            Ok(t) => t,
            Err(s) => return Ok(s),
        };
        let name = format!("out.{}", send.group);
        let mut out = match self.vault.get::<OutboundRecord>(store, &name)? {
            Some(r)
                if r.version == group.version
                    && r.messages < MEGOLM_MAX_MESSAGES
                    && now().saturating_sub(r.created) < MEGOLM_MAX_AGE_SECS =>
            {
                r
            }
            // None yet, or membership changed, or it is due: a new session,
            // which nobody removed since can read.
            _ => {
                let s = GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
                OutboundRecord {
                    session: session_id_bytes(&s.session_id()),
                    pickle: s.pickle(),
                    version: group.version,
                    messages: 0,
                    created: now(),
                    shared: BTreeSet::new(),
                }
            }
        };
        let mut session = GroupSession::from_pickle(out.pickle);
        let sharing = self.sharing.entry(send.group).or_default();
        let needing: Vec<Addr> =
            targets.into_iter().filter(|a| !out.shared.contains(a) && !sharing.contains(a)).collect();
        let under_way = !sharing.is_empty();
        let mut per_device = Vec::new();
        if !needing.is_empty() {
            let share = pb::E2eContent {
                group: send.group,
                room_key: Some(pb::E2eRoomKey {
                    group: send.group,
                    session_key: Bytes::from(session.session_key().to_bytes()),
                }),
                ..Default::default()
            }
            .encode_to_vec();
            for addr in needing {
                // Devices without a trusted session get nothing: they cannot
                // read this session's messages.
                if let Some(payload) = self.olm_encrypt(store, addr, &share)? {
                    per_device.push(pb::DeviceCiphertext { account: addr.0, device: addr.1, payload });
                }
            }
        }
        let shares_len: usize = per_device.iter().map(|c| c.encoded_len() + 4).sum();
        if under_way || shares_len + send.payload.len() > GROUP_SEND_BUDGET {
            // Too many keys to go beside the message (a large group's first
            // message under a session), or some still on their way: the
            // keys go first, in carriers, and the message once they are
            // stored, so every device has its key before the message.
            out.pickle = session.pickle();
            // The session is kept before any key of it leaves.
            self.vault.put(store, &name, &out)?;
            let mut carriers = Vec::new();
            let mut batch: Vec<pb::DeviceCiphertext> = Vec::new();
            let mut batch_len = 0;
            let sharing = self.sharing.entry(send.group).or_default();
            for c in per_device {
                sharing.insert((c.account, c.device));
                let len = c.encoded_len() + 4;
                if batch_len + len > GROUP_SEND_BUDGET && !batch.is_empty() {
                    carriers.push(carrier(send.group, &out.session, std::mem::take(&mut batch)));
                    batch_len = 0;
                }
                batch_len += len;
                batch.push(c);
            }
            if !batch.is_empty() {
                carriers.push(carrier(send.group, &out.session, batch));
            }
            return Ok(Sealed::Wait(carriers));
        }
        let content =
            pb::E2eContent { body: send.payload.clone(), group: send.group, ..Default::default() }.encode_to_vec();
        let ciphertext = session.encrypt(&content).to_bytes();
        let sid = out.session.clone();
        out.messages += 1;
        out.pickle = session.pickle();
        // The ratchet moved: saved before the ciphertext can leave.
        self.vault.put(store, &name, &out)?;
        let payload = encode_envelope(pb::E2eKind::Megolm, ciphertext, sid);
        Ok(Sealed::Ready(pb::Send { id: send.id, to: 0, group: send.group, payload, per_device }))
    }

    /// A sealed send is stored on the server: devices that were given a
    /// group session in it have it now.
    pub(crate) fn on_sent(&mut self, store: &mut dyn Store, sealed: &pb::Send) -> Result<(), StoreError> {
        if sealed.group == 0 || sealed.per_device.is_empty() {
            return Ok(());
        }
        let devices: Vec<Addr> = sealed.per_device.iter().map(|c| (c.account, c.device)).collect();
        if let Some(sharing) = self.sharing.get_mut(&sealed.group) {
            for d in &devices {
                sharing.remove(d);
            }
        }
        let name = format!("out.{}", sealed.group);
        let Some(mut out) = self.vault.get::<OutboundRecord>(store, &name)? else { return Ok(()) };
        let Ok((_, e)) = decode_envelope(&sealed.payload) else { return Ok(()) };
        if e.session[..] != out.session[..] {
            // Sent under a session since replaced: nothing to record.
            return Ok(());
        }
        out.shared.extend(devices);
        self.vault.put(store, &name, &out)
    }

    /// A sealed send the server refused for good: keys it carried did not
    /// arrive.
    pub(crate) fn on_send_failed(&mut self, sealed: &pb::Send) {
        if let Some(sharing) = self.sharing.get_mut(&sealed.group) {
            for c in &sealed.per_device {
                sharing.remove(&(c.account, c.device));
            }
        }
    }
}

/// A group send that carries only session keys (`E2E_KIND_KEYS`); the
/// task gives it an id.
fn carrier(group: u64, session: &[u8], per_device: Vec<pb::DeviceCiphertext>) -> Message {
    let payload = encode_envelope(pb::E2eKind::Keys, Vec::new(), session.to_vec());
    pb::Send { id: 0, to: 0, group, payload, per_device }.into()
}

/// The Megolm session id vodozemac gives as base64, as its 32 raw bytes.
fn session_id_bytes(b64: &str) -> Vec<u8> {
    vodozemac::base64_decode(b64).unwrap_or_default()
}
