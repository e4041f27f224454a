//! Presence, typing, privacy and push tokens end to end: the client
//! library (behind a link emulator the test cuts) and `pipit-cli`, against
//! a real server in-process with RocksDB in a temp dir.

mod common;

use std::net::SocketAddr;
use std::time::Duration;

use common::{cli, Terminal};
use pipit_client::pipit_protocol::message::pb;
use pipit_client::{Backoff, Client, ClientError, Config, Event, Events, MemoryStore};
use pipit_tools::linkem::{Link, Proxy};

const T: Duration = Duration::from_secs(20);

struct Server {
    running: Option<pipit::Running>,
    _dir: tempfile::TempDir,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(2));
        }
    }
}

impl Server {
    fn start() -> Self {
        Self::start_with(|_| {})
    }

    fn start_with(tweak: impl FnOnce(&mut pipit::Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = pipit::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            shards: 2,
            presence: pipit::config::PresenceSettings { grace_ms: 500, ..Default::default() },
            ..pipit::Config::default()
        };
        tweak(&mut cfg);
        let running = pipit::start(cfg).unwrap();
        Self { running: Some(running), _dir: dir }
    }

    fn addr(&self) -> SocketAddr {
        self.running.as_ref().unwrap().local_addr
    }

    fn key(&self) -> String {
        self.running.as_ref().unwrap().public_key.to_string()
    }
}

fn config(addr: SocketAddr) -> Config {
    let mut c = Config::new(addr.to_string());
    c.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    c.connect_timeout = Duration::from_secs(5);
    c
}

async fn connected(events: &mut Events) -> u64 {
    loop {
        match tokio::time::timeout(T, events.next()).await.expect("connected in time") {
            Some(Event::Connected { account, .. }) => return account,
            Some(Event::Stopped { reason }) => panic!("stopped: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
}

async fn next_presence(events: &mut Events) -> pb::Presence {
    loop {
        match tokio::time::timeout(T, events.next()).await.expect("presence in time") {
            Some(Event::Presence(p)) => return p,
            Some(Event::Stopped { reason }) => panic!("stopped: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
}

#[tokio::test]
async fn the_library_watches_again_after_a_reconnect_and_relays_typing() {
    let s = Server::start();
    let (alice, mut alice_events) = Client::start(config(s.addr()), MemoryStore::default()).unwrap();
    let a = connected(&mut alice_events).await;
    // Bob's link goes through a proxy the test cuts.
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), s.addr(), Link::default(), Link::default()).await.unwrap();
    let (bob, mut bob_events) = Client::start(config(proxy.addr()), MemoryStore::default()).unwrap();
    let b = connected(&mut bob_events).await;

    bob.watch_presence(vec![a]).await.unwrap();
    assert_eq!(next_presence(&mut bob_events).await, pb::Presence { account: a, online: true, last_seen: 0 });
    let e = bob.watch_presence(vec![a, 999_999]).await.unwrap_err();
    assert!(matches!(e, ClientError::Refused(pb::ErrorCode::NotFound)), "{e}");

    // The link drops; the library reconnects and watches a again.
    proxy.cut();
    loop {
        match tokio::time::timeout(T, bob_events.next()).await.unwrap() {
            Some(Event::Connected { .. }) => break,
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    assert!(next_presence(&mut bob_events).await.online, "the state again, on the new connection");
    alice.set_last_seen_visible(false).await.unwrap();
    alice.close().await;
    let p = next_presence(&mut bob_events).await;
    assert_eq!(p, pb::Presence { account: a, online: false, last_seen: 0 }, "hidden");

    // Typing, from the library to the library (carol: a new account).
    let (carol, mut carol_events) = Client::start(config(s.addr()), MemoryStore::default()).unwrap();
    let c = connected(&mut carol_events).await;
    bob.watch_presence(vec![]).await.unwrap();
    carol.typing(b, true).await.unwrap();
    loop {
        match tokio::time::timeout(T, bob_events.next()).await.unwrap() {
            Some(Event::Typing(t)) => {
                assert_eq!(t, pb::Typing { peer: c, group: 0, typing: true, from: 0 });
                break;
            }
            Some(Event::Presence(p)) => panic!("unwatched, still told: {p:?}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }

    // No gateway on this server: a push token is refused for good.
    let e = carol.set_push_token(pb::PushPlatform::Fcm, &b"token"[..]).await.unwrap_err();
    assert!(matches!(e, ClientError::Refused(pb::ErrorCode::NotSupported)), "{e}");
    drop(carol_events);
}

fn register(s: &Server, profile: &std::path::Path) -> u64 {
    let out = cli(&[
        "register",
        "--profile",
        profile.to_str().unwrap(),
        "--server",
        &s.addr().to_string(),
        "--server-key",
        &s.key(),
    ])
    .unwrap();
    out.split_whitespace().nth(1).unwrap().parse().unwrap()
}

#[test]
fn the_chat_shows_online_typing_and_last_seen() {
    let s = Server::start();
    let (pa, pb) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (a, b) = (register(&s, pa.path()), register(&s, pb.path()));
    let (pa_s, pb_s) = (pa.path().to_str().unwrap(), pb.path().to_str().unwrap());

    // Both registrations' connections are gone and past the grace.
    std::thread::sleep(Duration::from_millis(1_000));
    let mut alice = Terminal::spawn(&["chat", "--profile", pa_s, "--to", &b.to_string()]);
    alice.wait_for("chatting as");
    alice.wait_for(&format!("* {b} last seen"));
    let mut bob = Terminal::spawn(&["chat", "--profile", pb_s, "--to", &a.to_string()]);
    bob.wait_for(&format!("* {a} online"));
    alice.wait_for(&format!("* {b} online"));
    bob.type_line("/typing");
    alice.wait_for(&format!("* {b} typing..."));
    bob.type_line("hi alice");
    alice.wait_for("hi alice");
    bob.quit();
    let line = alice.wait_for(&format!("* {b} last seen"));
    assert!(line.ends_with("last seen just now"), "{line}");
    alice.quit();

    // One-shot commands.
    let out = cli(&["presence", "--profile", pa_s, &b.to_string()]).unwrap();
    assert!(out.starts_with(&format!("{b}: last seen")), "{out}");
    let out = cli(&["privacy", "--profile", pb_s, "--last-seen", "nobody"]).unwrap();
    assert_eq!(out.trim(), "last seen visible to nobody");
    // (that command's connection is past its grace)
    std::thread::sleep(Duration::from_millis(1_000));
    let out = cli(&["presence", "--profile", pa_s, &b.to_string()]).unwrap();
    assert_eq!(out.trim(), format!("{b}: offline"), "hidden");
    let err = cli(&["presence", "--profile", pa_s, "424242"]).unwrap_err();
    assert!(err.contains("no such account"), "{err}");
    let err = cli(&["push-token", "--profile", pa_s, "--platform", "fcm", "tok"]).unwrap_err();
    assert!(err.contains("does not offer"), "{err}");
}

#[test]
fn the_cli_registers_and_removes_a_push_token() {
    let s = Server::start_with(|c| {
        c.push.unifiedpush = true;
        c.push.allow_private_endpoints = true;
    });
    let p = tempfile::tempdir().unwrap();
    register(&s, p.path());
    let ps = p.path().to_str().unwrap();
    let out = cli(&["push-token", "--profile", ps, "--platform", "unifiedpush", "http://127.0.0.1:9/up/1"]).unwrap();
    assert_eq!(out.trim(), "push token registered");
    let err = cli(&["push-token", "--profile", ps, "--platform", "unifiedpush", "not a url"]).unwrap_err();
    assert!(err.contains("malformed"), "{err}");
    let out = cli(&["push-token", "--profile", ps, "--platform", "unifiedpush", "--remove"]).unwrap();
    assert_eq!(out.trim(), "push token removed");
}

/// Presence bytes over real TCP, counted by the link emulator between a
/// subscriber and the server: one subscription to 50 accounts (10 of them
/// online) and one online/offline change. Run with `--nocapture` for the
/// figures; they count TCP payload bytes (add 52 per segment for TCP/IP
/// headers).
#[tokio::test]
async fn presence_bytes_on_the_wire() {
    use pipit_client::pipit_protocol::Message;
    use pipit_client::{ConnectOptions, Connection};
    use std::sync::atomic::Ordering::Relaxed;

    let s = Server::start();
    let key = s.running.as_ref().unwrap().public_key;
    let opts = ConnectOptions { server_key: Some(key), ..ConnectOptions::default() };
    let mut accounts = Vec::new();
    let mut online = Vec::new();
    for i in 0..50 {
        let kp = pipit_client::pipit_protocol::StaticKeypair::generate();
        let c = Connection::connect(s.addr(), &kp, pipit_client::register("", "p"), &opts).await.unwrap();
        accounts.push((c.login().account, kp));
        if i % 5 == 0 {
            online.push(c);
        }
    }
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), s.addr(), Link::default(), Link::default()).await.unwrap();
    let me = pipit_client::pipit_protocol::StaticKeypair::generate();
    let mut w = Connection::connect(proxy.addr(), &me, pipit_client::register("", "w"), &opts).await.unwrap();
    let (up0, down0) = (proxy.stats().up.bytes.load(Relaxed), proxy.stats().down.bytes.load(Relaxed));
    let ids: Vec<u64> = accounts.iter().map(|(a, _)| *a).collect();
    w.send(&[pb::PresenceSubscribe { accounts: ids, req: 1 }.into()]).await.unwrap();
    let mut states = 0;
    loop {
        match w.recv_timeout(T).await.unwrap() {
            Message::Presence(_) => states += 1,
            Message::Done(d) if d.req == 1 => break,
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(states, 50);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (up1, down1) = (proxy.stats().up.bytes.load(Relaxed), proxy.stats().down.bytes.load(Relaxed));
    println!("subscribe to 50 accounts (10 online): {} bytes up, {} bytes down", up1 - up0, down1 - down0);

    // One account comes online, then goes offline.
    let (account, kp) = &accounts[1];
    let c = Connection::connect(s.addr(), kp, pipit_client::login(*account, 0, 0), &opts).await.unwrap();
    let p = match w.recv_timeout(T).await.unwrap() {
        Message::Presence(p) => p,
        other => panic!("{other:?}"),
    };
    assert!(p.online);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let down2 = proxy.stats().down.bytes.load(Relaxed);
    println!("one account came online: {} bytes down", down2 - down1);
    drop(c);
    let p = match w.recv_timeout(T).await.unwrap() {
        Message::Presence(p) => p,
        other => panic!("{other:?}"),
    };
    assert!(!p.online && p.last_seen > 0);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let down3 = proxy.stats().down.bytes.load(Relaxed);
    println!("one account went offline: {} bytes down", down3 - down2);
    assert_eq!(proxy.stats().up.bytes.load(Relaxed), up1, "the subscriber sent nothing for the changes");
    drop(online);
}
