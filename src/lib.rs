//! The pipit chat server.
//!
//! A thin I/O driver around `pipit-protocol`: shards accept TCP
//! connections and run the protocol's state machines; one writer thread
//! makes every change durable in RocksDB with group commit before anyone
//! is told; a registry routes new inbox entries to whichever shard holds
//! the recipient's connection. The binary (`pipit`) adds the command line,
//! signals, metrics and systemd readiness.
//!
//! Groups are stored once per message and fanned out to members' inboxes
//! after "sent" by a driver thread (`service::fanout`). It serves
//! presence, typing, push wake-ups, unlinking devices and the end-to-end
//! key directory (public keys only: payloads stay opaque); device-issued
//! invites are not offered: `LoginOk.features` does not list them, and
//! their requests are answered `NOT_SUPPORTED` (`service::features` is
//! the one list of what is offered).
//!
//! # Layers
//!
//! Each module imports only modules on lines above its own:
//!
//! ```text
//! model            ids and time
//! store/           the only code that names RocksDB: a file per table, Txn
//! commit           the group-commit engine, generic over its operations
//! route/           online devices, mailboxes, presence, cluster placement
//!                  (never committed)
//! service/         the product's rules: a file per concern, its operations
//! net/             listeners, the connection driver, dispatch
//! admin            the admin socket
//! config           the file: gathers the settings table of each layer
//!                  (`net::settings`, `commit::settings`, ...)
//! server           wiring: start and stop
//! ```
//!
//! `keys` (the server's key files and their rotation) sits apart: any
//! layer may use it, and it imports nothing of the server; so does
//! `telemetry`, the list of every metric the server exports.

pub mod admin;
pub mod commit;
pub mod config;
pub mod keys;
pub mod model;
pub mod net;
pub mod route;
pub mod server;
pub mod service;
pub mod store;
pub mod telemetry;

pub use config::Config;
pub use server::{start, Running};
