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

mod group;
mod identity;
mod keys;
mod one_to_one;
mod records;
mod size;
mod vault;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::fmt;

use pipit_protocol::message::pb;
use pipit_protocol::Message;
use prost::Message as _;
use vodozemac::olm::{Account, Session};

use crate::store::{Store, StoreError};
pub(crate) use vault::Vault;

pub use identity::DeviceIdentity;
use records::{AccountRecord, GroupRecord, PeerRecord, Stashed};
pub(crate) use size::{largest_plaintext, smallest_sealed};

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
    /// A group message this device already read, delivered again as a
    /// new message (same session and index, another sequence number): a
    /// replay by the server or the network, not shown twice.
    Replayed,
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
            Undecryptable::Replayed => "a replay of a message already read",
        })
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
    /// An upload of this device's keys was answered (stored or refused).
    pub(crate) upload_answered: bool,
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
}

fn decode_content(plain: &[u8]) -> Result<pb::E2eContent, Undecryptable> {
    pb::E2eContent::decode(plain).map_err(|_| Undecryptable::Damaged)
}

#[cfg(test)]
mod tests;
