//! What the client is configured with: [`Config`] and its [`PickleKey`].

use std::time::Duration;

use crate::backoff::Backoff;
use crate::e2e::Encryption;

/// How the client behaves.
#[derive(Debug, Clone)]
pub struct Config {
    /// `host:port` of the server.
    pub server: String,
    /// Invite code, used only when registering.
    pub invite: String,
    /// Device name, used only when registering.
    pub device_name: String,
    /// Keepalive interval to propose, seconds; 0 = the server's default.
    pub keepalive_secs: u32,
    /// How long to wait for any byte after a keepalive before reconnecting.
    pub response_timeout: Duration,
    /// Time allowed to connect and log in.
    pub connect_timeout: Duration,
    /// Reconnect delays.
    pub backoff: Backoff,
    /// Accept a server key different from the pinned one. Off by default:
    /// a changed key stops the client with [`ClientError::ServerKeyChanged`](crate::ClientError::ServerKeyChanged).
    pub accept_server_key_change: bool,
    /// Events buffered for the app before the client stops reading the
    /// network (which makes the server hold deliveries on disk).
    pub event_buffer: usize,
    /// End-to-end encryption: [`Encryption::On`] unless turned off (for
    /// tests and bots).
    pub encryption: Encryption,
    /// The key that encrypts the end-to-end state in the [`Store`](crate::Store). Give
    /// one kept in the platform's keystore (Keychain, Android Keystore)
    /// and the store's files alone reveal no session; without one it is
    /// derived from the device's identity key, which lives in the same
    /// store, so it protects no more than the store itself does. It must
    /// stay the same for the life of the store.
    pub pickle_key: Option<PickleKey>,
}

/// A 32-byte key for the end-to-end state (see [`Config::pickle_key`]).
#[derive(Clone)]
pub struct PickleKey(pub [u8; 32]);

impl std::fmt::Debug for PickleKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PickleKey(..)")
    }
}

impl Config {
    /// Defaults for `server`.
    pub fn new(server: impl Into<String>) -> Self {
        Self {
            server: server.into(),
            invite: String::new(),
            device_name: String::new(),
            keepalive_secs: 0,
            response_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(30),
            backoff: Backoff::default(),
            accept_server_key_change: false,
            event_buffer: 256,
            encryption: Encryption::On,
            pickle_key: None,
        }
    }
}
