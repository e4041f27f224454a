//! End to end over real TCP on 127.0.0.1, with RocksDB in a temp dir and
//! real Noise handshakes: 1:1 messaging, receipts, the offline inbox,
//! multi-device, dedup, backpressure, expiry.

mod common;

use std::time::Duration;

use bytes::Bytes;
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::{ClientError, ConnectOptions, Connection};

#[tokio::test]
async fn two_devices_exchange_and_the_sender_sees_sent_delivered_read() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    assert_ne!(a.account, b.account);

    ca.send(&[text(1, b.account, "hi")]).await.unwrap();
    // "sent" comes first: it is the answer to the send itself.
    let first = ca.recv_timeout(T).await.unwrap();
    let Message::Sent(sent) = first else { panic!("expected Sent first, got {first:?}") };
    assert_eq!(sent.id, 1);
    let d = expect_deliver(&mut cb).await;
    assert_eq!((d.from, d.seq, &d.payload[..]), (a.account, sent.seq, &b"hi"[..]));
    ack(&mut cb, d.inbox).await;

    let delivered = expect(&mut ca, receipt(pb::ReceiptKind::Delivered)).await;
    assert_eq!((delivered.peer, delivered.through), (b.account, sent.seq));
    mark_read(&mut cb, a.account, d.seq).await;
    let read = expect(&mut ca, receipt(pb::ReceiptKind::Read)).await;
    assert_eq!((read.peer, read.through), (b.account, sent.seq));
    ack(&mut ca, read.inbox).await;

    // And back: one sequence per conversation, both directions.
    cb.send(&[text(1, a.account, "hello back")]).await.unwrap();
    let back = expect_sent(&mut cb, 1).await;
    assert_eq!(back.seq, sent.seq + 1);
    let d = expect_deliver(&mut ca).await;
    assert_eq!((d.from, d.seq), (b.account, back.seq));
}

#[tokio::test]
async fn an_offline_account_gets_everything_in_order_on_all_devices_and_the_sender_a_copy() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let a2 = link(&s, &mut ca, 1).await;
    let (b, mut cb) = register(s.addr).await;
    let b2 = link(&s, &mut cb, 1).await;
    let b3 = link(&s, &mut cb, 2).await;
    drop(cb); // every device of b is offline now
    let mut ca2 = login(&s, &a2).await;

    let mut seqs = Vec::new();
    for i in 1..=5u64 {
        ca.send(&[text(i, b.account, &format!("m{i}"))]).await.unwrap();
        seqs.push(expect_sent(&mut ca, i).await.seq);
    }
    assert!(seqs.windows(2).all(|w| w[0] < w[1]));

    // The sender's other device got copies at once, marked with the peer.
    for (i, seq) in seqs.iter().enumerate() {
        let d = expect_deliver(&mut ca2).await;
        assert_eq!((d.from, d.from_device, d.peer, d.seq), (a.account, a.device, b.account, *seq));
        assert_eq!(&d.payload[..], format!("m{}", i + 1).as_bytes());
    }

    // Each of b's three devices gets all five, in order, on reconnect.
    for dev in [&b, &b2, &b3] {
        let mut c = login(&s, dev).await;
        assert_eq!(c.login().pending, 5);
        for (i, seq) in seqs.iter().enumerate() {
            let d = expect_deliver(&mut c).await;
            assert_eq!((d.from, d.seq, d.peer), (a.account, *seq, 0));
            assert_eq!(&d.payload[..], format!("m{}", i + 1).as_bytes());
        }
    }
}

#[tokio::test]
async fn a_retried_send_gets_the_original_answer_and_is_delivered_once() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    ca.send(&[text(7, b.account, "once")]).await.unwrap();
    let first = expect_sent(&mut ca, 7).await;
    // As after a lost "sent": the same id again, on the same connection and
    // on a new one.
    ca.send(&[text(7, b.account, "once")]).await.unwrap();
    assert_eq!(expect_sent(&mut ca, 7).await, first);
    drop(ca);
    let mut ca = login(&s, &a).await;
    ca.send(&[text(7, b.account, "once")]).await.unwrap();
    assert_eq!(expect_sent(&mut ca, 7).await, first);

    let d = expect_deliver(&mut cb).await;
    assert_eq!(d.seq, first.seq);
    ack(&mut cb, d.inbox).await;
    quiet(&mut cb, Duration::from_millis(500)).await;
    drop(cb);
    let cb = login(&s, &b).await;
    assert_eq!(cb.login().pending, 0, "nothing stored twice");
}

#[tokio::test]
async fn a_recipient_that_never_reads_holds_only_a_window_and_then_gets_everything() {
    const N: u64 = 3_000;
    let s = TestServer::start(|c| c.net.delivery_window = 16);
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let payload = Bytes::from(vec![0x42u8; 100]);
    for chunk in (1..=N).collect::<Vec<_>>().chunks(100) {
        let msgs: Vec<Message> = chunk
            .iter()
            .map(|&i| pb::Send { id: i, to: b.account, payload: payload.clone(), ..Default::default() }.into())
            .collect();
        ca.send(&msgs).await.unwrap();
        for &i in chunk {
            expect_sent(&mut ca, i).await;
        }
    }
    // Every message is durable in b's inbox, not in server memory: the
    // server handed b's connection exactly one window and no more.
    let inbox = s.running.as_ref().unwrap().services().inbox.clone();
    let depth = inbox.depth(pipit::model::DeviceAddr::new(b.account, 0)).await.unwrap();
    assert_eq!(depth, N as usize);
    let mut got = Vec::new();
    for _ in 0..16 {
        got.push(expect_deliver(&mut cb).await);
    }
    quiet(&mut cb, Duration::from_millis(300)).await;

    // Now b reads and acks as it goes: everything arrives, in order, once.
    while got.len() < N as usize {
        ack(&mut cb, got.last().unwrap().inbox).await;
        for _ in 0..16.min(N as usize - got.len()) {
            got.push(expect_deliver(&mut cb).await);
        }
    }
    let seqs: Vec<u64> = got.iter().map(|d| d.seq).collect();
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "in order, no gaps, no repeats");
    ack(&mut cb, got.last().unwrap().inbox).await;
    quiet(&mut cb, Duration::from_millis(300)).await;
}

#[tokio::test]
async fn a_second_login_of_a_device_replaces_the_first() {
    let s = TestServer::start(|_| {});
    let (a, mut first) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let mut second = login(&s, &a).await;
    match first.recv_timeout(T).await {
        Err(ClientError::Refused(pb::ErrorCode::Replaced)) => {}
        other => panic!("expected REPLACED, got {other:?}"),
    }
    cb.send(&[text(1, a.account, "to the new one")]).await.unwrap();
    expect_sent(&mut cb, 1).await;
    assert_eq!(&expect_deliver(&mut second).await.payload[..], b"to the new one");
    let _ = b;
}

#[tokio::test]
async fn undelivered_messages_expire_and_the_sender_is_told() {
    let s = TestServer::start(|c| {
        c.messages.ttl_secs = 1;
        c.messages.expiry_sweep_secs = 1;
    });
    let (_a, mut ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    drop(cb);
    ca.send(&[text(1, b.account, "too late")]).await.unwrap();
    let sent = expect_sent(&mut ca, 1).await;
    let expired = expect(&mut ca, |m| match m {
        Message::Expired(e) => Some(e),
        _ => None,
    })
    .await;
    assert_eq!((expired.peer, expired.seq, expired.devices), (b.account, sent.seq, 1));
    let cb = login(&s, &b).await;
    assert_eq!(cb.login().pending, 0);
}

#[tokio::test]
async fn invite_only_registration_uses_codes_from_the_admin_socket() {
    let s = TestServer::start(|c| c.accounts.registration = pipit::config::Registration::Invite);
    let key = pipit_client::pipit_protocol::StaticKeypair::generate();
    let opts = s.opts();
    let err = Connection::connect(s.addr, &key, pipit_client::register("", "phone"), &opts).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(pb::ErrorCode::RegistrationClosed)), "{err}");
    let dir = s.dir.path().to_path_buf();
    let code = tokio::task::spawn_blocking(move || pipit::admin::request(&dir, "invite 60").unwrap()).await.unwrap();
    let code = code.trim().to_string();
    let c = Connection::connect(s.addr, &key, pipit_client::register(&code, "phone"), &opts).await.unwrap();
    assert_eq!(c.login().device, 0);
    let other = pipit_client::pipit_protocol::StaticKeypair::generate();
    let err = Connection::connect(s.addr, &other, pipit_client::register(&code, "phone"), &opts).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(pb::ErrorCode::InvalidInvite)), "{err}");
}

#[tokio::test]
async fn a_changed_server_key_is_refused_unless_allowed() {
    let s = TestServer::start(|_| {});
    let (a, _) = register(s.addr).await;
    let wrong = pipit_client::pipit_protocol::StaticKeypair::generate();
    let opts = ConnectOptions { server_key: Some(*wrong.public()), ..ConnectOptions::default() };
    let err = Connection::connect(s.addr, &a.key, pipit_client::login(a.account, 0, 0), &opts).await.unwrap_err();
    assert!(matches!(err, ClientError::ServerKeyChanged { .. }), "{err}");
    let opts = ConnectOptions { accept_new_server_key: true, ..opts };
    let c = Connection::connect(s.addr, &a.key, pipit_client::login(a.account, 0, 0), &opts).await.unwrap();
    assert_eq!(c.server_key(), &s.key);
}
