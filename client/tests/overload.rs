//! Defect 5, client side: an overloaded server's refusal (`UNAVAILABLE`
//! with `retry_after_secs`) used to make the client drop the connection
//! and reconnect, turning overload into a reconnect storm. Now the client
//! keeps the connection and sends the message again after the pause; a
//! `NOT_SUPPORTED` answer is final. A scripted server (the protocol
//! crate's real responder over a real socket) refuses, then accepts.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_client::pipit_protocol::handshake::ServerKeys;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::session::Incoming;
use pipit_client::pipit_protocol::{Message, StaticKeypair};
use pipit_client::{Client, Config, Encryption, Event};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const T: Duration = Duration::from_secs(20);

/// What the scripted server saw: each Send's id and when it arrived.
type Seen = Vec<(u64, Instant)>;

#[tokio::test(flavor = "current_thread")]
async fn overload_is_retried_on_the_same_connection_and_not_supported_is_final() {
    let server_kp = StaticKeypair::generate();
    let keys = Arc::new(ServerKeys::new(server_kp.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server = tokio::spawn(async move {
        let (mut s, mut session, mut input) = common::accept(&listener, &keys, &[]).await;
        let mut out = BytesMut::new();
        let mut seen: Seen = Vec::new();
        let mut refused = 0;
        // Until message 1 got Sent and message 2 its final refusal, and a
        // moment more to catch a resend of 2 that must not come.
        let deadline = tokio::time::Instant::now() + T;
        let mut done_at = None;
        loop {
            let stop = done_at.unwrap_or(deadline);
            let n = match tokio::time::timeout_at(stop, s.read_buf(&mut input)).await {
                Err(_) => break,
                Ok(r) => r.unwrap(),
            };
            if n == 0 {
                panic!("the client closed the connection");
            }
            let mut answers = Vec::new();
            while let Some(inc) = session.open(&mut input).unwrap() {
                let Incoming::Messages(msgs) = inc else { continue };
                for m in msgs {
                    let Message::Send(send) = m else { continue };
                    seen.push((send.id, Instant::now()));
                    let answer: Message = match send.id {
                        // Busy twice, then stored.
                        1 if refused < 2 => {
                            refused += 1;
                            pb::Error {
                                code: pb::ErrorCode::Unavailable as i32,
                                id: 1,
                                retry_after_secs: 1,
                                ..Default::default()
                            }
                            .into()
                        }
                        1 => pb::Sent { id: 1, seq: 1, time: 1_795_000_000 }.into(),
                        _ => pb::Error { code: pb::ErrorCode::NotSupported as i32, id: send.id, ..Default::default() }
                            .into(),
                    };
                    answers.push(answer);
                }
            }
            out.clear();
            session.seal(&answers, &mut out).unwrap();
            s.write_all(&out).await.unwrap();
            if done_at.is_none() && seen.iter().any(|(id, _)| *id == 2) && refused == 2 && seen.len() >= 4 {
                done_at = Some(tokio::time::Instant::now() + Duration::from_millis(1_500));
            }
        }
        seen
    });

    let store = common::known_to(&server_kp);
    // A scripted server without the key directory: payloads go as they are.
    let mut config = Config::new(addr.to_string());
    config.encryption = Encryption::Off;
    let (client, mut events) = Client::start(config, store).unwrap();
    let first = client.send(9, &b"busy at first"[..]).await.unwrap();
    let second = client.send(9, &b"group-only, say"[..]).await.unwrap();
    assert_eq!((first, second), (1, 2));
    let (mut sent, mut failed) = (None, None);
    while sent.is_none() || failed.is_none() {
        match tokio::time::timeout(T, events.next()).await.unwrap() {
            Some(Event::Sent(s)) => sent = Some(s.id),
            Some(Event::SendFailed { id, code }) => failed = Some((id, code)),
            Some(Event::Disconnected { reason }) => panic!("dropped the connection: {reason}"),
            Some(Event::Stopped { reason }) => panic!("stopped: {reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    assert_eq!(sent, Some(1));
    assert_eq!(failed, Some((2, pb::ErrorCode::NotSupported)));

    let seen = tokio::time::timeout(T * 2, server).await.unwrap().unwrap();
    let ones: Vec<Instant> = seen.iter().filter(|(id, _)| *id == 1).map(|(_, t)| *t).collect();
    assert_eq!(ones.len(), 3, "sent, refused twice, sent again each time: {seen:?}");
    // The pause the server asked for, then a longer one after the second
    // refusal in a row (generous margins: the machine is shared).
    assert!(ones[1] - ones[0] >= Duration::from_millis(900), "waited {:?}", ones[1] - ones[0]);
    assert!(ones[2] - ones[1] >= Duration::from_millis(1_800), "backed off {:?}", ones[2] - ones[1]);
    assert_eq!(seen.iter().filter(|(id, _)| *id == 2).count(), 1, "NOT_SUPPORTED is final: not sent again");
    assert_eq!(client.stats().reconnects.load(Ordering::Relaxed), 0);
    assert_eq!(client.stats().deferred.load(Ordering::Relaxed), 2);
}
