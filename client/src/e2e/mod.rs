//! End-to-end encryption, on by default: the server relays ciphertexts
//! and public keys and never sees a plaintext (SPEC.md 13).
//!
//! Olm and Megolm are vodozemac's (audited; what Matrix clients use). This
//! module decides what to encrypt for whom and keeps the state, with no
//! I/O of its own: the client's task hands it what the server said and
//! sends what it returns.
//!
//! - The device's Olm account lives in the app's [`Store`]; its identity,
//!   a signed prekey (Olm's fallback key) and one-time prekeys go to the
//!   server's key directory, topped up when the server says the stock is
//!   low.
//! - 1:1: one Olm session per device pair, started from a fetched bundle;
//!   each message is one ciphertext per recipient device and per other
//!   device of the sender (`Send.per_device`). A `DeviceMismatch` makes it
//!   fetch the missing devices' keys and encrypt the same message again
//!   under the same client id.
//! - Groups: one outbound Megolm session per group, its key shared over
//!   Olm with the member devices that lack it (`per_device`, which arrives
//!   beside the one group ciphertext as `Deliver.device_payload`); a new
//!   session when membership changes, after [`MEGOLM_MAX_MESSAGES`]
//!   messages or after [`MEGOLM_MAX_AGE_SECS`].
//! - Identities are trusted on first use and pinned: a device whose
//!   identity changes is reported ([`crate::Event::IdentityChanged`]) and
//!   gets nothing ([`pb::E2eKind::Withheld`]) and is not believed until
//!   the app accepts the new identity ([`crate::Client::trust_identity`]).

mod vault;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use bytes::Bytes;
use pipit_protocol::e2e::{check_bundle, decode_envelope, encode_envelope, identity_curve25519, identity_ed25519};
use pipit_protocol::message::pb;
use pipit_protocol::Message;
use prost::Message as _;
use serde::{Deserialize, Serialize};
use vodozemac::megolm::{
    GroupSession, GroupSessionPickle, InboundGroupSession, InboundGroupSessionPickle, MegolmMessage,
};
use vodozemac::olm::{Account, AccountPickle, OlmMessage, PreKeyMessage, Session, SessionConfig, SessionPickle};
use vodozemac::Curve25519PublicKey;

use crate::store::{Store, StoreError};
pub(crate) use vault::Vault;

/// Whether the client encrypts end to end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Encryption {
    /// Every message is end-to-end encrypted, and only encrypted messages
    /// are handed to the app as messages (the default).
    #[default]
    On,
    /// Payloads go as the app gives them and arrive as they were sent:
    /// for tests, bots and apps that bring their own encryption. Such a
    /// client cannot read encrypted messages, and an encrypting client
    /// reports its messages as [`Undecryptable::NotEncrypted`].
    Off,
}

/// Why a message could not be read. The message was still acknowledged:
/// the server cannot help, and holding it would stall the stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Undecryptable {
    /// The payload is not end-to-end encrypted (its sender has encryption
    /// off, or the server made it up): the raw payload is attached.
    NotEncrypted,
    /// The sender had no keys it trusts for this device, so it sent none.
    Withheld,
    /// No session decrypts it (lost state on either side, or a message
    /// from before this device existed).
    NoSession,
    /// It does not decrypt, or is malformed: damaged or forged.
    Damaged,
    /// The sender device's identity changed and the app has not accepted
    /// the new one (see [`crate::Event::IdentityChanged`]).
    UntrustedIdentity,
    /// It decrypted, but names another conversation than the one it
    /// arrived in: the server moved it.
    WrongConversation,
    /// A group message whose Megolm session this device was never given
    /// (it was not a member, or not yet a device, when it was made).
    NoGroupSession,
}

impl fmt::Display for Undecryptable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Undecryptable::NotEncrypted => "not end-to-end encrypted",
            Undecryptable::Withheld => "the sender had no keys for this device",
            Undecryptable::NoSession => "no session with the sender decrypts it",
            Undecryptable::Damaged => "damaged or forged",
            Undecryptable::UntrustedIdentity => "the sender's identity changed and was not accepted",
            Undecryptable::WrongConversation => "it names another conversation",
            Undecryptable::NoGroupSession => "this device was never given the group session",
        })
    }
}

/// A device's end-to-end identity: its Ed25519 key (known once a bundle
/// of it was fetched) and its Curve25519 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// The Ed25519 key; `None` while known only from its messages.
    pub ed25519: Option<[u8; 32]>,
    /// The Curve25519 key (what Olm sessions are bound to).
    pub curve25519: [u8; 32],
}

impl fmt::Display for DeviceIdentity {
    /// The Curve25519 key in hex: what two people compare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.curve25519 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl DeviceIdentity {
    fn from_published(identity: &[u8]) -> Option<Self> {
        Some(Self { ed25519: Some(*identity_ed25519(identity)?), curve25519: *identity_curve25519(identity)? })
    }

    /// The same device key: the Curve25519 key matches, and the Ed25519
    /// key too when both are known.
    fn same(&self, other: &Self) -> bool {
        self.curve25519 == other.curve25519
            && (self.ed25519.is_none() || other.ed25519.is_none() || self.ed25519 == other.ed25519)
    }
}

/// One-time prekeys a device keeps on the server (vodozemac's advice).
pub(crate) const ONE_TIME_TARGET: usize = 50;
/// A group's Megolm session is replaced after this many messages.
pub(crate) const MEGOLM_MAX_MESSAGES: u32 = 100;
/// ... or after this long.
pub(crate) const MEGOLM_MAX_AGE_SECS: u64 = 7 * 86_400;
/// The signed prekey is replaced this often.
const FALLBACK_MAX_AGE_SECS: u64 = 7 * 86_400;
/// Olm sessions kept per peer device (the newest first).
const SESSIONS_PER_DEVICE: usize = 3;
/// A device that had no keys (a new one that has not uploaded yet) is
/// asked again after this long.
const KEYLESS_RETRY_SECS: u64 = 60;
/// Request ids of the end-to-end layer start here, far above what an app
/// numbers its own requests with, so answers are never mixed up.
pub(crate) const REQ_BASE: u64 = 1 << 40;
/// Peers and sessions kept in memory; the store has all of them.
const CACHE_MAX: usize = 4_096;
/// Bytes of key shares (and message) one group send may carry: a packet,
/// less room for the send's own fields.
const GROUP_SEND_BUDGET: usize = pipit_protocol::limits::MAX_PACKET_LEN - 1_024;

/// A device: account and device number.
pub(crate) type Addr = (u64, u32);

fn now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Serialize, Deserialize)]
struct AccountRecord {
    pickle: AccountPickle,
    /// The identity is on the server.
    published: bool,
    /// A new signed prekey waits to be uploaded.
    fallback_due: bool,
    /// When the current signed prekey was made.
    fallback_at: u64,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PeerDevice {
    /// The identity this device trusts for it.
    identity: Option<DeviceIdentity>,
    /// A different identity it showed, waiting for the app to accept it.
    offered: Option<DeviceIdentity>,
    /// The server had no keys for it when last asked.
    keyless_at: Option<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct PeerRecord {
    devices: BTreeMap<u32, PeerDevice>,
}

#[derive(Serialize, Deserialize, Default)]
struct SessionsRecord {
    sessions: Vec<SessionPickle>,
}

#[derive(Serialize, Deserialize)]
struct OutboundRecord {
    pickle: GroupSessionPickle,
    /// Its session id (raw), so it need not be unpickled to be named.
    session: Vec<u8>,
    /// The group version it was made for.
    version: u64,
    messages: u32,
    created: u64,
    /// Devices that have its key (their sends were stored).
    shared: BTreeSet<Addr>,
}

#[derive(Serialize, Deserialize)]
struct InboundRecord {
    pickle: InboundGroupSessionPickle,
    /// The device that shared it: only its messages may use it.
    sender: Addr,
}

/// A message waiting to be sealed: `pb::Send`, base64.
#[derive(Serialize, Deserialize)]
struct Stashed {
    send: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct GroupRecord {
    members: Vec<u64>,
    version: u64,
}

/// What [`E2e::seal`] made of a send.
#[derive(Debug)]
pub(crate) enum Sealed {
    /// Ready for the wire.
    Ready(pb::Send),
    /// Keys are needed first: send these requests, then seal again when
    /// their answers are in.
    Wait(Vec<Message>),
    /// It cannot be sent: fail it with this code.
    Fail(pb::ErrorCode),
}

/// What an answer to one of the layer's requests means for the task.
#[derive(Debug, Default)]
pub(crate) struct Answered {
    /// Events for the app (identity changes).
    pub(crate) events: Vec<crate::Event>,
    /// Requests to send now.
    pub(crate) send: Vec<Message>,
    /// Try sealing again after this many seconds (a busy server).
    pub(crate) retry_after: Option<u32>,
    /// An upload of this device's keys was stored.
    pub(crate) published: bool,
}

/// What one of the layer's requests was for.
#[derive(Debug, Clone)]
enum Pending {
    Upload,
    /// Keys of these devices of an account (all of them when `None`).
    Fetch(u64, Option<Vec<u32>>),
    Groups,
}

/// The end-to-end layer of one device.
pub(crate) struct E2e {
    vault: Vault,
    account: Account,
    published: bool,
    fallback_due: bool,
    fallback_at: u64,
    own: Addr,
    /// The server offers the key directory.
    directory: bool,
    next_req: u64,
    requests: HashMap<u64, Pending>,
    /// Accounts whose keys are being fetched.
    fetching: HashSet<u64>,
    /// Accounts a fetch found missing (or refused): sends to them fail.
    refused: HashMap<u64, pb::ErrorCode>,
    peers: HashMap<u64, PeerRecord>,
    sessions: HashMap<Addr, Vec<Session>>,
    groups: HashMap<u64, GroupRecord>,
    /// A group list was asked for.
    listing: bool,
    /// Every page of the group list has been read on this connection: a
    /// group still unknown is not this account's.
    listed: bool,
    /// Per group, devices whose key for the current session is in a
    /// carrier not yet stored.
    sharing: HashMap<u64, BTreeSet<Addr>>,
}

impl E2e {
    /// Loads the device's Olm account from `store`, or makes one.
    pub(crate) fn load(store: &mut dyn Store, vault: Vault) -> Result<Self, StoreError> {
        let r = match vault.get::<AccountRecord>(store, "account")? {
            Some(r) => r,
            None => {
                let mut account = Account::new();
                account.generate_fallback_key();
                // Saved before anything is published: keys the server hands
                // out must never be keys this device forgot.
                let r = AccountRecord {
                    pickle: account.pickle(),
                    published: false,
                    fallback_due: true,
                    fallback_at: now(),
                };
                vault.put(store, "account", &r)?;
                r
            }
        };
        Ok(Self {
            vault,
            account: Account::from_pickle(r.pickle),
            published: r.published,
            fallback_due: r.fallback_due,
            fallback_at: r.fallback_at,
            own: (0, 0),
            directory: true,
            next_req: REQ_BASE,
            requests: HashMap::new(),
            fetching: HashSet::new(),
            refused: HashMap::new(),
            peers: HashMap::new(),
            sessions: HashMap::new(),
            groups: HashMap::new(),
            listing: false,
            listed: false,
            sharing: HashMap::new(),
        })
    }

    /// Keeps a message the app sent until the server has it (sealed).
    pub(crate) fn stash(&self, store: &mut dyn Store, send: &pb::Send) -> Result<(), StoreError> {
        let r = Stashed { send: vodozemac::base64_encode(send.encode_to_vec()) };
        self.vault.put(store, &format!("pend.{:020}", send.id), &r)
    }

    /// Forgets a stashed message.
    pub(crate) fn unstash(&self, store: &mut dyn Store, id: u64) -> Result<(), StoreError> {
        store.e2e_delete(&format!("pend.{id:020}"))
    }

    /// Every stashed message, in id order.
    pub(crate) fn stashed(&self, store: &mut dyn Store) -> Result<Vec<pb::Send>, StoreError> {
        let mut out = Vec::new();
        for name in store.e2e_names("pend.")? {
            let Some(r) = self.vault.get::<Stashed>(store, &name)? else { continue };
            let bytes = vodozemac::base64_decode(&r.send).map_err(|_| StoreError::Record(name.clone()))?;
            out.push(pb::Send::decode(&bytes[..]).map_err(|_| StoreError::Record(name.clone()))?);
        }
        Ok(out)
    }

    /// This device's identity as published.
    pub(crate) fn identity(&self) -> DeviceIdentity {
        let k = self.account.identity_keys();
        DeviceIdentity { ed25519: Some(k.ed25519.as_bytes().to_owned()), curve25519: k.curve25519.to_bytes() }
    }

    fn save_account(&self, store: &mut dyn Store) -> Result<(), StoreError> {
        let r = AccountRecord {
            pickle: self.account.pickle(),
            published: self.published,
            fallback_due: self.fallback_due,
            fallback_at: self.fallback_at,
        };
        self.vault.put(store, "account", &r)
    }

    fn req(&mut self, p: Pending) -> u64 {
        self.next_req += 1;
        self.requests.insert(self.next_req, p);
        self.next_req
    }

    /// Whether `req` is one of this layer's requests.
    pub(crate) fn owns(&self, req: u64) -> bool {
        req > REQ_BASE && self.requests.contains_key(&req)
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
    fn upload(&mut self, store: &mut dyn Store, generate: usize) -> Result<Option<Message>, StoreError> {
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
                    Pending::Upload => {}
                }
                if retry {
                    out.retry_after = Some(e.retry_after_secs.max(1));
                }
            }
            _ => {}
        }
        Ok(out)
    }

    /// The directory entry of `account`, if this device has ever fetched
    /// its keys or heard from it.
    fn known_peer(&mut self, store: &mut dyn Store, account: u64) -> Result<Option<PeerRecord>, StoreError> {
        if let Some(p) = self.peers.get(&account) {
            return Ok(Some(p.clone()));
        }
        let r = self.vault.get::<PeerRecord>(store, &format!("peer.{account}"))?;
        if let Some(r) = &r {
            if self.peers.len() >= CACHE_MAX {
                self.peers.clear();
            }
            self.peers.insert(account, r.clone());
        }
        Ok(r)
    }

    fn save_peer(&mut self, store: &mut dyn Store, account: u64, r: PeerRecord) -> Result<(), StoreError> {
        self.vault.put(store, &format!("peer.{account}"), &r)?;
        if self.peers.len() >= CACHE_MAX {
            self.peers.clear();
        }
        self.peers.insert(account, r);
        Ok(())
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

    fn load_sessions(&mut self, store: &mut dyn Store, addr: Addr) -> Result<Vec<Session>, StoreError> {
        if let Some(s) = self.sessions.remove(&addr) {
            return Ok(s);
        }
        let r = self.vault.get::<SessionsRecord>(store, &format!("olm.{}.{}", addr.0, addr.1))?.unwrap_or_default();
        Ok(r.sessions.into_iter().map(Session::from_pickle).collect())
    }

    fn save_sessions(&mut self, store: &mut dyn Store, addr: Addr, list: Vec<Session>) -> Result<(), StoreError> {
        let r = SessionsRecord { sessions: list.iter().map(Session::pickle).collect() };
        self.vault.put(store, &format!("olm.{}.{}", addr.0, addr.1), &r)?;
        if self.sessions.len() >= CACHE_MAX {
            self.sessions.clear();
        }
        self.sessions.insert(addr, list);
        Ok(())
    }

    fn drop_sessions(&mut self, store: &mut dyn Store, addr: Addr) -> Result<(), StoreError> {
        self.sessions.remove(&addr);
        store.e2e_delete(&format!("olm.{}.{}", addr.0, addr.1))
    }

    /// The app accepts the identity `account`/`device` showed.
    pub(crate) fn trust(&mut self, store: &mut dyn Store, account: u64, device: u32) -> Result<bool, StoreError> {
        let Some(mut peer) = self.known_peer(store, account)? else { return Ok(false) };
        let Some(entry) = peer.devices.get_mut(&device) else { return Ok(false) };
        let Some(offered) = entry.offered.take() else { return Ok(false) };
        entry.identity = Some(offered);
        self.save_peer(store, account, peer)?;
        // Sessions with the old identity are worthless now; the next send
        // fetches a bundle of the new one.
        self.drop_sessions(store, (account, device))?;
        Ok(true)
    }

    /// A fetch of `account`'s keys (of `devices` only, when given), unless
    /// one is under way.
    fn fetch(&mut self, account: u64, devices: Option<Vec<u32>>) -> Option<Message> {
        if !self.fetching.insert(account) {
            return None;
        }
        let req = self.req(Pending::Fetch(account, devices.clone()));
        Some(pb::KeysFetch { req, account, devices: devices.unwrap_or_default() }.into())
    }

    /// The devices a message to these accounts goes to, or what to wait
    /// for first (fetches of accounts never seen, or of devices without a
    /// session yet), or why it cannot go.
    fn targets(&mut self, store: &mut dyn Store, accounts: &[u64]) -> Result<Result<Vec<Addr>, Sealed>, StoreError> {
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
    fn olm_encrypt(&mut self, store: &mut dyn Store, addr: Addr, content: &[u8]) -> Result<Option<Bytes>, StoreError> {
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
    fn open_olm(
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

    /// A group delivery's `device_payload`: an Olm message carrying a
    /// Megolm session for the group.
    fn open_key_share(
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
        if let Some(known) = self.vault.get::<InboundRecord>(store, &name)? {
            if known.sender != (d.from, d.from_device) {
                // Another member passing on someone else's session as its
                // own: keep it bound to the device that made it.
                return Ok(Err(Undecryptable::Damaged));
            }
        }
        let r = InboundRecord { pickle: inbound.pickle(), sender: (d.from, d.from_device) };
        self.vault.put(store, &name, &r)?;
        Ok(Ok(()))
    }

    fn open_megolm(
        &mut self,
        store: &mut dyn Store,
        d: &pb::Deliver,
        e: &pb::E2eEnvelope,
    ) -> Result<Result<Bytes, Undecryptable>, StoreError> {
        let name = format!("in.{}.{}", d.group, hex(&e.session));
        let Some(rec) = self.vault.get::<InboundRecord>(store, &name)? else {
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

    fn seal_group(&mut self, store: &mut dyn Store, send: &pb::Send) -> Result<Sealed, StoreError> {
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

/// vodozemac's one-time key id (a counter) as the wire's u32.
fn key_id(id: vodozemac::KeyId) -> Option<u32> {
    let raw = vodozemac::base64_decode(id.to_base64()).ok()?;
    let n = u64::from_be_bytes(raw.try_into().ok()?);
    u32::try_from(n).ok()
}

fn decode_content(plain: &[u8]) -> Result<pb::E2eContent, Undecryptable> {
    pb::E2eContent::decode(plain).map_err(|_| Undecryptable::Damaged)
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

#[cfg(test)]
mod tests;
