//! Several nodes, for real: an etcd of its own on a free loopback port and
//! three `pipit` processes, each with its own data directory; clients
//! over real TCP with real handshakes.

mod common;

use std::time::{Duration, Instant};

use common::cluster::{three_nodes, Etcd};
use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn accounts_are_created_with_ids_unique_across_nodes() {
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
