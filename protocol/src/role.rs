//! Which end of a connection a piece of code speaks for.
//!
//! The bottom of the crate: messages use it to say who may send a kind,
//! sessions and handshakes to say which side they are.

/// Which end of the connection this is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The device.
    Client,
    /// The server.
    Server,
}

impl Role {
    /// The other end.
    pub fn peer(self) -> Role {
        match self {
            Role::Client => Role::Server,
            Role::Server => Role::Client,
        }
    }

    /// Lower-case name, for errors and logs.
    pub fn name(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }
}
