//! Files by reference, as the designs pipit follows keep media out of the
//! message path: [`encrypt`] seals a file with a fresh key; the app
//! uploads the ciphertext wherever it keeps blobs and sends the small
//! [`MediaRef`] (url, key, SHA-256, size, type) inside an end-to-end
//! encrypted message ([`MediaRef::to_bytes`]). The receiver checks the
//! hash of what it downloaded before it decrypts ([`MediaRef::decrypt`]).
//! The server sees neither the file nor the reference.
//!
//! The cipher is ChaCha20-Poly1305 with a zero nonce: each key encrypts
//! one file only, so the nonce never repeats under a key.

use bytes::Bytes;
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use pipit_protocol::message::pb;
use prost::Message as _;
use sha2::Digest as _;

/// Longest `url` a reference may carry.
pub const MAX_URL_LEN: usize = 2_048;
/// Longest media type.
pub const MAX_MIME_LEN: usize = 255;

/// A file sealed by [`encrypt`]: upload `ciphertext`, then send
/// [`EncryptedMedia::reference`].
#[derive(Clone)]
pub struct EncryptedMedia {
    /// What to upload.
    pub ciphertext: Vec<u8>,
    key: [u8; 32],
    sha256: [u8; 32],
    size: u64,
}

impl std::fmt::Debug for EncryptedMedia {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EncryptedMedia").field("len", &self.ciphertext.len()).finish_non_exhaustive()
    }
}

impl EncryptedMedia {
    /// The reference to send, once the ciphertext is stored at `url`.
    pub fn reference(&self, url: impl Into<String>, mime: impl Into<String>) -> MediaRef {
        MediaRef { url: url.into(), key: self.key, sha256: self.sha256, size: self.size, mime: mime.into() }
    }
}

/// Encrypts `plaintext` under a fresh random key.
pub fn encrypt(plaintext: &[u8]) -> EncryptedMedia {
    let mut key = [0u8; 32];
    rand::RngCore::fill_bytes(&mut rand::rng(), &mut key);
    let ciphertext = ChaCha20Poly1305::new(Key::from_slice(&key))
        .encrypt(Nonce::from_slice(&[0; 12]), plaintext)
        .expect("ChaCha20-Poly1305 encrypts any length that fits in memory");
    let sha256 = sha2::Sha256::digest(&ciphertext).into();
    EncryptedMedia { ciphertext, key, sha256, size: plaintext.len() as u64 }
}

/// What a message carries about a file.
#[derive(Clone, PartialEq, Eq)]
pub struct MediaRef {
    /// Where the ciphertext is.
    pub url: String,
    /// The file's key.
    pub key: [u8; 32],
    /// SHA-256 of the ciphertext.
    pub sha256: [u8; 32],
    /// Bytes of the plaintext.
    pub size: u64,
    /// Its media type.
    pub mime: String,
}

impl std::fmt::Debug for MediaRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("MediaRef")
            .field("url", &self.url)
            .field("size", &self.size)
            .field("mime", &self.mime)
            .finish_non_exhaustive()
    }
}

/// Why a reference or a downloaded file was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum MediaError {
    /// The bytes are not a media reference, or a field is over its limit.
    #[error("not a valid media reference")]
    Malformed,
    /// The download is not the file the reference names (checked before
    /// anything is decrypted).
    #[error("the file's hash does not match its reference")]
    HashMismatch,
    /// The hash matched but the file does not decrypt to the stated size:
    /// the sender made a bad reference.
    #[error("the file does not decrypt to what its reference says")]
    Damaged,
}

impl MediaRef {
    /// The reference's wire form (`pb::MediaRef`), to send inside an
    /// end-to-end encrypted message.
    pub fn to_bytes(&self) -> Vec<u8> {
        pb::MediaRef {
            url: self.url.clone(),
            key: Bytes::copy_from_slice(&self.key),
            sha256: Bytes::copy_from_slice(&self.sha256),
            size: self.size,
            mime: self.mime.clone(),
        }
        .encode_to_vec()
    }

    /// Reads a reference from a message.
    pub fn from_bytes(bytes: &[u8]) -> Result<Self, MediaError> {
        let m = pb::MediaRef::decode(bytes).map_err(|_| MediaError::Malformed)?;
        if m.url.len() > MAX_URL_LEN || m.mime.len() > MAX_MIME_LEN {
            return Err(MediaError::Malformed);
        }
        Ok(Self {
            key: m.key[..].try_into().map_err(|_| MediaError::Malformed)?,
            sha256: m.sha256[..].try_into().map_err(|_| MediaError::Malformed)?,
            url: m.url,
            size: m.size,
            mime: m.mime,
        })
    }

    /// Checks `ciphertext` (what was downloaded from `url`) against the
    /// hash, then decrypts it.
    pub fn decrypt(&self, ciphertext: &[u8]) -> Result<Vec<u8>, MediaError> {
        let got: [u8; 32] = sha2::Sha256::digest(ciphertext).into();
        if got != self.sha256 {
            return Err(MediaError::HashMismatch);
        }
        let plain = ChaCha20Poly1305::new(Key::from_slice(&self.key))
            .decrypt(Nonce::from_slice(&[0; 12]), ciphertext)
            .map_err(|_| MediaError::Damaged)?;
        if plain.len() as u64 != self.size {
            return Err(MediaError::Damaged);
        }
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_file_round_trips_and_a_changed_download_is_refused_before_decrypting() {
        let file = b"a picture, honestly".repeat(100);
        let sealed = encrypt(&file);
        assert_ne!(&sealed.ciphertext[..file.len()], &file[..]);
        let r = sealed.reference("https://blobs.example/1", "image/jpeg");
        let back = MediaRef::from_bytes(&r.to_bytes()).unwrap();
        assert_eq!(back, r);
        assert_eq!(back.decrypt(&sealed.ciphertext).unwrap(), file);
        let mut tampered = sealed.ciphertext.clone();
        tampered[3] ^= 1;
        assert_eq!(back.decrypt(&tampered), Err(MediaError::HashMismatch));
        // A reference whose hash matches but whose key does not.
        let wrong_key = MediaRef { key: [9; 32], ..back.clone() };
        assert_eq!(wrong_key.decrypt(&sealed.ciphertext), Err(MediaError::Damaged));
        assert!(!format!("{back:?}").contains("key: ["), "Debug never shows the key");
        assert_eq!(MediaRef::from_bytes(b"\x12\x01x"), Err(MediaError::Malformed));
        assert_ne!(encrypt(&file).reference("u", "m").key, r.key, "a fresh key per file");
    }
}
