//! Groups end to end over real TCP on 127.0.0.1, with RocksDB in a temp
//! dir and real Noise handshakes: requests and their errors, order with
//! concurrent senders, membership changes racing with sends, and a
//! 1,024-member group (fan-out after "sent", online and offline members,
//! one stored body per message, coalesced receipts).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;

fn create(req: u64, members: &[u64]) -> Message {
    pb::GroupCreate { req, name: Bytes::from_static(b"friends"), members: members.to_vec(), id: 0 }.into()
}

async fn created(c: &mut Connection, req: u64) -> pb::GroupInfo {
    expect(c, |m| match m {
        Message::GroupInfo(g) if g.req == req => Some(g),
        Message::Error(e) if e.req == req => panic!("create failed: {e:?}"),
        _ => None,
    })
    .await
}

/// The next change notice (an inbox entry), acked.
async fn notice(c: &mut Connection) -> pb::GroupInfo {
    let g = expect(c, |m| match m {
        Message::GroupInfo(g) if g.req == 0 => Some(g),
        _ => None,
    })
    .await;
    assert_ne!(g.inbox, 0, "a change notice is an inbox entry");
    ack(c, g.inbox).await;
    g
}

async fn error_for(c: &mut Connection, m: Message, req: u64, id: u64) -> pb::ErrorCode {
    c.send(&[m]).await.unwrap();
    let code = expect(c, |m| match m {
        Message::Error(e) if e.req == req && e.id == id => Some(e.code),
        Message::Done(d) if d.req == req && req != 0 => panic!("expected an error, got Done"),
        Message::Sent(s) if s.id == id && id != 0 => panic!("expected an error, got Sent"),
        _ => None,
    })
    .await;
    // The connection stays usable.
    c.send(&[pb::Ping { id: 4242 }.into()]).await.unwrap();
    expect(c, |m| matches!(m, Message::Pong(p) if p.id == 4242).then_some(())).await;
    pb::ErrorCode::try_from(code).unwrap()
}

#[tokio::test]
async fn group_requests_and_bad_input_over_tcp() {
    let s = TestServer::start(|c| c.groups.max_members = 4);
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let (c, mut cc) = register(s.addr).await;
    let (d, mut cd) = register(s.addr).await;
    let (e, _) = register(s.addr).await;

    ca.send(&[create(1, &[b.account, c.account])]).await.unwrap();
    let info = created(&mut ca, 1).await;
    let g = info.group;
    assert_eq!(
        (info.members.clone(), info.admins.clone(), info.version),
        (vec![a.account, b.account, c.account], vec![a.account], 1)
    );
    assert_eq!(&info.name[..], b"friends");
    for conn in [&mut ca, &mut cb, &mut cc] {
        let n = notice(conn).await;
        assert_eq!((n.group, n.version, n.seq, n.by, n.members.len()), (g, 1, 1, a.account, 3));
    }

    // Bad input: a specific code each, nothing changed, connection usable.
    use pb::ErrorCode::*;
    let add = |req, group, members: &[u64]| pb::GroupAdd { req, group, members: members.to_vec() }.into();
    assert_eq!(error_for(&mut ca, create(2, &[b.account, b.account]), 2, 0).await, BadRequest);
    assert_eq!(error_for(&mut ca, create(3, &[999]), 3, 0).await, NotFound);
    assert_eq!(error_for(&mut ca, create(4, &[b.account, c.account, d.account, e.account]), 4, 0).await, TooLarge);
    assert_eq!(error_for(&mut ca, add(5, 0, &[d.account]), 5, 0).await, BadRequest);
    assert_eq!(error_for(&mut ca, add(6, 99, &[d.account]), 6, 0).await, NotFound);
    assert_eq!(error_for(&mut ca, add(7, g, &[d.account, d.account]), 7, 0).await, BadRequest);
    assert_eq!(error_for(&mut ca, add(8, g, &[d.account, e.account]), 8, 0).await, TooLarge);
    assert_eq!(error_for(&mut cb, add(9, g, &[d.account]), 9, 0).await, Forbidden, "b is no admin");
    assert_eq!(error_for(&mut cd, pb::GroupLeave { req: 10, group: g }.into(), 10, 0).await, Forbidden);
    assert_eq!(error_for(&mut cd, group_text(1, g, "let me in"), 0, 1).await, Forbidden, "d is no member");
    assert_eq!(error_for(&mut ca, group_text(2, 77, "?"), 0, 2).await, NotFound);
    assert_eq!(error_for(&mut ca, group_text(3, 0, "?"), 0, 3).await, BadRequest);
    ca.send(&[pb::GroupListRequest { req: 11, after: 0 }.into()]).await.unwrap();
    let list = expect(&mut ca, |m| if let Message::GroupList(l) = m { Some(l) } else { None }).await;
    assert_eq!((list.req, list.groups.len(), list.groups[0].version, list.more), (11, 1, 1, false), "nothing changed");

    // d joins: every member device, d's included, hears it in order.
    assert_eq!(done(&mut ca, add(12, g, &[d.account]), 12).await, Ok(()));
    for conn in [&mut ca, &mut cb, &mut cc, &mut cd] {
        let n = notice(conn).await;
        assert_eq!((n.version, n.seq, n.members.len()), (2, 2, 4));
    }
    ca.send(&[group_text(4, g, "welcome d")]).await.unwrap();
    let sent = expect_sent(&mut ca, 4).await;
    assert_eq!(sent.seq, 3);
    for conn in [&mut cb, &mut cc, &mut cd] {
        let m = expect_deliver(conn).await;
        assert_eq!((m.group, m.seq, m.from, &m.payload[..]), (g, 3, a.account, &b"welcome d"[..]));
        ack(conn, m.inbox).await;
    }
    // A retry (the answer was lost) gets the original Sent, and nobody gets
    // the message twice: b's next group entry is the next change.
    ca.send(&[group_text(4, g, "welcome d")]).await.unwrap();
    assert_eq!(expect_sent(&mut ca, 4).await, sent);

    // c is removed: it hears that, and can no longer send.
    let remove = pb::GroupRemove { req: 13, group: g, members: vec![c.account] };
    assert_eq!(done(&mut ca, remove.into(), 13).await, Ok(()));
    let next = expect(&mut cb, |m| match m {
        Message::Deliver(d) => Some(Err(d.seq)),
        Message::GroupInfo(n) if n.inbox != 0 => Some(Ok(n.seq)),
        _ => None,
    })
    .await;
    assert_eq!(next, Ok(4), "the retried message was not fanned out again");
    let n = notice(&mut cc).await;
    assert_eq!((n.version, n.members.contains(&c.account)), (3, false));
    assert_eq!(error_for(&mut cc, group_text(1, g, "still here?"), 0, 1).await, Forbidden);

    // The last admin leaves: the oldest member, b, becomes admin.
    assert_eq!(done(&mut ca, pb::GroupLeave { req: 14, group: g }.into(), 14).await, Ok(()));
    let _v3 = notice(&mut cd).await;
    for conn in [&mut cb, &mut cd] {
        let n = notice(conn).await;
        assert_eq!((n.version, n.admins.clone(), n.by), (4, vec![b.account], a.account));
    }
    for (conn, groups) in [(&mut cd, 1), (&mut cc, 0), (&mut ca, 0)] {
        conn.send(&[pb::GroupListRequest { req: 15, after: 0 }.into()]).await.unwrap();
        let l = expect(conn, |m| if let Message::GroupList(l) = m { Some(l) } else { None }).await;
        assert_eq!(l.groups.len(), groups);
    }
    // Paging by id.
    cb.send(&[create(16, &[d.account])]).await.unwrap();
    let g2 = created(&mut cb, 16).await.group;
    cb.send(&[pb::GroupListRequest { req: 17, after: g }.into()]).await.unwrap();
    let l = expect(&mut cb, |m| if let Message::GroupList(l) = m { Some(l) } else { None }).await;
    assert_eq!(l.groups.iter().map(|x| x.group).collect::<Vec<_>>(), vec![g2]);

    // The sender-key shape: one payload for all, one ciphertext for d.
    let send = pb::Send {
        id: 5,
        group: g2,
        payload: Bytes::from_static(b"megolm"),
        per_device: vec![pb::DeviceCiphertext {
            account: d.account,
            device: 0,
            payload: Bytes::from_static(b"key for d"),
        }],
        ..Default::default()
    };
    cb.send(&[send.into()]).await.unwrap();
    expect_sent(&mut cb, 5).await;
    let m = expect_deliver(&mut cd).await;
    assert_eq!((&m.payload[..], &m.device_payload[..]), (&b"megolm"[..], &b"key for d"[..]));
}

/// Each member's own sends and everything it received, in arrival order.
struct Seen {
    sent: Vec<pb::Sent>,
    got: Vec<pb::Deliver>,
    notices: Vec<pb::GroupInfo>,
    refused: Vec<u64>,
}

/// Sends `ids` to `group` (in chunks of `chunk`, `pace` apart) and reads
/// until it has an answer for each and `want` group messages, acking as it
/// goes.
async fn send_and_read(
    mut c: Connection,
    group: u64,
    ids: Vec<u64>,
    (chunk, pace): (usize, Duration),
    want: usize,
) -> (Connection, Seen) {
    let msgs: Vec<Message> = ids.iter().map(|&i| group_text(i, group, &format!("{}:{i}", c.login().account))).collect();
    for chunk in msgs.chunks(chunk) {
        c.send(chunk).await.unwrap();
        tokio::time::sleep(pace).await;
    }
    let mut seen = Seen { sent: Vec::new(), got: Vec::new(), notices: Vec::new(), refused: Vec::new() };
    while seen.sent.len() + seen.refused.len() < ids.len() || seen.got.len() < want {
        match c.recv_timeout(T).await.unwrap() {
            Message::Sent(s) => seen.sent.push(s),
            Message::Error(e) if e.id != 0 => seen.refused.push(e.id),
            Message::Deliver(d) if d.group == group => {
                ack(&mut c, d.inbox).await;
                seen.got.push(d);
            }
            Message::GroupInfo(g) if g.inbox != 0 => {
                ack(&mut c, g.inbox).await;
                seen.notices.push(g);
            }
            Message::Receipt(r) if r.inbox != 0 => ack(&mut c, r.inbox).await,
            _ => {}
        }
    }
    (c, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_senders_in_one_group_are_seen_in_one_order_by_every_member() {
    const SENDERS: usize = 5;
    const EACH: u64 = 20;
    let s = TestServer::start(|c| c.groups.fanout_batch = 2);
    let (devices, mut conns) = register_many(s.addr, SENDERS, SENDERS, SENDERS).await;
    let others: Vec<u64> = devices[1..].iter().map(|d| d.account).collect();
    // A second device of the first member sees everything, its own
    // account's sends included (as copies).
    let companion = link(&s, &mut conns[0], 1).await;
    let mut watcher = login(&s, &companion).await;
    conns[0].send(&[create(2, &others)]).await.unwrap();
    let g = created(&mut conns[0], 2).await.group;
    let total = SENDERS * EACH as usize;
    let mut tasks = Vec::new();
    for c in conns {
        let pipelined = (5, Duration::ZERO);
        tasks.push(tokio::spawn(send_and_read(c, g, (1..=EACH).collect(), pipelined, total - EACH as usize)));
    }
    let mut all = Vec::new();
    while all.len() < total {
        let d = expect_deliver(&mut watcher).await;
        ack(&mut watcher, d.inbox).await;
        all.push(d);
    }
    let order: Vec<u64> = all.iter().map(|d| d.seq).collect();
    assert!(order.windows(2).all(|w| w[0] < w[1]), "{order:?}");
    let by_seq: BTreeMap<u64, &pb::Deliver> = all.iter().map(|d| (d.seq, d)).collect();
    for t in tasks {
        let (c, seen) = t.await.unwrap();
        let me = c.login().account;
        let got: Vec<u64> = seen.got.iter().map(|d| d.seq).collect();
        let expected: Vec<u64> = order.iter().copied().filter(|s| by_seq[s].from != me).collect();
        assert_eq!(got, expected, "member {me} sees the same order, minus its own");
        for d in &seen.got {
            assert_eq!(d.payload, by_seq[&d.seq].payload);
        }
        for sent in &seen.sent {
            assert_eq!(by_seq[&sent.seq].from, me);
        }
        assert_eq!(seen.sent.len(), EACH as usize);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removals_and_additions_racing_with_sends_follow_the_group_sequence() {
    const EACH: u64 = 30;
    let s = TestServer::start(|c| c.groups.fanout_batch = 1);
    let (devices, mut conns) = register_many(s.addr, 5, 5, 5).await;
    let [_, s1, s2, x, y] = [0, 1, 2, 3, 4].map(|i| devices[i].account);
    let mut cy = conns.pop().unwrap();
    let cx = conns.pop().unwrap();
    let cs2 = conns.pop().unwrap();
    let cs1 = conns.pop().unwrap();
    let mut ca = conns.pop().unwrap();
    ca.send(&[create(1, &[s1, s2, x])]).await.unwrap();
    let g = created(&mut ca, 1).await.group;
    // s1, s2 and x send, one message every 10 ms, while a removes x and
    // adds y. Whatever the interleaving, the seqs decide who gets what.
    let paced = (1, Duration::from_millis(10));
    let t1 = tokio::spawn(send_and_read(cs1, g, (1..=EACH).collect(), paced, 0));
    let t2 = tokio::spawn(send_and_read(cs2, g, (1..=EACH).collect(), paced, 0));
    let tx = tokio::spawn(send_and_read(cx, g, (1..=EACH).collect(), paced, 0));
    tokio::time::sleep(Duration::from_millis(100)).await;
    let remove = pb::GroupRemove { req: 2, group: g, members: vec![x] };
    assert_eq!(done(&mut ca, remove.into(), 2).await, Ok(()));
    tokio::time::sleep(Duration::from_millis(50)).await;
    let add = pb::GroupAdd { req: 3, group: g, members: vec![y] };
    assert_eq!(done(&mut ca, add.into(), 3).await, Ok(()));
    let (_, seen1) = t1.await.unwrap();
    let (_, seen2) = t2.await.unwrap();
    let (mut cx, mut seenx) = tx.await.unwrap();
    // Every message that was stored, by seq, with its sender.
    let mut stored: BTreeMap<u64, u64> = BTreeMap::new();
    for (account, seen) in [(s1, &seen1), (s2, &seen2), (x, &seenx)] {
        for sent in &seen.sent {
            stored.insert(sent.seq, account);
        }
    }
    assert_eq!(seen1.sent.len() + seen2.sent.len(), 2 * EACH as usize, "members' sends all succeed");
    // x: the notice of its removal has seq R; x got exactly the others'
    // messages before R, and every send of its own after R was refused.
    read_until(&mut cx, &mut seenx, |seen| seen.notices.iter().any(|n| !n.members.contains(&x))).await;
    let removed_at = seenx.notices.iter().find(|n| !n.members.contains(&x)).unwrap().seq;
    let before: Vec<u64> = stored.range(..removed_at).filter(|(_, f)| **f != x).map(|(s, _)| *s).collect();
    read_until(&mut cx, &mut seenx, |seen| seen.got.len() >= before.len()).await;
    let x_got: Vec<u64> = seenx.got.iter().map(|d| d.seq).collect();
    assert_eq!(x_got, before, "x gets every message before its removal and none after");
    assert!(seenx.sent.iter().all(|s| s.seq < removed_at));
    assert_eq!(seenx.sent.len() + seenx.refused.len(), EACH as usize);
    no_more_group_entries(&mut cx, Duration::from_millis(300)).await;
    // y: added at seq A, it gets exactly the messages after A.
    let mut seeny = Seen { sent: Vec::new(), got: Vec::new(), notices: Vec::new(), refused: Vec::new() };
    read_until(&mut cy, &mut seeny, |seen| !seen.notices.is_empty()).await;
    let added_at = seeny.notices[0].seq;
    assert!(seeny.notices[0].members.contains(&y) && added_at > removed_at);
    let after: Vec<u64> = stored.range(added_at..).map(|(s, _)| *s).collect();
    read_until(&mut cy, &mut seeny, |seen| seen.got.len() >= after.len()).await;
    let y_got: Vec<u64> = seeny.got.iter().map(|d| d.seq).collect();
    assert_eq!(y_got, after, "y gets every message after it was added and none before");
    no_more_group_entries(&mut cy, Duration::from_millis(300)).await;
}

/// Reads (and acks) group entries into `seen` until `done` holds.
async fn read_until(c: &mut Connection, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    while !done(seen) {
        match c.recv_timeout(T).await.unwrap() {
            Message::Deliver(d) if d.group != 0 => {
                ack(c, d.inbox).await;
                seen.got.push(d);
            }
            Message::GroupInfo(g) if g.inbox != 0 => {
                ack(c, g.inbox).await;
                seen.notices.push(g);
            }
            _ => {}
        }
    }
}

/// No group message or notice arrives within `d` (receipt counts for the
/// device's own sends may).
async fn no_more_group_entries(c: &mut Connection, d: Duration) {
    let deadline = tokio::time::Instant::now() + d;
    while let Ok(m) = tokio::time::timeout_at(deadline, c.recv()).await {
        match m.unwrap() {
            Message::Receipt(r) => ack(c, r.inbox).await,
            other => panic!("expected no more group entries, got {other:?}"),
        }
    }
}

/// The next event the test cares about, skipping connection noise.
async fn next_event(events: &mut pipit_client::Events) -> pipit_client::Event {
    loop {
        match tokio::time::timeout(T, events.next()).await.unwrap().unwrap() {
            pipit_client::Event::Connected { .. } | pipit_client::Event::Disconnected { .. } => {}
            e => return e,
        }
    }
}

#[tokio::test]
async fn the_client_library_does_groups_end_to_end() {
    use pipit_client::{Client, ClientError, Config, Event, MemoryStore};
    let s = TestServer::start(|c| c.groups.receipt_flush_ms = 50);
    let start = |name: &str| {
        let mut cfg = Config::new(s.addr.to_string());
        cfg.device_name = name.into();
        Client::start(cfg, MemoryStore::new()).unwrap()
    };
    let (alice, mut alice_events) = start("alice");
    let (bob, mut bob_events) = start("bob");
    let (carol, mut carol_events) = start("carol");
    let mut ids = Vec::new();
    for events in [&mut alice_events, &mut bob_events, &mut carol_events] {
        loop {
            if let Event::Connected { account, .. } = tokio::time::timeout(T, events.next()).await.unwrap().unwrap() {
                ids.push(account);
                break;
            }
        }
    }
    let (a, b, c) = (ids[0], ids[1], ids[2]);

    let info = alice.create_group("book club", &[b]).await.unwrap();
    let sorted = |mut v: Vec<u64>| {
        v.sort_unstable();
        v
    };
    assert_eq!((info.members.clone(), info.admins.clone()), (sorted(vec![a, b]), vec![a]));
    let g = info.group;
    for events in [&mut alice_events, &mut bob_events] {
        let Event::Group(n) = next_event(events).await else { panic!("expected the group notice") };
        assert_eq!((n.group, n.version), (g, 1));
    }
    assert!(matches!(bob.add_members(g, &[c]).await, Err(ClientError::Refused(pb::ErrorCode::Forbidden))));
    alice.add_members(g, &[c]).await.unwrap();
    for events in [&mut alice_events, &mut bob_events, &mut carol_events] {
        let Event::Group(n) = next_event(events).await else { panic!("expected the group notice") };
        assert_eq!((n.version, n.members.len()), (2, 3));
    }
    assert_eq!(carol.groups().await.unwrap().iter().map(|g| g.group).collect::<Vec<_>>(), vec![g]);

    let id = alice.send_group(g, "chapter one?").await.unwrap();
    let Event::Sent(sent) = next_event(&mut alice_events).await else { panic!("expected Sent") };
    assert_eq!(sent.id, id);
    for (client, events) in [(&bob, &mut bob_events), (&carol, &mut carol_events)] {
        let Event::Message(m) = next_event(events).await else { panic!("expected the message") };
        assert_eq!((m.group, m.seq, m.from, &m.payload[..]), (g, sent.seq, a, &b"chapter one?"[..]));
        client.mark_group_read(g, m.seq).await.unwrap();
    }
    // Receipts come as counts; read by both eventually.
    let mut read = 0;
    while read < 2 {
        if let Event::Receipt(r) = next_event(&mut alice_events).await {
            assert_eq!((r.group, r.seq), (g, sent.seq));
            if r.kind == pb::ReceiptKind::Read as i32 {
                read = r.count;
            }
        }
    }
    carol.leave_group(g).await.unwrap();
    assert!(carol.groups().await.unwrap().is_empty());
    let Event::Group(n) = next_event(&mut bob_events).await else { panic!("expected the group notice") };
    assert_eq!(n.members, sorted(vec![a, b]));
    for client in [alice, bob, carol] {
        client.close().await;
    }
}

/// Typing in a group reaches the other members' connected devices once,
/// never a member who was offline (not at its next login either), and a
/// non-member's notice reaches nobody.
#[tokio::test]
async fn group_typing_reaches_connected_members_only_and_is_never_stored() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let (c, cc) = register(s.addr).await;
    let (_stranger, mut cs) = register(s.addr).await;
    drop(cc);
    ca.send(&[create(1, &[b.account, c.account])]).await.unwrap();
    let g = created(&mut ca, 1).await.group;
    notice(&mut cb).await;
    let typing = |group| -> Message { pb::Typing { group, typing: true, ..Default::default() }.into() };
    ca.send(&[typing(g)]).await.unwrap();
    let t = expect(&mut cb, |m| match m {
        Message::Typing(t) => Some(t),
        _ => None,
    })
    .await;
    assert_eq!((t.group, t.from, t.peer, t.typing), (g, a.account, 0, true));
    // A non-member's notice goes nowhere; the sender is not answered.
    cs.send(&[typing(g)]).await.unwrap();
    quiet(&mut cb, Duration::from_millis(400)).await;
    // c was offline: at login it finds the group's notice, never the typing.
    let mut cc = login(&s, &c).await;
    notice(&mut cc).await;
    quiet(&mut cc, Duration::from_millis(400)).await;
    quiet(&mut cs, Duration::from_millis(100)).await;
}
