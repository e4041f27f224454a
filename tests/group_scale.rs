//! A 1,024-member group end to end: 1,024 accounts registered over real
//! handshakes, 100 members online and the rest offline. One send reaches
//! every online device once and every offline device at its next login;
//! "sent" arrives while the fan-out (made slow on purpose) has not
//! started; receipts reach the sender as counts; and 100 sends store 100
//! bodies, not 102,400.

mod common;

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use futures_util::stream::{self, StreamExt};
use pipit::model::DeviceAddr;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;
use tokio::sync::mpsc;

const MEMBERS: usize = 1_024;
const ONLINE: usize = 100;
const FLUSH_MS: u64 = 200;

/// What an online member's reader saw: (account, seq, is a message).
type Seen = (u64, u64, bool);

/// Reads an online member's connection, acking every entry and reading
/// every message (a READ receipt), and reports group entries.
async fn reader(mut c: Connection, out: mpsc::UnboundedSender<Seen>) {
    let me = c.login().account;
    loop {
        let Ok(m) = c.recv().await else { return };
        match m {
            Message::Deliver(d) if d.group != 0 => {
                let read = pb::Receipt {
                    kind: pb::ReceiptKind::Read as i32,
                    group: d.group,
                    through: d.seq,
                    ..Default::default()
                };
                c.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into(), read.into()]).await.unwrap();
                let _ = out.send((me, d.seq, true));
            }
            Message::GroupInfo(g) if g.inbox != 0 => {
                ack(&mut c, g.inbox).await;
                let _ = out.send((me, g.seq, false));
            }
            _ => {}
        }
    }
}

async fn wait_backlog_empty(s: &TestServer, group: u64) {
    let fanout = s.running.as_ref().unwrap().services().fanout.clone();
    let deadline = Instant::now() + Duration::from_secs(120);
    while fanout.backlog(Some(group), usize::MAX).await.unwrap().jobs > 0 {
        assert!(Instant::now() < deadline, "fan-out did not finish");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_1024_member_group_reaches_everyone_once_after_sent_with_one_stored_copy() {
    let s = TestServer::start(|c| {
        // A thousand registrations from one address: no per-source limit.
        c.net.handshake_rate_per_source = 0;
        c.groups.fanout_batch = 256;
        c.groups.receipt_flush_ms = FLUSH_MS;
    });
    let services = s.running.as_ref().unwrap().services().clone();
    let t0 = Instant::now();
    let (devices, mut conns) = register_many(s.addr, MEMBERS, 32, ONLINE + 1).await;
    eprintln!("registered {MEMBERS} accounts in {:?}", t0.elapsed());
    let mut sender = conns.remove(0);
    let me = devices[0].account;
    let members: Vec<u64> = devices[1..].iter().map(|d| d.account).collect();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let online: Vec<u64> = conns.iter().map(|c| c.login().account).collect();
    let readers: Vec<_> = conns.into_iter().map(|c| tokio::spawn(reader(c, tx.clone()))).collect();

    let create = pb::GroupCreate { req: 1, name: Bytes::from_static(b"everyone"), members, id: 0 };
    sender.send(&[create.into()]).await.unwrap();
    let info =
        expect(&mut sender, |m| if let Message::GroupInfo(g) = m { (g.req == 1).then_some(g) } else { None }).await;
    let g = info.group;
    assert_eq!(info.members.len(), MEMBERS);
    for _ in 0..ONLINE {
        let (_, seq, message) = seen.recv().await.unwrap();
        assert_eq!((seq, message), (1, false), "every online member hears of the group first");
    }
    wait_backlog_empty(&s, g).await;

    // The fan-out is made slow on purpose: it pauses 60 s before each
    // round. "Sent" must arrive while it has not even started.
    services.fanout.set_step_delay(Duration::from_secs(60));
    let sent_at = Instant::now();
    sender.send(&[group_text(1, g, "hello, everyone")]).await.unwrap();
    let sent = expect_sent(&mut sender, 1).await;
    let to_sent = sent_at.elapsed();
    let backlog = services.fanout.backlog(Some(g), usize::MAX).await.unwrap();
    assert_eq!((backlog.jobs, backlog.members), (1, MEMBERS as u64), "sent before the fan-out wrote anything");
    assert!(seen.try_recv().is_err(), "no member has the message yet");
    services.fanout.set_step_delay(Duration::ZERO);

    // Every online device gets it, once.
    let mut got: HashMap<u64, u32> = HashMap::new();
    while got.len() < ONLINE {
        let (account, seq, message) = tokio::time::timeout(T * 6, seen.recv()).await.unwrap().unwrap();
        assert_eq!((seq, message), (sent.seq, true));
        *got.entry(account).or_default() += 1;
    }
    let to_online = sent_at.elapsed();
    wait_backlog_empty(&s, g).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    if let Ok((account, seq, _)) = seen.try_recv() {
        panic!("member {account} got seq {seq} again");
    }
    assert!(got.values().all(|n| *n == 1) && online.iter().all(|a| got.contains_key(a)));
    eprintln!("sent after {to_sent:?}; every online device had it after {to_online:?}");

    // Every offline device gets the notice, then the message, at its next
    // login: exactly those two entries.
    let t1 = Instant::now();
    let offline: Vec<Device> = devices[ONLINE + 1..].to_vec();
    stream::iter(offline.iter())
        .map(|d| {
            let s = &s;
            async move {
                let mut c = login(s, d).await;
                assert_eq!(c.login().pending, 2, "member {}", d.account);
                let n = expect(&mut c, |m| if let Message::GroupInfo(g) = m { Some(g) } else { None }).await;
                assert_eq!((n.group, n.seq), (g, 1));
                let m = expect_deliver(&mut c).await;
                assert_eq!((m.group, m.seq, m.from, &m.payload[..]), (g, sent.seq, me, &b"hello, everyone"[..]));
                ack(&mut c, m.inbox).await;
                // The ack is applied before the next login of this device;
                // a ping round trip makes sure it was read.
                c.send(&[pb::Ping { id: 1 }.into()]).await.unwrap();
                expect(&mut c, |m| matches!(m, Message::Pong(_)).then_some(())).await;
            }
        })
        .buffer_unordered(32)
        .collect::<Vec<()>>()
        .await;
    eprintln!("{} offline devices logged in and got it in {:?}", offline.len(), t1.elapsed());

    // Receipts: counts, at most one per kind and flush, not one per member.
    let mut receipts = Vec::new();
    let (mut delivered, mut read) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(30);
    while delivered < MEMBERS as u32 - 1 || read < ONLINE as u32 {
        assert!(Instant::now() < deadline, "counts stalled at delivered {delivered}, read {read}");
        if let Message::Receipt(r) = sender.recv_timeout(T).await.unwrap() {
            ack(&mut sender, r.inbox).await;
            assert_eq!((r.group, r.seq), (g, sent.seq));
            if r.kind == pb::ReceiptKind::Delivered as i32 {
                assert!(r.count >= delivered, "counts only grow");
                delivered = r.count;
            } else {
                read = r.count;
            }
            receipts.push(Message::Receipt(r));
        }
    }
    let flushes = t0.elapsed().as_millis() as usize / FLUSH_MS as usize + 2;
    let bytes: usize = receipts.iter().map(Message::encoded_len).sum();
    eprintln!("{} receipts ({bytes} bytes of messages) instead of {}", receipts.len(), 2 * (MEMBERS - 1) + ONLINE);
    assert!(receipts.len() <= 2 * flushes, "at most one per kind and flush");
    assert!(receipts.len() < (MEMBERS - 1) / 4);
    for r in readers {
        r.abort();
    }

    // Storage: once everyone has acked, the bodies are gone; 100 more sends
    // to the (now offline) group store 100 bodies, however many members.
    let deadline = Instant::now() + Duration::from_secs(30);
    while services.groups.bodies(Some(g)).await.unwrap() != Default::default() {
        assert!(Instant::now() < deadline, "bodies left after every member acked");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let msgs: Vec<Message> = (2..=101).map(|i| group_text(i, g, &format!("message {i}"))).collect();
    sender.send(&msgs).await.unwrap();
    for i in 2..=101 {
        expect_sent(&mut sender, i).await;
    }
    let t2 = Instant::now();
    wait_backlog_empty(&s, g).await;
    eprintln!("100 fan-outs of {MEMBERS} members in {:?}", t2.elapsed());
    let bodies = services.groups.bodies(Some(g)).await.unwrap();
    assert_eq!((bodies.messages, bodies.notices, bodies.extras), (100, 0, 0), "stored 100 times, not 102,400");
    let mut entries = 0;
    for d in &devices[1..] {
        entries += services.inbox.depth(DeviceAddr::new(d.account, d.device)).await.unwrap();
    }
    assert_eq!(entries, 100 * (MEMBERS - 1), "one small reference per member device and message");
    eprintln!("bodies: {} bytes for 100 messages; {entries} inbox references", bodies.bytes);
}
