//! The cryptography snow runs on: its own BLAKE2s and RNG, and X25519 and
//! ChaChaPoly from AWS-LC when the `aws-lc` feature is on (snow's own
//! ChaChaPoly otherwise).
//!
//! X25519 is nearly all of a handshake's cost (the IK responder does
//! four Diffie-Hellman operations and two base-point multiplications), and
//! AWS-LC's assembly field arithmetic does one in about half the time of
//! curve25519-dalek's portable code (`bench/README.md`). The server turns
//! the feature on; the client library and the mobile bindings leave it off
//! by default, where a phone's three or four operations per login are not
//! the bottleneck and AWS-LC would add its C build and about a megabyte to
//! the app. AWS-LC's ChaCha20-Poly1305 (assembly) also serves every frame a
//! session seals or opens. Either backend computes the same bytes: the test vectors pass
//! unchanged under both.
//!
//! A server loads the same static key for every handshake. snow's builder
//! sets it anew each time, which derives its public half (a base-point
//! multiplication, about 6 µs on AWS-LC: 6% of an IK responder); a
//! [`ReadyKey`] is set once and shared by every handshake that uses it
//! ([`Resolver::with_ready`]).

use std::sync::Arc;

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

use crate::limits::KEY_LEN;

/// The resolver every handshake in this crate is built with.
#[derive(Debug, Default, Clone, Copy)]
pub struct Resolver;

impl Resolver {
    /// Which X25519 implementation this build uses, for logs and benches.
    pub fn x25519_backend() -> &'static str {
        if cfg!(feature = "aws-lc") {
            "aws-lc"
        } else {
            "curve25519-dalek"
        }
    }
}

impl CryptoResolver for Resolver {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        DefaultResolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        #[cfg(feature = "aws-lc")]
        if let DHChoice::Curve25519 = choice {
            return Some(Box::<aws_lc::X25519>::default());
        }
        DefaultResolver.resolve_dh(choice)
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        DefaultResolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        #[cfg(feature = "aws-lc")]
        if let CipherChoice::ChaChaPoly = choice {
            return Some(Box::<aws_lc::ChaChaPoly>::default());
        }
        DefaultResolver.resolve_cipher(choice)
    }
}

/// A static key loaded into X25519 once, for the many handshakes that use
/// it. Cheap to clone.
#[derive(Clone)]
pub struct ReadyKey(Arc<Ready>);

struct Ready {
    private: [u8; KEY_LEN],
    dh: Box<dyn Dh>,
}

impl ReadyKey {
    /// Loads `private` (and derives its public half) once.
    pub fn new(private: &[u8; KEY_LEN]) -> Self {
        let mut dh = x25519();
        dh.set(private);
        Self(Arc::new(Ready { private: *private, dh }))
    }

    /// The private half, as the builder takes it.
    pub(crate) fn private(&self) -> &[u8; KEY_LEN] {
        &self.0.private
    }

    /// The public half.
    pub fn public(&self) -> [u8; KEY_LEN] {
        let mut out = [0u8; KEY_LEN];
        out.copy_from_slice(self.0.dh.pubkey());
        out
    }

    fn is(&self, private: &[u8]) -> bool {
        // Without an early exit: the other keys set through here are
        // ephemeral secrets.
        private.len() == KEY_LEN && private.iter().zip(&self.0.private).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    }
}

impl std::fmt::Debug for ReadyKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReadyKey").field("public", &self.public()).finish_non_exhaustive()
    }
}

fn x25519() -> Box<dyn Dh> {
    Resolver.resolve_dh(&DHChoice::Curve25519).expect("the resolver has X25519")
}

impl Resolver {
    /// A resolver whose X25519 takes `key` as already loaded whenever a
    /// handshake sets it as a static key.
    pub fn with_ready(key: ReadyKey) -> WithReady {
        WithReady(key)
    }
}

/// [`Resolver`], with a static key already loaded.
#[derive(Debug, Clone)]
pub struct WithReady(ReadyKey);

impl CryptoResolver for WithReady {
    fn resolve_rng(&self) -> Option<Box<dyn Random>> {
        Resolver.resolve_rng()
    }

    fn resolve_dh(&self, choice: &DHChoice) -> Option<Box<dyn Dh>> {
        match choice {
            DHChoice::Curve25519 => Some(Box::new(ReadyOr { ready: self.0.clone(), own: None })),
            _ => Resolver.resolve_dh(choice),
        }
    }

    fn resolve_hash(&self, choice: &HashChoice) -> Option<Box<dyn Hash>> {
        Resolver.resolve_hash(choice)
    }

    fn resolve_cipher(&self, choice: &CipherChoice) -> Option<Box<dyn Cipher>> {
        Resolver.resolve_cipher(choice)
    }
}

/// X25519 that uses the ready key when set to it, and a key of its own
/// (made when first needed: the ephemeral) otherwise.
struct ReadyOr {
    ready: ReadyKey,
    /// `None`: unset, or set to the ready key.
    own: Option<Box<dyn Dh>>,
}

impl ReadyOr {
    fn current(&self) -> &dyn Dh {
        match &self.own {
            Some(own) => &**own,
            None => &*self.ready.0.dh,
        }
    }
}

impl Dh for ReadyOr {
    fn name(&self) -> &'static str {
        "25519"
    }

    fn pub_len(&self) -> usize {
        KEY_LEN
    }

    fn priv_len(&self) -> usize {
        KEY_LEN
    }

    fn set(&mut self, privkey: &[u8]) {
        if self.ready.is(privkey) {
            self.own = None;
        } else {
            self.own.get_or_insert_with(x25519).set(privkey);
        }
    }

    fn generate(&mut self, rng: &mut dyn Random) -> Result<(), snow::Error> {
        self.own.get_or_insert_with(x25519).generate(rng)
    }

    fn pubkey(&self) -> &[u8] {
        self.current().pubkey()
    }

    fn privkey(&self) -> &[u8] {
        self.current().privkey()
    }

    fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), snow::Error> {
        self.current().dh(pubkey, out)
    }
}

#[cfg(feature = "aws-lc")]
mod aws_lc {
    use aws_lc_rs::aead::{Aad, LessSafeKey, Nonce, UnboundKey, CHACHA20_POLY1305};
    use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey};
    use snow::types::{Cipher, Dh, Random};
    use snow::Error;

    const LEN: usize = 32;
    const TAG: usize = 16;

    /// ChaCha20-Poly1305 on AWS-LC, with Noise's nonce: 32 zero bits, then
    /// the 64-bit counter little-endian.
    #[derive(Default)]
    pub(super) struct ChaChaPoly {
        key: Option<LessSafeKey>,
    }

    impl ChaChaPoly {
        fn key(&self) -> &LessSafeKey {
            self.key.as_ref().expect("snow sets a cipher's key before using it")
        }
    }

    fn nonce(n: u64) -> Nonce {
        let mut b = [0u8; 12];
        b[4..].copy_from_slice(&n.to_le_bytes());
        Nonce::assume_unique_for_key(b)
    }

    impl Cipher for ChaChaPoly {
        fn name(&self) -> &'static str {
            "ChaChaPoly"
        }

        fn set(&mut self, key: &[u8; LEN]) {
            let key = UnboundKey::new(&CHACHA20_POLY1305, key).expect("a 32-byte ChaCha20-Poly1305 key");
            self.key = Some(LessSafeKey::new(key));
        }

        fn encrypt(&self, n: u64, authtext: &[u8], plaintext: &[u8], out: &mut [u8]) -> usize {
            let len = plaintext.len();
            out[..len].copy_from_slice(plaintext);
            let tag = self
                .key()
                .seal_in_place_separate_tag(nonce(n), Aad::from(authtext), &mut out[..len])
                .expect("sealing a Noise message cannot fail");
            out[len..len + TAG].copy_from_slice(tag.as_ref());
            len + TAG
        }

        fn decrypt(&self, n: u64, authtext: &[u8], ciphertext: &[u8], out: &mut [u8]) -> Result<usize, Error> {
            let len = ciphertext.len().checked_sub(TAG).ok_or(Error::Decrypt)?;
            let plain = out.get_mut(..len).ok_or(Error::Decrypt)?;
            plain.copy_from_slice(&ciphertext[..len]);
            self.key()
                .open_in_place_separate_tag(nonce(n), Aad::from(authtext), &ciphertext[len..], plain)
                .map_err(|_| Error::Decrypt)?;
            Ok(len)
        }
    }

    /// X25519 on AWS-LC. Keeps the raw private bytes beside AWS-LC's key
    /// because snow reads them back (`privkey`) when it generates a key
    /// pair; the scalar is clamped by AWS-LC exactly as by dalek.
    #[derive(Default)]
    pub(super) struct X25519 {
        key: Option<PrivateKey>,
        private: [u8; LEN],
        public: [u8; LEN],
    }

    impl Dh for X25519 {
        fn name(&self) -> &'static str {
            "25519"
        }

        fn pub_len(&self) -> usize {
            LEN
        }

        fn priv_len(&self) -> usize {
            LEN
        }

        fn set(&mut self, privkey: &[u8]) {
            // snow hands over exactly `priv_len` bytes; AWS-LC accepts
            // any 32 (it clamps), so this cannot fail.
            let key = PrivateKey::from_private_key(&agreement::X25519, privkey).expect("a 32-byte X25519 private key");
            let public = key.compute_public_key().expect("X25519 public key of a valid private key");
            self.public.copy_from_slice(public.as_ref());
            self.private.copy_from_slice(privkey);
            self.key = Some(key);
        }

        fn generate(&mut self, rng: &mut dyn Random) -> Result<(), Error> {
            // From snow's RNG, as the default backend does, so a fixed
            // ephemeral key for the test vectors still goes through `set`.
            let mut bytes = [0u8; LEN];
            rng.try_fill_bytes(&mut bytes)?;
            self.set(&bytes);
            Ok(())
        }

        fn pubkey(&self) -> &[u8] {
            &self.public
        }

        fn privkey(&self) -> &[u8] {
            &self.private
        }

        fn dh(&self, pubkey: &[u8], out: &mut [u8]) -> Result<(), Error> {
            let key = self.key.as_ref().ok_or(Error::Dh)?;
            let peer = UnparsedPublicKey::new(&agreement::X25519, pubkey.get(..LEN).ok_or(Error::Dh)?);
            // AWS-LC refuses a peer key of small order (an all-zero
            // shared secret), which dalek would have computed: such a
            // handshake now fails instead of deriving keys an attacker
            // knows. No honest peer sends one.
            agreement::agree(key, peer, Error::Dh, |secret| {
                out.get_mut(..LEN).ok_or(Error::Dh)?.copy_from_slice(secret);
                Ok(())
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dh(resolver: &dyn CryptoResolver, private: &[u8; 32]) -> Box<dyn Dh> {
        let mut dh = resolver.resolve_dh(&DHChoice::Curve25519).expect("X25519");
        dh.set(private);
        dh
    }

    /// Keys that exercise clamping (high bit, low bits) and ordinary ones.
    fn keys() -> Vec<[u8; 32]> {
        let mut out = vec![[0u8; 32], [0xff; 32], [1u8; 32], [0x80; 32]];
        let mut x = 0x9e37_79b9_u32;
        for _ in 0..16 {
            let mut k = [0u8; 32];
            for b in &mut k {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                *b = x as u8;
            }
            out.push(k);
        }
        out
    }

    #[test]
    fn this_builds_backend_agrees_with_dalek_byte_for_byte() {
        let keys = keys();
        for a in &keys {
            let ours = dh(&Resolver, a);
            let dalek = dh(&DefaultResolver, a);
            assert_eq!(ours.pubkey(), dalek.pubkey(), "public key of {a:02x?}");
            for b in &keys[4..] {
                let peer = dh(&DefaultResolver, b);
                let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
                ours.dh(peer.pubkey(), &mut x).unwrap();
                dalek.dh(peer.pubkey(), &mut y).unwrap();
                assert_eq!(x, y, "shared secret of {a:02x?} and {b:02x?}");
            }
        }
    }

    #[test]
    fn generated_keys_come_from_snows_rng_and_match_their_private_half() {
        let mut rng = Resolver.resolve_rng().unwrap();
        let mut ours = Resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        ours.generate(&mut *rng).unwrap();
        let private: [u8; 32] = ours.privkey().try_into().unwrap();
        assert_ne!(private, [0u8; 32]);
        assert_eq!(ours.pubkey(), dh(&DefaultResolver, &private).pubkey());
    }

    #[test]
    fn this_builds_cipher_agrees_with_snows_byte_for_byte_and_refuses_what_it_refuses() {
        let choice = CipherChoice::ChaChaPoly;
        let mut ours = Resolver.resolve_cipher(&choice).unwrap();
        let mut snows = DefaultResolver.resolve_cipher(&choice).unwrap();
        let key = [0x42u8; 32];
        ours.set(&key);
        snows.set(&key);
        let plain: Vec<u8> = (0..300u32).map(|i| (i * 7) as u8).collect();
        for (n, len, aad) in [(0u64, 0usize, &b""[..]), (1, 1, b"h"), (7, 48, &[9u8; 32]), (u64::MAX - 1, 300, b"")] {
            let (mut a, mut b) = (vec![0u8; len + 16], vec![0u8; len + 16]);
            assert_eq!(ours.encrypt(n, aad, &plain[..len], &mut a), len + 16);
            snows.encrypt(n, aad, &plain[..len], &mut b);
            assert_eq!(a, b, "nonce {n}, {len} bytes");
            let mut back = vec![0u8; len];
            assert_eq!(ours.decrypt(n, aad, &a, &mut back).unwrap(), len);
            assert_eq!(back, &plain[..len]);
            let mut bad = a.clone();
            bad[len / 2] ^= 1;
            assert!(ours.decrypt(n, aad, &bad, &mut back).is_err());
            assert!(ours.decrypt(n + 1, aad, &a, &mut back).is_err());
        }
        // snow never hands a cipher less than a tag (its own would panic);
        // ours refuses it all the same.
        #[cfg(feature = "aws-lc")]
        assert!(ours.decrypt(0, b"", &[0u8; 15], &mut [0u8; 16]).is_err(), "shorter than a tag");
        ours.rekey();
        snows.rekey();
        let (mut a, mut b) = ([0u8; 20], [0u8; 20]);
        ours.encrypt(3, b"", &[1, 2, 3, 4], &mut a);
        snows.encrypt(3, b"", &[1, 2, 3, 4], &mut b);
        assert_eq!(a, b, "after a rekey");
    }

    #[test]
    fn a_ready_key_computes_what_a_freshly_set_one_does_and_other_keys_are_their_own() {
        let keys = keys();
        let ready = ReadyKey::new(&keys[5]);
        let resolver = Resolver::with_ready(ready.clone());
        let mut s = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        s.set(&keys[5]);
        let fresh = dh(&DefaultResolver, &keys[5]);
        assert_eq!(s.pubkey(), fresh.pubkey());
        assert_eq!(ready.public(), fresh.pubkey());
        assert_eq!(s.privkey(), &keys[5]);
        let peer = dh(&DefaultResolver, &keys[9]);
        let (mut x, mut y) = ([0u8; 32], [0u8; 32]);
        s.dh(peer.pubkey(), &mut x).unwrap();
        fresh.dh(peer.pubkey(), &mut y).unwrap();
        assert_eq!(x, y);
        // Another key set through the same resolver, then the ready one
        // again: each behaves as its own key.
        for k in [&keys[6], &keys[5], &keys[7]] {
            s.set(k);
            assert_eq!(s.pubkey(), dh(&DefaultResolver, k).pubkey());
            assert_eq!(s.privkey(), k);
        }
        let mut e = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut rng = resolver.resolve_rng().unwrap();
        e.generate(&mut *rng).unwrap();
        let private: [u8; 32] = e.privkey().try_into().unwrap();
        assert_ne!(private, keys[5]);
        assert_eq!(e.pubkey(), dh(&DefaultResolver, &private).pubkey());
    }

    #[cfg(feature = "aws-lc")]
    #[test]
    fn a_small_order_peer_key_is_refused() {
        // Points of small order (u = 0, u = 1) give an all-zero shared
        // secret for every private key.
        let ours = dh(&Resolver, &[7u8; 32]);
        let mut out = [0u8; 32];
        let mut one = [0u8; 32];
        one[0] = 1;
        for peer in [[0u8; 32], one] {
            assert!(ours.dh(&peer, &mut out).is_err());
        }
        assert_eq!(Resolver::x25519_backend(), "aws-lc");
    }
}
