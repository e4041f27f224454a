//! Backpressure instead of loss: an ack or read receipt the server
//! accepted is never dropped for want of room in the storage queue (the
//! connection stops reading instead), and a peer that stops reading is
//! dropped after the write timeout instead of holding a task forever.

mod common;

use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::writer::{Block, Noop};
use common::*;
use pipit::commit::SubmitError;
use pipit_client::pipit_protocol::handshake::IkStep;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{ClientHandshake, Message};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn acks_and_read_receipts_wait_for_a_full_storage_queue_instead_of_being_dropped() {
    let s = TestServer::start(|c| c.storage.queue = 4);
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    ca.send(&[text(1, b.account, "hi")]).await.unwrap();
    let sent = expect_sent(&mut ca, 1).await;
    let d = expect_deliver(&mut cb).await;

    // Stall the writer and fill its queue.
    let writer = s.running.as_ref().unwrap().services().writer.clone();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    writer.try_submit(Box::new(Block { entered: Some(entered_tx), release: release_rx })).unwrap();
    tokio::task::spawn_blocking(move || entered.recv_timeout(T).unwrap()).await.unwrap();
    let mut queued = 0;
    loop {
        match writer.try_submit(Box::new(Noop)) {
            Ok(()) => queued += 1,
            Err(r) => {
                assert_eq!(r.reason, SubmitError::Full);
                break;
            }
        }
    }
    assert_eq!(queued, 4);

    // b acks and reads while there is no room.
    let read =
        pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer: a.account, through: d.seq, ..Default::default() };
    cb.send(&[pb::Ack { through: d.inbox, ids: vec![] }.into(), read.into()]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    release.send(()).unwrap();

    // Both reach the sender once the writer has room again.
    let mut kinds = Vec::new();
    while kinds.len() < 2 {
        match ca.recv_timeout(T).await.unwrap() {
            Message::Receipt(r) => {
                assert_eq!((r.peer, r.through), (b.account, sent.seq));
                kinds.push(r.kind);
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    kinds.sort();
    assert_eq!(kinds, vec![pb::ReceiptKind::Delivered as i32, pb::ReceiptKind::Read as i32]);
    // And b's connection still works.
    cb.send(&[text(1, a.account, "back")]).await.unwrap();
    expect_sent(&mut cb, 1).await;
}

#[tokio::test]
async fn a_peer_that_stops_reading_is_dropped_after_the_write_timeout() {
    let s = TestServer::start(|c| c.net.write_timeout_secs = 1);
    let (a, first) = register(s.addr).await;
    drop(first);
    // A socket with a tiny receive window, so the server's writes block
    // as soon as its own send buffer is full.
    let sock = tokio::net::TcpSocket::new_v4().unwrap();
    sock.set_recv_buffer_size(4096).unwrap();
    let mut stream = sock.connect(s.addr).await.unwrap();
    let mut out = BytesMut::new();
    let mut hs = ClientHandshake::ik(&a.key, &s.key, pipit_client::login(a.account, 0, 0), &mut out).unwrap();
    stream.write_all(&out).await.unwrap();
    let mut inbuf = BytesMut::new();
    let mut session = loop {
        assert!(stream.read_buf(&mut inbuf).await.unwrap() > 0);
        match hs.read(&mut inbuf).unwrap() {
            IkStep::NeedMore(h) => hs = h,
            IkStep::Established { session, .. } => break session,
            IkStep::Retry(_) => panic!("retry"),
        }
    };
    let addr = pipit::model::DeviceAddr::new(a.account, a.device);
    let registry = s.running.as_ref().unwrap().registry().clone();
    assert!(registry.is_online(addr));
    // Pings whose pongs (about 13 KB a frame) the client never reads:
    // far more than the kernel buffers hold.
    let pings: Vec<Message> = (0..1000).map(|i| pb::Ping { id: u64::MAX - i }.into()).collect();
    let mut flood = BytesMut::new();
    for _ in 0..700 {
        session.seal(&pings, &mut flood).unwrap();
    }
    let (_r, mut w) = stream.into_split();
    let writer = tokio::spawn(async move {
        // Blocks once the server stops reading; fails once it has closed.
        let _ = tokio::time::timeout(Duration::from_secs(30), w.write_all(&flood)).await;
        w
    });
    let started = Instant::now();
    while registry.is_online(addr) {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "the server still holds a connection that stopped reading"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    writer.abort();
    // The device can log in again at once.
    let mut c = login(&s, &a).await;
    c.send(&[pb::Ping { id: 1 }.into()]).await.unwrap();
}
