//! Noise static keys: a device's identity and the server's.
//!
//! Keys are X25519. On the wire they are 32 raw bytes; in configuration
//! files and on the command line they are 64 lowercase hex digits.

use std::fmt;
use std::str::FromStr;

use crate::limits::KEY_LEN;
use crate::noise;

/// A 32-byte X25519 public key.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PublicKey(pub [u8; KEY_LEN]);

impl PublicKey {
    /// The key from exactly 32 bytes.
    pub fn from_slice(bytes: &[u8]) -> Option<Self> {
        bytes.try_into().ok().map(PublicKey)
    }

    /// The raw bytes.
    pub fn as_bytes(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

/// A key in text form was not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a key is 64 hex digits")]
pub struct KeyParseError;

fn parse_hex32(s: &str) -> Result<[u8; KEY_LEN], KeyParseError> {
    let s = s.trim();
    if s.len() != 2 * KEY_LEN || !s.is_ascii() {
        return Err(KeyParseError);
    }
    let mut out = [0u8; KEY_LEN];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&s[2 * i..2 * i + 2], 16).map_err(|_| KeyParseError)?;
    }
    Ok(out)
}

impl FromStr for PublicKey {
    type Err = KeyParseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        parse_hex32(s).map(PublicKey)
    }
}

/// A static key pair: the private half never leaves the device or server.
#[derive(Clone)]
pub struct StaticKeypair {
    private: [u8; KEY_LEN],
    public: PublicKey,
}

impl StaticKeypair {
    /// A fresh random key pair from the operating system's RNG.
    pub fn generate() -> Self {
        let (private, public) = noise::generate_keypair();
        Self { private, public: PublicKey(public) }
    }

    /// The key pair from its private key (the public half is derived).
    pub fn from_private(private: [u8; KEY_LEN]) -> Self {
        let public = noise::x25519_base(&private);
        Self { private, public: PublicKey(public) }
    }

    /// The public half.
    pub fn public(&self) -> &PublicKey {
        &self.public
    }

    /// The private half, for storing it (see [`StaticKeypair::to_hex`]).
    pub fn private_bytes(&self) -> &[u8; KEY_LEN] {
        &self.private
    }

    /// The private key as 64 hex digits, the form key files hold.
    pub fn to_hex(&self) -> String {
        PublicKey(self.private).to_string()
    }

    /// Parses the form [`StaticKeypair::to_hex`] writes.
    pub fn from_hex(s: &str) -> Result<Self, KeyParseError> {
        parse_hex32(s).map(Self::from_private)
    }
}

impl fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the private half.
        f.debug_struct("StaticKeypair").field("public", &self.public).finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_round_trip_and_derivation() {
        let kp = StaticKeypair::generate();
        let again = StaticKeypair::from_hex(&kp.to_hex()).unwrap();
        assert_eq!(again.public(), kp.public());
        let pk: PublicKey = kp.public().to_string().parse().unwrap();
        assert_eq!(&pk, kp.public());
        assert!("zz".parse::<PublicKey>().is_err());
        assert!(format!("{kp:?}").find(&kp.to_hex()).is_none(), "Debug hides the private key");
    }

    #[test]
    fn rfc7748_base_point_vector() {
        // RFC 7748 section 6.1, Alice's key pair.
        let sk = parse_hex32("77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a").unwrap();
        let pk = StaticKeypair::from_private(sk);
        assert_eq!(pk.public().to_string(), "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a");
    }
}
