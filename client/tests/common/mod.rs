//! The scripted server of the client's tests: the protocol crate's real
//! responder over a real socket, which logs the client in and then does
//! what each test says.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_client::pipit_protocol::handshake::{ServerHandshake, ServerKeys, ServerStep};
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, Session, StaticKeypair};
use pipit_client::{MemoryStore, State, Store as _};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A client store that already knows the scripted server (its key pinned)
/// and its account (7), as after an earlier registration.
pub(crate) fn known_to(server: &StaticKeypair) -> MemoryStore {
    let mut store = MemoryStore::new();
    let mut state = State::new(StaticKeypair::generate());
    state.account = 7;
    state.server_key = Some(*server.public());
    store.save_state(&state).unwrap();
    store
}

/// Accepts one connection, completes its handshake, answers the login as
/// account 7 followed by `then`, and returns the socket, the session and
/// what was read past the handshake.
pub(crate) async fn accept(
    listener: &TcpListener,
    keys: &Arc<ServerKeys>,
    then: &[Message],
) -> (TcpStream, Session, BytesMut) {
    let (mut s, _) = listener.accept().await.unwrap();
    let mut hs = ServerHandshake::new(keys.clone(), Instant::now(), Duration::from_secs(5));
    let mut input = BytesMut::new();
    let mut out = BytesMut::new();
    let accepted = loop {
        s.read_buf(&mut input).await.unwrap();
        match hs.read(&mut input, Instant::now(), &mut out).unwrap() {
            ServerStep::NeedMore(h) => hs = h,
            ServerStep::Accepted(a) => break a,
        }
    };
    let ok: Message = pb::LoginOk { account: 7, keepalive_secs: 60, window: 8, ..Default::default() }.into();
    let packet: Vec<Message> = std::iter::once(ok).chain(then.iter().cloned()).collect();
    let session = accepted.finish(&packet, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    (s, session, input)
}
