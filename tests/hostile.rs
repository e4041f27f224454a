//! Misbehaving peers get a clear error or a timeout and a closed
//! connection; a pair connected beside them keeps exchanging throughout.

mod common;

use std::time::{Duration, Instant};

use bytes::BytesMut;
use common::*;
use pipit_client::pipit_protocol::handshake::IkStep;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{ClientHandshake, StaticKeypair};
use pipit_client::{ClientError, Connection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// One message each way between a and b, acked.
async fn exchange(ca: &mut Connection, a: &Device, cb: &mut Connection, b: &Device, id: u64) {
    ca.send(&[text(id, b.account, "ping")]).await.unwrap();
    expect_sent(ca, id).await;
    let d = expect_deliver(cb).await;
    ack(cb, d.inbox).await;
    cb.send(&[text(id, a.account, "pong")]).await.unwrap();
    expect_sent(cb, id).await;
    let d = expect_deliver(ca).await;
    ack(ca, d.inbox).await;
}

/// Reads until the server closes; returns what it sent and how long it took.
async fn closed_by_server(mut s: TcpStream, within: Duration) -> (Vec<u8>, Duration) {
    let start = Instant::now();
    let mut got = Vec::new();
    let mut buf = [0u8; 512];
    loop {
        match tokio::time::timeout_at((start + within).into(), s.read(&mut buf)).await {
            Err(_) => panic!("server kept the connection open for {within:?}"),
            Ok(Ok(0)) | Ok(Err(_)) => return (got, start.elapsed()),
            Ok(Ok(n)) => got.extend_from_slice(&buf[..n]),
        }
    }
}

async fn raw(s: &TestServer, bytes: &[u8]) -> TcpStream {
    let mut c = TcpStream::connect(s.addr).await.unwrap();
    c.write_all(bytes).await.unwrap();
    c
}

#[tokio::test]
async fn hostile_peers_are_closed_while_a_pair_keeps_exchanging() {
    let s = TestServer::start(|c| c.handshake_timeout_secs = 1);
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let mut id = 0;
    let mut step = async |ca: &mut Connection, cb: &mut Connection| {
        id += 1;
        exchange(ca, &a, cb, &b, id).await;
    };
    step(&mut ca, &mut cb).await;

    // Garbage before the handshake: closed on the first byte, no answer.
    let (got, _) = closed_by_server(raw(&s, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await, T).await;
    assert!(got.is_empty());
    step(&mut ca, &mut cb).await;

    // An oversized length: refused from the two length bytes alone.
    let (got, _) = closed_by_server(raw(&s, b"pip\x01\xff\xff").await, T).await;
    assert!(got.is_empty());
    step(&mut ca, &mut cb).await;

    // An unsupported version gets a Refuse frame with the code, then close.
    let (got, _) = closed_by_server(raw(&s, b"pip\x09").await, T).await;
    assert_eq!(got, vec![0, 2, 7, pb::ErrorCode::UnsupportedVersion as u8]);

    // An unregistered key: an authenticated UNKNOWN_DEVICE, then close.
    let stranger = StaticKeypair::generate();
    let err = Connection::connect(s.addr, &stranger, pipit_client::login(99, 0, 0), &s.opts()).await.unwrap_err();
    assert!(matches!(err, ClientError::Refused(pb::ErrorCode::UnknownDevice)), "{err}");
    step(&mut ca, &mut cb).await;

    // A truncated frame: the server waits, then times the handshake out.
    let (_, took) = closed_by_server(raw(&s, b"pip\x01\x00\x80\x01\x02\x03").await, T).await;
    assert!(took >= Duration::from_millis(900), "closed after {took:?}, before the timeout");
    step(&mut ca, &mut cb).await;

    // A peer that never says anything: timed out the same way.
    let (_, took) = closed_by_server(raw(&s, b"").await, T).await;
    assert!(took >= Duration::from_millis(900));
    step(&mut ca, &mut cb).await;

    // After a valid handshake: a forged frame, then a replayed frame.
    for replay in [false, true] {
        let mut stream = TcpStream::connect(s.addr).await.unwrap();
        let mut out = BytesMut::new();
        let mut hs = ClientHandshake::ik(&a.key, &s.key, pipit_client::login(a.account, 0, 0), &mut out).unwrap();
        stream.write_all(&out).await.unwrap();
        let mut inbuf = BytesMut::new();
        let mut session = loop {
            let n = stream.read_buf(&mut inbuf).await.unwrap();
            assert!(n > 0);
            match hs.read(&mut inbuf).unwrap() {
                IkStep::NeedMore(h) => hs = h,
                IkStep::Established { session, .. } => break session,
                IkStep::Retry(_) => panic!("retry"),
            }
        };
        // This login replaced a's connection; a logs in again below.
        let mut frame = BytesMut::new();
        if replay {
            session.seal(&[pb::Ping { id: 1 }.into()], &mut frame).unwrap();
            let copy = frame.clone();
            frame.extend_from_slice(&copy);
        } else {
            frame.extend_from_slice(&[0, 20]);
            frame.extend_from_slice(&[0xAB; 20]);
        }
        stream.write_all(&frame).await.unwrap();
        closed_by_server(stream, T).await;
        ca = login(&s, &a).await;
        step(&mut ca, &mut cb).await;
    }
}
