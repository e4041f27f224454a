//! The pipit chat server.
//!
//! A thin I/O driver around `pipit-protocol`: shards accept TCP
//! connections and run the protocol's state machines; one storage thread
//! makes messages durable in RocksDB with group commit before anyone is
//! told "sent"; a registry routes new inbox entries to whichever shard
//! holds the recipient's connection. The binary (`pipit`) adds the
//! command line, signals, metrics and systemd readiness.
//!
//! It does not implement groups, presence, the key directory or push yet;
//! those message kinds are answered with `UNAVAILABLE`.

pub mod admin;
pub mod config;
pub mod connection;
pub mod registry;
pub mod server;
pub mod storage;

pub use config::Config;
pub use server::{start, Running};
