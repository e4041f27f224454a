//! `kill -9` of the real binary in the middle of a 1,024-member fan-out:
//! after a restart the fan-out resumes from its last committed step, and
//! every member device gets the message exactly once.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::stream::{self, StreamExt};
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;

const MEMBERS: usize = 1_024;

/// (jobs, members to reach) from `pipit admin group ID`.
fn backlog(data: &std::path::Path, group: u64) -> (u64, u64) {
    let out = pipit::admin::request(data, &format!("group {group}")).unwrap();
    let line = out.lines().find(|l| l.starts_with("fanout ")).unwrap_or_else(|| panic!("{out}"));
    let words: Vec<&str> = line.split_whitespace().collect();
    (words[1].parse().unwrap(), words[3].parse().unwrap())
}

async fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_killed_half_way_resumes_and_every_member_device_gets_the_message_once() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    // Slow on purpose, so that the kill lands in the middle: 8 members a
    // step, 20 ms between steps.
    let slow = dir.path().join("slow.toml");
    // A thousand logins from one address: the per-source admission limit
    // (for hostile sources) is off, as for a bulk loader.
    std::fs::write(
        &slow,
        "[net]\nhandshake_rate_per_source = 0\n[groups]\nfanout_batch = 8\nfanout_step_delay_ms = 20\n",
    )
    .unwrap();
    let server = BinaryServer::spawn(&data, &["--config", slow.to_str().unwrap()], &[]);
    let (devices, mut conns) = register_many(server.addr, MEMBERS, 32, 4).await;
    // Three members have a second device.
    let mut extra = Vec::new();
    for c in conns.iter_mut().skip(1) {
        let key = pipit_client::pipit_protocol::StaticKeypair::generate();
        let req = pb::LinkDevice {
            req: 1,
            key: bytes::Bytes::copy_from_slice(key.public().as_bytes()),
            name: "tablet".into(),
        };
        c.send(&[req.into()]).await.unwrap();
        let device = expect(c, |m| if let Message::Linked(l) = m { Some(l.device) } else { None }).await;
        extra.push(Device { key, account: c.login().account, device });
    }
    let mut sender = conns.remove(0);
    drop(conns);
    let members: Vec<u64> = devices[1..].iter().map(|d| d.account).collect();
    sender
        .send(&[pb::GroupCreate { req: 1, name: bytes::Bytes::from_static(b"all"), members, id: 0 }.into()])
        .await
        .unwrap();
    let g = expect(&mut sender, |m| if let Message::GroupInfo(i) = m { (i.req == 1).then_some(i.group) } else { None })
        .await;
    wait_until("the group's notice to be fanned out", || backlog(&data, g).0 == 0).await;

    sender.send(&[group_text(1, g, "through a crash")]).await.unwrap();
    let sent = expect_sent(&mut sender, 1).await;
    // Half way: some members reached, some not.
    let mut at_kill = (0, 0);
    wait_until("the fan-out to be under way", || {
        at_kill = backlog(&data, g);
        at_kill.0 == 1 && at_kill.1 > 64 && at_kill.1 <= MEMBERS as u64 / 2
    })
    .await;
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    eprintln!("killed with {} of {MEMBERS} members still to reach", at_kill.1);
    drop(server);
    drop(sender);

    // Restarted at full speed: the job resumes from its durable cursor.
    let unlimited = dir.path().join("unlimited.toml");
    std::fs::write(&unlimited, "[net]\nhandshake_rate_per_source = 0\n").unwrap();
    let server = BinaryServer::spawn(&data, &["--config", unlimited.to_str().unwrap()], &[]);
    let after = backlog(&data, g);
    assert!(after.0 == 0 || after.1 <= at_kill.1, "resumed from the last commit, not from the start: {after:?}");
    wait_until("the fan-out to finish after the restart", || backlog(&data, g).0 == 0).await;
    let everyone: Vec<Device> = devices[1..].iter().cloned().chain(extra).collect();
    let addr = server.addr;
    let key = server.key;
    stream::iter(everyone.iter())
        .map(|d| async move {
            let mut c = login_at(addr, key, d).await;
            let entries = c.login().pending;
            let n = expect(&mut c, |m| if let Message::GroupInfo(i) = m { Some(i) } else { None }).await;
            let m = expect_deliver(&mut c).await;
            assert_eq!(entries, 2, "device {}/{}: exactly the notice and the message", d.account, d.device);
            assert_eq!((n.group, n.seq), (g, 1));
            assert_eq!((m.group, m.seq, &m.payload[..]), (g, sent.seq, &b"through a crash"[..]));
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
}
