//! The end-to-end layer's records in the app's [`Store`]: each one
//! serialised (vodozemac's pickles inside) and sealed with
//! ChaCha20-Poly1305 under the pickle key, with its name as associated
//! data, so a record can neither be read nor moved to another name
//! without the key.

use chacha20poly1305::aead::{Aead, KeyInit, Payload};
use chacha20poly1305::{ChaCha20Poly1305, Nonce};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sha2::Digest as _;

use crate::store::{Store, StoreError};

const NONCE_LEN: usize = 12;

/// The key that seals end-to-end records.
pub(crate) struct Vault {
    cipher: ChaCha20Poly1305,
}

impl Vault {
    /// A vault under `key` (the app's, from the platform keystore).
    pub(crate) fn new(key: &[u8; 32]) -> Self {
        Self { cipher: ChaCha20Poly1305::new(key.into()) }
    }

    /// A vault under a key derived from the device's Noise private key,
    /// for apps that give none: it keeps the records as safe as the
    /// identity key beside them, no more.
    pub(crate) fn derived(identity_private: &[u8; 32]) -> Self {
        let mut h = sha2::Sha256::new();
        h.update(b"pipit e2e store key v1");
        h.update(identity_private);
        Self::new(&h.finalize().into())
    }

    fn seal(&self, name: &str, plain: &[u8]) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::RngCore::fill_bytes(&mut rand::rng(), &mut nonce);
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad: name.as_bytes() })
            .expect("ChaCha20-Poly1305 encrypts any length a record has");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    fn open(&self, name: &str, sealed: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < NONCE_LEN {
            return None;
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        self.cipher.decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: name.as_bytes() }).ok()
    }

    /// Reads record `name`. One that does not open (another key, damage)
    /// is an error: silently starting over would throw away sessions.
    pub(crate) fn get<T: DeserializeOwned>(&self, store: &mut dyn Store, name: &str) -> Result<Option<T>, StoreError> {
        let Some(sealed) = store.e2e_get(name)? else { return Ok(None) };
        let corrupt = || StoreError::Record(name.to_string());
        let plain = self.open(name, &sealed).ok_or_else(corrupt)?;
        serde_json::from_slice(&plain).map(Some).map_err(|_| corrupt())
    }

    /// Writes record `name`.
    pub(crate) fn put<T: Serialize>(&self, store: &mut dyn Store, name: &str, value: &T) -> Result<(), StoreError> {
        let plain = serde_json::to_vec(value).map_err(|_| StoreError::Record(name.to_string()))?;
        store.e2e_put(name, &self.seal(name, &plain))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemoryStore;

    #[test]
    fn records_need_the_key_and_their_own_name() {
        let mut store = MemoryStore::new();
        let v = Vault::derived(&[1; 32]);
        v.put(&mut store, "a", &vec![1u32, 2, 3]).unwrap();
        assert_eq!(v.get::<Vec<u32>>(&mut store, "a").unwrap(), Some(vec![1, 2, 3]));
        assert!(Vault::derived(&[2; 32]).get::<Vec<u32>>(&mut store, "a").is_err(), "another key");
        let sealed = store.e2e_get("a").unwrap().unwrap();
        store.e2e_put("b", &sealed).unwrap();
        assert!(v.get::<Vec<u32>>(&mut store, "b").is_err(), "moved to another name");
        assert_eq!(v.get::<Vec<u32>>(&mut store, "c").unwrap(), None);
    }
}
