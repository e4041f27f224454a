//! Connecting and logging in: the hello, the options, and what a login
//! teaches the task (the server key to pin, this device's ids).

use bytes::Bytes;
use pipit_protocol::handshake::Hello;
use pipit_protocol::message::pb;
use pipit_protocol::{PublicKey, StaticKeypair};

use crate::connection::{ConnectOptions, Connection};
use crate::ClientError;

use super::task::Task;

impl Task {
    pub(super) fn hello(&self) -> Hello {
        let user_agent = concat!("pipit-client/", env!("CARGO_PKG_VERSION")).to_string();
        if self.state.account == 0 {
            Hello::Register(pb::Register {
                invite: Bytes::copy_from_slice(self.config.invite.as_bytes()),
                device_name: self.config.device_name.clone(),
                keepalive_secs: self.config.keepalive_secs,
                user_agent,
            })
        } else {
            Hello::Login(pb::Login {
                account: self.state.account,
                device: self.state.device,
                acked_through: self.state.acked_through,
                keepalive_secs: self.config.keepalive_secs,
                user_agent,
            })
        }
    }

    pub(super) fn connect_options(&self) -> ConnectOptions {
        ConnectOptions {
            server_key: self.state.home.as_ref().map(|h| h.server_key).or(self.state.server_key),
            accept_new_server_key: self.config.accept_server_key_change,
            timeout: self.config.connect_timeout,
            local_ip: None,
        }
    }

    /// Records what a login taught us: the server key to pin, our ids.
    pub(super) fn connected(&mut self, conn: Connection) -> Result<Connection, ClientError> {
        let login = conn.login().clone();
        let mut changed = false;
        // The key this connection authenticated belongs to the home node
        // when there is one, else to the configured server.
        let first_contact = self.state.home.is_none() && self.state.server_key.is_none();
        let pinned = match &mut self.state.home {
            Some(home) => &mut home.server_key,
            None => self.state.server_key.get_or_insert(*conn.server_key()),
        };
        // Trust on first use: pin what XX authenticated.
        if first_contact || *pinned != *conn.server_key() {
            *pinned = *conn.server_key();
            changed = true;
        }
        // A rotated key arrives inside the session made with the old one.
        if let Some(k) = PublicKey::from_slice(&login.new_server_key) {
            *pinned = k;
            changed = true;
        }
        if self.state.account == 0 {
            self.state.account = login.account;
            self.state.device = login.device;
            changed = true;
        }
        if changed {
            self.store.save_state(&self.state)?;
        }
        Ok(conn)
    }
}

pub(super) async fn dial(
    server: String,
    identity: StaticKeypair,
    hello: Hello,
    opts: ConnectOptions,
) -> Result<Connection, ClientError> {
    Connection::connect(server.as_str(), &identity, hello, &opts).await
}
