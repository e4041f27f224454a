//! What operators install beside the server, checked against the real
//! thing: the alert and recording rules (`deploy/prometheus/`) with
//! promtool, then a real Prometheus scraping a real two-node cluster
//! (real etcd) under a little load, with the rules loaded; every query of
//! the Grafana dashboard (`deploy/grafana/pipit.json`) runs through its
//! HTTP API, and every metric the dashboard and the rules name must be
//! exported by the running servers, so a renamed metric cannot silently
//! empty a panel or an alert.
//!
//! Nothing is skipped: without `promtool` and `prometheus` (Debian's
//! `prometheus` package) the tests fail and say to run `tools/dev deps`.

mod common;

#[path = "monitoring/prom.rs"]
mod prom;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::cluster::{Etcd, Node};
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use prom::{metric_names, referenced_metrics, scrape, tool, Prometheus};

fn deploy(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy").join(rel)
}

#[test]
fn promtool_checks_and_unit_tests_the_rules() {
    let promtool = tool("promtool");
    for args in [
        vec!["check", "rules", "pipit-rules.yml"],
        vec!["check", "config", "prometheus.yml"],
        vec!["test", "rules", "pipit-rules.test.yml"],
    ] {
        let out = std::process::Command::new(&promtool).args(&args).current_dir(deploy("prometheus")).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
        println!("promtool {}:\n{text}", args.join(" "));
        assert!(out.status.success(), "promtool {} failed:\n{text}", args.join(" "));
    }
}

/// The TOML of cluster node `id`: metrics on `metrics`, push wake-ups to
/// the local gateway at `gateway`.
fn config(dir: &Path, id: &str, port: u16, metrics: u16, etcd: &str, gateway: u16) -> String {
    let top = format!(
        "metrics_listen = \"127.0.0.1:{metrics}\"\n\n\
         [push]\n\
         gateway_url = \"http://127.0.0.1:{gateway}/_matrix/push/v1/notify\"\n\
         fcm_app_id = \"org.example.pipit\"\n\
         allow_private_endpoints = true\n\
         interval_secs = 1"
    );
    common::cluster::node_config(dir, id, port, etcd, &top)
}

/// Starts `pipit serve --config` on `cfg` as node `id`.
fn start(dir: &Path, id: &str, cfg: &str) -> Node {
    use std::io::BufRead as _;
    std::fs::create_dir_all(dir).unwrap();
    let path = dir.join("pipit.toml");
    std::fs::write(&path, cfg).unwrap();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipit"))
        .args(["serve", "--config"])
        .arg(&path)
        .env("PIPIT_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("start pipit");
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(words.get(..3), Some(&["pipit", "listening", "on"][..]), "node {id} did not start: {line:?}");
    Node {
        addr: words[3].parse().unwrap(),
        key: words[6].parse().unwrap(),
        child: Some(child),
        id: id.into(),
        dir: dir.into(),
    }
}

/// A push gateway on 127.0.0.1 that accepts every wake-up (the one stand-in
/// the rules allow); answers how many it got.
async fn gateway() -> (u16, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen = std::sync::Arc::new(AtomicUsize::new(0));
    let count = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            let count = count.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // The head, then as many bytes as it announces.
                loop {
                    let Ok(n) = s.read(&mut chunk).await else { return };
                    if n == 0 {
                        return;
                    }
                    buf.extend_from_slice(&chunk[..n]);
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else { continue };
                    let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                    let len: usize =
                        head.lines().find_map(|l| l.strip_prefix("content-length:")?.trim().parse().ok()).unwrap_or(0);
                    if buf.len() >= end + 4 + len {
                        break;
                    }
                }
                count.fetch_add(1, Ordering::Relaxed);
                let body = br#"{"rejected":[]}"#;
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(head.as_bytes()).await;
                let _ = s.write_all(body).await;
            });
        }
    });
    (port, seen)
}

async fn group_created(c: &mut pipit_client::Connection, req: u64) -> u64 {
    expect(c, |m| match m {
        Message::GroupInfo(g) if g.req == req => Some(g.group),
        Message::Error(e) if e.req == req => panic!("group create failed: {e:?}"),
        _ => None,
    })
    .await
}

/// A little of everything the dashboard shows: 1:1 on one node and across
/// the link, receipts, a group fan-out, a push wake-up for a device that
/// went away. Answers the one-to-one messages stored on n1.
async fn load(n1: SocketAddr, n2: SocketAddr) -> u64 {
    let (a, mut ca) = register(n1).await;
    let (b, mut cb) = register(n1).await;
    let (c, mut cc) = register(n1).await;
    let (remote, mut cr) = register(n2).await;
    // c takes a push token, then goes away: what it is sent wakes it.
    let token = pb::PushToken { platform: pb::PushPlatform::Fcm as i32, token: Bytes::from_static(b"tok-c"), req: 1 };
    assert!(matches!(call(&mut cc, token.into()).await, Message::Done(_)));
    drop(cc);
    let mut id = 0;
    for _ in 0..20 {
        id += 1;
        ca.send(&[text(id, b.account, "same node")]).await.unwrap();
        expect_sent(&mut ca, id).await;
    }
    for _ in 0..20 {
        let d = expect_deliver(&mut cb).await;
        ack(&mut cb, d.inbox).await;
    }
    for _ in 0..5 {
        id += 1;
        ca.send(&[text(id, remote.account, "across the link")]).await.unwrap();
        expect_sent(&mut ca, id).await;
    }
    for _ in 0..5 {
        let d = expect_deliver(&mut cr).await;
        ack(&mut cr, d.inbox).await;
    }
    mark_read(&mut cr, a.account, 5).await;
    id += 1;
    ca.send(&[text(id, c.account, "wake up")]).await.unwrap();
    expect_sent(&mut ca, id).await;
    let create =
        pb::GroupCreate { req: 2, name: Bytes::from_static(b"ops"), members: vec![b.account, c.account], id: 0 };
    ca.send(&[create.into()]).await.unwrap();
    let group = group_created(&mut ca, 2).await;
    id += 1;
    ca.send(&[group_text(id, group, "to the group")]).await.unwrap();
    expect_sent(&mut ca, id).await;
    // 20 + 5 + 1 one-to-one messages, the cross-node ones stored on n1
    // first (the group message counts in pipit_group_sends_total).
    26
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_a_cluster_under_load_and_finds_every_metric_the_dashboard_and_rules_use() {
    let prometheus = tool("prometheus");
    let etcd = Etcd::start();
    let root = tempfile::tempdir().unwrap();
    let (gw, wakeups) = gateway().await;
    let (p1, p2, m1, m2) = (free_port(), free_port(), free_port(), free_port());
    let n1 = start(&root.path().join("n1"), "n1", &config(&root.path().join("n1"), "n1", p1, m1, &etcd.endpoint, gw));
    let n2 = start(&root.path().join("n2"), "n2", &config(&root.path().join("n2"), "n2", p2, m2, &etcd.endpoint, gw));
    let prom = Prometheus::start(&prometheus, root.path(), &[m1, m2], &deploy("prometheus/pipit-rules.yml"));

    // Scraped once before the load, or rate() sees no increase.
    prom.until("count(up{job=\"pipit\"} == 1) == 2", Duration::from_secs(30)).await;
    let stored = load(n1.addr, n2.addr).await;
    let started = Instant::now();
    // Wait (bounded) until Prometheus has scraped the load, the group
    // fan-out is done and the wake-up went out.
    let want = format!("sum(pipit_messages_stored_total{{instance=\"127.0.0.1:{m1}\"}}) >= {stored}");
    prom.until(&want, Duration::from_secs(60)).await;
    prom.until("sum(pipit_group_sends_total) >= 1 and sum(pipit_fanout_jobs_total) >= 1", Duration::from_secs(60))
        .await;
    prom.until("sum(pipit_push_sent_total) >= 1", Duration::from_secs(60)).await;
    prom.until("min(pipit_node_link_up) == 1", Duration::from_secs(60)).await;
    // Two scrapes after the load for rate() and the recording rules.
    prom.until("max_over_time(instance:pipit_messages_stored:rate1m[5m]) > 0", Duration::from_secs(60)).await;
    println!(
        "prometheus saw the load after {:?}; gateway got {} wake-ups",
        started.elapsed(),
        wakeups.load(std::sync::atomic::Ordering::Relaxed)
    );

    for q in [
        "up{job=\"pipit\"}",
        "sum by (instance) (pipit_messages_stored_total)",
        "sum by (instance) (pipit_messages_delivered_total)",
        "instance:pipit_messages_stored:rate1m",
        "pipit_node_link_up",
        "sum by (instance, peer) (pipit_node_link_forwarded_total)",
        "histogram_quantile(0.99, sum by (instance, le) (rate(pipit_group_commit_seconds_bucket[1m])))",
        "pipit_push_sent_total",
        "pipit_cluster_etcd_up",
    ] {
        println!("{q}\n  {}", prom.show(q).await);
    }
    let ups = prom.query("up{job=\"pipit\"} == 1").await;
    assert_eq!(ups.len(), 2, "both nodes up: {ups:?}");
    let stored_n1 = prom.query(&format!("pipit_messages_stored_total{{instance=\"127.0.0.1:{m1}\"}}")).await;
    assert_eq!(prom::value(&stored_n1[0]), stored as f64, "{stored_n1:?}");

    // Every query of the dashboard, with its variables filled in, is valid
    // PromQL against live data; most return series.
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(deploy("grafana/pipit.json")).unwrap()).unwrap();
    let exprs = prom::dashboard_exprs(&dashboard);
    assert!(exprs.len() > 50, "{} queries", exprs.len());
    let mut empty = Vec::new();
    for e in &exprs {
        let q = e.replace("$job", "pipit").replace("$instance", ".*").replace("$__rate_interval", "1m");
        if prom.query(&q).await.is_empty() {
            empty.push(q);
        }
    }
    println!("dashboard: {} queries, {} with data; empty now: {empty:#?}", exprs.len(), exprs.len() - empty.len());

    // The rules load and evaluate without error; a healthy cluster fires
    // nothing.
    let rules = prom.api("/api/v1/rules").await;
    let mut count = 0;
    for g in rules["data"]["groups"].as_array().unwrap() {
        for r in g["rules"].as_array().unwrap() {
            count += 1;
            assert_eq!(r["health"], "ok", "rule {} does not evaluate: {}", r["name"], r["lastError"]);
        }
    }
    assert_eq!(count, 23, "every rule of pipit-rules.yml is loaded");
    let alerts = prom.api("/api/v1/alerts").await;
    let firing: Vec<_> =
        alerts["data"]["alerts"].as_array().unwrap().iter().filter(|a| a["state"] == "firing").collect();
    assert!(firing.is_empty(), "a healthy cluster fires alerts: {firing:#?}");

    // Every metric the dashboard and the rules name is exported by the
    // running nodes.
    let mut exported = BTreeSet::new();
    for port in [m1, m2] {
        exported.extend(metric_names(&tokio::task::spawn_blocking(move || scrape(port)).await.unwrap()));
    }
    let mut referenced = referenced_metrics(&std::fs::read_to_string(deploy("grafana/pipit.json")).unwrap());
    referenced.extend(referenced_metrics(&std::fs::read_to_string(deploy("prometheus/pipit-rules.yml")).unwrap()));
    let missing: Vec<_> = referenced.difference(&exported).collect();
    assert!(missing.is_empty(), "the dashboard or the rules use metrics no running server exports: {missing:?}");
    let unused: Vec<_> = exported.iter().filter(|n| !referenced.iter().any(|r| r.starts_with(n.as_str()))).collect();
    println!("{} metrics referenced, all exported; exported but not on the dashboard: {unused:?}", referenced.len());
    drop((n1, n2));
}
