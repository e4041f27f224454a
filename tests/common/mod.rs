//! Test helpers: a real server (in this process, or the real binary) on
//! 127.0.0.1 with RocksDB in a temporary directory, and real clients.
#![allow(dead_code, unreachable_pub)]

pub mod cluster;
pub mod etcd;
pub mod writer;

use std::time::Duration;

use bytes::Bytes;
use pipit::Config;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey, StaticKeypair};
use pipit_client::{ClientError, ConnectOptions, Connection};

pub const T: Duration = Duration::from_secs(10);

pub struct TestServer {
    pub running: Option<pipit::Running>,
    pub dir: tempfile::TempDir,
    pub addr: std::net::SocketAddr,
    pub key: PublicKey,
    pub cfg: Config,
}

impl TestServer {
    pub fn start(tweak: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().to_path_buf(),
            shards: 2,
            ..Config::default()
        };
        tweak(&mut cfg);
        let running = pipit::start(cfg.clone()).unwrap();
        Self { addr: running.local_addr, key: running.public_key, running: Some(running), dir, cfg }
    }

    /// Stops the server (its data stays).
    pub fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(2));
        }
    }

    /// Starts it again with the same data and configuration, on a new
    /// port: between the stop and the start, a connection of another test
    /// may have been given the old port as its local one.
    pub fn restart_same(&mut self) {
        self.stop();
        let mut cfg = self.cfg.clone();
        cfg.listen = "127.0.0.1:0".parse().unwrap();
        let running = pipit::start(cfg).unwrap();
        self.addr = running.local_addr;
        self.running = Some(running);
    }

    /// Stops the server gracefully and starts it again on the same data
    /// directory (a new port).
    pub fn restart_with(&mut self, tweak: impl FnOnce(&mut Config)) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(2));
        }
        let mut cfg = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: self.dir.path().to_path_buf(),
            shards: 2,
            ..Config::default()
        };
        tweak(&mut cfg);
        let running = pipit::start(cfg).unwrap();
        self.addr = running.local_addr;
        self.key = running.public_key;
        self.running = Some(running);
    }

    pub fn opts(&self) -> ConnectOptions {
        ConnectOptions { server_key: Some(self.key), ..ConnectOptions::default() }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown(Duration::from_secs(2));
        }
    }
}

/// A device: its key and, once registered, its ids.
#[derive(Clone)]
pub struct Device {
    pub key: StaticKeypair,
    pub account: u64,
    pub device: u32,
}

/// Registers a new account over XX (first contact) and returns its device.
pub async fn register(addr: std::net::SocketAddr) -> (Device, Connection) {
    let key = StaticKeypair::generate();
    let conn =
        Connection::connect(addr, &key, pipit_client::register("", "phone"), &ConnectOptions::default()).await.unwrap();
    let d = Device { key, account: conn.login().account, device: conn.login().device };
    (d, conn)
}

/// Logs a device in over IK.
pub async fn login(server: &TestServer, d: &Device) -> Connection {
    login_at(server.addr, server.key, d).await
}

pub async fn login_at(addr: std::net::SocketAddr, key: PublicKey, d: &Device) -> Connection {
    let opts = ConnectOptions { server_key: Some(key), ..ConnectOptions::default() };
    Connection::connect(addr, &d.key, pipit_client::login(d.account, d.device, 0), &opts).await.unwrap()
}

/// Links a new device to `owner`'s account and returns it.
pub async fn link(server: &TestServer, owner: &mut Connection, req: u64) -> Device {
    let key = StaticKeypair::generate();
    owner
        .send(&[
            pb::LinkDevice { req, key: Bytes::copy_from_slice(key.public().as_bytes()), name: "tablet".into() }.into()
        ])
        .await
        .unwrap();
    let device = match owner.recv_timeout(T).await.unwrap() {
        Message::Linked(l) if l.req == req => l.device,
        other => panic!("expected Linked, got {other:?}"),
    };
    let d = Device { key, account: owner.login().account, device };
    // The new device logs in knowing only its key.
    let opts = server.opts();
    let c = Connection::connect(server.addr, &d.key, pipit_client::login(0, 0, 0), &opts).await.unwrap();
    assert_eq!((c.login().account, c.login().device), (d.account, d.device));
    d
}

pub fn text(id: u64, to: u64, body: &str) -> Message {
    pb::Send { id, to, payload: Bytes::copy_from_slice(body.as_bytes()), ..Default::default() }.into()
}

/// Receives until `pick` returns something, skipping what it declines.
pub async fn expect<T>(c: &mut Connection, mut pick: impl FnMut(Message) -> Option<T>) -> T {
    loop {
        let m = c.recv_timeout(T).await.unwrap_or_else(|e| panic!("waiting: {e}"));
        if let Some(t) = pick(m) {
            return t;
        }
    }
}

pub async fn expect_deliver(c: &mut Connection) -> pb::Deliver {
    expect(c, |m| match m {
        Message::Deliver(d) => Some(d),
        _ => None,
    })
    .await
}

pub async fn expect_sent(c: &mut Connection, id: u64) -> pb::Sent {
    expect(c, |m| match m {
        Message::Sent(s) if s.id == id => Some(s),
        Message::Error(e) if e.id == id => panic!("send {id} failed: {e:?}"),
        _ => None,
    })
    .await
}

/// Everything that arrives before the answer to a `Ping` sent now: by
/// SPEC.md 4, all that the server had queued for this connection.
pub async fn until_pong(c: &mut Connection, id: u64) -> Vec<Message> {
    c.send(&[pb::Ping { id }.into()]).await.unwrap();
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(T).await.unwrap_or_else(|e| panic!("waiting for pong {id}: {e}")) {
            Message::Pong(p) if p.id == id => return got,
            m => got.push(m),
        }
    }
}

/// Picks a receipt of `kind` (for [`expect`]).
pub fn receipt(kind: pb::ReceiptKind) -> impl FnMut(Message) -> Option<pb::Receipt> {
    move |m| match m {
        Message::Receipt(r) if r.kind == kind as i32 => Some(r),
        _ => None,
    }
}

/// Sends a read receipt: `peer`'s messages read through `through`.
pub async fn mark_read(c: &mut Connection, peer: u64, through: u64) {
    let r = pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer, through, ..Default::default() };
    c.send(&[r.into()]).await.unwrap();
}

pub async fn ack(c: &mut Connection, through: u64) {
    c.send(&[pb::Ack { through, ids: vec![] }.into()]).await.unwrap();
}

/// Nothing arrives within `d` (besides what `allow` accepts).
pub async fn quiet(c: &mut Connection, d: Duration) {
    match c.recv_timeout(d).await {
        Err(ClientError::Timeout) => {}
        other => panic!("expected silence, got {other:?}"),
    }
}

/// The real `pipit` binary, started on 127.0.0.1 with a data directory.
pub struct BinaryServer {
    pub child: std::process::Child,
    pub addr: std::net::SocketAddr,
    pub key: PublicKey,
}

impl BinaryServer {
    pub fn spawn(dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_cmd(std::process::Command::new(env!("CARGO_BIN_EXE_pipit")), dir, args, env)
    }

    /// The binary with its file-descriptor limit lowered to `nofile`.
    pub fn spawn_with_fd_limit(dir: &std::path::Path, nofile: u32, args: &[&str]) -> Self {
        let mut cmd = std::process::Command::new("sh");
        cmd.args(["-c", &format!("ulimit -n {nofile} && exec \"$0\" \"$@\""), env!("CARGO_BIN_EXE_pipit")]);
        Self::spawn_cmd(cmd, dir, args, &[])
    }

    fn spawn_cmd(mut cmd: std::process::Command, dir: &std::path::Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        use std::io::BufRead as _;
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--shards", "1", "--data-dir"])
            .arg(dir)
            .args(args)
            .env("PIPIT_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().expect("start pipit");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "pipit listening on ADDR server key KEY"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(&words[..3], ["pipit", "listening", "on"], "{line}");
        Self { addr: words[3].parse().unwrap(), key: words[6].parse().unwrap(), child }
    }

    pub fn signal(&self, sig: &str) {
        let ok = std::process::Command::new("kill").args([sig, &self.child.id().to_string()]).status().unwrap();
        assert!(ok.success());
    }
}

impl Drop for BinaryServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A free port on 127.0.0.1.
///
/// Taken below Linux's ephemeral range (32768-60999 by default): a port the
/// kernel hands out for `bind(0)` can be handed out again, at once, as the
/// local port of any test's outgoing connection, and a server started on it
/// a moment later finds it in use (seen in CI). Ports here come from a
/// per-process counter, so threads of one test binary never share one, and
/// are checked free before they are returned.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const LOW: u32 = 20_000;
    const SPAN: u32 = 12_000;
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7_919) % SPAN,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
    for _ in 0..SPAN {
        let port = (LOW + NEXT.fetch_add(1, Ordering::AcqRel) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {LOW}..{}", LOW + SPAN)
}

/// Registers `n` accounts over real XX handshakes, `parallel` at a time;
/// returns them in account order with the connections of the first
/// `keep` (the rest are closed).
pub async fn register_many(
    addr: std::net::SocketAddr,
    n: usize,
    parallel: usize,
    keep: usize,
) -> (Vec<Device>, Vec<Connection>) {
    use futures_util::stream::{self, StreamExt};
    let mut all: Vec<(Device, Connection)> =
        stream::iter(0..n).map(|_| register(addr)).buffer_unordered(parallel).collect().await;
    all.sort_by_key(|(d, _)| d.account);
    let mut devices = Vec::with_capacity(n);
    let mut conns = Vec::with_capacity(keep);
    for (i, (d, c)) in all.into_iter().enumerate() {
        devices.push(d);
        if i < keep {
            conns.push(c);
        }
    }
    (devices, conns)
}

/// A request answered with `Done` (Ok) or an `Error` for its `req`.
pub async fn done(c: &mut Connection, m: Message, req: u64) -> Result<(), pb::ErrorCode> {
    c.send(&[m]).await.unwrap();
    expect(c, |m| match m {
        Message::Done(d) if d.req == req => Some(Ok(())),
        Message::Error(e) if e.req == req => Some(Err(pb::ErrorCode::try_from(e.code).unwrap())),
        _ => None,
    })
    .await
}

/// A key upload for the directory with a valid signed prekey: identity
/// from `seed`, one-time prekeys with the given ids.
pub fn key_upload(req: u64, seed: u8, ids: impl IntoIterator<Item = u32>) -> pb::KeysUpload {
    use ed25519_dalek::Signer as _;
    let sk = ed25519_dalek::SigningKey::from_bytes(&[seed; 32]);
    let mut identity = sk.verifying_key().to_bytes().to_vec();
    identity.extend_from_slice(&[seed ^ 0x55; 32]);
    let key = vec![seed ^ 0xaa; 32];
    let msg = pipit_client::pipit_protocol::e2e::signed_prekey_message(&identity, 1, &key);
    let signature = Bytes::copy_from_slice(&sk.sign(&msg).to_bytes());
    pb::KeysUpload {
        req,
        identity: Bytes::from(identity),
        signed: Some(pb::SignedPreKey { id: 1, key: Bytes::from(key), signature }),
        one_time: one_time_keys(ids),
    }
}

/// One-time prekeys with these ids (the key bytes say the id).
pub fn one_time_keys(ids: impl IntoIterator<Item = u32>) -> Vec<pb::PreKey> {
    ids.into_iter()
        .map(|id| {
            let mut key = [0u8; 32];
            key[..4].copy_from_slice(&id.to_be_bytes());
            pb::PreKey { id, key: Bytes::copy_from_slice(&key) }
        })
        .collect()
}

/// Sends a request and returns the answer carrying its `req`.
pub async fn call(c: &mut Connection, m: Message) -> Message {
    let req = m.request_id().expect("a request");
    c.send(&[m]).await.unwrap();
    expect(c, |m| {
        let answers = match &m {
            Message::Done(d) => d.req,
            Message::Error(e) => e.req,
            Message::KeysResult(r) => r.req,
            Message::Linked(l) => l.req,
            Message::DeviceList(l) => l.req,
            _ => 0,
        };
        (answers == req).then_some(m)
    })
    .await
}

pub fn group_text(id: u64, group: u64, body: &str) -> Message {
    pb::Send { id, group, payload: Bytes::copy_from_slice(body.as_bytes()), ..Default::default() }.into()
}

/// The error code of an `Error` answer.
pub fn code(m: &Message) -> pb::ErrorCode {
    match m {
        Message::Error(e) => pb::ErrorCode::try_from(e.code).unwrap(),
        other => panic!("expected an Error, got {other:?}"),
    }
}
