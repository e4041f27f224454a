//! What operators rely on, checked against the real binary: metrics,
//! graceful shutdown on SIGTERM, systemd readiness.

mod common;

use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::ClientError;

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

fn value(metrics: &str, name: &str) -> f64 {
    metrics
        .lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|rest| rest.starts_with([' ', '{'])))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test]
async fn metrics_count_handshakes_messages_and_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = BinaryServer::spawn(dir.path(), &["--metrics-listen", &format!("127.0.0.1:{port}")], &[]);
    let (_a, mut ca) = register(server.addr).await;
    let (b, mut cb) = register(server.addr).await;
    for i in 1..=5 {
        ca.send(&[text(i, b.account, "x")]).await.unwrap();
        expect_sent(&mut ca, i).await;
    }
    for _ in 0..5 {
        let d = expect_deliver(&mut cb).await;
        ack(&mut cb, d.inbox).await;
    }
    // A retry, and an id reused for other content: neither is stored.
    ca.send(&[text(5, b.account, "x")]).await.unwrap();
    expect_sent(&mut ca, 5).await;
    ca.send(&[text(5, b.account, "other")]).await.unwrap();
    expect(&mut ca, |m| matches!(m, Message::Error(e) if e.code == pb::ErrorCode::IdReused as i32).then_some(())).await;
    let m = tokio::task::spawn_blocking(move || scrape(port)).await.unwrap();
    assert_eq!(value(&m, "pipit_messages_sent_total"), 6.0, "five and the retry's answer: {m}");
    assert_eq!(value(&m, "pipit_messages_stored_total"), 5.0);
    assert_eq!(value(&m, "pipit_messages_deduplicated_total"), 1.0, "{m}");
    assert_eq!(value(&m, "pipit_messages_id_reused_total"), 1.0);
    assert_eq!(value(&m, "pipit_messages_delivered_total"), 5.0);
    assert!(m.contains("pipit_handshakes_total{pattern=\"xx\",result=\"ok\"} 2"), "{m}");
    assert!(value(&m, "pipit_group_commit_ops_count") >= 1.0);
    assert!(m.contains("pipit_group_commit_seconds"));
    assert_eq!(value(&m, "pipit_connections"), 2.0);
    assert!(value(&m, "pipit_received_bytes_total") > 0.0 && value(&m, "pipit_frames_out_total") > 0.0);
    assert!(m.contains("pipit_inbox_entries"), "{m}");
}

#[tokio::test]
async fn sigterm_tells_clients_and_exits_cleanly_within_the_grace_period() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::spawn(dir.path(), &[], &[]);
    let (_a, mut ca) = register(server.addr).await;
    let started = Instant::now();
    server.signal("-TERM");
    match ca.recv_timeout(T).await {
        Err(ClientError::Refused(pb::ErrorCode::ShuttingDown)) => {}
        other => panic!("expected SHUTTING_DOWN, got {other:?}"),
    }
    let status = tokio::task::spawn_blocking(move || {
        let s = server.child.wait().unwrap();
        (s, server)
    })
    .await
    .unwrap()
    .0;
    assert!(status.success(), "{status:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "exited within the grace period");
}

#[test]
fn readiness_is_reported_to_systemd_once_listening() {
    let dir = tempfile::tempdir().unwrap();
    let sock_path = dir.path().join("notify.sock");
    let sock = std::os::unix::net::UnixDatagram::bind(&sock_path).unwrap();
    sock.set_read_timeout(Some(T)).unwrap();
    let data = dir.path().join("data");
    let server = BinaryServer::spawn(&data, &[], &[("NOTIFY_SOCKET", sock_path.to_str().unwrap())]);
    let mut buf = [0u8; 256];
    let n = sock.recv(&mut buf).unwrap();
    assert_eq!(std::str::from_utf8(&buf[..n]).unwrap().trim_end(), "READY=1");
    // Ready means accepting: a connection works right away.
    std::net::TcpStream::connect(server.addr).unwrap();
}

/// One failed `accept` (here: out of file descriptors) used to disable
/// the admin socket until shutdown. It must keep serving once
/// descriptors are free again.
#[test]
fn the_admin_socket_keeps_serving_after_running_out_of_file_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Half-open connections are held, not timed out, during the test.
    let config = dir.path().join("pipit.toml");
    std::fs::write(&config, "[net]\nhandshake_timeout_secs = 300\n").unwrap();
    let server = BinaryServer::spawn_with_fd_limit(&data, 64, &["--config", config.to_str().unwrap()]);
    assert_eq!(pipit::admin::request(&data, "stats").unwrap().split_whitespace().next(), Some("online_devices"));
    // Exhaust the server's descriptors with connections it accepts and
    // holds (they never send a byte).
    let hold: Vec<std::net::TcpStream> = (0..80).map(|_| std::net::TcpStream::connect(server.addr).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    // This admin request finds no descriptor to accept with.
    let starved = {
        let data = data.clone();
        std::thread::spawn(move || pipit::admin::request(&data, "stats"))
    };
    std::thread::sleep(Duration::from_millis(500));
    drop(hold);
    let starved = starved.join().unwrap();
    let later = pipit::admin::request(&data, "stats");
    assert!(later.as_ref().is_ok_and(|a| a.starts_with("online_devices")), "after the shortage: {later:?}");
    assert!(starved.as_ref().is_ok_and(|a| a.starts_with("online_devices")), "during the shortage: {starved:?}");
}

#[tokio::test]
async fn metrics_count_group_sends_fan_out_entries_backlog_and_lag() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let server = BinaryServer::spawn(dir.path(), &["--metrics-listen", &format!("127.0.0.1:{port}")], &[]);
    let (_a, mut ca) = register(server.addr).await;
    let (b, _) = register(server.addr).await;
    let (c, _) = register(server.addr).await;
    let create = pb::GroupCreate { req: 1, name: Default::default(), members: vec![b.account, c.account], id: 0 };
    ca.send(&[create.into()]).await.unwrap();
    let g = expect(&mut ca, |m| match m {
        pipit_client::pipit_protocol::Message::GroupInfo(i) if i.req == 1 => Some(i.group),
        _ => None,
    })
    .await;
    for i in 1..=2 {
        ca.send(&[group_text(i, g, "x")]).await.unwrap();
        expect_sent(&mut ca, i).await;
    }
    // Three jobs (the notice, two messages) fan out; wait for them.
    let data = dir.path().to_path_buf();
    let deadline = Instant::now() + T;
    loop {
        let d = data.clone();
        let out = tokio::task::spawn_blocking(move || pipit::admin::request(&d, &format!("group {g}")).unwrap())
            .await
            .unwrap();
        if out.contains("fanout 0 jobs") {
            break;
        }
        assert!(Instant::now() < deadline, "{out}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = tokio::task::spawn_blocking(move || scrape(port)).await.unwrap();
    assert_eq!(value(&m, "pipit_group_sends_total"), 2.0, "{m}");
    assert_eq!(value(&m, "pipit_group_changes_total"), 1.0);
    // The notice to 3 devices, each message to the 2 others.
    assert_eq!(value(&m, "pipit_fanout_entries_total"), 7.0);
    assert_eq!(value(&m, "pipit_fanout_jobs_total"), 3.0);
    assert_eq!(value(&m, "pipit_fanout_lag_seconds_count"), 3.0);
    assert!(m.contains("pipit_fanout_backlog_jobs") && m.contains("pipit_fanout_backlog_members"), "{m}");
}

/// An operator's configuration file of the previous release (flat keys)
/// still starts the server with its settings, and stderr names each key's
/// new place once; a setting given both ways stops the start, naming both.
#[tokio::test]
async fn a_flat_config_file_still_works_and_the_log_names_each_keys_new_place() {
    use std::io::BufRead as _;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("pipit.toml");
    std::fs::write(&config, "registration = \"invite\"\n\n[net]\nhandshake_timeout_secs = 30\n").unwrap();
    let serve = || {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_pipit"));
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--shards", "1", "--data-dir"])
            .arg(dir.path().join("data"))
            .arg("--config")
            .arg(&config)
            .env("PIPIT_LOG", "warn");
        cmd
    };
    let mut child = serve().stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap();
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.get(..3), Some(&["pipit", "listening", "on"][..]), "{line:?}");
    let (addr, server_key): (std::net::SocketAddr, _) = (words[3].parse().unwrap(), words[6].parse().unwrap());
    // The flat `registration` is in force: no code, no account.
    let key = pipit_client::pipit_protocol::StaticKeypair::generate();
    let opts = pipit_client::ConnectOptions { server_key: Some(server_key), ..Default::default() };
    let err =
        pipit_client::Connection::connect(addr, &key, pipit_client::register("", "phone"), &opts).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(pb::ErrorCode::RegistrationClosed)), "{err}");
    child.kill().unwrap();
    child.wait().unwrap();
    let mut log = String::new();
    child.stderr.take().unwrap().read_to_string(&mut log).unwrap();
    assert_eq!(log.matches("config: `registration` is deprecated; use `[accounts] registration`").count(), 1, "{log}");
    assert!(!log.contains("handshake_timeout_secs"), "{log}");

    std::fs::write(&config, "registration = \"invite\"\n\n[accounts]\nregistration = \"open\"\n").unwrap();
    let out = serve().output().unwrap();
    assert!(!out.status.success(), "started with a setting given both ways");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("`registration` and `[accounts] registration` are the same setting"), "{err}");
}
