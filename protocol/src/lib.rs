//! pipit's wire protocol as a sans-IO library.
//!
//! This crate holds every rule about bytes on the wire: the framing codec
//! ([`frame`]), the Noise handshakes ([`handshake`]), the encrypted transport
//! ([`session`]), the protobuf messages ([`message`]) and the limits
//! ([`limits`]). The server, the client library, the fuzzers and the
//! benchmarks all use it, so each rule lives in exactly one place.
//!
//! Test-only entry points (fixed ephemeral keys for the vectors, the fuzz
//! bodies, sample messages) exist only with the `testing` feature, so an
//! app cannot reach them by accident.
//!
//! It does no I/O and reads no clock: callers hand it the bytes they read
//! and take from it the bytes to write; time, where a rule needs it, comes
//! in as an argument. There is no tokio and no socket here.
//!
//! `SPEC.md` beside this crate describes the same protocol for people
//! writing another implementation; `vectors/` holds byte-exact test vectors.
#![deny(missing_docs)]

// Modules in layers; each imports only those listed before it:
// error, limits, role -> frame -> message -> resolver -> noise -> keys ->
// session -> handshake. node (node links) uses frame, keys, limits and
// noise. keepalive stands alone; e2e (the end-to-end layer's formats
// inside payloads) uses only limits and message.
pub mod e2e;
pub mod error;
pub mod frame;
#[cfg(feature = "testing")]
pub mod fuzz;
pub mod handshake;
pub mod keepalive;
pub mod keys;
pub mod limits;
pub mod message;
pub mod node;
pub mod noise;
pub mod resolver;
pub mod role;
pub mod session;

pub use error::{Error, FrameError, HandshakeError, MessageError};
pub use frame::{Frame, FrameDecoder};
pub use handshake::{ClientHandshake, ServerHandshake};
pub use keys::{PublicKey, StaticKeypair};
pub use message::Message;
pub use role::Role;
pub use session::Session;

/// The protocol version this crate speaks, carried in the connection
/// preamble and bound into every handshake through the Noise prologue.
pub const VERSION: u8 = 1;
