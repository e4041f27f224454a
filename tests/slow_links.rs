//! What a device on a slow, lossy link (2G) relies on, end to end over
//! real TCP on 127.0.0.1 with RocksDB in a temp dir: a `GroupCreate` sent
//! again after its answer was lost makes no second group (SPEC.md 5.6),
//! and a sender back after a long absence spends its first window on
//! messages, not on receipts that a later one covers (SPEC.md 5.3).

mod common;

use bytes::Bytes;
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;

fn create(req: u64, id: u64, members: &[u64]) -> Message {
    pb::GroupCreate { req, name: Bytes::from_static(b"club"), members: members.to_vec(), id }.into()
}

/// The answer to request `req`: the group made, or the error code.
async fn answer(c: &mut Connection, req: u64) -> Result<pb::GroupInfo, pb::ErrorCode> {
    expect(c, |m| match m {
        Message::GroupInfo(g) if g.req == req => Some(Ok(g)),
        Message::Error(e) if e.req == req => Some(Err(pb::ErrorCode::try_from(e.code).unwrap())),
        _ => None,
    })
    .await
}

/// The groups `c`'s account is in, and the change notices waiting in its
/// inbox (every entry the login's window holds).
async fn groups_and_notices(c: &mut Connection) -> (Vec<u64>, Vec<u64>) {
    let notices = until_pong(c, 77)
        .await
        .into_iter()
        .filter_map(|m| match m {
            Message::GroupInfo(g) if g.inbox != 0 => Some(g.group),
            _ => None,
        })
        .collect();
    c.send(&[pb::GroupListRequest { req: 78, after: 0 }.into()]).await.unwrap();
    let list = expect(c, |m| match m {
        Message::GroupList(l) if l.req == 78 => Some(l),
        _ => None,
    })
    .await;
    (list.groups.iter().map(|g| g.group).collect(), notices)
}

#[tokio::test]
async fn a_group_create_sent_again_after_a_lost_answer_makes_one_group() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    let (c, cc) = register(s.addr).await;
    drop((cb, cc));
    let members = [b.account, c.account];

    // The create goes through; its answer is lost with the connection
    // (read here only to compare), and the client sends it again on the
    // next one, under another req.
    ca.send(&[create(1, 7, &members)]).await.unwrap();
    let first = answer(&mut ca, 1).await.unwrap();
    drop(ca);
    let mut ca = login(&s, &a).await;
    ca.send(&[create(2, 7, &members)]).await.unwrap();
    let again = answer(&mut ca, 2).await.unwrap();
    assert_eq!(pb::GroupInfo { req: 1, ..again.clone() }, first, "the original answer, with the retry's req");

    // Two copies in one packet (one writer round): one group as well.
    ca.send(&[create(3, 9, &members), create(4, 9, &members)]).await.unwrap();
    let (x, y) = (answer(&mut ca, 3).await.unwrap(), answer(&mut ca, 4).await.unwrap());
    assert_eq!(x.group, y.group);
    assert_ne!(x.group, first.group, "another id, another group");

    // The same id for another group is refused; nothing is made.
    ca.send(&[create(5, 7, &[b.account])]).await.unwrap();
    assert_eq!(answer(&mut ca, 5).await, Err(pb::ErrorCode::IdReused));

    // Every member sees two groups, each announced once.
    for (d, announced) in [(&a, false), (&b, true), (&c, true)] {
        let mut conn = login(&s, d).await;
        let (groups, mut notices) = groups_and_notices(&mut conn).await;
        assert_eq!(groups, vec![first.group, x.group], "account {}", d.account);
        if announced {
            notices.sort_unstable();
            assert_eq!(notices, vec![first.group, x.group], "account {}", d.account);
        }
    }
}

/// Issue 21, defect 12: a device acks 70 deliveries one by one while
/// their sender is offline, and messages are queued for the sender behind
/// the receipts. Each of the sender's devices, back, must find one
/// DELIVERED receipt (the latest) ahead of those messages, not a window
/// full of receipts.
#[tokio::test]
async fn a_returning_sender_gets_one_receipt_per_conversation_then_its_messages() {
    const SENT: u64 = 70;
    const BEHIND: u64 = 5;
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let a2 = link(&s, &mut ca, 1).await;
    let mut ca2 = login(&s, &a2).await;
    let (b, mut cb) = register(s.addr).await;
    let (_c, mut cc) = register(s.addr).await;

    let mut last = 0;
    for id in 1..=SENT {
        ca.send(&[text(id, b.account, "m")]).await.unwrap();
        last = expect_sent(&mut ca, id).await.seq;
    }
    // The second device has its copies of them, and acks them.
    for _ in 0..SENT {
        let d = expect_deliver(&mut ca2).await;
        ack(&mut ca2, d.inbox).await;
    }
    until_pong(&mut ca2, 1).await;
    // Both of the sender's devices are offline from here on.
    drop((ca, ca2));
    // b's copy of each message is acked on its own, as a phone that acks
    // every delivery once it is stored would.
    for _ in 0..SENT {
        let d = expect_deliver(&mut cb).await;
        ack(&mut cb, d.inbox).await;
    }
    // Messages for the sender, queued behind the receipts (the acks went
    // to storage before b's send: one connection's writes stay in order).
    cb.send(&[text(1, a.account, "back to you")]).await.unwrap();
    expect_sent(&mut cb, 1).await;
    for id in 1..BEHIND {
        cc.send(&[text(id, a.account, "hello")]).await.unwrap();
        expect_sent(&mut cc, id).await;
    }

    let mut seen = Vec::new();
    for (name, d) in [("a", &a), ("a2", &a2)] {
        let mut conn = login(&s, d).await;
        let window = conn.login().window;
        // The first window: everything the login sends before any ack.
        let first: Vec<Message> = until_pong(&mut conn, 1).await;
        let ahead: Vec<&pb::Receipt> = first
            .iter()
            .take_while(|m| !matches!(m, Message::Deliver(_)))
            .filter_map(|m| if let Message::Receipt(r) = m { Some(r) } else { None })
            .collect();
        let receipts = first.iter().filter(|m| matches!(m, Message::Receipt(_))).count();
        let receipt_bytes: usize =
            first.iter().filter(|m| matches!(m, Message::Receipt(_))).map(Message::encoded_len).sum();
        let delivers = first.iter().filter(|m| matches!(m, Message::Deliver(_))).count();
        eprintln!(
            "device {name}: first window of {window} slots: {receipts} receipts ({receipt_bytes} bytes of \
             packet), {delivers} of the {BEHIND} messages; {} receipts before the first message",
            ahead.len()
        );
        let latest = ahead.last().map(|r| (r.kind, r.peer, r.through));
        seen.push((name, ahead.len(), latest, delivers as u64));
    }
    let latest = Some((pb::ReceiptKind::Delivered as i32, b.account, last));
    for (name, ahead, got, delivers) in seen {
        assert_eq!(ahead, 1, "{name}: one receipt ahead of the messages");
        assert_eq!(got, latest, "{name}: the latest");
        assert_eq!(delivers, BEHIND, "{name}: every message in the first window");
    }
}
