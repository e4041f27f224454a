//! Several nodes, for real: an etcd of its own on a free loopback port and
//! three `pipit` processes, each with its own data directory; clients
//! over real TCP with real handshakes.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{three_nodes, Etcd, Node};
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::{ClientError, Config, ConnectOptions, Connection, Encryption, Event, FileStore, Store as _};

/// Where `d` logs in at `node`: logged in, redirected, or refused.
async fn try_login(node: &Node, d: &Device) -> Result<Connection, ClientError> {
    let opts = ConnectOptions { server_key: Some(node.key), timeout: T, ..ConnectOptions::default() };
    Connection::connect(node.addr, &d.key, pipit_client::login(d.account, d.device, 0), &opts).await
}

/// Waits up to 20 s for the client to log in; answers its account.
async fn connected(events: &mut pipit_client::Events) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, events.next()).await {
            Ok(Some(Event::Connected { account, .. })) => return account,
            Ok(Some(Event::Stopped { reason })) => panic!("client stopped: {reason}"),
            Ok(Some(_)) => {}
            Ok(None) | Err(_) => panic!("no login within 20 s"),
        }
    }
}

/// Registers one account on each node; returns them by node.
async fn one_account_each(nodes: &[Node]) -> Vec<Device> {
    let mut out = Vec::new();
    for n in nodes {
        let (d, _conn) = register(n.addr).await;
        out.push(d);
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_created_on_their_owner_and_a_login_elsewhere_is_redirected() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &etcd);

    // Ids are unique across nodes and each node's ids share its slot.
    let mut ids = std::collections::BTreeSet::new();
    let mut slots = Vec::new();
    for n in &nodes {
        let mut mine = Vec::new();
        for _ in 0..4 {
            let (d, _c) = register(n.addr).await;
            assert!(ids.insert(d.account), "account id {} given twice", d.account);
            mine.push(d.account % 1024);
        }
        mine.dedup();
        assert_eq!(mine.len(), 1, "node {} gave ids from several slots", n.id);
        slots.push(mine[0]);
    }
    slots.sort_unstable();
    slots.dedup();
    assert_eq!(slots.len(), 3, "two nodes share a slot");

    let devices = one_account_each(&nodes).await;
    for (i, d) in devices.iter().enumerate() {
        // On its own node: logged in with IK.
        let c = try_login(&nodes[i], d).await.unwrap();
        assert_eq!(c.login().account, d.account);
        drop(c);
        // Elsewhere: sent to the owner, with the owner's key.
        let other = &nodes[(i + 1) % 3];
        match try_login(other, d).await {
            Err(ClientError::Redirected { server, server_key }) => {
                assert_eq!(server, nodes[i].addr.to_string());
                assert_eq!(server_key, nodes[i].key);
            }
            other => panic!("expected a redirect, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_client_library_follows_a_redirect_and_then_goes_straight_to_the_owner() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &etcd);
    let (d, conn) = register(nodes[0].addr).await;
    drop(conn);

    // A profile that knows its ids and n2 (the server the app is
    // configured with), not the owner n1.
    let profile = tempfile::tempdir().unwrap();
    let mut state = pipit_client::State::new(d.key.clone());
    state.account = d.account;
    state.device = d.device;
    state.server_key = Some(nodes[1].key);
    FileStore::open(profile.path()).unwrap().save_state(&state).unwrap();

    let seed = nodes[1].addr.to_string();
    let config = || {
        let mut c = Config::new(seed.clone());
        c.encryption = Encryption::Off;
        c
    };
    let (client, mut events) = pipit_client::Client::start(config(), FileStore::open(profile.path()).unwrap()).unwrap();
    assert_eq!(connected(&mut events).await, d.account);
    client.close().await;
    let saved = FileStore::open(profile.path()).unwrap().load_state().unwrap().unwrap();
    let home = saved.home.expect("the owner is remembered");
    assert_eq!((home.server, home.server_key), (nodes[0].addr.to_string(), nodes[0].key));
    assert_eq!(saved.server_key, Some(nodes[1].key), "the configured server's key stays pinned");

    // Next time it goes to the owner directly: even with the configured
    // server gone, it logs in.
    nodes[1].kill();
    let (client, mut events) = pipit_client::Client::start(config(), FileStore::open(profile.path()).unwrap()).unwrap();
    assert_eq!(connected(&mut events).await, d.account);
    assert_eq!(client.stats().reconnects.load(std::sync::atomic::Ordering::Relaxed), 0);
    client.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_lease_lapses_is_down_for_the_others_and_back_when_it_restarts() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &etcd);
    let (d, conn) = register(nodes[0].addr).await;
    drop(conn);
    let port = nodes[0].addr.port();
    nodes[0].kill();

    // Within its lease (3 s) and a generous margin, n2 says "try later"
    // with a retry_after rather than sending the device to a dead node.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_login(&nodes[1], &d).await {
            Err(ClientError::Refused(pb::ErrorCode::Unavailable)) => break,
            Err(ClientError::Redirected { .. }) => {}
            other => panic!("unexpected answer while n1 is down: {other:?}"),
        }
        assert!(Instant::now() < deadline, "n1 never seen down");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Back on the same data: it takes its own old lease's place at once
    // and the others send its devices to it again.
    nodes[0] = Node::start_on(&root.path().join("n1"), "n1", &etcd.endpoint, port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match try_login(&nodes[1], &d).await {
            Err(ClientError::Redirected { server, .. }) => {
                assert_eq!(server, nodes[0].addr.to_string());
                break;
            }
            Err(ClientError::Refused(pb::ErrorCode::Unavailable)) => {}
            other => panic!("unexpected answer after n1 restarted: {other:?}"),
        }
        assert!(Instant::now() < deadline, "n1 never seen back");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let c = try_login(&nodes[0], &d).await.unwrap();
    assert_eq!(c.login().account, d.account);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_etcd_keeps_the_ring_and_nobody_is_declared_down() {
    let mut etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &etcd);
    let devices = one_account_each(&nodes).await;
    etcd.kill();
    // Well past every lease: no node decides on its own that another died.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for (i, d) in devices.iter().enumerate() {
        let c = try_login(&nodes[i], d).await.unwrap();
        assert_eq!(c.login().account, d.account);
        match try_login(&nodes[(i + 2) % 3], d).await {
            Err(ClientError::Redirected { server, .. }) => assert_eq!(server, nodes[i].addr.to_string()),
            other => panic!("expected a redirect with etcd gone, got {other:?}"),
        }
    }
}

#[test]
fn an_unreachable_etcd_at_start_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let nowhere = format!("http://127.0.0.1:{}", free_port());
    let cfg = dir.path().join("pipit.toml");
    let text = common::cluster::node_config(dir.path(), "n1", free_port(), &nowhere, "")
        .replace("lease_secs = 3", "lease_secs = 3\netcd_timeout_secs = 1");
    std::fs::write(&cfg, text).unwrap();
    let started = Instant::now();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pipit"))
        .args(["serve", "--config"])
        .arg(&cfg)
        .env("PIPIT_LOG", "error")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("etcd at {nowhere} is unreachable")), "{err}");
    assert!(err.contains("joining the cluster as node \"n1\""), "{err}");
    assert!(started.elapsed() < Duration::from_secs(30), "gave up only after {:?}", started.elapsed());
}

/// `pipit admin cluster` at `node`, polled until `ok` accepts it.
async fn admin_cluster_until(node: &Node, what: &str, ok: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let dir = node.dir.clone();
        let text = tokio::task::spawn_blocking(move || pipit::admin::request(&dir, "cluster").unwrap_or_default())
            .await
            .unwrap();
        if ok(&text) {
            return text;
        }
        assert!(Instant::now() < deadline, "{}: never {what}:\n{text}", node.id);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn line<'a>(text: &'a str, peer: &str) -> &'a str {
    text.lines().find(|l| l.starts_with(&format!("{peer} "))).unwrap_or("")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_links_come_up_between_every_pair_and_again_after_a_kill() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &etcd);
    for (i, n) in nodes.iter().enumerate() {
        let others: Vec<String> = (1..=3).filter(|j| *j != i + 1).map(|j| format!("n{j}")).collect();
        let text = admin_cluster_until(n, "all links up with a round trip", |t| {
            others.iter().all(|o| line(t, o).contains("link up rtt"))
        })
        .await;
        assert!(text.starts_with(&format!("node n{} slot ", i + 1)), "{text}");
        assert!(line(&text, &format!("n{}", i + 1)).ends_with("alive me"), "{text}");
    }

    // kill -9 n2: n1 and n3 see the link go down, then n2 down in etcd.
    let port = nodes[1].addr.port();
    nodes[1].kill();
    admin_cluster_until(&nodes[0], "n2 down", |t| line(t, "n2").contains("down link down")).await;
    admin_cluster_until(&nodes[2], "n2's link down", |t| !line(t, "n2").contains("link up")).await;
    // Back: both links come up again by themselves.
    nodes[1] = Node::start_on(&root.path().join("n2"), "n2", &etcd.endpoint, port);
    admin_cluster_until(&nodes[0], "n2 back", |t| line(t, "n2").contains("alive link up")).await;
    admin_cluster_until(&nodes[2], "n2 back", |t| line(t, "n2").contains("alive link up")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_is_refused_at_the_link_handshake_and_a_forged_frame_closes_the_link() {
    use bytes::BytesMut;
    use pipit_client::pipit_protocol::node::{pb as node_pb, DialStep, LinkDialer};
    use pipit_client::pipit_protocol::StaticKeypair;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &etcd);
    let n3_link: std::net::SocketAddr =
        format!("127.0.0.1:{}", common::cluster::link_port(nodes[2].addr.port())).parse().unwrap();
    let hello = |id: &str| node_pb::NodeHello { node_id: id.into(), epoch: 1, max_in_flight: 0 };

    // A key that is not in the node list: closed on, nothing answered.
    let mut s = tokio::net::TcpStream::connect(n3_link).await.unwrap();
    let mut out = BytesMut::new();
    LinkDialer::dial(&StaticKeypair::generate(), &nodes[2].key, &hello("n9"), &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(T, s.read(&mut buf)).await.expect("closed in time").unwrap_or(0);
    assert_eq!(n, 0, "a stranger got an answer");

    // n2's real key (its process stopped, its key file read): the link
    // comes up; then a forged frame and n3 closes it.
    nodes[1].kill();
    let n2_key = pipit::keys::load_or_create(&nodes[1].dir).unwrap().current;
    let mut s = tokio::net::TcpStream::connect(n3_link).await.unwrap();
    let mut out = BytesMut::new();
    let mut dialer = LinkDialer::dial(&n2_key, &nodes[2].key, &hello("n2"), &mut out).unwrap();
    s.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let mut session = loop {
        assert!(tokio::time::timeout(T, s.read_buf(&mut inbuf)).await.unwrap().unwrap() > 0, "n3 closed");
        match dialer.read(&mut inbuf).unwrap() {
            DialStep::NeedMore(d) => dialer = d,
            DialStep::Established(h, session) => {
                assert_eq!(h.node_id, "n3");
                break session;
            }
        }
    };
    let mut frame = BytesMut::new();
    session.seal(&node_pb::NodePacket::default(), &mut frame).unwrap();
    let last = frame.len() - 1;
    frame[last] ^= 0x80;
    s.write_all(&frame).await.unwrap();
    // n3 closes (what it sent before, a ping, may come first).
    let deadline = Instant::now() + T;
    loop {
        let mut buf = [0u8; 256];
        match tokio::time::timeout_at(deadline.into(), s.read(&mut buf)).await.expect("n3 kept the link open") {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
    }
    admin_cluster_until(&nodes[2], "the forged link down", |t| line(t, "n2").contains("link down")).await;
}

/// Logs `d` in at its owner `node`.
async fn at_home(node: &Node, d: &Device) -> Connection {
    try_login(node, d).await.unwrap()
}

/// Receives `n` deliveries from `from`, acking each, in arrival order.
async fn receive(c: &mut Connection, from: u64, n: usize) -> Vec<pb::Deliver> {
    let mut got = Vec::new();
    while got.len() < n {
        let d = expect_deliver(c).await;
        ack(c, d.inbox).await;
        if d.from == from {
            got.push(d);
        }
    }
    got
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_to_an_account_on_another_node_is_sent_delivered_read_and_answered() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &etcd);
    let devices = one_account_each(&nodes).await;
    let (a, b) = (&devices[0], &devices[1]);
    let mut ca = at_home(&nodes[0], a).await;
    let mut cb = at_home(&nodes[1], b).await;

    ca.send(&[text(1, b.account, "hello from n1")]).await.unwrap();
    let sent = expect_sent(&mut ca, 1).await;
    let got = receive(&mut cb, a.account, 1).await;
    assert_eq!((&got[0].payload[..], got[0].seq, got[0].from_device), (&b"hello from n1"[..], sent.seq, a.device));
    // A retry is the same message, not a second one.
    ca.send(&[text(1, b.account, "hello from n1")]).await.unwrap();
    assert_eq!(expect_sent(&mut ca, 1).await, sent);
    // b's ack comes back to a as "delivered", its read receipt as "read".
    let delivered = expect(&mut ca, receipt(pb::ReceiptKind::Delivered)).await;
    assert_eq!((delivered.peer, delivered.through), (b.account, sent.seq));
    mark_read(&mut cb, a.account, sent.seq).await;
    let read = expect(&mut ca, receipt(pb::ReceiptKind::Read)).await;
    assert_eq!((read.peer, read.through), (b.account, sent.seq));

    // The answer goes the other way; the two directions never share a
    // sequence number.
    cb.send(&[text(1, a.account, "hello back from n2")]).await.unwrap();
    let back = expect_sent(&mut cb, 1).await;
    assert_ne!(back.seq % 2, sent.seq % 2);
    let got = receive(&mut ca, b.account, 1).await;
    assert_eq!(&got[0].payload[..], b"hello back from n2");
    // Nothing arrived twice; b hears of a's receipt of its answer.
    let delivered = expect(&mut cb, receipt(pb::ReceiptKind::Delivered)).await;
    assert_eq!((delivered.peer, delivered.through), (a.account, back.seq));
    quiet(&mut cb, Duration::from_millis(500)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_the_owner_loses_nothing_and_doubles_nothing() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let mut nodes = three_nodes(root.path(), &etcd);
    let devices = one_account_each(&nodes).await;
    let (a, b, c) = (&devices[0], &devices[1], &devices[2]);
    let mut ca = at_home(&nodes[0], a).await;
    let mut cc = at_home(&nodes[2], c).await;
    const N: u64 = 40;
    // Senders on n1 and n3 keep sending to b (on n2); n2 is killed part
    // way and started again later.
    let port = nodes[1].addr.port();
    for id in 1..=N {
        if id == N / 4 {
            nodes[1].kill();
        }
        ca.send(&[text(id, b.account, &format!("a{id}"))]).await.unwrap();
        expect_sent(&mut ca, id).await;
        cc.send(&[text(id, b.account, &format!("c{id}"))]).await.unwrap();
        expect_sent(&mut cc, id).await;
    }
    // What waits for n2 is visible to operators on n1.
    let queued =
        |t: &str| -> u64 { line(t, "n2").rsplit_once("queue ").and_then(|(_, n)| n.trim().parse().ok()).unwrap_or(0) };
    let text = admin_cluster_until(&nodes[0], "a queue for n2", |t| queued(t) > 0).await;
    assert!(queued(&text) <= N, "{text}");
    nodes[1] = Node::start_on(&root.path().join("n2"), "n2", &etcd.endpoint, port);
    let mut cb = at_home(&nodes[1], b).await;
    let mut from_a = Vec::new();
    let mut from_c = Vec::new();
    while from_a.len() < N as usize || from_c.len() < N as usize {
        let d = expect_deliver(&mut cb).await;
        ack(&mut cb, d.inbox).await;
        let text = String::from_utf8(d.payload.to_vec()).unwrap();
        if d.from == a.account {
            from_a.push(text)
        } else if d.from == c.account {
            from_c.push(text)
        }
    }
    quiet(&mut cb, Duration::from_secs(1)).await;
    let want = |p: &str| (1..=N).map(|i| format!("{p}{i}")).collect::<Vec<_>>();
    assert_eq!(from_a, want("a"), "every message from n1, once, in order");
    assert_eq!(from_c, want("c"), "every message from n3, once, in order");
    // Acknowledged, the queues empty.
    admin_cluster_until(&nodes[0], "n1's queue to n2 drained", |t| line(t, "n2").ends_with("queue 0")).await;
    admin_cluster_until(&nodes[2], "n3's queue to n2 drained", |t| line(t, "n2").ends_with("queue 0")).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_queue_for_a_down_node_refuses_with_a_retry_time_and_loses_nothing() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let n1 = Node::start_with(&root.path().join("n1"), "n1", &etcd.endpoint, free_port(), "outbound_max = 5\n");
    let n2_port = free_port();
    let mut n2 = Node::start_on(&root.path().join("n2"), "n2", &etcd.endpoint, n2_port);
    let (a, ca) = register(n1.addr).await;
    drop(ca);
    let (b, cb) = register(n2.addr).await;
    drop(cb);
    let mut ca = at_home(&n1, &a).await;
    n2.kill();
    for id in 1..=5 {
        ca.send(&[text(id, b.account, &format!("m{id}"))]).await.unwrap();
        expect_sent(&mut ca, id).await;
    }
    ca.send(&[text(6, b.account, "m6")]).await.unwrap();
    let refused = expect(&mut ca, |m| match m {
        Message::Error(e) if e.id == 6 => Some(e),
        Message::Sent(s) if s.id == 6 => panic!("a sixth message was queued past outbound_max"),
        _ => None,
    })
    .await;
    assert_eq!(refused.code, pb::ErrorCode::Unavailable as i32);
    assert!(refused.retry_after_secs > 0);
    // The node comes back, the queue drains, the retry is taken.
    n2 = Node::start_on(&root.path().join("n2"), "n2", &etcd.endpoint, n2_port);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        ca.send(&[text(6, b.account, "m6")]).await.unwrap();
        let answer = expect(&mut ca, |m| match m {
            Message::Error(e) if e.id == 6 => Some(false),
            Message::Sent(s) if s.id == 6 => Some(true),
            _ => None,
        })
        .await;
        if answer {
            break;
        }
        assert!(Instant::now() < deadline, "the queue never drained");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut cb = at_home(&n2, &b).await;
    let got = receive(&mut cb, a.account, 6).await;
    let texts: Vec<_> = got.iter().map(|d| String::from_utf8(d.payload.to_vec()).unwrap()).collect();
    assert_eq!(texts, ["m1", "m2", "m3", "m4", "m5", "m6"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_that_knows_only_its_key_is_found_and_sent_to_its_owner() {
    use bytes::Bytes;
    use pipit_client::pipit_protocol::StaticKeypair;

    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &etcd);
    // Wait for every link: the lookup asks the nodes a link reaches.
    for n in &nodes {
        admin_cluster_until(n, "all links up", |t| t.matches("link up").count() == 2).await;
    }
    let (a, conn) = register(nodes[0].addr).await;
    drop(conn);
    let mut ca = at_home(&nodes[0], &a).await;
    let tablet = StaticKeypair::generate();
    ca.send(&[pb::LinkDevice {
        req: 1,
        key: Bytes::copy_from_slice(tablet.public().as_bytes()),
        name: "tablet".into(),
    }
    .into()])
        .await
        .unwrap();
    let device = expect(&mut ca, |m| match m {
        Message::Linked(l) if l.req == 1 => Some(l.device),
        _ => None,
    })
    .await;
    // It knows only its key, and asks n2: n2 asks the others and sends it
    // to n1, where it logs in as the account's new device.
    let opts = |n: &Node| ConnectOptions { server_key: Some(n.key), timeout: T, ..ConnectOptions::default() };
    match Connection::connect(nodes[1].addr, &tablet, pipit_client::login(0, 0, 0), &opts(&nodes[1])).await {
        Err(ClientError::Redirected { server, server_key }) => {
            assert_eq!((server, server_key), (nodes[0].addr.to_string(), nodes[0].key));
        }
        other => panic!("expected a redirect to n1, got {other:?}"),
    }
    let c = Connection::connect(nodes[0].addr, &tablet, pipit_client::login(0, 0, 0), &opts(&nodes[0])).await.unwrap();
    assert_eq!((c.login().account, c.login().device), (a.account, device));
    // A key no node knows is refused as before, after the bounded lookup.
    let stranger = StaticKeypair::generate();
    match Connection::connect(nodes[2].addr, &stranger, pipit_client::login(0, 0, 0), &opts(&nodes[2])).await {
        Err(ClientError::Refused(pb::ErrorCode::UnknownDevice)) => {}
        other => panic!("expected UNKNOWN_DEVICE, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn typing_reaches_a_device_on_another_node_and_is_never_stored() {
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let nodes = three_nodes(root.path(), &etcd);
    admin_cluster_until(&nodes[0], "n1's links up", |t| t.matches("link up").count() == 2).await;
    let devices = one_account_each(&nodes).await;
    let (a, b) = (&devices[0], &devices[1]);
    let mut ca = at_home(&nodes[0], a).await;
    let mut cb = at_home(&nodes[1], b).await;
    ca.send(&[pb::Typing { peer: b.account, typing: true, ..Default::default() }.into()]).await.unwrap();
    let t = expect(&mut cb, |m| match m {
        Message::Typing(t) => Some(t),
        _ => None,
    })
    .await;
    assert_eq!((t.peer, t.typing, t.group), (a.account, true, 0));
    // Never stored: a device that logs in later gets nothing of it.
    drop(cb);
    let mut cb = at_home(&nodes[1], b).await;
    quiet(&mut cb, Duration::from_millis(500)).await;
}
