//! Rules SPEC.md states and the server once broke, each over real TCP with
//! RocksDB in a temp dir: message id 0, a reused id with other content,
//! attributable answers and the connection-level error, "not supported",
//! the order of answers, `LoginOk.pending`, the ids a login names, and a
//! registration with a known key. Round two (issue 21): a 1:1 send with
//! both shapes of payload, where a per-device 1:1 ciphertext arrives,
//! `LinkDevice`'s edge cases, and the features the byte budget counts.

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

// ---------------------------------------------------------------- round two
// Issue 21: what a second independent implementation found.

/// Round two, defect 1: a 1:1 `Send` with both `payload` and `per_device`
/// was answered `Sent`, and `payload` reached nobody (each device gets its
/// own ciphertext instead). It is refused now: BAD_REQUEST, nothing stored.
#[tokio::test]
async fn a_one_to_one_send_with_payload_and_per_device_is_refused() {
    let s = TestServer::start(|_| {});
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let both = pb::Send {
        id: 1,
        to: b.account,
        payload: Bytes::from_static(b"for every device"),
        per_device: vec![pb::DeviceCiphertext {
            account: b.account,
            device: b.device,
            payload: Bytes::from_static(b"for b's device"),
        }],
        ..Default::default()
    };
    ca.send(&[both.into()]).await.unwrap();
    let answer = expect(&mut ca, |m| match &m {
        Message::Sent(x) if x.id == 1 => Some(m),
        Message::Error(e) if e.id == 1 => Some(m),
        Message::DeviceMismatch(x) if x.id == 1 => Some(m),
        _ => None,
    })
    .await;
    assert!(is_error(&answer, pb::ErrorCode::BadRequest, 0, 1), "expected BAD_REQUEST, got {answer:?}");
    assert!(deliveries(&mut cb, Duration::from_millis(500)).await.is_empty(), "nothing was stored");
    // The connection stays usable, and the same id may carry the message
    // in one of the two shapes (nothing was stored under it).
    ca.send(&[send(1, b.account, "for every device")]).await.unwrap();
    expect_sent(&mut ca, 1).await;
    assert_eq!(&expect_deliver(&mut cb).await.payload[..], b"for every device");
}

/// Round two, defect 2: SPEC.md did not say where a 1:1 per-device
/// ciphertext arrives; `Deliver.device_payload` was documented for groups
/// only, and a client looking there lost the message. It arrives in
/// `Deliver.payload`, each device its own; `device_payload` stays empty.
#[tokio::test]
async fn a_per_device_one_to_one_message_arrives_in_deliver_payload() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let b2 = link(&s, &mut cb, 1).await;
    let cipher = |account: u64, device: u32, text: &'static str| pb::DeviceCiphertext {
        account,
        device,
        payload: Bytes::from_static(text.as_bytes()),
    };
    let m = pb::Send {
        id: 1,
        to: b.account,
        per_device: vec![cipher(b.account, b.device, "for b0"), cipher(0, b2.device, "for b1")],
        ..Default::default()
    };
    ca.send(&[m.into()]).await.unwrap();
    let sent = expect_sent(&mut ca, 1).await;
    let mut cb2 = login(&s, &b2).await;
    for (c, want) in [(&mut cb, "for b0"), (&mut cb2, "for b1")] {
        let d = expect_deliver(c).await;
        assert_eq!((d.from, d.seq, &d.payload[..]), (a.account, sent.seq, want.as_bytes()), "{d:?}");
        assert!(d.device_payload.is_empty(), "device_payload is for groups only: {d:?}");
    }
}

/// The answer to a `LinkDevice` of `key`: the device number or the code.
async fn link_key(
    c: &mut Connection,
    req: u64,
    key: &pipit_client::pipit_protocol::PublicKey,
) -> Result<u32, pb::ErrorCode> {
    let m = pb::LinkDevice { req, key: Bytes::copy_from_slice(key.as_bytes()), name: "tablet".into() };
    match call(c, m.into()).await {
        Message::Linked(l) => Ok(l.device),
        m => Err(code(&m)),
    }
}

/// Round two, defect 7: the same key linked twice is idempotent (a retry
/// after a lost answer): the second answer names the same device and the
/// account has no extra device, also once it is full.
#[tokio::test]
async fn linking_the_same_key_twice_names_the_same_device() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let key = pipit_client::pipit_protocol::StaticKeypair::generate();
    let first = link_key(&mut ca, 1, key.public()).await.unwrap();
    assert_eq!(link_key(&mut ca, 2, key.public()).await, Ok(first));
    // From the linked device, the first device's key is just as known.
    let mut c1 = login(&s, &Device { key: key.clone(), account: a.account, device: first }).await;
    assert_eq!(link_key(&mut c1, 3, a.key.public()).await, Ok(a.device));
    let list = match call(&mut ca, pb::DeviceListRequest { req: 4, account: 0 }.into()).await {
        Message::DeviceList(l) => l,
        m => panic!("expected DeviceList, got {m:?}"),
    };
    assert_eq!(list.devices.len(), 2, "{list:?}");
}

/// Round two, defect 7: a device linking its own key got `Linked{its own
/// number}`, a success that linked nothing. BAD_REQUEST now; the
/// connection stays.
#[tokio::test]
async fn linking_the_requesting_devices_own_key_is_a_bad_request() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    assert_eq!(link_key(&mut ca, 1, a.key.public()).await, Err(pb::ErrorCode::BadRequest));
    until_pong(&mut ca, 2).await;
}

/// Round two, defect 7: another account's device key cannot be taken over.
#[tokio::test]
async fn linking_another_accounts_key_is_forbidden() {
    let s = TestServer::start(|_| {});
    let (_a, mut ca) = register(s.addr).await;
    let (b, _cb) = register(s.addr).await;
    assert_eq!(link_key(&mut ca, 1, b.key.public()).await, Err(pb::ErrorCode::Forbidden));
    until_pong(&mut ca, 2).await;
}

/// Round two, defect 7: at most 16 devices; the 17th is TOO_LARGE, while a
/// key already linked is still answered with its device.
#[tokio::test]
async fn a_seventeenth_device_is_too_large() {
    let s = TestServer::start(|_| {});
    let (_a, mut ca) = register(s.addr).await;
    let mut last = None;
    for req in 1..=15u64 {
        let key = pipit_client::pipit_protocol::StaticKeypair::generate();
        let device = link_key(&mut ca, req, key.public()).await.unwrap_or_else(|c| panic!("device {req}: {c:?}"));
        last = Some((key, device));
    }
    let (key, device) = last.unwrap();
    let extra = pipit_client::pipit_protocol::StaticKeypair::generate();
    assert_eq!(link_key(&mut ca, 16, extra.public()).await, Err(pb::ErrorCode::TooLarge));
    assert_eq!(link_key(&mut ca, 17, key.public()).await, Ok(device), "idempotent, also when full");
}

/// Round two, defect 8: SPEC.md §11 counts the login result with the
/// features a default server lists (`protocol/tests/budget.rs`,
/// `REFERENCE_FEATURES`, computes the table's login rows with them). If
/// this fails, change both and the table follows by that test.
#[tokio::test]
async fn login_ok_lists_the_features_the_byte_budget_counts() {
    let s = TestServer::start(|_| {});
    let (_a, ca) = register(s.addr).await;
    use pb::Feature::*;
    let counted = [Groups, Presence, Typing, KeyDirectory, UnlinkDevice].map(|f| f as i32);
    assert_eq!(ca.login().features, counted);
}
