//! The server's key directory: publishing this device's keys, fetching
//! other devices' bundles, and the answers to the layer's requests.

use std::collections::HashSet;

use bytes::Bytes;
use pipit_protocol::e2e::check_bundle;
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use vodozemac::olm::SessionConfig;
use vodozemac::Curve25519PublicKey;

use crate::store::{Store, StoreError};

use super::{now, Answered, DeviceIdentity, E2e, Pending, FALLBACK_MAX_AGE_SECS, ONE_TIME_TARGET, SESSIONS_PER_DEVICE};

impl E2e {
    /// This device's keys are on the server.
    pub(crate) fn published(&self) -> bool {
        self.published
    }

    /// Logged in as `account`/`device`: publishes the keys if they are
    /// not on the server yet, or a new signed prekey when the old one is
    /// due.
    pub(crate) fn on_login(&mut self, store: &mut dyn Store, login: &pb::LoginOk) -> Result<Vec<Message>, StoreError> {
        self.own = (login.account, login.device);
        self.directory = login.features().any(|f| f == pb::Feature::KeyDirectory);
        // Answers to requests on the old connection will not come.
        self.requests.clear();
        self.fetching.clear();
        self.listing = false;
        self.listed = false;
        if !self.directory {
            return Ok(Vec::new());
        }
        if now().saturating_sub(self.fallback_at) > FALLBACK_MAX_AGE_SECS {
            self.new_fallback();
            self.save_account(store)?;
        }
        if !self.published || self.fallback_due || !self.account.one_time_keys().is_empty() {
            let top_up = if self.published { 0 } else { ONE_TIME_TARGET };
            return Ok(self.upload(store, top_up)?.into_iter().collect());
        }
        Ok(Vec::new())
    }

    /// The server says `left` one-time prekeys remain.
    pub(crate) fn on_keys_status(&mut self, store: &mut dyn Store, left: u32) -> Result<Vec<Message>, StoreError> {
        if !self.directory || self.requests.values().any(|p| matches!(p, Pending::Upload)) {
            return Ok(Vec::new());
        }
        let want = ONE_TIME_TARGET.saturating_sub(left as usize);
        if left == 0 {
            // The stock ran dry, so the signed prekey is being used in its
            // place: replace it too.
            self.new_fallback();
        }
        Ok(self.upload(store, want)?.into_iter().collect())
    }

    fn new_fallback(&mut self) {
        self.account.generate_fallback_key();
        self.fallback_at = now();
        self.fallback_due = true;
    }

    /// A `KeysUpload` with `generate` new one-time prekeys and whatever is
    /// not published yet.
    pub(super) fn upload(&mut self, store: &mut dyn Store, generate: usize) -> Result<Option<Message>, StoreError> {
        if self.requests.values().any(|p| matches!(p, Pending::Upload)) {
            return Ok(None);
        }
        if generate > 0 {
            self.account.generate_one_time_keys(generate);
        }
        // Kept before the server has them (see open).
        self.save_account(store)?;
        let mut one_time: Vec<pb::PreKey> = self
            .account
            .one_time_keys()
            .into_iter()
            .filter_map(|(id, key)| Some(pb::PreKey { id: key_id(id)?, key: Bytes::copy_from_slice(key.as_bytes()) }))
            .collect();
        one_time.sort_by_key(|k| k.id);
        let fallback = self.account.fallback_key().into_iter().next();
        let (identity, signed) = match fallback {
            Some((id, key)) if !self.published || self.fallback_due => {
                let identity = self.published_identity();
                let id = key_id(id).unwrap_or(0);
                let msg = pipit_protocol::e2e::signed_prekey_message(&identity, id, key.as_bytes());
                let signature = self.account.sign(msg).to_bytes();
                let signed = pb::SignedPreKey {
                    id,
                    key: Bytes::copy_from_slice(key.as_bytes()),
                    signature: Bytes::copy_from_slice(&signature),
                };
                (Bytes::from(identity), Some(signed))
            }
            _ => (Bytes::new(), None),
        };
        if signed.is_none() && one_time.is_empty() {
            return Ok(None);
        }
        let req = self.req(Pending::Upload);
        Ok(Some(pb::KeysUpload { req, identity, signed, one_time }.into()))
    }

    fn published_identity(&self) -> Vec<u8> {
        let k = self.account.identity_keys();
        let mut v = k.ed25519.as_bytes().to_vec();
        v.extend_from_slice(k.curve25519.as_bytes());
        v
    }

    /// An answer to one of this layer's requests (`owns` said so).
    pub(crate) fn on_answer(&mut self, store: &mut dyn Store, m: Message) -> Result<Answered, StoreError> {
        let req = match &m {
            Message::Done(d) => d.req,
            Message::KeysResult(r) => r.req,
            Message::GroupList(l) => l.req,
            Message::Error(e) => e.req,
            _ => return Ok(Answered::default()),
        };
        let Some(pending) = self.requests.remove(&req) else { return Ok(Answered::default()) };
        let mut out = Answered::default();
        match (pending, m) {
            (Pending::Upload, Message::Done(_)) => {
                self.account.mark_keys_as_published();
                self.published = true;
                self.fallback_due = false;
                self.save_account(store)?;
                out.published = true;
                out.upload_answered = true;
            }
            (Pending::Fetch(account, asked), Message::KeysResult(r)) => {
                self.fetching.remove(&account);
                out.events = self.on_bundles(store, account, asked.as_deref(), &r.bundles)?;
            }
            (Pending::Groups, Message::GroupList(l)) => {
                for g in &l.groups {
                    self.on_group_info(store, g)?;
                }
                match l.groups.last() {
                    // More pages: ask for the next one.
                    Some(last) if l.more => {
                        let req = self.req(Pending::Groups);
                        out.send.push(pb::GroupListRequest { req, after: last.group }.into());
                    }
                    _ => {
                        self.listing = false;
                        self.listed = true;
                    }
                }
            }
            (p, Message::Error(e)) => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                let retry =
                    matches!(code, pb::ErrorCode::RateLimited | pb::ErrorCode::Unavailable | pb::ErrorCode::Internal);
                match p {
                    Pending::Fetch(account, _) => {
                        self.fetching.remove(&account);
                        if !retry {
                            self.refused.insert(account, code);
                        }
                    }
                    Pending::Groups => self.listing = false,
                    // Uploaded again when a message waits to be sealed or
                    // at the next login; the app hears of this login now.
                    Pending::Upload => out.upload_answered = true,
                }
                if retry {
                    out.retry_after = Some(e.retry_after_secs.max(1));
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// Bundles fetched for `account`: pins new identities, reports changed
    /// ones, and starts an Olm session with each trusted device.
    fn on_bundles(
        &mut self,
        store: &mut dyn Store,
        account: u64,
        asked: Option<&[u32]>,
        bundles: &[pb::KeyBundle],
    ) -> Result<Vec<crate::Event>, StoreError> {
        let mut peer = self.known_peer(store, account)?.unwrap_or_default();
        let mut events = Vec::new();
        let t = now();
        if asked.is_none() {
            // The whole account: devices it no longer lists are gone (or
            // have no keys; a DeviceMismatch will say which).
            let listed: HashSet<u32> = bundles.iter().map(|b| b.device).collect();
            let gone: Vec<u32> = peer.devices.keys().filter(|d| !listed.contains(d)).copied().collect();
            for d in gone {
                peer.devices.remove(&d);
                self.drop_sessions(store, (account, d))?;
            }
        }
        for d in asked.unwrap_or(&[]) {
            if !bundles.iter().any(|b| b.device == *d) && (account, *d) != self.own {
                peer.devices.entry(*d).or_default().keyless_at = Some(t);
            }
        }
        for b in bundles {
            let addr = (account, b.device);
            let entry = peer.devices.entry(b.device).or_default();
            entry.keyless_at = None;
            // A bundle whose signature does not verify is not believed:
            // the device is treated as one without keys.
            if check_bundle(b).is_err() {
                entry.keyless_at = Some(t);
                continue;
            }
            let Some(shown) = DeviceIdentity::from_published(&b.identity) else { continue };
            match entry.identity {
                Some(known) if !known.same(&shown) => {
                    if entry.offered != Some(shown) {
                        entry.offered = Some(shown);
                        events.push(crate::Event::IdentityChanged {
                            account,
                            device: b.device,
                            old: Some(known),
                            new: shown,
                        });
                    }
                    continue;
                }
                Some(_) => entry.identity = Some(shown),
                None => entry.identity = Some(shown),
            }
            let prekey = b.one_time.as_ref().map(|k| &k.key).or(b.signed.as_ref().map(|s| &s.key));
            let Some(prekey) = prekey.and_then(|k| <[u8; 32]>::try_from(&k[..]).ok()) else { continue };
            let their = Curve25519PublicKey::from_bytes(shown.curve25519);
            match self.account.create_outbound_session(
                SessionConfig::version_1(),
                their,
                Curve25519PublicKey::from_bytes(prekey),
            ) {
                Ok(s) => {
                    let mut list = self.load_sessions(store, addr)?;
                    list.insert(0, s);
                    list.truncate(SESSIONS_PER_DEVICE);
                    self.save_sessions(store, addr, list)?;
                }
                Err(_) => entry.keyless_at = Some(t),
            }
        }
        self.save_peer(store, account, peer)?;
        Ok(events)
    }

    /// A fetch of `account`'s keys (of `devices` only, when given), unless
    /// one is under way.
    pub(super) fn fetch(&mut self, account: u64, devices: Option<Vec<u32>>) -> Option<Message> {
        if !self.fetching.insert(account) {
            return None;
        }
        let req = self.req(Pending::Fetch(account, devices.clone()));
        Some(pb::KeysFetch { req, account, devices: devices.unwrap_or_default() }.into())
    }
}

/// vodozemac's one-time key id (a counter) as the wire's u32.
fn key_id(id: vodozemac::KeyId) -> Option<u32> {
    let raw = vodozemac::base64_decode(id.to_base64()).ok()?;
    let n = u64::from_be_bytes(raw.try_into().ok()?);
    u32::try_from(n).ok()
}
