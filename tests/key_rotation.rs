//! Defect 3: a client that pins the server key could not survive a key
//! rotation (a Retry always carries a key other than the pin, and the
//! server could keep no retired key). Now the operator runs `pipit key
//! rotate`: the old key stays accepted as retired, pinned devices log in
//! with it in one round trip and are told the new key inside that session,
//! and `pipit key drop-retired` ends the overlap. Over real TCP, with the
//! real `pipit` binary doing the rotation, on a running server (reloaded
//! through the admin socket) and on a stopped one.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{PublicKey, StaticKeypair};
use pipit_client::{Client, ClientError, Config, ConnectOptions, Connection, Event, FileStore, State, Store as _};

fn pipit(args: &[&str], dir: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_pipit")).args(args).arg("--data-dir").arg(dir).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "pipit {args:?}: {stdout}{}", String::from_utf8_lossy(&out.stderr));
    stdout
}

/// Logs `d` in over IK with `pinned` as the server key, refusing a Retry
/// (as a pinning client does). Returns the login answer.
async fn pinned_login(addr: std::net::SocketAddr, d: &Device, pinned: PublicKey) -> Result<pb::LoginOk, ClientError> {
    let opts = ConnectOptions { server_key: Some(pinned), ..ConnectOptions::default() };
    let c = Connection::connect(addr, &d.key, pipit_client::login(d.account, d.device, 0), &opts).await?;
    Ok(c.login().clone())
}

/// A client library device whose profile (a `FileStore`) pins `server_key`.
fn profile(dir: &Path, d: &Device, server_key: PublicKey) {
    let mut store = FileStore::open(dir).unwrap();
    let mut state = State::new(d.key.clone());
    state.account = d.account;
    state.device = d.device;
    state.server_key = Some(server_key);
    store.save_state(&state).unwrap();
}

/// Connects the client library with `dir`'s profile and returns the key
/// it pins afterwards.
async fn connect_profile(addr: std::net::SocketAddr, dir: &Path) -> PublicKey {
    let (client, mut events) = Client::start(Config::new(addr.to_string()), FileStore::open(dir).unwrap()).unwrap();
    loop {
        match tokio::time::timeout(T, events.next()).await.unwrap() {
            Some(Event::Connected { .. }) => break,
            Some(Event::Stopped { reason }) => panic!("{reason}"),
            Some(Event::Disconnected { reason }) => panic!("{reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    client.close().await;
    FileStore::open(dir).unwrap().load_state().unwrap().unwrap().server_key.unwrap()
}

#[tokio::test]
async fn a_pinned_client_survives_key_rotation_and_learns_the_new_key() {
    let s = TestServer::start(|_| {});
    let dir = s.dir.path().to_path_buf();
    let k1 = s.key;
    let (a, ca) = register(s.addr).await;
    drop(ca);
    let profile_dir = tempfile::tempdir().unwrap();
    profile(profile_dir.path(), &a, k1);

    // Rotate on the running server: it reloads its keys at once.
    let out = pipit(&["key", "rotate"], &dir);
    assert!(out.contains("the running server uses the new keys now"), "{out}");
    let k2: PublicKey = pipit(&["key"], &dir).trim().parse().unwrap();
    assert_ne!(k2, k1);

    // Pinned to the old key: IK works at once (no Retry, which a pinning
    // client would refuse) and LoginOk carries the new key.
    let ok = pinned_login(s.addr, &a, k1).await.unwrap();
    assert_eq!(PublicKey::from_slice(&ok.new_server_key), Some(k2));
    // Pinned to the new key: plain IK, nothing to learn.
    let ok = pinned_login(s.addr, &a, k2).await.unwrap();
    assert!(ok.new_server_key.is_empty());
    // First contact learns the new key.
    let (_, cx) = register(s.addr).await;
    assert_eq!(cx.server_key(), &k2);
    // The client library replaces its pin with what it was told.
    assert_eq!(connect_profile(s.addr, profile_dir.path()).await, k2);
    assert_eq!(connect_profile(s.addr, profile_dir.path()).await, k2, "and keeps it");

    // The overlap ends: the old key is no longer accepted; a client still
    // pinning it is told to retry, and refuses the unknown key.
    let out = pipit(&["key", "drop-retired"], &dir);
    assert!(out.contains(&format!("dropped {k1}")), "{out}");
    let err = pinned_login(s.addr, &a, k1).await.unwrap_err();
    assert!(matches!(err, ClientError::ServerKeyChanged { offered, .. } if offered == k2), "{err}");
    pinned_login(s.addr, &a, k2).await.unwrap();
}

#[tokio::test]
async fn a_rotation_on_a_stopped_server_takes_effect_at_start() {
    let dir = tempfile::tempdir().unwrap();
    let k1: PublicKey = pipit(&["key"], dir.path()).trim().parse().unwrap();
    let server = BinaryServer::spawn(dir.path(), &[], &[]);
    assert_eq!(server.key, k1);
    let (a, ca) = register(server.addr).await;
    drop(ca);
    drop(server);

    let out = pipit(&["key", "rotate"], dir.path());
    assert!(out.contains("no server is running"), "{out}");
    let listed = pipit(&["key", "list"], dir.path());
    assert!(listed.contains(&format!("retired {k1}")), "{listed}");
    let server = BinaryServer::spawn(dir.path(), &[], &[]);
    let k2 = server.key;
    assert_ne!(k2, k1);
    let ok = pinned_login(server.addr, &a, k1).await.unwrap();
    assert_eq!(PublicKey::from_slice(&ok.new_server_key), Some(k2));
    assert!(pinned_login(server.addr, &a, k2).await.unwrap().new_server_key.is_empty());
    // A key that was never the server's is still refused by a pinning client.
    let stranger = *StaticKeypair::generate().public();
    let err = pinned_login(server.addr, &a, stranger).await.unwrap_err();
    assert!(matches!(err, ClientError::ServerKeyChanged { .. }), "{err}");
}
