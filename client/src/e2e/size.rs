//! What a message weighs once sealed, known before it is sealed: with
//! encryption on, `Client::send` refuses at once a message whose
//! ciphertext could never be sent (a 65,280-byte plaintext, the largest
//! unencrypted payload, grows past every limit), instead of the app
//! learning it from a later `SendFailed TOO_LARGE`.
//!
//! The sizes are lower bounds: the smallest sealed form, one recipient
//! device with a normal (not a session-starting) Olm message, or a Megolm
//! message without key shares. A message that does not fit even so can
//! never be sent; one that fits may still grow past a limit with many
//! devices, which the outbox reports as before.

use bytes::Bytes;
use pipit_protocol::message::pb;
use prost::encoding::encoded_len_varint;
use prost::Message as _;

/// A length-delimited field with a one-byte key.
fn field(len: usize) -> usize {
    1 + encoded_len_varint(len as u64) + len
}

/// AES-256-CBC with PKCS#7 padding, as Olm and Megolm use: always at
/// least one byte of padding, up to a whole block.
fn cbc(plain: usize) -> usize {
    (plain / 16 + 1) * 16
}

/// Bytes of the MAC Olm and Megolm messages end with (truncated).
const MAC_LEN: usize = 8;
/// Bytes of the Ed25519 signature a Megolm message carries.
const SIGNATURE_LEN: usize = 64;

/// The smallest Olm message for `plain` bytes: version byte, the ratchet
/// key (32 bytes), a chain index (at least nothing), the ciphertext, the
/// MAC.
fn olm_len(plain: usize) -> usize {
    1 + field(32) + field(cbc(plain)) + MAC_LEN
}

/// The smallest Megolm message for `plain` bytes: version byte, message
/// index (at least nothing), ciphertext, MAC, signature.
fn megolm_len(plain: usize) -> usize {
    1 + field(cbc(plain)) + MAC_LEN + SIGNATURE_LEN
}

/// The `E2eEnvelope` around a ciphertext of `ciphertext` bytes (and a
/// session id of `session` bytes, 0 for none).
fn envelope_len(kind: pb::E2eKind, ciphertext: usize, session: usize) -> usize {
    let version = 1 + encoded_len_varint(u64::from(pipit_protocol::e2e::ENVELOPE_VERSION));
    let kind = 1 + encoded_len_varint(kind as u64);
    version + kind + field(ciphertext) + if session > 0 { field(session) } else { 0 }
}

/// The smallest sealed form of plaintext `send` (its id as given): what
/// the outbox would hold at the least, with zeros for ciphertext.
pub(crate) fn smallest_sealed(send: &pb::Send) -> pb::Send {
    let content = pb::E2eContent { body: send.payload.clone(), to: send.to, group: send.group, ..Default::default() }
        .encoded_len();
    let zeros = |n: usize| Bytes::from(vec![0u8; n]);
    if send.group != 0 {
        let n = envelope_len(pb::E2eKind::Megolm, megolm_len(content), 32);
        pb::Send { id: send.id, group: send.group, payload: zeros(n), ..Default::default() }
    } else {
        let n = envelope_len(pb::E2eKind::Olm, olm_len(content), 0);
        let one = pb::DeviceCiphertext { account: send.to, device: 0, payload: zeros(n) };
        pb::Send { id: send.id, to: send.to, per_device: vec![one], ..Default::default() }
    }
}

/// The largest plaintext payload for `send`'s recipient and id whose
/// smallest sealed form `fits`.
pub(crate) fn largest_plaintext(send: &pb::Send, fits: impl Fn(&pb::Send) -> bool) -> usize {
    let probe = |n: usize| {
        let mut s = send.clone();
        s.payload = Bytes::from(vec![0u8; n]);
        fits(&smallest_sealed(&s))
    };
    // `fits` is monotone in the payload's length: bisect.
    let (mut lo, mut hi) = (0, send.payload.len());
    if !probe(lo) {
        return 0;
    }
    while lo + 1 < hi {
        let mid = lo + (hi - lo) / 2;
        if probe(mid) {
            lo = mid;
        } else {
            hi = mid;
        }
    }
    lo
}

#[cfg(test)]
mod tests {
    use pipit_protocol::e2e::encode_envelope;
    use vodozemac::olm::{Account, OlmMessage, SessionConfig};

    use super::*;

    fn content(n: usize, to: u64, group: u64) -> Vec<u8> {
        pb::E2eContent { body: Bytes::from(vec![7u8; n]), to, group, ..Default::default() }.encode_to_vec()
    }

    /// The bounds are never above what vodozemac really makes, and close
    /// to it (a bound far below would let through what cannot be sent).
    #[test]
    fn the_bounds_are_at_most_the_real_sizes_and_close_to_them() {
        let alice = Account::new();
        let mut bob = Account::new();
        bob.generate_one_time_keys(1);
        let otk = *bob.one_time_keys().values().next().unwrap();
        let mut a = alice.create_outbound_session(SessionConfig::version_1(), bob.curve25519_key(), otk).unwrap();
        let mut group = vodozemac::megolm::GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
        let sid = vec![1u8; 32];
        let mut b = None;
        for n in [0usize, 1, 15, 16, 17, 1000, 65_000] {
            let plain = content(n, 42, 0);
            let first = a.encrypt(&plain).unwrap();
            let OlmMessage::PreKey(pre) = &first else { panic!("a new session starts with a prekey message") };
            if b.is_none() {
                let created = bob.create_inbound_session(SessionConfig::version_1(), alice.curve25519_key(), pre);
                b = Some(created.unwrap().session);
            }
            // Bob's messages on the session he answered are normal ones.
            let normal = b.as_mut().unwrap().encrypt(&plain).unwrap();
            let OlmMessage::Normal(normal) = normal else { panic!("an answered session sends normal messages") };
            let real = encode_envelope(pb::E2eKind::Olm, normal.to_bytes(), Vec::new()).len();
            let bound = envelope_len(pb::E2eKind::Olm, olm_len(plain.len()), 0);
            assert!(bound <= real && real <= bound + 4, "olm, {n} bytes: bound {bound}, real {real}");
            let real_pre = encode_envelope(pb::E2eKind::OlmPreKey, pre.to_bytes(), Vec::new()).len();
            assert!(bound <= real_pre, "prekey, {n} bytes: bound {bound}, real {real_pre}");

            let plain = content(n, 0, 9);
            let real = encode_envelope(pb::E2eKind::Megolm, group.encrypt(&plain).to_bytes(), sid.clone());
            let bound = envelope_len(pb::E2eKind::Megolm, megolm_len(plain.len()), 32);
            assert!(
                bound <= real.len() && real.len() <= bound + 4,
                "megolm, {n} bytes: bound {bound}, real {}",
                real.len()
            );
        }
    }
}
