//! pipit's mobile bindings: the client library (`pipit-client`) exported
//! with UniFFI, for Kotlin (Android, through JNA), Swift (iOS) and Python
//! (the end-to-end test).
//!
//! What it does: starts a [`Client`] over a storage directory, forwards
//! sends, read marks and the requests the server serves, and turns the
//! library's events into plain records ([`Event`]) and its errors into
//! typed exceptions ([`PipitError`]).
//!
//! What it does not do: any protocol logic. Reconnects, the durable
//! outbox, dedup, acks and keepalive all live in `pipit-client`; this
//! crate only converts types. A new library feature becomes a new method
//! on [`Client`] and a new [`Event`] variant here, and nothing else.
//!
//! Threads: every call that does I/O or waits on the client runs on one
//! tokio runtime owned by this crate (two worker threads, created on
//! first use), never on the caller's thread; the async functions only
//! await it.

// No lint override: the workspace's `forbid(unsafe_code)` holds here.
// UniFFI's macros expand to unsafe `extern "C"` scaffolding, but rustc does
// not report `unsafe_code` inside expansions of another crate's macros, so
// the lint still rejects any unsafe code written in this crate.

mod client;
mod config;
mod error;
mod event;
mod runtime;

pub use client::PushPlatform;
pub use client::{start_client, Client};
pub use config::{default_config, ClientConfig, Stats};
pub use error::PipitError;
pub use event::{DeviceInfo, ErrorCode, Event, Feature, GroupInfo, ReceiptKind, UndecryptableReason};

uniffi::setup_scaffolding!("pipit");
