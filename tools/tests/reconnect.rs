//! The client library against a real server (in-process, RocksDB in a temp
//! dir) behind a link emulator the test controls: cuts, restarts, a
//! changed server key, an app restart with a file-backed outbox.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use pipit_client::pipit_protocol::message::pb;
use pipit_client::{Backoff, Client, Config, Encryption, Event, Events, FileStore, MemoryStore};
use pipit_tools::linkem::{Link, Proxy};

const T: Duration = Duration::from_secs(20);

fn server(dir: &std::path::Path) -> pipit::Running {
    pipit::start(pipit::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        shards: 2,
        ..pipit::Config::default()
    })
    .unwrap()
}

async fn proxy_to(upstream: SocketAddr) -> Proxy {
    Proxy::start("127.0.0.1:0".parse().unwrap(), upstream, Link::default(), Link::default()).await.unwrap()
}

fn config(addr: SocketAddr) -> Config {
    let mut c = Config::new(addr.to_string());
    c.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(200) };
    c.connect_timeout = Duration::from_secs(5);
    // These tests count what crosses a bad link; the end-to-end layer's
    // key traffic is tested in tests/e2e.rs.
    c.encryption = Encryption::Off;
    c
}

/// Waits for the first `Connected` and returns the account.
async fn account(events: &mut Events) -> u64 {
    loop {
        match tokio::time::timeout(T, events.next()).await.expect("connected in time") {
            Some(Event::Connected { account, .. }) => return account,
            Some(Event::Stopped { reason }) => panic!("stopped: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
}

/// What one side saw.
#[derive(Default, Debug)]
struct Seen {
    /// Payload index of every message received, in arrival order.
    received: Vec<u64>,
    seqs: Vec<u64>,
    sent: BTreeMap<u64, pb::Sent>,
}

fn index(d: &pb::Deliver) -> u64 {
    u64::from_be_bytes(d.payload[..8].try_into().unwrap())
}

/// Drains events until `want_received` messages and `want_sent` "sent"s,
/// failing on duplicates the library should have dropped.
async fn collect(events: &mut Events, seen: &mut Seen, want_received: usize, want_sent: usize) {
    while seen.received.len() < want_received || seen.sent.len() < want_sent {
        let e = tokio::time::timeout(T, events.next())
            .await
            .unwrap_or_else(|_| panic!("stuck at {} received, {} sent", seen.received.len(), seen.sent.len()));
        match e {
            Some(Event::Message(d)) => {
                seen.received.push(index(&d));
                seen.seqs.push(d.seq);
            }
            Some(Event::Sent(s)) => assert!(seen.sent.insert(s.id, s).is_none(), "Sent twice for {}", s.id),
            Some(Event::Stopped { reason }) => panic!("stopped: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
}

fn payload(i: u64) -> bytes::Bytes {
    let mut v = i.to_be_bytes().to_vec();
    v.extend_from_slice(&[0x77; 92]);
    v.into()
}

#[tokio::test(flavor = "current_thread")]
async fn twenty_cuts_during_a_thousand_message_exchange_lose_and_double_nothing() {
    const EACH: u64 = 500;
    let dir = tempfile::tempdir().unwrap();
    let running = server(dir.path());
    let proxy = proxy_to(running.local_addr).await;
    let (a, mut ea) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    let (b, mut eb) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    let (acc_a, acc_b) = (account(&mut ea).await, account(&mut eb).await);

    let mut seen_a = Seen::default();
    let mut seen_b = Seen::default();
    let mut cuts = 0;
    for i in 0..EACH {
        a.send(acc_b, payload(i)).await.unwrap();
        b.send(acc_a, payload(i)).await.unwrap();
        // Cut the link every 25 messages, while traffic is in flight.
        if i % 25 == 12 {
            proxy.cut();
            cuts += 1;
        }
        // Keep both event streams moving (the library must not stall on
        // a slow app, but the test should not make it wait needlessly).
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), ea.next()).await {
            record(e, &mut seen_a);
        }
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), eb.next()).await {
            record(e, &mut seen_b);
        }
    }
    assert_eq!(cuts, 20);
    collect(&mut ea, &mut seen_a, EACH as usize, EACH as usize).await;
    collect(&mut eb, &mut seen_b, EACH as usize, EACH as usize).await;

    for (name, seen, client) in [("a", &seen_a, &a), ("b", &seen_b, &b)] {
        assert_eq!(seen.received, (0..EACH).collect::<Vec<_>>(), "{name}: every message once, in order");
        assert!(seen.seqs.windows(2).all(|w| w[0] < w[1]), "{name}: per-conversation order");
        assert_eq!(seen.sent.len(), EACH as usize, "{name}: every send reached sent");
        let s = client.stats();
        println!(
            "{name}: sent {} received {} duplicates dropped {} resent {} reconnects {}",
            s.sent.load(Ordering::Relaxed),
            s.received.load(Ordering::Relaxed),
            s.duplicates_dropped.load(Ordering::Relaxed),
            s.resent.load(Ordering::Relaxed),
            s.reconnects.load(Ordering::Relaxed),
        );
        assert!(s.reconnects.load(Ordering::Relaxed) >= 20, "{name} reconnected after every cut");
    }
    // Sequence numbers are shared by the conversation: together the two
    // directions used 1..=1000 exactly once.
    let mut all: Vec<u64> = seen_a.seqs.iter().chain(&seen_b.seqs).copied().collect();
    all.sort();
    assert_eq!(all, (1..=2 * EACH).collect::<Vec<_>>());
    drop((a, b));
    running.shutdown(Duration::from_secs(2));
}

fn record(e: Event, seen: &mut Seen) {
    match e {
        Event::Message(d) => {
            seen.received.push(index(&d));
            seen.seqs.push(d.seq);
        }
        Event::Sent(s) => assert!(seen.sent.insert(s.id, s).is_none(), "Sent twice for {}", s.id),
        Event::Stopped { reason } => panic!("stopped: {reason}"),
        _ => {}
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_server_restart_during_sends_loses_and_doubles_nothing() {
    const N: u64 = 300;
    let dir = tempfile::tempdir().unwrap();
    let mut running = Some(server(dir.path()));
    let proxy = proxy_to(running.as_ref().unwrap().local_addr).await;
    let (a, mut ea) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    let (b, mut eb) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    let acc_b = {
        account(&mut ea).await;
        account(&mut eb).await
    };
    let mut seen_a = Seen::default();
    let mut seen_b = Seen::default();
    for i in 0..N {
        a.send(acc_b, payload(i)).await.unwrap();
        if i == N / 2 {
            // Restart: SIGTERM-style shutdown, then a new process on the
            // same data directory (a new port, behind the same proxy).
            running.take().unwrap().shutdown(Duration::from_secs(2));
            proxy.cut();
            let next = server(dir.path());
            proxy.set_upstream(next.local_addr).unwrap();
            running = Some(next);
        }
        while let Ok(Some(e)) = tokio::time::timeout(Duration::from_millis(1), ea.next()).await {
            record(e, &mut seen_a);
        }
    }
    collect(&mut ea, &mut seen_a, 0, N as usize).await;
    collect(&mut eb, &mut seen_b, N as usize, 0).await;
    assert_eq!(seen_b.received, (0..N).collect::<Vec<_>>(), "all delivered, once, in order");
    assert_eq!(seen_a.sent.len(), N as usize);
    drop((a, b));
    running.unwrap().shutdown(Duration::from_secs(2));
}

#[tokio::test(flavor = "current_thread")]
async fn a_changed_server_key_stops_the_client_with_a_clear_error() {
    let (d1, d2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = server(d1.path());
    let proxy = proxy_to(first.local_addr).await;
    let (c, mut events) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    account(&mut events).await;
    // Same address, different server (another key): an impostor or a
    // reinstalled server. No silent fallback to the new key.
    let impostor = server(d2.path());
    proxy.set_upstream(impostor.local_addr).unwrap();
    proxy.cut();
    loop {
        match tokio::time::timeout(T, events.next()).await.unwrap() {
            Some(Event::Stopped { reason }) => {
                assert!(reason.contains("server key changed"), "{reason}");
                break;
            }
            Some(Event::Connected { .. }) => panic!("connected to a server with another key"),
            Some(_) => {}
            None => panic!("ended without saying why"),
        }
    }
    assert!(events.next().await.is_none(), "the client stopped");
    assert!(c.send(1, &b"x"[..]).await.is_err());
    first.shutdown(Duration::from_secs(1));
    impostor.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "current_thread")]
async fn the_file_outbox_survives_an_app_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = server(dir.path());
    let proxy = proxy_to(running.local_addr).await;
    let (b, mut eb) = Client::start(config(proxy.addr()), MemoryStore::new()).unwrap();
    let acc_b = account(&mut eb).await;
    let profile = tempfile::tempdir().unwrap();
    // Register a, then go offline: the link stalls, so sends only reach
    // the outbox; then the app is closed.
    let (a, mut ea) = Client::start(config(proxy.addr()), FileStore::open(profile.path()).unwrap()).unwrap();
    account(&mut ea).await;
    proxy.stall(true);
    for i in 0..5 {
        a.send(acc_b, payload(i)).await.unwrap();
    }
    a.close().await;
    proxy.cut();
    proxy.stall(false);
    // The app starts again from the same files: the outbox goes out.
    let (a, mut ea) = Client::start(config(proxy.addr()), FileStore::open(profile.path()).unwrap()).unwrap();
    let mut seen_a = Seen::default();
    let mut seen_b = Seen::default();
    collect(&mut ea, &mut seen_a, 0, 5).await;
    collect(&mut eb, &mut seen_b, 5, 0).await;
    assert_eq!(seen_b.received, vec![0, 1, 2, 3, 4]);
    assert_eq!(seen_a.sent.keys().copied().collect::<Vec<_>>(), vec![1, 2, 3, 4, 5]);
    drop((a, b));
    running.shutdown(Duration::from_secs(2));
}

#[tokio::test(flavor = "current_thread")]
async fn keepalives_flow_at_the_negotiated_interval_and_a_stalled_link_is_replaced() {
    let dir = tempfile::tempdir().unwrap();
    let running = pipit::start(pipit::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().to_path_buf(),
        shards: 1,
        net: pipit::config::NetSettings { keepalive_min_secs: 1, ..Default::default() },
        ..pipit::Config::default()
    })
    .unwrap();
    let proxy = proxy_to(running.local_addr).await;
    let mut cfg = config(proxy.addr());
    cfg.keepalive_secs = 1;
    cfg.response_timeout = Duration::from_secs(1);
    let (c, mut events) = Client::start(cfg, MemoryStore::new()).unwrap();
    account(&mut events).await;
    let (up0, down0) =
        (proxy.stats().up.bytes.load(Ordering::Relaxed), proxy.stats().down.bytes.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_millis(3_500)).await;
    let up = proxy.stats().up.bytes.load(Ordering::Relaxed) - up0;
    let down = proxy.stats().down.bytes.load(Ordering::Relaxed) - down0;
    // Idle: only 2-byte keepalives each way, about one a second.
    assert!((4..=10).contains(&up) && up % 2 == 0, "{up} bytes up");
    assert_eq!(up, down, "every keepalive answered");
    // The link stalls: no answer within the response timeout, so the
    // client gives up on the connection and makes a new one.
    proxy.stall(true);
    let mut reason = None;
    while reason.is_none() {
        if let Some(Event::Disconnected { reason: r }) = tokio::time::timeout(T, events.next()).await.unwrap() {
            reason = Some(r);
        }
    }
    assert!(reason.unwrap().contains("timed out"));
    proxy.stall(false);
    proxy.cut();
    loop {
        if let Some(Event::Connected { .. }) = tokio::time::timeout(T, events.next()).await.unwrap() {
            break;
        }
    }
    drop(c);
    running.shutdown(Duration::from_secs(1));
}

#[tokio::test(flavor = "current_thread")]
async fn an_oversized_message_is_refused_before_it_reaches_the_outbox() {
    let (c, _events) = Client::start(config("127.0.0.1:9".parse().unwrap()), MemoryStore::new()).unwrap();
    let err = c.send(1, vec![0u8; 70_000]).await.unwrap_err();
    assert!(matches!(err, pipit_client::ClientError::TooLarge { .. }), "{err}");
    assert_eq!(c.send(1, vec![0u8; 60_000]).await.unwrap(), 1, "a large but valid one is queued");
}

/// A new device behind a slow link: its `Connected` comes once its keys
/// are on the server, so a peer that writes to it at once (as an app does
/// when told "new contact") reaches it, instead of finding no keys and
/// withholding the message from it for good.
#[tokio::test(flavor = "current_thread")]
async fn a_new_device_is_reachable_as_soon_as_it_reports_connected() {
    let dir = tempfile::tempdir().unwrap();
    let s = server(dir.path());
    let slow = Link { delay: Duration::from_millis(300), ..Link::default() };
    let proxy = Proxy::start("127.0.0.1:0".parse().unwrap(), s.local_addr, slow, slow).await.unwrap();
    let e2e = |addr| {
        let mut c = config(addr);
        c.encryption = Encryption::On;
        c
    };
    let (alice, mut alice_events) = Client::start(e2e(s.local_addr), MemoryStore::default()).unwrap();
    account(&mut alice_events).await;
    let (_bob, mut bob_events) = Client::start(e2e(proxy.addr()), MemoryStore::default()).unwrap();
    let b = account(&mut bob_events).await;
    alice.send(b, &b"right away"[..]).await.unwrap();
    loop {
        match tokio::time::timeout(T, bob_events.next()).await.expect("the message in time") {
            Some(Event::Message(d)) => {
                assert_eq!(&d.payload[..], b"right away");
                break;
            }
            Some(Event::Undecryptable { reason, .. }) => panic!("bob cannot read alice's first message: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    s.shutdown(Duration::from_secs(2));
}
