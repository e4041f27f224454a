//! The end-to-end layer's formats, and the checks anyone can make on them
//! without a private key: the key directory's key lengths and the signed
//! prekey's signature (the server checks them on upload, the client
//! library again on every bundle it fetches), and the envelope that every
//! end-to-end payload starts with.
//!
//! The cryptography itself (Olm sessions, Megolm sessions) is the client
//! library's, with vodozemac. The server stores public keys and relays
//! ciphertexts; nothing here needs or sees a plaintext.

use bytes::Bytes;
use prost::Message as _;
use thiserror::Error;

use crate::limits::MAX_ONE_TIME_PREKEYS;
use crate::message::pb;

/// A device's published identity: its Ed25519 key, then its Curve25519
/// key.
pub const IDENTITY_LEN: usize = 64;
/// An X25519 prekey (one-time or signed).
pub const PREKEY_LEN: usize = 32;
/// An Ed25519 signature.
pub const SIGNATURE_LEN: usize = 64;
/// The only envelope version this crate writes and reads.
pub const ENVELOPE_VERSION: u32 = 1;
/// What the signature over a signed prekey starts with, so it can never be
/// mistaken for a signature over anything else.
pub const SIGNED_PREKEY_CONTEXT: &[u8] = b"pipit e2e signed prekey v1";

/// Keys that fail a check.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyError {
    /// An identity that is not 64 bytes.
    #[error("an identity is {IDENTITY_LEN} bytes")]
    IdentityLength,
    /// A prekey that is not 32 bytes.
    #[error("a prekey is {PREKEY_LEN} bytes")]
    PreKeyLength,
    /// A signature that is not 64 bytes.
    #[error("a signature is {SIGNATURE_LEN} bytes")]
    SignatureLength,
    /// The signed prekey's signature does not verify under the identity.
    #[error("the signed prekey's signature does not verify")]
    BadSignature,
    /// An upload with an identity but no signed prekey, or the reverse.
    #[error("identity and signed prekey come together")]
    Incomplete,
    /// More one-time prekeys than a device may hold.
    #[error("more than {MAX_ONE_TIME_PREKEYS} one-time prekeys")]
    TooMany,
    /// One-time prekey ids that do not increase.
    #[error("one-time prekey ids must increase")]
    Order,
}

/// The bytes a signed prekey's signature covers.
pub fn signed_prekey_message(identity: &[u8], id: u32, key: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNED_PREKEY_CONTEXT.len() + identity.len() + 4 + key.len());
    m.extend_from_slice(SIGNED_PREKEY_CONTEXT);
    m.extend_from_slice(identity);
    m.extend_from_slice(&id.to_be_bytes());
    m.extend_from_slice(key);
    m
}

/// The Ed25519 half of an identity.
pub fn identity_ed25519(identity: &[u8]) -> Option<&[u8; 32]> {
    identity.get(..32)?.try_into().ok()
}

/// The Curve25519 half of an identity.
pub fn identity_curve25519(identity: &[u8]) -> Option<&[u8; 32]> {
    identity.get(32..64)?.try_into().ok()
}

/// Checks a signed prekey's lengths and its signature by `identity`.
pub fn check_signed_prekey(identity: &[u8], signed: &pb::SignedPreKey) -> Result<(), KeyError> {
    if identity.len() != IDENTITY_LEN {
        return Err(KeyError::IdentityLength);
    }
    if signed.key.len() != PREKEY_LEN {
        return Err(KeyError::PreKeyLength);
    }
    let sig: &[u8; SIGNATURE_LEN] = signed.signature[..].try_into().map_err(|_| KeyError::SignatureLength)?;
    let ed = identity_ed25519(identity).ok_or(KeyError::IdentityLength)?;
    let key = ed25519_dalek::VerifyingKey::from_bytes(ed).map_err(|_| KeyError::BadSignature)?;
    let msg = signed_prekey_message(identity, signed.id, &signed.key);
    // Strict: no malleable or small-order signatures, as vodozemac checks.
    key.verify_strict(&msg, &ed25519_dalek::Signature::from_bytes(sig)).map_err(|_| KeyError::BadSignature)
}

/// Checks what a server can check of an upload: lengths, counts, order,
/// and the signed prekey's signature when the upload carries one.
pub fn check_upload(u: &pb::KeysUpload) -> Result<(), KeyError> {
    match (&u.signed, u.identity.is_empty()) {
        (Some(signed), false) => check_signed_prekey(&u.identity, signed)?,
        (None, true) => {}
        _ => return Err(KeyError::Incomplete),
    }
    if u.one_time.len() > MAX_ONE_TIME_PREKEYS {
        return Err(KeyError::TooMany);
    }
    if u.one_time.iter().any(|k| k.key.len() != PREKEY_LEN) {
        return Err(KeyError::PreKeyLength);
    }
    if u.one_time.windows(2).any(|w| w[0].id >= w[1].id) {
        return Err(KeyError::Order);
    }
    Ok(())
}

/// Checks a fetched bundle: lengths, and the signed prekey's signature by
/// the bundle's identity.
pub fn check_bundle(b: &pb::KeyBundle) -> Result<(), KeyError> {
    let signed = b.signed.as_ref().ok_or(KeyError::Incomplete)?;
    check_signed_prekey(&b.identity, signed)?;
    match &b.one_time {
        Some(k) if k.key.len() != PREKEY_LEN => Err(KeyError::PreKeyLength),
        _ => Ok(()),
    }
}

/// A payload that is not a well-formed end-to-end envelope.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum EnvelopeError {
    /// Not protobuf, or not an envelope at all.
    #[error("not an end-to-end envelope")]
    Malformed,
    /// An envelope version this crate does not read.
    #[error("envelope version {0} is not supported")]
    Version(u32),
    /// A kind this crate does not know, or one missing what it needs.
    #[error("envelope kind {0} unknown or incomplete")]
    Kind(i32),
}

/// An envelope with `kind` around `ciphertext`.
pub fn encode_envelope(kind: pb::E2eKind, ciphertext: Vec<u8>, session: Vec<u8>) -> Bytes {
    let e = pb::E2eEnvelope {
        version: ENVELOPE_VERSION,
        kind: kind as i32,
        ciphertext: Bytes::from(ciphertext),
        session: Bytes::from(session),
    };
    Bytes::from(e.encode_to_vec())
}

/// Decodes an envelope and checks that it is one this crate can act on:
/// version 1, a known kind, a ciphertext where the kind needs one, a
/// 32-byte session id on Megolm and key carriers.
pub fn decode_envelope(payload: &[u8]) -> Result<(pb::E2eKind, pb::E2eEnvelope), EnvelopeError> {
    let e = pb::E2eEnvelope::decode(payload).map_err(|_| EnvelopeError::Malformed)?;
    if e.version != ENVELOPE_VERSION {
        return Err(if e.version == 0 { EnvelopeError::Malformed } else { EnvelopeError::Version(e.version) });
    }
    let kind = pb::E2eKind::try_from(e.kind).map_err(|_| EnvelopeError::Kind(e.kind))?;
    let complete = match kind {
        pb::E2eKind::Unspecified => false,
        pb::E2eKind::OlmPreKey | pb::E2eKind::Olm => !e.ciphertext.is_empty(),
        pb::E2eKind::Megolm => !e.ciphertext.is_empty() && e.session.len() == 32,
        pb::E2eKind::Keys => e.session.len() == 32,
        pb::E2eKind::Withheld => true,
    };
    if !complete {
        return Err(EnvelopeError::Kind(e.kind));
    }
    Ok((kind, e))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ed25519_dalek::Signer as _;

    fn upload() -> (pb::KeysUpload, ed25519_dalek::SigningKey) {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[5; 32]);
        let mut identity = sk.verifying_key().to_bytes().to_vec();
        identity.extend_from_slice(&[9; 32]);
        let key = vec![3; 32];
        let sig = sk.sign(&signed_prekey_message(&identity, 7, &key));
        let u = pb::KeysUpload {
            req: 1,
            identity: Bytes::from(identity),
            signed: Some(pb::SignedPreKey {
                id: 7,
                key: Bytes::from(key),
                signature: Bytes::copy_from_slice(&sig.to_bytes()),
            }),
            one_time: (1..=3).map(|id| pb::PreKey { id, key: Bytes::from(vec![id as u8; 32]) }).collect(),
        };
        (u, sk)
    }

    #[test]
    fn uploads_are_checked_for_lengths_order_and_signature() {
        let (u, _) = upload();
        assert_eq!(check_upload(&u), Ok(()));
        let mut bad = u.clone();
        bad.signed.as_mut().unwrap().id = 8;
        assert_eq!(check_upload(&bad), Err(KeyError::BadSignature), "the id is signed");
        let mut bad = u.clone();
        bad.identity = Bytes::from(vec![1; 63]);
        assert_eq!(check_upload(&bad), Err(KeyError::IdentityLength));
        let mut bad = u.clone();
        bad.signed = None;
        assert_eq!(check_upload(&bad), Err(KeyError::Incomplete));
        let mut bad = u.clone();
        bad.one_time.swap(0, 1);
        assert_eq!(check_upload(&bad), Err(KeyError::Order));
        let mut bad = u.clone();
        bad.one_time[2].key = Bytes::from(vec![0; 31]);
        assert_eq!(check_upload(&bad), Err(KeyError::PreKeyLength));
        let only_keys = pb::KeysUpload { identity: Bytes::new(), signed: None, ..u.clone() };
        assert_eq!(check_upload(&only_keys), Ok(()));
        let mut many = only_keys;
        many.one_time =
            (0..=MAX_ONE_TIME_PREKEYS as u32).map(|id| pb::PreKey { id, key: u.one_time[0].key.clone() }).collect();
        assert_eq!(check_upload(&many), Err(KeyError::TooMany));
    }

    #[test]
    fn envelopes_round_trip_and_junk_is_refused() {
        let e = encode_envelope(pb::E2eKind::Olm, vec![1, 2, 3], Vec::new());
        let (kind, back) = decode_envelope(&e).unwrap();
        assert_eq!((kind, &back.ciphertext[..]), (pb::E2eKind::Olm, &[1u8, 2, 3][..]));
        assert_eq!(decode_envelope(b"hello world"), Err(EnvelopeError::Malformed));
        let megolm_without_session = encode_envelope(pb::E2eKind::Megolm, vec![1], Vec::new());
        assert!(decode_envelope(&megolm_without_session).is_err());
        let v2 = pb::E2eEnvelope { version: 2, kind: 2, ..Default::default() }.encode_to_vec();
        assert_eq!(decode_envelope(&v2), Err(EnvelopeError::Version(2)));
    }
}
