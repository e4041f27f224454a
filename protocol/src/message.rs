//! Protocol messages and the packet codec.
//!
//! The schema lives in `pipit.proto`; [`pb`] is the code prost generates
//! from it. A frame's plaintext is a `Packet`: a protobuf message whose
//! fields are all `repeated`, one field number per message kind. This
//! module encodes and decodes it field by field, so several messages share
//! one frame *and* keep the order the sender wrote them in, which a plain
//! `Packet::decode` would lose by grouping them per kind. The bytes are
//! exactly `Packet`'s protobuf encoding; a test checks that the two agree.

use bytes::{Buf, BufMut, Bytes};
use prost::encoding::{decode_varint, encode_varint, encoded_len_varint, WireType};
use prost::Message as _;

use crate::error::MessageError;
use crate::limits::{MAX_MESSAGES_PER_PACKET, MAX_PACKET_LEN, MAX_PAYLOAD_LEN};
use crate::role::Role;

/// Types generated from `pipit.proto`.
#[allow(missing_docs, clippy::all, unreachable_pub)]
pub mod pb {
    include!(concat!(env!("OUT_DIR"), "/pipit.v1.rs"));
}

/// Which side may send a message kind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// Only the client, in an established session.
    Client,
    /// Only the client, and only as its handshake payload.
    ClientHello,
    /// Only the server.
    Server,
    /// Either side.
    Either,
}

macro_rules! messages {
    ($( $(#[$doc:meta])* $field:literal $variant:ident($ty:ident) $origin:ident; )*) => {
        /// One protocol message: a field of `Packet` and its value.
        #[derive(Clone, PartialEq, Debug)]
        #[non_exhaustive]
        pub enum Message {
            $( $(#[$doc])* $variant(pb::$ty), )*
        }

        impl Message {
            /// The `Packet` field number this kind travels under.
            pub fn field_number(&self) -> u32 {
                match self { $( Message::$variant(_) => $field, )* }
            }

            /// The kind's name, for logs and errors.
            pub fn kind(&self) -> &'static str {
                match self { $( Message::$variant(_) => stringify!($variant), )* }
            }

            /// Which side may send it.
            pub fn origin(&self) -> Origin {
                match self { $( Message::$variant(_) => Origin::$origin, )* }
            }

            fn body_len(&self) -> usize {
                match self { $( Message::$variant(m) => m.encoded_len(), )* }
            }

            fn encode_body(&self, buf: &mut impl BufMut) {
                match self { $( Message::$variant(m) => m.encode_raw(buf), )* }
            }

            /// Whether `field` is a kind this version knows.
            // The numbers happen to be contiguous today; a range would
            // silently claim numbers a later removal frees.
            #[allow(clippy::manual_range_patterns)]
            pub fn is_known_field(field: u64) -> bool {
                matches!(field, $( $field )|*)
            }

            fn decode_field(field: u32, body: Bytes) -> Result<Option<Message>, prost::DecodeError> {
                Ok(Some(match field {
                    $( $field => Message::$variant(pb::$ty::decode(body)?), )*
                    _ => return Ok(None),
                }))
            }

            /// One message of every kind, each with a non-default field so
            /// it encodes to at least one byte. For tests and fuzz seeds.
            #[cfg(any(test, feature = "testing"))]
            pub fn one_of_each() -> Vec<Message> {
                vec![ $( Message::$variant(sample::<pb::$ty>()), )* ]
            }
        }

        $(
            impl From<pb::$ty> for Message {
                fn from(m: pb::$ty) -> Self { Message::$variant(m) }
            }
        )*
    };
}

messages! {
    /// Client message to send.
    1 Send(Send) Client;
    /// "Sent": the message is durable.
    2 Sent(Sent) Server;
    /// A message from the inbox.
    3 Deliver(Deliver) Server;
    /// Deliveries processed.
    4 Ack(Ack) Client;
    /// Delivered/read receipt.
    5 Receipt(Receipt) Either;
    /// Typing indicator.
    6 Typing(Typing) Either;
    /// Presence of a watched account.
    7 Presence(Presence) Server;
    /// Authenticated ping.
    8 Ping(Ping) Either;
    /// Answer to a ping.
    9 Pong(Pong) Either;
    /// Error.
    10 Error(Error) Server;
    /// Login (handshake payload).
    11 Login(Login) ClientHello;
    /// Login result.
    12 LoginOk(LoginOk) Server;
    /// Registration (handshake payload).
    13 Register(Register) ClientHello;
    /// A sent message expired undelivered.
    14 Expired(Expired) Server;
    /// Presence subscription.
    15 PresenceSubscribe(PresenceSubscribe) Client;
    /// Create a group.
    16 GroupCreate(GroupCreate) Client;
    /// Add group members.
    17 GroupAdd(GroupAdd) Client;
    /// Remove group members.
    18 GroupRemove(GroupRemove) Client;
    /// Leave a group.
    19 GroupLeave(GroupLeave) Client;
    /// List my groups.
    20 GroupListRequest(GroupListRequest) Client;
    /// A group's state.
    21 GroupInfo(GroupInfo) Server;
    /// My groups.
    22 GroupList(GroupList) Server;
    /// Publish end-to-end keys.
    23 KeysUpload(KeysUpload) Client;
    /// Fetch a key bundle.
    24 KeysFetch(KeysFetch) Client;
    /// Key bundles.
    25 KeysResult(KeysResult) Server;
    /// One-time prekey stock.
    26 KeysStatus(KeysStatus) Server;
    /// Push token.
    27 PushToken(PushToken) Client;
    /// Go to another node.
    28 Redirect(Redirect) Server;
    /// A request succeeded.
    29 Done(Done) Server;
    /// Authorise a new device.
    30 LinkDevice(LinkDevice) Client;
    /// A device was linked.
    31 Linked(Linked) Server;
    /// List an account's devices.
    32 DeviceListRequest(DeviceListRequest) Client;
    /// An account's devices.
    33 DeviceList(DeviceList) Server;
    /// Remove a device.
    34 UnlinkDevice(UnlinkDevice) Client;
    /// Privacy settings.
    35 PrivacySet(PrivacySet) Client;
    /// Per-device ciphertexts did not match.
    36 DeviceMismatch(DeviceMismatch) Server;
    /// Ask for an invite code.
    37 InviteCreate(InviteCreate) Client;
    /// An invite code.
    38 Invite(Invite) Server;
}

#[cfg(any(test, feature = "testing"))]
/// A value of `T` whose encoding is not empty: decode a single byte `0x08
/// 0x01` (field 1 = 1) or, for kinds whose field 1 is not a varint, the
/// first field that takes one.
fn sample<T: prost::Message + Default>() -> T {
    for key in 1u8..=8 {
        let bytes = [key << 3, 1];
        if let Ok(m) = T::decode(&bytes[..]) {
            if m.encoded_len() > 0 {
                return m;
            }
        }
        let bytes = [key << 3 | 2, 1, 7];
        if let Ok(m) = T::decode(&bytes[..]) {
            if m.encoded_len() > 0 {
                return m;
            }
        }
    }
    T::default()
}

impl Message {
    /// The request id of a kind that expects an answer echoing it (`Done`,
    /// `Error`, or its specific result); `None` for kinds that carry none
    /// (`Send` is answered by its client message id instead, see
    /// [`Message::send_id`]). A client request whose id is 0 cannot be
    /// answered attributably and is a protocol error (SPEC.md 7.1).
    pub fn request_id(&self) -> Option<u64> {
        Some(match self {
            Message::GroupCreate(x) => x.req,
            Message::GroupAdd(x) => x.req,
            Message::GroupRemove(x) => x.req,
            Message::GroupLeave(x) => x.req,
            Message::GroupListRequest(x) => x.req,
            Message::KeysUpload(x) => x.req,
            Message::KeysFetch(x) => x.req,
            Message::PushToken(x) => x.req,
            Message::LinkDevice(x) => x.req,
            Message::DeviceListRequest(x) => x.req,
            Message::UnlinkDevice(x) => x.req,
            Message::PrivacySet(x) => x.req,
            Message::PresenceSubscribe(x) => x.req,
            Message::InviteCreate(x) => x.req,
            _ => return None,
        })
    }

    /// Sets the request id of a kind that carries one (see
    /// [`Message::request_id`]); false for kinds that carry none.
    pub fn set_request_id(&mut self, req: u64) -> bool {
        let slot = match self {
            Message::GroupCreate(x) => &mut x.req,
            Message::GroupAdd(x) => &mut x.req,
            Message::GroupRemove(x) => &mut x.req,
            Message::GroupLeave(x) => &mut x.req,
            Message::GroupListRequest(x) => &mut x.req,
            Message::KeysUpload(x) => &mut x.req,
            Message::KeysFetch(x) => &mut x.req,
            Message::PushToken(x) => &mut x.req,
            Message::LinkDevice(x) => &mut x.req,
            Message::DeviceListRequest(x) => &mut x.req,
            Message::UnlinkDevice(x) => &mut x.req,
            Message::PrivacySet(x) => &mut x.req,
            Message::PresenceSubscribe(x) => &mut x.req,
            Message::InviteCreate(x) => &mut x.req,
            _ => return false,
        };
        *slot = req;
        true
    }

    /// The request a server message answers: `Done`, an `Error` with a
    /// `req`, or a request's result (`GroupInfo` only with a `req`: with
    /// 0 it is a change notice).
    pub fn answered_request(&self) -> Option<u64> {
        let req = match self {
            Message::Done(x) => x.req,
            Message::Error(x) => x.req,
            Message::Linked(x) => x.req,
            Message::DeviceList(x) => x.req,
            Message::Invite(x) => x.req,
            Message::GroupInfo(x) => x.req,
            Message::GroupList(x) => x.req,
            Message::KeysResult(x) => x.req,
            _ => return None,
        };
        (req != 0).then_some(req)
    }

    /// The client message id of a `Send`.
    pub fn send_id(&self) -> Option<u64> {
        match self {
            Message::Send(s) => Some(s.id),
            _ => None,
        }
    }

    /// The optional feature (`LoginOk.features`) a client message belongs
    /// to; `None` for the core every server offers. A `Send`, `Receipt` or
    /// `Typing` naming a group belongs to groups.
    pub fn feature(&self) -> Option<pb::Feature> {
        use pb::Feature::*;
        Some(match self {
            Message::Send(x) if x.group != 0 => Groups,
            Message::Receipt(x) if x.group != 0 => Groups,
            Message::Typing(x) if x.group != 0 => Groups,
            Message::Typing(_) => Typing,
            Message::GroupCreate(_)
            | Message::GroupAdd(_)
            | Message::GroupRemove(_)
            | Message::GroupLeave(_)
            | Message::GroupListRequest(_) => Groups,
            Message::PresenceSubscribe(_) | Message::PrivacySet(_) => Presence,
            Message::KeysUpload(_) | Message::KeysFetch(_) => KeyDirectory,
            Message::PushToken(_) => Push,
            Message::UnlinkDevice(_) => UnlinkDevice,
            Message::InviteCreate(_) => Invites,
            _ => return None,
        })
    }

    /// Bytes this message adds to a packet: key, length and body.
    pub fn encoded_len(&self) -> usize {
        let body = self.body_len();
        encoded_len_varint(u64::from(self.field_number() << 3)) + encoded_len_varint(body as u64) + body
    }

    /// Appends the message as one `Packet` field.
    pub fn encode(&self, buf: &mut impl BufMut) {
        let key = (self.field_number() << 3) | WireType::LengthDelimited as u32;
        encode_varint(u64::from(key), buf);
        encode_varint(self.body_len() as u64, buf);
        self.encode_body(buf);
    }

    /// Whether `sender` may send this kind inside an established session.
    pub fn allowed_in_session_from(&self, sender: Role) -> bool {
        matches!(
            (self.origin(), sender),
            (Origin::Either, _) | (Origin::Client, Role::Client) | (Origin::Server, Role::Server)
        )
    }
}

/// Checks a `Send` against what its recipients will receive: the payload,
/// and each per-device ciphertext, at most [`MAX_PAYLOAD_LEN`] bytes, and
/// the `Send` itself within one packet. The client library checks before
/// queueing and the server before storing, so a message that would not fit
/// a recipient's `Deliver` is refused at send time, never stored.
pub fn check_send(send: &pb::Send) -> Result<(), MessageError> {
    let largest = send.per_device.iter().map(|c| c.payload.len()).chain([send.payload.len()]).max().unwrap_or(0);
    if largest > MAX_PAYLOAD_LEN {
        return Err(MessageError::TooLarge { len: largest });
    }
    let whole = Message::Send(send.clone()).encoded_len();
    if whole > MAX_PACKET_LEN {
        return Err(MessageError::TooLarge { len: whole });
    }
    Ok(())
}

impl Message {
    /// Whether the message fits one packet on its own: a server delivers
    /// nothing that does not (it would close the recipient's connection).
    pub fn fits_packet(&self) -> bool {
        self.encoded_len() <= MAX_PACKET_LEN
    }
}

/// Encodes `messages` as one packet.
pub fn encode_packet(messages: &[Message], buf: &mut impl BufMut) {
    for m in messages {
        m.encode(buf);
    }
}

/// Decodes a packet into its messages, in wire order.
///
/// Unknown field numbers are skipped (a newer peer may send kinds this
/// version does not know); unknown fields inside known messages are
/// ignored by prost. A known field number with any wire type but
/// length-delimited is malformed, as a known field of the wrong wire type
/// inside a message is to prost: one rule at both levels (SPEC.md 4).
/// Payload bytes are sliced out of `packet`, not copied.
pub fn decode_packet(mut packet: Bytes) -> Result<Vec<Message>, MessageError> {
    let malformed = |e: prost::DecodeError| MessageError::Malformed(e.to_string());
    let mut out = Vec::new();
    while packet.has_remaining() {
        let key = decode_varint(&mut packet).map_err(malformed)?;
        let (field, wire) = (key >> 3, key & 7);
        if field == 0 || field > u64::from(u32::MAX) {
            return Err(MessageError::Malformed(format!("invalid field number {field}")));
        }
        if wire != WireType::LengthDelimited as u64 && Message::is_known_field(field) {
            return Err(MessageError::Malformed(format!("field {field} with wire type {wire}")));
        }
        match wire {
            0 => {
                decode_varint(&mut packet).map_err(malformed)?;
            }
            1 => skip(&mut packet, 8)?,
            5 => skip(&mut packet, 4)?,
            2 => {
                let len = decode_varint(&mut packet).map_err(malformed)?;
                let len = usize::try_from(len).unwrap_or(usize::MAX);
                if len > packet.remaining() {
                    return Err(MessageError::Malformed("length past the end of the packet".into()));
                }
                let body = packet.split_to(len);
                if let Some(m) = Message::decode_field(field as u32, body).map_err(malformed)? {
                    if out.len() == MAX_MESSAGES_PER_PACKET {
                        return Err(MessageError::TooMany);
                    }
                    out.push(m);
                }
            }
            _ => return Err(MessageError::Malformed(format!("wire type {wire} is not allowed"))),
        }
    }
    Ok(out)
}

fn skip(packet: &mut Bytes, n: usize) -> Result<(), MessageError> {
    if packet.remaining() < n {
        return Err(MessageError::Malformed("field past the end of the packet".into()));
    }
    packet.advance(n);
    Ok(())
}

/// A conversation, as order is kept (SPEC.md 5.1): the account at the
/// other end of a 1:1 send (the sender's own for a note to self), or a
/// group. A refusal for now holds every later send of the same
/// conversation, on the server and in the client library alike.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Conversation {
    /// 1:1, with this account.
    Peer(u64),
    /// A group.
    Group(u64),
}

impl Conversation {
    /// The conversation `send` belongs to.
    pub fn of(send: &pb::Send) -> Self {
        if send.group != 0 {
            Conversation::Group(send.group)
        } else {
            Conversation::Peer(send.to)
        }
    }
}

/// Encoded length of a packet holding `messages`.
pub fn packet_len(messages: &[Message]) -> usize {
    messages.iter().map(Message::encoded_len).sum()
}

#[cfg(test)]
mod tests;
