//! The real server binary, killed with SIGKILL right after it said "sent",
//! loses nothing and delivers everything once after a restart.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;
use pipit_client::pipit_protocol::PublicKey;

struct Server {
    child: Child,
    addr: SocketAddr,
    key: PublicKey,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn spawn(dir: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_pipit"))
        .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1", "--data-dir"])
        .arg(dir)
        .env("PIPIT_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start pipit");
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
    // "pipit listening on ADDR server key KEY"
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(&words[..3], ["pipit", "listening", "on"], "{line}");
    Server { addr: words[3].parse().unwrap(), key: words[6].parse().unwrap(), child }
}

#[tokio::test]
async fn nothing_acknowledged_is_lost_across_repeated_sigkills() {
    const ROUNDS: u64 = 3;
    const PER_ROUND: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let mut server = spawn(dir.path());
    let (a, ca) = register(server.addr).await;
    let (b, cb) = register(server.addr).await;
    drop((ca, cb));

    let mut sent = Vec::new();
    for round in 0..ROUNDS {
        let mut ca = login_at(server.addr, server.key, &a).await;
        let ids: Vec<u64> = (1..=PER_ROUND).map(|i| round * PER_ROUND + i).collect();
        let msgs: Vec<_> = ids.iter().map(|&i| text(i, b.account, &format!("m{i}"))).collect();
        ca.send(&msgs).await.unwrap();
        for &i in &ids {
            sent.push(expect_sent(&mut ca, i).await);
        }
        // The moment the last "sent" is in: SIGKILL, no chance to flush.
        server.child.kill().unwrap();
        server.child.wait().unwrap();
        drop(server);
        server = spawn(dir.path());
        // A retry after the crash is still recognised.
        let mut ca = login_at(server.addr, server.key, &a).await;
        let last = *ids.last().unwrap();
        ca.send(&[text(last, b.account, &format!("m{last}"))]).await.unwrap();
        assert_eq!(&expect_sent(&mut ca, last).await, sent.last().unwrap());
    }

    let mut cb = login_at(server.addr, server.key, &b).await;
    assert_eq!(u64::from(cb.login().pending), (ROUNDS * PER_ROUND).min(64));
    for (i, s) in sent.iter().enumerate() {
        let d = expect_deliver(&mut cb).await;
        assert_eq!(d.seq, s.seq);
        assert_eq!(&d.payload[..], format!("m{}", i + 1).as_bytes());
        ack(&mut cb, d.inbox).await;
    }
    quiet(&mut cb, std::time::Duration::from_millis(500)).await;
}
