//! Olm: pairwise sessions, sealing 1:1 messages for every device, and
//! opening deliveries ([`E2e::seal`] and [`E2e::decrypt`] are the entry
//! points, handing group messages to the Megolm side).

use std::collections::BTreeMap;

use bytes::Bytes;
use pipit_protocol::e2e::{decode_envelope, encode_envelope};
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use prost::Message as _;
use vodozemac::olm::{OlmMessage, PreKeyMessage, Session, SessionConfig};

use crate::store::{Store, StoreError};

use super::records::SessionsRecord;
use super::{
    decode_content, now, Addr, DeviceIdentity, E2e, Sealed, Undecryptable, CACHE_MAX, KEYLESS_RETRY_SECS,
    SESSIONS_PER_DEVICE,
};

impl E2e {
    pub(super) fn load_sessions(&mut self, store: &mut dyn Store, addr: Addr) -> Result<Vec<Session>, StoreError> {
        if let Some(s) = self.sessions.remove(&addr) {
            return Ok(s);
        }
        let r = self.vault.get::<SessionsRecord>(store, &format!("olm.{}.{}", addr.0, addr.1))?.unwrap_or_default();
        Ok(r.sessions.into_iter().map(Session::from_pickle).collect())
    }

    pub(super) fn save_sessions(
        &mut self,
        store: &mut dyn Store,
        addr: Addr,
        list: Vec<Session>,
    ) -> Result<(), StoreError> {
        let r = SessionsRecord { sessions: list.iter().map(Session::pickle).collect() };
        self.vault.put(store, &format!("olm.{}.{}", addr.0, addr.1), &r)?;
        if self.sessions.len() >= CACHE_MAX {
            self.sessions.clear();
        }
        self.sessions.insert(addr, list);
        Ok(())
    }

    pub(super) fn drop_sessions(&mut self, store: &mut dyn Store, addr: Addr) -> Result<(), StoreError> {
        self.sessions.remove(&addr);
        store.e2e_delete(&format!("olm.{}.{}", addr.0, addr.1))
    }

    /// The devices a message to these accounts goes to, or what to wait
    /// for first (fetches of accounts never seen, or of devices without a
    /// session yet), or why it cannot go.
    pub(super) fn targets(
        &mut self,
        store: &mut dyn Store,
        accounts: &[u64],
    ) -> Result<Result<Vec<Addr>, Sealed>, StoreError> {
        let mut wait = Vec::new();
        let mut waiting = false;
        let mut out = Vec::new();
        let t = now();
        for &account in accounts {
            if let Some(code) = self.refused.remove(&account) {
                return Ok(Err(Sealed::Fail(code)));
            }
            if self.fetching.contains(&account) {
                waiting = true;
                continue;
            }
            let Some(peer) = self.known_peer(store, account)? else {
                wait.extend(self.fetch(account, None));
                continue;
            };
            let mut need = Vec::new();
            for (&device, entry) in &peer.devices {
                let addr = (account, device);
                if addr == self.own {
                    continue;
                }
                out.push(addr);
                let trusted = entry.identity.is_some() && entry.offered.is_none();
                let untried = entry.identity.is_none() && entry.keyless_at.is_none();
                let stale_keyless = entry.keyless_at.is_some_and(|at| t.saturating_sub(at) > KEYLESS_RETRY_SECS);
                let sessionless = trusted && entry.keyless_at.is_none() && !self.has_session(store, addr)?;
                if untried || stale_keyless || sessionless {
                    need.push(device);
                }
            }
            if !need.is_empty() {
                wait.extend(self.fetch(account, Some(need)));
            }
        }
        if waiting || !wait.is_empty() {
            return Ok(Err(Sealed::Wait(wait)));
        }
        Ok(Ok(out))
    }

    fn has_session(&mut self, store: &mut dyn Store, addr: Addr) -> Result<bool, StoreError> {
        let list = self.load_sessions(store, addr)?;
        let has = !list.is_empty();
        self.sessions.insert(addr, list);
        Ok(has)
    }

    /// Olm-encrypts `content` for `addr`: `None` when there is no session
    /// or its identity is not trusted.
    pub(super) fn olm_encrypt(
        &mut self,
        store: &mut dyn Store,
        addr: Addr,
        content: &[u8],
    ) -> Result<Option<Bytes>, StoreError> {
        let trusted = self
            .known_peer(store, addr.0)?
            .and_then(|p| p.devices.get(&addr.1).cloned())
            .is_some_and(|e| e.identity.is_some() && e.offered.is_none());
        if !trusted {
            return Ok(None);
        }
        let mut list = self.load_sessions(store, addr)?;
        let Some(session) = list.first_mut() else {
            self.sessions.insert(addr, list);
            return Ok(None);
        };
        let msg = match session.encrypt(content) {
            Ok(m) => m,
            Err(_) => {
                self.sessions.insert(addr, list);
                return Ok(None);
            }
        };
        // The ratchet moved: saved before the ciphertext can leave, so no
        // message key is ever used twice.
        self.save_sessions(store, addr, list)?;
        let (kind, bytes) = match msg {
            OlmMessage::PreKey(m) => (pb::E2eKind::OlmPreKey, m.to_bytes()),
            OlmMessage::Normal(m) => (pb::E2eKind::Olm, m.to_bytes()),
        };
        Ok(Some(encode_envelope(kind, bytes, Vec::new())))
    }

    /// Encrypts `send` (a plaintext 1:1 or group send with its id), or
    /// says what it waits for.
    pub(crate) fn seal(&mut self, store: &mut dyn Store, send: &pb::Send) -> Result<Sealed, StoreError> {
        if !self.directory {
            return Ok(Sealed::Fail(pb::ErrorCode::NotSupported));
        }
        if !self.published {
            // Nobody could answer a session this device starts before its
            // own keys are on the server: (re)start the upload and wait.
            return Ok(Sealed::Wait(self.upload(store, 0)?.into_iter().collect()));
        }
        if send.group != 0 {
            return self.seal_group(store, send);
        }
        let mut accounts = vec![send.to];
        if send.to != self.own.0 {
            accounts.push(self.own.0);
        }
        let targets = match self.targets(store, &accounts)? {
            Ok(t) => t,
            Err(s) => return Ok(s),
        };
        let content = pb::E2eContent { body: send.payload.clone(), to: send.to, ..Default::default() }.encode_to_vec();
        let mut per_device = Vec::with_capacity(targets.len());
        for addr in targets {
            let payload = match self.olm_encrypt(store, addr, &content)? {
                Some(p) => p,
                None => encode_envelope(pb::E2eKind::Withheld, Vec::new(), Vec::new()),
            };
            per_device.push(pb::DeviceCiphertext { account: addr.0, device: addr.1, payload });
        }
        if per_device.is_empty() && send.to != self.own.0 {
            // No device of the recipient is known (it has published no
            // keys): an empty list would mean "one payload for all", so
            // name device 0 and let the server's DeviceMismatch say which
            // devices there are.
            let payload = encode_envelope(pb::E2eKind::Withheld, Vec::new(), Vec::new());
            per_device.push(pb::DeviceCiphertext { account: send.to, device: 0, payload });
        }
        Ok(Sealed::Ready(pb::Send { id: send.id, to: send.to, group: 0, payload: Bytes::new(), per_device }))
    }

    /// The server said a sealed send named the wrong devices: forgets the
    /// extra ones and fetches the missing ones. Seal it again afterwards.
    pub(crate) fn on_mismatch(
        &mut self,
        store: &mut dyn Store,
        m: &pb::DeviceMismatch,
    ) -> Result<Vec<Message>, StoreError> {
        let mut missing: BTreeMap<u64, Vec<u32>> = BTreeMap::new();
        for d in &m.missing {
            missing.entry(d.account).or_default().push(d.device);
        }
        for d in &m.extra {
            if let Some(mut peer) = self.known_peer(store, d.account)? {
                peer.devices.remove(&d.device);
                self.save_peer(store, d.account, peer)?;
            }
            self.drop_sessions(store, (d.account, d.device))?;
        }
        let mut out = Vec::new();
        for (account, devices) in missing {
            if self.known_peer(store, account)?.is_none() {
                out.extend(self.fetch(account, None));
            } else {
                out.extend(self.fetch(account, Some(devices)));
            }
        }
        Ok(out)
    }

    /// Decrypts a delivery. Returns the events for the app: the message
    /// with its plaintext, or why it cannot be read (and an identity
    /// change, if one showed).
    pub(crate) fn decrypt(
        &mut self,
        store: &mut dyn Store,
        mut d: pb::Deliver,
    ) -> Result<Vec<crate::Event>, StoreError> {
        let mut events = Vec::new();
        if d.group != 0 && !d.device_payload.is_empty() {
            let key_share = std::mem::take(&mut d.device_payload);
            if let Err(reason) = self.open_key_share(store, &d, &key_share, &mut events)? {
                // The group message itself may still decrypt with a key
                // this device already has.
                if reason == Undecryptable::UntrustedIdentity {
                    return Ok(finish(events, d, Err(reason)));
                }
            }
        }
        let body = match decode_envelope(&d.payload) {
            Err(_) => Err(Undecryptable::NotEncrypted),
            // Keys only, taken above: nothing for the app.
            Ok((pb::E2eKind::Keys, _)) if d.group != 0 => return Ok(events),
            Ok((pb::E2eKind::Keys, _)) => Err(Undecryptable::WrongConversation),
            Ok((pb::E2eKind::Withheld, _)) => Err(Undecryptable::Withheld),
            Ok((pb::E2eKind::Megolm, e)) if d.group != 0 => self.open_megolm(store, &d, &e)?,
            Ok((pb::E2eKind::Megolm, _)) => Err(Undecryptable::WrongConversation),
            Ok((_, _)) if d.group != 0 => Err(Undecryptable::WrongConversation),
            Ok((kind, e)) => match self.open_olm(store, &d, kind, &e.ciphertext, &mut events)? {
                Ok(content) => self.check_conversation(&d, content),
                Err(r) => Err(r),
            },
        };
        Ok(finish(events, d, body))
    }

    /// Checks that a decrypted 1:1 content names the conversation its
    /// delivery came in.
    fn check_conversation(&self, d: &pb::Deliver, c: pb::E2eContent) -> Result<Bytes, Undecryptable> {
        let own = self.own.0;
        let expected = if d.from == own {
            if d.peer == 0 {
                own
            } else {
                d.peer
            }
        } else {
            own
        };
        if c.group != 0 || c.to != expected {
            return Err(Undecryptable::WrongConversation);
        }
        Ok(c.body)
    }

    /// Decrypts an Olm message from the delivery's sender device.
    pub(super) fn open_olm(
        &mut self,
        store: &mut dyn Store,
        d: &pb::Deliver,
        kind: pb::E2eKind,
        ciphertext: &[u8],
        events: &mut Vec<crate::Event>,
    ) -> Result<Result<pb::E2eContent, Undecryptable>, StoreError> {
        let from = (d.from, d.from_device);
        let parsed = match kind {
            pb::E2eKind::OlmPreKey => PreKeyMessage::from_bytes(ciphertext).map(OlmMessage::PreKey),
            _ => vodozemac::olm::Message::from_bytes(ciphertext).map(OlmMessage::Normal),
        };
        let Ok(msg) = parsed else { return Ok(Err(Undecryptable::Damaged)) };
        let mut peer = self.known_peer(store, d.from)?.unwrap_or_default();
        let known = peer.devices.get(&d.from_device).cloned().unwrap_or_default();
        if known.offered.is_some() {
            return Ok(Err(Undecryptable::UntrustedIdentity));
        }
        let mut list = self.load_sessions(store, from)?;
        // An existing session first (a pre-key message is repeated until
        // the peer hears back).
        for i in 0..list.len() {
            if let OlmMessage::PreKey(p) = &msg {
                if list[i].session_keys() != p.session_keys() {
                    continue;
                }
            }
            if let Ok(plain) = list[i].decrypt(&msg) {
                let s = list.remove(i);
                list.insert(0, s);
                self.save_sessions(store, from, list)?;
                return Ok(decode_content(&plain));
            }
        }
        self.sessions.insert(from, list);
        let OlmMessage::PreKey(pre) = msg else { return Ok(Err(Undecryptable::NoSession)) };
        let shown = DeviceIdentity { ed25519: None, curve25519: pre.identity_key().to_bytes() };
        if let Some(old) = known.identity.filter(|k| !k.same(&shown)) {
            peer.devices.entry(d.from_device).or_default().offered = Some(shown);
            self.save_peer(store, d.from, peer)?;
            events.push(crate::Event::IdentityChanged {
                account: d.from,
                device: d.from_device,
                old: Some(old),
                new: shown,
            });
            return Ok(Err(Undecryptable::UntrustedIdentity));
        }
        match self.account.create_inbound_session(SessionConfig::version_1(), pre.identity_key(), &pre) {
            Ok(created) => {
                if known.identity.is_none() {
                    // Trust on first use: the server says which device sent
                    // it, the message proves the key.
                    let entry = peer.devices.entry(d.from_device).or_default();
                    entry.identity = Some(shown);
                    entry.keyless_at = None;
                    self.save_peer(store, d.from, peer)?;
                }
                let mut list = self.load_sessions(store, from)?;
                list.insert(0, created.session);
                list.truncate(SESSIONS_PER_DEVICE);
                self.save_sessions(store, from, list)?;
                // The one-time key is used up; that must stick.
                self.save_account(store)?;
                Ok(decode_content(&created.plaintext))
            }
            Err(vodozemac::olm::SessionCreationError::MissingOneTimeKey(_)) => Ok(Err(Undecryptable::NoSession)),
            Err(_) => Ok(Err(Undecryptable::Damaged)),
        }
    }
}

/// The events for a delivery: its plaintext as a message, or why not.
fn finish(mut events: Vec<crate::Event>, mut d: pb::Deliver, body: Result<Bytes, Undecryptable>) -> Vec<crate::Event> {
    match body {
        Ok(b) => {
            d.payload = b;
            events.push(crate::Event::Message(d));
        }
        Err(reason) => events.push(crate::Event::Undecryptable { message: d, reason }),
    }
    events
}
