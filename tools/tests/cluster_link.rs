//! A node link through the link emulator: cut, then stalled past the
//! link's dead-peer timeout, then restored, while a sender on one node
//! keeps sending to an account on the other. Two in-process nodes with a
//! real etcd, real RocksDB and real handshakes; the link between them runs
//! through `pipit-linkem`'s proxy.

#[path = "../../tests/common/etcd.rs"]
mod etcd;

use std::time::{Duration, Instant};

use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, StaticKeypair};
use pipit_client::{ConnectOptions, Connection};
use pipit_tools::linkem::{Link, Proxy};

const T: Duration = Duration::from_secs(20);

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn node(dir: &std::path::Path, id: &str, etcd: &str, link_listen: u16, link_advertise: u16) -> pipit::Running {
    let port = free_port();
    let cfg = pipit::Config {
        listen: format!("127.0.0.1:{port}").parse().unwrap(),
        data_dir: dir.to_path_buf(),
        shards: 1,
        cluster: Some(pipit::config::ClusterConfig {
            node_id: id.into(),
            advertise: format!("127.0.0.1:{port}"),
            link_listen: format!("127.0.0.1:{link_listen}").parse().unwrap(),
            link_advertise: format!("127.0.0.1:{link_advertise}"),
            etcd_endpoints: vec![etcd.into()],
            etcd_prefix: "/pipit".into(),
            lease_secs: 30,
            etcd_timeout_secs: 5,
            outbound_max: 100_000,
        }),
        ..pipit::Config::default()
    };
    pipit::start(cfg).unwrap()
}

async fn connect(
    r: &pipit::Running,
    key: &StaticKeypair,
    hello: pipit_client::pipit_protocol::handshake::Hello,
) -> Connection {
    let opts = ConnectOptions { server_key: Some(r.public_key), ..ConnectOptions::default() };
    Connection::connect(r.local_addr, key, hello, &opts).await.unwrap()
}

async fn next(c: &mut Connection) -> Message {
    c.recv_timeout(T).await.unwrap_or_else(|e| panic!("waiting: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cut_and_stalled_node_link_loses_nothing_and_doubles_nothing() {
    let etcd = etcd::Etcd::start();
    let root = tempfile::tempdir().unwrap();
    // n1 dials n2 (ids in order), through the proxy: n2 advertises it.
    let (n2_link, proxy_port) = (free_port(), free_port());
    let proxy = Proxy::start(
        format!("127.0.0.1:{proxy_port}").parse().unwrap(),
        format!("127.0.0.1:{n2_link}").parse().unwrap(),
        Link::mobile(Duration::from_millis(20), 0),
        Link::mobile(Duration::from_millis(20), 0),
    )
    .await
    .unwrap();
    let n1_link = free_port();
    let n1 = node(&root.path().join("n1"), "n1", &etcd.endpoint, n1_link, n1_link);
    let n2 = node(&root.path().join("n2"), "n2", &etcd.endpoint, n2_link, proxy_port);

    let (ka, kb) = (StaticKeypair::generate(), StaticKeypair::generate());
    let mut a = connect(&n1, &ka, pipit_client::register("", "a")).await;
    let mut b = connect(&n2, &kb, pipit_client::register("", "b")).await;
    let to = b.login().account;

    const N: u64 = 60;
    let sender = tokio::spawn(async move {
        for id in 1..=N {
            let send = pb::Send { id, to, payload: bytes::Bytes::from(format!("m{id}")), ..Default::default() };
            a.send(&[send.into()]).await.unwrap();
            loop {
                match next(&mut a).await {
                    Message::Sent(s) if s.id == id => break,
                    Message::Error(e) if e.id == id => panic!("send {id} refused: {e:?}"),
                    _ => {}
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        a
    });
    let started = Instant::now();
    let mut got = Vec::new();
    let mut cut = false;
    let mut stalled_at = None;
    while got.len() < N as usize {
        // Cut the link after a few messages; then stall it for longer
        // than a link stays up without hearing anything (10 s).
        if !cut && got.len() >= 10 {
            proxy.cut();
            cut = true;
        }
        if cut && stalled_at.is_none() && got.len() >= 20 {
            proxy.stall(true);
            stalled_at = Some(Instant::now());
        }
        if stalled_at.is_some_and(|t| t.elapsed() > Duration::from_secs(12)) {
            proxy.stall(false);
        }
        match tokio::time::timeout(Duration::from_millis(500), b.recv()).await {
            Ok(Ok(Message::Deliver(d))) => {
                b.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into()]).await.unwrap();
                got.push(String::from_utf8(d.payload.to_vec()).unwrap());
            }
            Ok(Ok(_)) | Err(_) => {}
            Ok(Err(e)) => panic!("b: {e}"),
        }
        assert!(started.elapsed() < Duration::from_secs(90), "only {} of {N} arrived: {got:?}", got.len());
    }
    proxy.stall(false);
    let _a = sender.await.unwrap();
    // Nothing more comes: nothing was doubled.
    match tokio::time::timeout(Duration::from_secs(2), b.recv()).await {
        Err(_) => {}
        Ok(other) => panic!("after all {N}: {other:?}"),
    }
    let want: Vec<String> = (1..=N).map(|i| format!("m{i}")).collect();
    assert_eq!(got, want, "every message once, in order");
    assert!(proxy.stats().cuts.load(std::sync::atomic::Ordering::Relaxed) >= 1);
    n1.shutdown(Duration::from_secs(2));
    n2.shutdown(Duration::from_secs(2));
}
