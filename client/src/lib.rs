//! pipit client library: what a mobile app embeds to talk to a pipit
//! server. It depends on the protocol crate and tokio, never on the server
//! or RocksDB.
//!
//! - [`Client`]: the reconnecting client with a durable outbox, dedup,
//!   coalesced acks and keepalive, reporting [`Event`]s; 1:1 and group
//!   messages, group requests.
//! - [`Connection`]: one authenticated connection, for tools and tests
//!   that drive the protocol step by step.
//! - [`Store`]: what the client remembers; [`MemoryStore`] and
//!   [`FileStore`] ship with it.
//! - End-to-end encryption, on by default ([`Encryption`]): Olm and
//!   Megolm with vodozemac, keys in the server's directory, the app sees
//!   plaintext [`Event::Message`]s (SPEC.md 13).
//! - [`media`]: files by reference, encrypted with a fresh key.

pub mod admin;
mod backoff;
mod client;
mod connection;
mod e2e;
mod error;
mod groups;
pub mod media;
pub mod store;

pub use backoff::Backoff;
pub use client::{Client, Config, Event, Events, PickleKey, Stats};
pub use connection::{ConnectOptions, Connection, Received};
pub use e2e::{DeviceIdentity, Encryption, Undecryptable};
pub use error::{explain, ClientError};
pub use pipit_protocol;
pub use store::{FileStore, Home, MemoryStore, State, Store, StoreError};

use bytes::Bytes;
use pipit_protocol::handshake::Hello;
use pipit_protocol::message::pb;

/// A `Login` hello.
pub fn login(account: u64, device: u32, acked_through: u64) -> Hello {
    Hello::Login(pb::Login { account, device, acked_through, keepalive_secs: 0, user_agent: String::new() })
}

/// A `Register` hello.
pub fn register(invite: &str, device_name: &str) -> Hello {
    Hello::Register(pb::Register {
        invite: Bytes::copy_from_slice(invite.as_bytes()),
        device_name: device_name.into(),
        keepalive_secs: 0,
        user_agent: String::new(),
    })
}
