//! Requests the library answers itself (`Client::call`, and through it
//! presence, privacy and push tokens): a busy server's `UNAVAILABLE` is
//! retried on the same connection after the pause, a final refusal is
//! returned, a request made while offline goes once connected, and the
//! presence subscription goes again on every new connection, as does a
//! group create whose answer was lost, with its create id. A scripted
//! server (the protocol crate's real responder over a real socket).

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use pipit_client::pipit_protocol::handshake::ServerKeys;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::session::Incoming;
use pipit_client::pipit_protocol::{Message, Session, StaticKeypair};
use pipit_client::{Backoff, Client, ClientError, Config};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const T: Duration = Duration::from_secs(20);

/// Reads until a message `pick` takes.
async fn read_until<T>(
    s: &mut TcpStream,
    session: &mut Session,
    input: &mut BytesMut,
    mut pick: impl FnMut(Message) -> Option<T>,
) -> T {
    loop {
        while let Some(inc) = session.open(input).unwrap() {
            if let Incoming::Messages(msgs) = inc {
                for m in msgs {
                    if let Some(t) = pick(m) {
                        return t;
                    }
                }
            }
        }
        let n = tokio::time::timeout(T, s.read_buf(input)).await.unwrap().unwrap();
        assert!(n > 0, "the client closed");
    }
}

async fn answer(s: &mut TcpStream, session: &mut Session, msgs: &[Message]) {
    let mut out = BytesMut::new();
    session.seal(msgs, &mut out).unwrap();
    s.write_all(&out).await.unwrap();
}

#[tokio::test(flavor = "current_thread")]
async fn busy_is_retried_final_is_returned_and_the_subscription_follows_reconnects() {
    let server_kp = StaticKeypair::generate();
    let keys = Arc::new(ServerKeys::new(server_kp.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server = tokio::spawn(async move {
        let (mut s, mut session, mut input) = common::accept(&listener, &keys, &[]).await;
        // A privacy change: busy once, then done.
        let (req, first) = read_until(&mut s, &mut session, &mut input, |m| match m {
            Message::PrivacySet(p) => Some((p.req, Instant::now())),
            _ => None,
        })
        .await;
        assert!(req >= 1 << 20, "the library's ids stay clear of the app's: {req}");
        let busy =
            pb::Error { code: pb::ErrorCode::Unavailable as i32, req, retry_after_secs: 1, ..Default::default() };
        answer(&mut s, &mut session, &[busy.into()]).await;
        let (again, second) = read_until(&mut s, &mut session, &mut input, |m| match m {
            Message::PrivacySet(p) => Some((p.req, Instant::now())),
            _ => None,
        })
        .await;
        assert_eq!(again, req, "the same request again");
        assert!(second - first >= Duration::from_millis(900), "after the pause: {:?}", second - first);
        answer(&mut s, &mut session, &[pb::Done { req }.into()]).await;
        // A subscription: the state, then done; then one refused for good.
        let (req, accounts) = read_until(&mut s, &mut session, &mut input, |m| match m {
            Message::PresenceSubscribe(p) => Some((p.req, p.accounts)),
            _ => None,
        })
        .await;
        assert_eq!(accounts, vec![5]);
        let state = pb::Presence { account: 5, online: true, last_seen: 0 };
        answer(&mut s, &mut session, &[state.into(), pb::Done { req }.into()]).await;
        let req = read_until(&mut s, &mut session, &mut input, |m| match m {
            Message::PresenceSubscribe(p) => Some(p.req),
            _ => None,
        })
        .await;
        let gone = pb::Error { code: pb::ErrorCode::NotFound as i32, req, ..Default::default() };
        answer(&mut s, &mut session, &[gone.into()]).await;
        // Drop the connection: the client comes back and watches 5 again
        // (not the refused set), unasked.
        read_until(&mut s, &mut session, &mut input, |m| matches!(m, Message::Ping(_)).then_some(())).await;
        drop(s);
        let (mut s, mut session, mut input) = common::accept(&listener, &keys, &[]).await;
        let (req, accounts) = read_until(&mut s, &mut session, &mut input, |m| match m {
            Message::PresenceSubscribe(p) => Some((p.req, p.accounts)),
            _ => None,
        })
        .await;
        answer(&mut s, &mut session, &[pb::Done { req }.into()]).await;
        accounts
    });

    let store = common::known_to(&server_kp);
    let mut config = Config::new(addr.to_string());
    config.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(100) };
    let (client, mut events) = Client::start(config, store).unwrap();
    // Drain events in the background so the client never waits on us.
    let drain = tokio::spawn(async move { while events.next().await.is_some() {} });

    tokio::time::timeout(T, client.set_last_seen_visible(false)).await.unwrap().unwrap();
    tokio::time::timeout(T, client.watch_presence(vec![5])).await.unwrap().unwrap();
    let e = tokio::time::timeout(T, client.watch_presence(vec![5, 6])).await.unwrap().unwrap_err();
    assert!(matches!(e, ClientError::Refused(pb::ErrorCode::NotFound)), "{e}");
    client.request(vec![pb::Ping { id: 1 }.into()]).await.unwrap();
    let resubscribed = tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert_eq!(resubscribed, vec![5], "the set in force, on the new connection");
    client.close().await;
    drain.abort();
}

/// A group create whose answer was lost with its connection goes again on
/// the next connection with the same create id (SPEC.md 5.6: the server
/// answers it with the group the first copy made), instead of failing as
/// `Offline` and leaving the app to guess whether the group exists.
#[tokio::test(flavor = "current_thread")]
async fn a_group_create_whose_answer_was_lost_goes_again_with_its_create_id() {
    let server_kp = StaticKeypair::generate();
    let keys = Arc::new(ServerKeys::new(server_kp.clone()));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();

    let server = tokio::spawn(async move {
        let pick = |m: Message| match m {
            Message::GroupCreate(g) => Some(g),
            _ => None,
        };
        let (mut s, mut session, mut input) = common::accept(&listener, &keys, &[]).await;
        let first = read_until(&mut s, &mut session, &mut input, pick).await;
        // The create arrived; its answer is lost with the connection.
        drop(s);
        let (mut s, mut session, mut input) = common::accept(&listener, &keys, &[]).await;
        let again = read_until(&mut s, &mut session, &mut input, pick).await;
        let info = pb::GroupInfo { req: again.req, group: 3, version: 1, ..Default::default() };
        answer(&mut s, &mut session, &[info.into()]).await;
        (first, again, s)
    });

    let store = common::known_to(&server_kp);
    let mut config = Config::new(addr.to_string());
    config.backoff = Backoff { initial: Duration::from_millis(20), max: Duration::from_millis(100) };
    let (client, mut events) = Client::start(config, store).unwrap();
    let drain = tokio::spawn(async move { while events.next().await.is_some() {} });

    let created = tokio::time::timeout(T, client.create_group("club", &[8])).await.unwrap();
    assert_eq!(created.map(|g| g.group).map_err(|e| e.to_string()), Ok(3), "the answer to the copy sent again");
    let (first, again, _s) = tokio::time::timeout(T, server).await.unwrap().unwrap();
    assert_ne!(first.id, 0, "every create carries a create id");
    assert_eq!((again.id, &again.name, &again.members), (first.id, &first.name, &first.members), "the same create");
    client.close().await;
    drain.abort();
}
