//! The client drops a delivery it has already processed. A scripted server
//! (the protocol crate's real responder over a real socket) delivers inbox
//! id 1 twice, then 2; the app must see 1 and 2 once each, and the client
//! must ack through 2.

mod common;

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use pipit_client::pipit_protocol::handshake::ServerKeys;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::session::Incoming;
use pipit_client::pipit_protocol::{Message, StaticKeypair};
use pipit_client::{Client, Config, Encryption, Event};
use tokio::io::AsyncReadExt;

fn deliver(inbox: u64, seq: u64) -> Message {
    pb::Deliver { inbox, from: 9, seq, payload: Bytes::from(format!("m{seq}")), ..Default::default() }.into()
}

#[tokio::test(flavor = "current_thread")]
async fn a_redelivered_message_reaches_the_app_once() {
    let server_kp = StaticKeypair::generate();
    let keys = Arc::new(ServerKeys::new(server_kp.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server = tokio::spawn(async move {
        // Inbox 1 arrives twice, as after a reconnect before the ack landed.
        let (mut s, mut session, mut input) =
            common::accept(&listener, &keys, &[deliver(1, 1), deliver(1, 1), deliver(2, 2)]).await;
        // Wait for the client's cumulative ack.
        let mut acked = 0;
        while acked < 2 {
            if s.read_buf(&mut input).await.unwrap() == 0 {
                break;
            }
            while let Some(Incoming::Messages(msgs)) = session.open(&mut input).unwrap() {
                for m in msgs {
                    if let Message::Ack(a) = m {
                        acked = acked.max(a.through);
                    }
                }
            }
        }
        acked
    });

    let store = common::known_to(&server_kp);
    // A scripted server without the key directory: payloads go as they are.
    let mut config = Config::new(addr.to_string());
    config.encryption = Encryption::Off;
    let (client, mut events) = Client::start(config, store).unwrap();
    let mut seen = Vec::new();
    while seen.len() < 2 {
        match tokio::time::timeout(Duration::from_secs(10), events.next()).await.unwrap() {
            Some(Event::Message(d)) => seen.push(d.inbox),
            Some(Event::Stopped { reason }) => panic!("{reason}"),
            Some(_) => {}
            None => panic!("client ended"),
        }
    }
    assert_eq!(seen, vec![1, 2]);
    assert_eq!(tokio::time::timeout(Duration::from_secs(10), server).await.unwrap().unwrap(), 2, "acked through 2");
    assert_eq!(client.stats().duplicates_dropped.load(Ordering::Relaxed), 1);
    // Nothing more reaches the app.
    assert!(!matches!(
        tokio::time::timeout(Duration::from_millis(200), events.next()).await,
        Ok(Some(Event::Message(_)))
    ));
}
