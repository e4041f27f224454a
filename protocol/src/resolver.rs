//! The cryptography snow runs on: its own ChaChaPoly, BLAKE2s and RNG,
//! and X25519 from AWS-LC when the `aws-lc` feature is on.
//!
//! X25519 is nearly all of a handshake's cost (the IK responder does
//! four Diffie-Hellman operations and two base-point multiplications), and
//! AWS-LC's assembly field arithmetic does one in about half the time of
//! curve25519-dalek's portable code (`bench/README.md`). The server turns
//! the feature on; the client library and the mobile bindings leave it off
//! by default, where a phone's three or four operations per login are not
//! the bottleneck and AWS-LC would add its C build and about a megabyte to
//! the app. Either backend computes the same bytes: the test vectors pass
//! unchanged under both.

use snow::params::{CipherChoice, DHChoice, HashChoice};
use snow::resolvers::{CryptoResolver, DefaultResolver};
use snow::types::{Cipher, Dh, Hash, Random};

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
        DefaultResolver.resolve_cipher(choice)
    }
}

#[cfg(feature = "aws-lc")]
mod aws_lc {
    use aws_lc_rs::agreement::{self, PrivateKey, UnparsedPublicKey};
    use snow::types::{Dh, Random};
    use snow::Error;

    const LEN: usize = 32;

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
