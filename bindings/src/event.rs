//! The library's events as plain records: no protobuf types cross the FFI.

use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;

/// What the client reports, in order, through `Client.next_event()`.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Enum)]
pub enum Event {
    /// Logged in (on a device's first login with encryption on: once its
    /// keys are on the server, so peers can reach it at once).
    Connected {
        /// This device's account id.
        account: u64,
        /// This device's number within the account.
        device: u32,
        /// Deliveries waiting at login.
        pending: u32,
        /// The optional features this server offers.
        features: Vec<Feature>,
    },
    /// The connection dropped; the client reconnects by itself.
    Disconnected {
        /// Why, for logs.
        reason: String,
    },
    /// The client stopped for good (a changed server key, a refused
    /// device): reconnecting cannot help. No events follow.
    Stopped {
        /// Why.
        reason: String,
    },
    /// A message for this device, or a copy of one this account sent from
    /// another device (then `peer` is set).
    Message {
        /// Sending account.
        from_account: u64,
        /// Sending device.
        from_device: u32,
        /// Per-conversation sequence number: `mark_read` takes it.
        seq: u64,
        /// Server time of the send, seconds since the Unix epoch.
        time: u64,
        /// The opaque payload.
        payload: Vec<u8>,
        /// On a copy of this account's own message: the 1:1 recipient.
        peer: u64,
        /// For group messages: the group (0 for 1:1).
        group: u64,
        /// In a group: a ciphertext for this device alone, beside the
        /// payload every member gets (end-to-end key distribution); empty
        /// otherwise.
        device_payload: Vec<u8>,
    },
    /// A message this device cannot read (encryption on); it was
    /// acknowledged, so the stream goes on.
    Undecryptable {
        /// Sending account.
        from_account: u64,
        /// Sending device.
        from_device: u32,
        /// Its sequence number.
        seq: u64,
        /// For group messages: the group.
        group: u64,
        /// Why.
        reason: UndecryptableReason,
    },
    /// A device's end-to-end identity is not the one pinned: nothing is
    /// encrypted for it, nor believed from it, until `trust_identity`.
    IdentityChanged {
        /// Its account.
        account: u64,
        /// Its device number.
        device: u32,
        /// The identity pinned before (64 hex digits), if any.
        old: Option<String>,
        /// The identity it shows now.
        new: String,
    },
    /// A send is durable on the server ("sent").
    Sent {
        /// The id `send` returned.
        id: u64,
        /// Its per-conversation sequence number.
        seq: u64,
        /// Server time, seconds since the Unix epoch.
        time: u64,
    },
    /// A send was refused for good and removed from the outbox.
    SendFailed {
        /// The id `send` returned.
        id: u64,
        /// Why.
        code: ErrorCode,
    },
    /// Messages this account sent were delivered or read, up to
    /// `through` (a sequence number) in the conversation.
    Receipt {
        /// Delivered or read.
        kind: ReceiptKind,
        /// The 1:1 conversation.
        peer: u64,
        /// Or the group.
        group: u64,
        /// Covers every sequence number up to this one.
        through: u64,
        /// Who received or read; 0 in a 1:1 conversation (it is `peer`).
        by: u64,
        /// When, seconds since the Unix epoch.
        time: u64,
        /// In a group: the one message this counts for.
        seq: u64,
        /// In a group: how many members received (or read) that message.
        count: u32,
    },
    /// A message this account sent expired undelivered on some devices.
    Expired {
        /// The 1:1 conversation.
        peer: u64,
        /// Or the group.
        group: u64,
        /// Its sequence number.
        seq: u64,
        /// On how many devices.
        devices: u32,
    },
    /// A watched account's presence.
    Presence {
        /// The account.
        account: u64,
        /// Online now.
        online: bool,
        /// Seconds since the Unix epoch; 0 when hidden or never seen.
        last_seen: u64,
    },
    /// Someone is typing (or stopped).
    Typing {
        /// The 1:1 conversation.
        peer: u64,
        /// Or the group.
        group: u64,
        /// Typing or stopped.
        typing: bool,
        /// Who, in a group.
        from_account: u64,
    },
    /// A group this account is in changed (or was created, or this
    /// account was added or removed): its state now. Arrives in order with
    /// the group's messages.
    Group {
        /// The group's state.
        info: GroupInfo,
    },
    /// The answer to `link_device`.
    Linked {
        /// The request id passed to `link_device`.
        req: u64,
        /// The new device's number.
        device: u32,
    },
    /// The answer to `request_device_list`.
    DeviceList {
        /// The request id passed to `request_device_list`.
        req: u64,
        /// Whose devices.
        account: u64,
        /// The devices.
        devices: Vec<DeviceInfo>,
    },
    /// A request failed.
    RequestFailed {
        /// The request id.
        req: u64,
        /// Why.
        code: ErrorCode,
        /// For `RateLimited` and `Unavailable`: seconds to wait.
        retry_after_secs: u32,
    },
    /// A server message this binding does not map yet (its protocol name).
    Other {
        /// The protocol message kind, for logs.
        kind: String,
    },
}

/// Why a message could not be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum UndecryptableReason {
    /// Not end-to-end encrypted (the sender has encryption off).
    NotEncrypted,
    /// The sender had no keys it trusts for this device.
    Withheld,
    /// No session decrypts it.
    NoSession,
    /// Damaged or forged.
    Damaged,
    /// From a device whose new identity is not accepted yet.
    UntrustedIdentity,
    /// It names another conversation than the one it arrived in.
    WrongConversation,
    /// A group message whose session this device was never given.
    NoGroupSession,
    /// A group message already read, delivered again as a new one.
    Replayed,
    /// A reason newer than this binding.
    Other,
}

impl From<pipit_client::Undecryptable> for UndecryptableReason {
    fn from(u: pipit_client::Undecryptable) -> Self {
        use pipit_client::Undecryptable as U;
        match u {
            U::NotEncrypted => Self::NotEncrypted,
            U::Withheld => Self::Withheld,
            U::NoSession => Self::NoSession,
            U::Damaged => Self::Damaged,
            U::UntrustedIdentity => Self::UntrustedIdentity,
            U::WrongConversation => Self::WrongConversation,
            U::NoGroupSession => Self::NoGroupSession,
            U::Replayed => Self::Replayed,
            #[allow(unreachable_patterns)]
            _ => Self::Other,
        }
    }
}

/// A group's state.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct GroupInfo {
    /// The group id.
    pub group: u64,
    /// Its name (UTF-8; invalid bytes are replaced).
    pub name: String,
    /// Member accounts.
    pub members: Vec<u64>,
    /// Admin accounts.
    pub admins: Vec<u64>,
    /// Bumped by every change.
    pub version: u64,
}

impl From<pb::GroupInfo> for GroupInfo {
    fn from(g: pb::GroupInfo) -> Self {
        GroupInfo {
            group: g.group,
            name: String::from_utf8_lossy(&g.name).into_owned(),
            members: g.members,
            admins: g.admins,
            version: g.version,
        }
    }
}

/// An optional protocol feature a server may offer (`LoginOk.features`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum Feature {
    /// Groups.
    Groups,
    /// Presence and last seen.
    Presence,
    /// Typing relayed to the peer.
    Typing,
    /// The end-to-end key directory.
    KeyDirectory,
    /// Push wake-ups.
    Push,
    /// Unlinking devices.
    UnlinkDevice,
    /// Devices issue invite codes.
    Invites,
    /// A feature newer than this library.
    Unknown,
}

impl From<pb::Feature> for Feature {
    fn from(f: pb::Feature) -> Self {
        use pb::Feature as F;
        match f {
            F::Groups => Feature::Groups,
            F::Presence => Feature::Presence,
            F::Typing => Feature::Typing,
            F::KeyDirectory => Feature::KeyDirectory,
            F::Push => Feature::Push,
            F::UnlinkDevice => Feature::UnlinkDevice,
            F::Invites => Feature::Invites,
            _ => Feature::Unknown,
        }
    }
}

/// One device of an account.
#[derive(Debug, Clone, PartialEq, Eq, uniffi::Record)]
pub struct DeviceInfo {
    /// Its number.
    pub device: u32,
    /// The name it registered with.
    pub name: String,
    /// Its public key, 64 hex digits.
    pub key: String,
    /// Seconds since the Unix epoch; 0 if hidden or never.
    pub last_seen: u64,
}

/// Delivered or read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ReceiptKind {
    /// Not set (a server bug).
    Unspecified,
    /// At least one device of the recipient stored the message.
    Delivered,
    /// The recipient displayed it.
    Read,
}

/// The server's error codes (`protocol/pipit.proto`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, uniffi::Enum)]
pub enum ErrorCode {
    /// Not set, or a code newer than this library.
    Unspecified,
    /// The request was malformed.
    BadRequest,
    /// The device key is not registered.
    UnknownDevice,
    /// The protocol version is not supported.
    UnsupportedVersion,
    /// Registration is closed, or the invite code is missing.
    RegistrationClosed,
    /// The invite code is unknown, used up or expired.
    InvalidInvite,
    /// An account, device or group does not exist.
    NotFound,
    /// Not allowed for this device.
    Forbidden,
    /// Over a limit (size, count).
    TooLarge,
    /// Too many requests; retry later.
    RateLimited,
    /// Per-device ciphertexts do not match the account's devices.
    DeviceMismatch,
    /// The server cannot take this now; retry later.
    Unavailable,
    /// Another connection of the same device logged in.
    Replaced,
    /// The server is shutting down.
    ShuttingDown,
    /// The peer took too long.
    Timeout,
    /// The account lives on another node.
    WrongNode,
    /// Internal server error.
    Internal,
    /// This server does not offer that feature; final.
    NotSupported,
    /// The message id was used before for other content; send it again
    /// under a new id.
    IdReused,
}

impl From<pb::ErrorCode> for ErrorCode {
    fn from(c: pb::ErrorCode) -> Self {
        use pb::ErrorCode as P;
        match c {
            P::Unspecified => ErrorCode::Unspecified,
            P::BadRequest => ErrorCode::BadRequest,
            P::UnknownDevice => ErrorCode::UnknownDevice,
            P::UnsupportedVersion => ErrorCode::UnsupportedVersion,
            P::RegistrationClosed => ErrorCode::RegistrationClosed,
            P::InvalidInvite => ErrorCode::InvalidInvite,
            P::NotFound => ErrorCode::NotFound,
            P::Forbidden => ErrorCode::Forbidden,
            P::TooLarge => ErrorCode::TooLarge,
            P::RateLimited => ErrorCode::RateLimited,
            P::DeviceMismatch => ErrorCode::DeviceMismatch,
            P::Unavailable => ErrorCode::Unavailable,
            P::Replaced => ErrorCode::Replaced,
            P::ShuttingDown => ErrorCode::ShuttingDown,
            P::Timeout => ErrorCode::Timeout,
            P::WrongNode => ErrorCode::WrongNode,
            P::Internal => ErrorCode::Internal,
            P::NotSupported => ErrorCode::NotSupported,
            P::IdReused => ErrorCode::IdReused,
            #[allow(unreachable_patterns)]
            _ => ErrorCode::Unspecified,
        }
    }
}

fn code(raw: i32) -> ErrorCode {
    pb::ErrorCode::try_from(raw).unwrap_or(pb::ErrorCode::Unspecified).into()
}

fn receipt_kind(raw: i32) -> ReceiptKind {
    match pb::ReceiptKind::try_from(raw) {
        Ok(pb::ReceiptKind::Delivered) => ReceiptKind::Delivered,
        Ok(pb::ReceiptKind::Read) => ReceiptKind::Read,
        Ok(pb::ReceiptKind::Unspecified) | Err(_) => ReceiptKind::Unspecified,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

impl From<pipit_client::Event> for Event {
    fn from(e: pipit_client::Event) -> Self {
        use pipit_client::Event as E;
        match e {
            E::Connected { account, device, pending, features } => Event::Connected {
                account,
                device,
                pending,
                features: features.into_iter().map(Feature::from).collect(),
            },
            E::Disconnected { reason } => Event::Disconnected { reason },
            E::Stopped { reason } => Event::Stopped { reason },
            E::Message(d) => Event::Message {
                from_account: d.from,
                from_device: d.from_device,
                seq: d.seq,
                time: d.time,
                payload: d.payload.to_vec(),
                peer: d.peer,
                group: d.group,
                device_payload: d.device_payload.to_vec(),
            },
            E::Sent(s) => Event::Sent { id: s.id, seq: s.seq, time: s.time },
            E::SendFailed { id, code } => Event::SendFailed { id, code: code.into() },
            E::Receipt(r) => Event::Receipt {
                kind: receipt_kind(r.kind),
                peer: r.peer,
                group: r.group,
                through: r.through,
                by: r.by,
                time: r.time,
                seq: r.seq,
                count: r.count,
            },
            E::Expired(x) => Event::Expired { peer: x.peer, group: x.group, seq: x.seq, devices: x.devices },
            E::Presence(p) => Event::Presence { account: p.account, online: p.online, last_seen: p.last_seen },
            E::Typing(t) => Event::Typing { peer: t.peer, group: t.group, typing: t.typing, from_account: t.from },
            E::Group(g) => Event::Group { info: g.into() },
            E::Undecryptable { message, reason } => Event::Undecryptable {
                from_account: message.from,
                from_device: message.from_device,
                seq: message.seq,
                group: message.group,
                reason: reason.into(),
            },
            E::IdentityChanged { account, device, old, new } => {
                Event::IdentityChanged { account, device, old: old.map(|i| i.to_string()), new: new.to_string() }
            }
            E::Other(m) => other(m),
            // A library event added after this binding: visible, not lost
            // silently, until it gets its own variant.
            e => Event::Other { kind: format!("{e:?}").chars().take_while(|c| c.is_alphanumeric()).collect() },
        }
    }
}

/// Answers to requests, which the library reports as `Other`.
fn other(m: Message) -> Event {
    match m {
        Message::Linked(l) => Event::Linked { req: l.req, device: l.device },
        Message::DeviceList(l) => Event::DeviceList {
            req: l.req,
            account: l.account,
            devices: l
                .devices
                .into_iter()
                .map(|d| DeviceInfo { device: d.device, name: d.name, key: hex(&d.key), last_seen: d.last_seen })
                .collect(),
        },
        Message::Error(e) => {
            Event::RequestFailed { req: e.req, code: code(e.code), retry_after_secs: e.retry_after_secs }
        }
        m => Event::Other { kind: m.kind().to_string() },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    #[test]
    fn maps_a_delivery_field_by_field() {
        let d = pb::Deliver {
            inbox: 9,
            from: 2,
            from_device: 1,
            seq: 5,
            time: 77,
            payload: Bytes::from_static(b"hi"),
            peer: 0,
            group: 0,
            device_payload: Bytes::new(),
        };
        assert_eq!(
            Event::from(pipit_client::Event::Message(d)),
            Event::Message {
                from_account: 2,
                from_device: 1,
                seq: 5,
                time: 77,
                payload: b"hi".to_vec(),
                peer: 0,
                group: 0,
                device_payload: vec![],
            }
        );
    }

    #[test]
    fn maps_request_answers_and_unknown_codes() {
        let e = pb::Error { code: 9999, req: 4, id: 0, retry_after_secs: 3 };
        assert_eq!(
            Event::from(pipit_client::Event::Other(e.into())),
            Event::RequestFailed { req: 4, code: ErrorCode::Unspecified, retry_after_secs: 3 }
        );
        let r = pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer: 3, through: 8, ..Default::default() };
        assert!(matches!(
            Event::from(pipit_client::Event::Receipt(r)),
            Event::Receipt { kind: ReceiptKind::Read, peer: 3, through: 8, .. }
        ));
        let pong = pb::Pong { id: 1 };
        assert_eq!(Event::from(pipit_client::Event::Other(pong.into())), Event::Other { kind: "Pong".into() });
    }
}
