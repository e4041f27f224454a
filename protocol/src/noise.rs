//! The Noise parameters pipit uses, in one place below the handshake, the
//! keys and the session: pattern names, the cipher suite and the builder
//! every handshake starts from.

use snow::params::NoiseParams;

use crate::error::HandshakeError;
use crate::limits::KEY_LEN;
use crate::resolver::{ReadyKey, Resolver};

/// The Noise handshake pattern.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Pattern {
    /// `Noise_IK_25519_ChaChaPoly_BLAKE2s`: the client knows the server key.
    IK,
    /// `Noise_XX_25519_ChaChaPoly_BLAKE2s`: first contact.
    XX,
    /// `Noise_KK_25519_ChaChaPoly_BLAKE2s`: a link between two cluster
    /// nodes, each of which knows the other's key (`crate::node`).
    KK,
}

impl Pattern {
    /// The full Noise protocol name.
    pub fn protocol_name(self) -> &'static str {
        match self {
            Pattern::IK => "Noise_IK_25519_ChaChaPoly_BLAKE2s",
            Pattern::XX => "Noise_XX_25519_ChaChaPoly_BLAKE2s",
            Pattern::KK => "Noise_KK_25519_ChaChaPoly_BLAKE2s",
        }
    }

    /// Lower-case name for logs and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            Pattern::IK => "ik",
            Pattern::XX => "xx",
            Pattern::KK => "kk",
        }
    }
}

pub(crate) fn params(p: Pattern) -> NoiseParams {
    p.protocol_name().parse().expect("pattern names are valid Noise protocol names")
}

/// A builder for `pattern` with `private` as the local static key.
pub(crate) fn builder(p: Pattern, private: &[u8; KEY_LEN]) -> Result<snow::Builder<'_>, HandshakeError> {
    with_resolver(p).local_private_key(private).map_err(HandshakeError::Config)
}

/// [`builder`] for a static key loaded once ([`ReadyKey`]): the
/// server's, which every handshake uses.
pub(crate) fn builder_ready(p: Pattern, key: &ReadyKey) -> Result<snow::Builder<'_>, HandshakeError> {
    snow::Builder::with_resolver(params(p), Box::new(Resolver::with_ready(key.clone())))
        .local_private_key(key.private())
        .map_err(HandshakeError::Config)
}

fn with_resolver(p: Pattern) -> snow::Builder<'static> {
    snow::Builder::with_resolver(params(p), Box::new(Resolver))
}

/// A fresh X25519 key pair from the operating system's RNG: (private, public).
pub(crate) fn generate_keypair() -> ([u8; KEY_LEN], [u8; KEY_LEN]) {
    let kp = with_resolver(Pattern::XX).generate_keypair().expect("the built-in resolver has an RNG and X25519");
    let private = kp.private.as_slice().try_into().expect("snow returns 32-byte keys");
    let public = kp.public.as_slice().try_into().expect("snow returns 32-byte keys");
    (private, public)
}

/// The X25519 public key of `private`, computed by the same DH the
/// handshakes use, so this crate carries no second curve implementation.
pub(crate) fn x25519_base(private: &[u8; KEY_LEN]) -> [u8; KEY_LEN] {
    use snow::resolvers::CryptoResolver;
    let mut dh = Resolver.resolve_dh(&snow::params::DHChoice::Curve25519).expect("the resolver has X25519");
    dh.set(private);
    let mut out = [0u8; KEY_LEN];
    out.copy_from_slice(dh.pubkey());
    out
}
