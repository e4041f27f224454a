//! The real server binary, killed with SIGKILL right after it said "sent",
//! loses nothing and delivers everything once after a restart.

mod common;

use common::*;

#[tokio::test]
async fn nothing_acknowledged_is_lost_across_repeated_sigkills() {
    const ROUNDS: u64 = 3;
    const PER_ROUND: u64 = 10;
    let dir = tempfile::tempdir().unwrap();
    let mut server = BinaryServer::spawn(dir.path(), &[], &[]);
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
        server = BinaryServer::spawn(dir.path(), &[], &[]);
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
