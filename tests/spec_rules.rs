//! Rules SPEC.md states and the server once broke, each over real TCP with
//! RocksDB in a temp dir: message id 0, a reused id with other content,
//! attributable answers and the connection-level error, "not supported",
//! the order of answers, `LoginOk.pending`, the ids a login names, and a
//! registration with a known key.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::{ClientError, Connection};

fn send(id: u64, to: u64, body: &str) -> Message {
    text(id, to, body)
}

/// Reads until the server closes; returns what it sent first.
async fn closed(c: &mut Connection) -> Vec<Message> {
    let mut got = Vec::new();
    loop {
        match c.recv_timeout(T).await {
            Ok(m) => got.push(m),
            Err(ClientError::Refused(code)) => {
                got.push(pb::Error { code: code as i32, ..Default::default() }.into());
            }
            Err(ClientError::Closed) | Err(ClientError::Io(_)) => return got,
            Err(e) => panic!("expected the server to close, got {e}"),
        }
    }
}

fn is_error(m: &Message, code: pb::ErrorCode, req: u64, id: u64) -> bool {
    matches!(m, Message::Error(e) if e.code == code as i32 && e.req == req && e.id == id)
}

async fn deliveries(c: &mut Connection, quiet: Duration) -> Vec<pb::Deliver> {
    let mut got = Vec::new();
    while let Ok(m) = c.recv_timeout(quiet).await {
        if let Message::Deliver(d) = m {
            got.push(d);
        }
    }
    got
}

/// Defect 1: the server took `Send{id: 0}`, and a second, different
/// `Send{id: 0}` got the first one's `Sent` and was never stored. Id 0 is
/// now invalid: a connection-level BAD_REQUEST, then close; nothing stored.
#[tokio::test]
async fn message_id_zero_is_refused_and_a_second_one_is_not_silently_dropped() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    for body in ["first", "second"] {
        ca.send(&[send(0, b.account, body)]).await.unwrap();
        let got = closed(&mut ca).await;
        assert!(!got.iter().any(|m| matches!(m, Message::Sent(_))), "{body}: answered Sent: {got:?}");
        assert!(
            got.last().is_some_and(|m| is_error(m, pb::ErrorCode::BadRequest, 0, 0)),
            "{body}: expected BAD_REQUEST for the connection, got {got:?}"
        );
        ca = login(&s, &a).await;
    }
    assert!(deliveries(&mut cb, Duration::from_millis(500)).await.is_empty(), "nothing was stored");
}

/// Defect 2: the same id with other content got the first message's `Sent`
/// and the second message vanished. Now it is answered ID_REUSED (nothing
/// stored), while a true retry still gets the original `Sent`.
#[tokio::test]
async fn the_same_id_with_other_content_is_refused_not_swallowed() {
    let s = TestServer::start(|_| {});
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    ca.send(&[send(5, b.account, "first")]).await.unwrap();
    let first = expect_sent(&mut ca, 5).await;
    ca.send(&[send(5, b.account, "second")]).await.unwrap();
    let answer = expect(&mut ca, |m| match &m {
        Message::Sent(x) if x.id == 5 => Some(m),
        Message::Error(e) if e.id == 5 => Some(m),
        _ => None,
    })
    .await;
    assert!(is_error(&answer, pb::ErrorCode::IdReused, 0, 5), "expected ID_REUSED, got {answer:?}");
    ca.send(&[send(5, b.account, "first")]).await.unwrap();
    assert_eq!(expect_sent(&mut ca, 5).await, first, "a true retry still gets the original");
    let got = deliveries(&mut cb, Duration::from_millis(500)).await;
    let bodies: Vec<&[u8]> = got.iter().map(|d| &d.payload[..]).collect();
    assert_eq!(bodies, [&b"first"[..]]);
}

/// Defects 4 and 5: requests of features this server does not offer are
/// answered NOT_SUPPORTED with their `req` and the connection stays open;
/// `LoginOk.features` lists what is offered; a request with `req` 0 ends
/// the connection with a connection-level BAD_REQUEST.
#[tokio::test]
async fn unoffered_features_are_not_supported_attributably_and_req_zero_closes() {
    let s = TestServer::start(|_| {});
    let (_a, mut ca) = register(s.addr).await;
    let offered = ca.login().features.clone();
    let candidates: Vec<Message> = vec![
        pb::PresenceSubscribe { accounts: vec![1], req: 1 }.into(),
        pb::PushToken { platform: pb::PushPlatform::Fcm as i32, token: Bytes::from_static(b"t"), req: 2 }.into(),
        pb::GroupListRequest { req: 3, ..Default::default() }.into(),
        pb::GroupCreate { req: 4, ..Default::default() }.into(),
        pb::GroupLeave { req: 5, group: 1 }.into(),
        pb::InviteCreate { req: 6 }.into(),
        pb::UnlinkDevice { req: 7, device: 9 }.into(),
    ];
    // Only what this server does not offer; at least one must be left for
    // the test to mean anything.
    let mut requests: Vec<Message> =
        candidates.into_iter().filter(|m| !m.feature().is_some_and(|f| offered.contains(&(f as i32)))).collect();
    let reqs: Vec<u64> = requests.iter().filter_map(Message::request_id).collect();
    assert!(!reqs.is_empty(), "every optional feature is offered; nothing to check");
    requests.push(pb::Ping { id: 99 }.into());
    ca.send(&requests).await.unwrap();
    let mut answers = Vec::new();
    loop {
        match ca.recv_timeout(T).await.unwrap() {
            Message::Pong(p) if p.id == 99 => break,
            m => answers.push(m),
        }
    }
    assert_eq!(answers.len(), reqs.len(), "one answer per request: {answers:?}");
    for (req, m) in reqs.iter().zip(&answers) {
        assert!(is_error(m, pb::ErrorCode::NotSupported, *req, 0), "request {req}: {m:?}");
    }
    ca.send(&[pb::DeviceListRequest { req: 0, account: 0 }.into()]).await.unwrap();
    let got = closed(&mut ca).await;
    assert!(got.last().is_some_and(|m| is_error(m, pb::ErrorCode::BadRequest, 0, 0)), "{got:?}");
}

/// Defect 11: answers that need no storage (Pong, a refused request) went
/// out ahead of earlier requests' answers that did. All now keep request
/// order.
#[tokio::test]
async fn answers_keep_the_order_of_their_requests() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    for round in 0..20u64 {
        let base = round * 10;
        ca.send(&[
            send(base + 1, a.account, "note"),
            pb::Ping { id: base + 2 }.into(),
            pb::DeviceListRequest { req: base + 3, account: 0 }.into(),
            pb::Ping { id: base + 4 }.into(),
            pb::InviteCreate { req: base + 5 }.into(),
        ])
        .await
        .unwrap();
        let mut order = Vec::new();
        while order.len() < 5 {
            match ca.recv_timeout(T).await.unwrap() {
                Message::Sent(x) => order.push(x.id),
                Message::Pong(p) => order.push(p.id),
                Message::DeviceList(d) => order.push(d.req),
                Message::Error(e) => order.push(e.req.max(e.id)),
                _ => {}
            }
        }
        assert_eq!(order, [base + 1, base + 2, base + 3, base + 4, base + 5], "round {round}");
    }
}

/// Defect 8: `LoginOk.pending` said the inbox depth but was capped at the
/// window. It is the depth now.
#[tokio::test]
async fn pending_is_the_inbox_depth_not_the_window() {
    let s = TestServer::start(|c| c.net.delivery_window = 4);
    let (_a, mut ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    drop(cb);
    for i in 1..=7 {
        ca.send(&[send(i, b.account, "m")]).await.unwrap();
        expect_sent(&mut ca, i).await;
    }
    let mut cb = login(&s, &b).await;
    assert_eq!(cb.login().pending, 7);
    assert_eq!(cb.login().window, 4);
    assert_eq!(deliveries(&mut cb, Duration::from_millis(500)).await.len(), 4, "still one window at a time");
}

/// Defect 9: a login naming another account's ids succeeded by key. The
/// ids must be the key's (or account 0: find me by key).
#[tokio::test]
async fn a_login_must_name_its_own_ids_or_none() {
    let s = TestServer::start(|_| {});
    let (a, _ca) = register(s.addr).await;
    let (b, _cb) = register(s.addr).await;
    for (account, device) in [(a.account, 0), (b.account, 1)] {
        let err =
            Connection::connect(s.addr, &b.key, pipit_client::login(account, device, 0), &s.opts()).await.unwrap_err();
        assert!(matches!(err, ClientError::Refused(pb::ErrorCode::UnknownDevice)), "{account}/{device}: {err}");
    }
    let c = Connection::connect(s.addr, &b.key, pipit_client::login(0, 0, 0), &s.opts()).await.unwrap();
    assert_eq!(c.login().account, b.account, "account 0 is found by key");
}

/// Defect 10: `Register` with a registered key logs that device in (a
/// registration whose answer was lost is retried safely); no new account.
#[tokio::test]
async fn registering_a_registered_key_logs_that_device_in() {
    let s = TestServer::start(|_| {});
    let (a, _ca) = register(s.addr).await;
    let c = Connection::connect(s.addr, &a.key, pipit_client::register("", "again"), &s.opts()).await.unwrap();
    assert_eq!((c.login().account, c.login().device), (a.account, a.device));
    let (next, _) = register(s.addr).await;
    assert_eq!(next.account, a.account + 1, "no account was created for the second Register");
}
