//! Every number that bounds what a peer may send or hold.
//!
//! A peer that exceeds one of these is misbehaving: the receiving side
//! rejects the input with an error instead of allocating for it.

/// The largest frame body: the 2-byte length prefix cannot say more, and a
/// Noise message is capped at the same 65,535 bytes.
pub const MAX_FRAME_LEN: usize = 65_535;

/// The AEAD tag ChaCha20-Poly1305 adds to every encrypted frame.
pub const TAG_LEN: usize = 16;

/// The largest plaintext one transport frame carries.
pub const MAX_PACKET_LEN: usize = MAX_FRAME_LEN - TAG_LEN;

/// The largest payload one message may carry: `Send.payload`, and each
/// `per_device` ciphertext on its own (each becomes one recipient device's
/// `Deliver.payload`).
///
/// A payload is checked against what the *recipient* will receive, not
/// against the `Send` that carries it: the `Deliver` the server makes of
/// it adds an inbox id, the sender, a sequence number, a time, a peer and
/// a group, each up to 11 bytes, and that must still fit one packet
/// ([`MAX_PACKET_LEN`]). At 64 KiB less 256 bytes, a `Deliver` with every
/// id at its largest takes at most 65,360 bytes (tested in
/// `message::tests`), which leaves 159 bytes for the envelope of the forms
/// a later version adds (a group fan-out, a copy forwarded between nodes)
/// without lowering this number. `message::check_send` applies it.
pub const MAX_PAYLOAD_LEN: usize = 65_280;

/// The largest handshake frame a client may send. A handshake message
/// carries at most a Login or Register, which are tiny; a server refuses
/// bigger ones before reading them, so a handshake cannot be used to make
/// it buffer 64 KiB per half-open connection.
pub const MAX_CLIENT_HANDSHAKE_FRAME_LEN: usize = 1_024;

/// Bytes of the connection preamble: `b"pip"` and the version.
pub const PREAMBLE_LEN: usize = 4;

/// X25519 public and private key length.
pub const KEY_LEN: usize = 32;

/// How many times one connection may be told to retry its IK handshake
/// with a new server key before the server gives up on it.
pub const MAX_HANDSHAKE_RETRIES: u8 = 1;

/// Accepted keepalive intervals, in seconds. The client proposes one at
/// login; the server clamps it into this range.
pub const MIN_KEEPALIVE_SECS: u32 = 15;
/// See [`MIN_KEEPALIVE_SECS`].
pub const MAX_KEEPALIVE_SECS: u32 = 1_800;
/// The interval used when the client proposes none. One keepalive
/// exchange on an idle connection measured 160 bytes on the wire with
/// TCP/IP headers (3 segments: ping, pong carrying the ACK, the client's
/// ACK; the first exchange on a connection can take a fourth, 212 bytes),
/// so 9 minutes keeps idle cost at about 1.1 KB an hour; a client behind a
/// NAT that forgets sooner proposes a shorter interval.
pub const DEFAULT_KEEPALIVE_SECS: u32 = 540;

/// A group's largest membership.
pub const MAX_GROUP_MEMBERS: usize = 1_024;
/// Most devices one account may have (a phone and its companions).
pub const MAX_DEVICES_PER_ACCOUNT: usize = 16;
/// Most accounts one connection may watch for presence.
pub const MAX_PRESENCE_SUBSCRIPTIONS: usize = 256;
/// Most one-time prekeys one upload may add, and most one device may hold.
pub const MAX_ONE_TIME_PREKEYS: usize = 200;
/// Longest device name, user agent or group name, in bytes.
pub const MAX_NAME_LEN: usize = 64;
/// Longest invite code, in bytes.
pub const MAX_INVITE_LEN: usize = 64;
/// Longest push token, in bytes.
pub const MAX_PUSH_TOKEN_LEN: usize = 512;
/// Most messages one decoded packet may hold. A 65,519-byte packet of
/// two-byte empty messages would otherwise be 32,759 allocations.
pub const MAX_MESSAGES_PER_PACKET: usize = 1_024;
