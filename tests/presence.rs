//! Presence and typing over real TCP, with RocksDB in a temp dir and real
//! handshakes: a subscriber sees online, offline after the grace period
//! and last seen; a reconnect within the grace does not flap; `NOBODY`
//! hides last seen; last seen survives a restart; a connection that did
//! not subscribe gets no presence at all; typing reaches an online peer
//! and never a later login.

mod common;

use std::time::{Duration, Instant};

use common::*;
use pipit::Config;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;

const GRACE_MS: u64 = 1_000;

fn tweak(c: &mut Config) {
    c.presence.grace_ms = GRACE_MS;
    c.presence.max_subscriptions = 8;
}

fn subscribe(req: u64, accounts: &[u64]) -> Message {
    pb::PresenceSubscribe { accounts: accounts.to_vec(), req }.into()
}

/// Sends a request and returns what arrived before its answer, and the
/// answer.
async fn request(c: &mut Connection, m: Message, req: u64) -> (Vec<Message>, Message) {
    c.send(&[m]).await.unwrap();
    let mut before = Vec::new();
    loop {
        let m = c.recv_timeout(T).await.unwrap();
        let answers = match &m {
            Message::Done(d) => d.req == req,
            Message::Error(e) => e.req == req,
            _ => false,
        };
        if answers {
            return (before, m);
        }
        before.push(m);
    }
}

fn presences(msgs: &[Message]) -> Vec<pb::Presence> {
    msgs.iter()
        .filter_map(|m| match m {
            Message::Presence(p) => Some(*p),
            _ => None,
        })
        .collect()
}

async fn expect_presence(c: &mut Connection) -> pb::Presence {
    expect(c, |m| match m {
        Message::Presence(p) => Some(p),
        _ => None,
    })
    .await
}

fn is_done(m: &Message, req: u64) -> bool {
    matches!(m, Message::Done(d) if d.req == req)
}

fn is_error(m: &Message, code: pb::ErrorCode, req: u64) -> bool {
    matches!(m, Message::Error(e) if e.code == code as i32 && e.req == req)
}

#[tokio::test]
async fn a_subscriber_sees_online_offline_after_the_grace_and_last_seen_and_no_flap() {
    let s = TestServer::start(tweak);
    assert!(s.running.as_ref().unwrap().services().features.offers(pb::Feature::Presence));
    let (a, ca) = register(s.addr).await;
    let (_b, mut cb) = register(s.addr).await;
    let (_c, mut cc) = register(s.addr).await;
    assert!(cb.login().features.contains(&(pb::Feature::Presence as i32)));

    // The current state at once, before the answer.
    let (before, answer) = request(&mut cb, subscribe(1, &[a.account]), 1).await;
    assert!(is_done(&answer, 1), "{answer:?}");
    assert_eq!(presences(&before), vec![pb::Presence { account: a.account, online: true, last_seen: 0 }]);

    // Offline only after the grace period, with a last seen of when it
    // left.
    let left = Instant::now();
    let left_unix = pipit::model::unix_now();
    drop(ca);
    let p = expect_presence(&mut cb).await;
    let waited = left.elapsed();
    assert!(waited >= Duration::from_millis(GRACE_MS - 100), "offline after {waited:?}, before the grace ended");
    assert!(!p.online);
    assert!(p.last_seen.abs_diff(left_unix) <= 2, "last seen {} for a departure at {left_unix}", p.last_seen);

    // Back online: told at once.
    let ca = login(&s, &a).await;
    let p = expect_presence(&mut cb).await;
    assert!(p.online && p.last_seen == 0, "{p:?}");

    // A reconnect within the grace period: no offline, no second online.
    drop(ca);
    let ca = login(&s, &a).await;
    tokio::time::sleep(Duration::from_millis(GRACE_MS * 2)).await;
    let got = until_pong(&mut cb, 10).await;
    assert!(presences(&got).is_empty(), "a reconnect within the grace flapped: {got:?}");

    // NOBODY: offline, and last seen 0; a new subscriber sees 0 too.
    let (_, answer) =
        request(&mut { ca }, pb::PrivacySet { last_seen: pb::LastSeenVisibility::Nobody as i32, req: 5 }.into(), 5)
            .await;
    assert!(is_done(&answer, 5), "{answer:?}");
    // (the connection was moved into the request and is gone now)
    let p = expect_presence(&mut cb).await;
    assert_eq!(p, pb::Presence { account: a.account, online: false, last_seen: 0 });
    let (_, mut cd) = register(s.addr).await;
    let (before, _) = request(&mut cd, subscribe(1, &[a.account]), 1).await;
    assert_eq!(presences(&before), vec![pb::Presence { account: a.account, online: false, last_seen: 0 }]);

    // Everyone back: shown again.
    let mut ca = login(&s, &a).await;
    let (_, answer) =
        request(&mut ca, pb::PrivacySet { last_seen: pb::LastSeenVisibility::Everyone as i32, req: 6 }.into(), 6).await;
    assert!(is_done(&answer, 6));

    // The connection that never subscribed got no presence at all.
    let got = until_pong(&mut cc, 1).await;
    assert!(presences(&got).is_empty(), "an unsubscribed connection got presence: {got:?}");
}

#[tokio::test]
async fn last_seen_survives_a_restart_and_an_account_online_at_shutdown_gets_one() {
    let mut s = TestServer::start(tweak);
    let (a, ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    let (_w, mut cw) = register(s.addr).await;
    let (_, answer) = request(&mut cw, subscribe(1, &[a.account]), 1).await;
    assert!(is_done(&answer, 1));
    drop(ca);
    let before = expect_presence(&mut cw).await;
    assert!(!before.online && before.last_seen > 0);
    drop(cw);
    // b is still online when the server stops.
    let stopped = pipit::model::unix_now();
    s.restart_with(tweak);
    drop(cb);
    let (_w2, mut cw) = register(s.addr).await;
    let (got, answer) = request(&mut cw, subscribe(2, &[a.account, b.account]), 2).await;
    assert!(is_done(&answer, 2));
    let got = presences(&got);
    assert_eq!(got[0], pb::Presence { account: a.account, online: false, last_seen: before.last_seen }, "{got:?}");
    assert_eq!(got[1].account, b.account);
    assert!(got[1].last_seen.abs_diff(stopped) <= 5, "online at shutdown: last seen {} vs {stopped}", got[1].last_seen);
}

#[tokio::test]
async fn bad_subscriptions_are_refused_and_change_nothing() {
    let s = TestServer::start(tweak);
    let (a, ca) = register(s.addr).await;
    let (_b, mut cb) = register(s.addr).await;
    let (_, answer) = request(&mut cb, subscribe(1, &[a.account]), 1).await;
    assert!(is_done(&answer, 1));

    let (_, answer) = request(&mut cb, subscribe(2, &[a.account, 999_999]), 2).await;
    assert!(is_error(&answer, pb::ErrorCode::NotFound, 2), "unknown account: {answer:?}");
    let (_, answer) = request(&mut cb, subscribe(3, &[0]), 3).await;
    assert!(is_error(&answer, pb::ErrorCode::NotFound, 3), "account 0: {answer:?}");
    let many: Vec<u64> = (1..=9).collect();
    let (_, answer) = request(&mut cb, subscribe(4, &many), 4).await;
    assert!(is_error(&answer, pb::ErrorCode::TooLarge, 4), "over the configured 8: {answer:?}");
    let duplicates = vec![a.account; 100];
    let (_, answer) = request(&mut cb, subscribe(5, &duplicates), 5).await;
    assert!(is_done(&answer, 5), "one account, named 100 times: {answer:?}");

    // The subscription in force is still a's.
    drop(ca);
    let p = expect_presence(&mut cb).await;
    assert_eq!((p.account, p.online), (a.account, false));

    // An empty list clears it.
    let (_, answer) = request(&mut cb, subscribe(6, &[]), 6).await;
    assert!(is_done(&answer, 6));
    let ca = login(&s, &a).await;
    drop(ca);
    tokio::time::sleep(Duration::from_millis(GRACE_MS * 2)).await;
    let got = until_pong(&mut cb, 7).await;
    assert!(presences(&got).is_empty(), "unsubscribed, still told: {got:?}");
    assert_eq!(s.running.as_ref().unwrap().registry().accounts_tracked(), 1, "only b's own entry is left");
}

#[tokio::test]
async fn subscriptions_die_with_the_connection() {
    let s = TestServer::start(tweak);
    let (a, _ca) = register(s.addr).await;
    let registry = s.running.as_ref().unwrap().registry().clone();
    let base = registry.accounts_tracked();
    for round in 0..20 {
        let (_w, mut cw) = register(s.addr).await;
        let (_, answer) = request(&mut cw, subscribe(1, &[a.account, 1, 2]), 1).await;
        assert!(is_done(&answer, 1), "round {round}");
    }
    // Each watcher's own account went offline (and its entry with it)
    // after the grace; what is left is a and nothing for the watchers.
    let deadline = Instant::now() + T;
    while registry.accounts_tracked() > base && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(registry.accounts_tracked(), base, "closed connections left state behind");
}

#[tokio::test]
async fn typing_reaches_an_online_peer_and_never_a_later_login() {
    let s = TestServer::start(|c| {
        tweak(c);
        c.typing.burst = 5;
        c.typing.per_minute = 60;
    });
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    assert!(ca.login().features.contains(&(pb::Feature::Typing as i32)));
    ca.send(&[pb::Typing { peer: b.account, typing: true, ..Default::default() }.into()]).await.unwrap();
    let t = expect(&mut cb, |m| match m {
        Message::Typing(t) => Some(t),
        _ => None,
    })
    .await;
    assert_eq!(t, pb::Typing { peer: a.account, group: 0, typing: true, from: 0 });

    // Offline: dropped, and not kept for the next login.
    drop(cb);
    tokio::time::sleep(Duration::from_millis(200)).await;
    ca.send(&[pb::Typing { peer: b.account, typing: false, ..Default::default() }.into()]).await.unwrap();
    let got = until_pong(&mut ca, 1).await;
    assert!(got.is_empty(), "typing is never answered: {got:?}");
    let mut cb = login(&s, &b).await;
    let got = until_pong(&mut cb, 2).await;
    assert!(!got.iter().any(|m| matches!(m, Message::Typing(_))), "typing was kept for a later login: {got:?}");

    // A flood (on a new connection, with a full allowance): the burst
    // passes, the rest is dropped, nobody is answered and the connection
    // stays.
    let mut ca = login(&s, &a).await;
    let flood: Vec<Message> =
        (0..200).map(|i| pb::Typing { peer: b.account, typing: i % 2 == 0, ..Default::default() }.into()).collect();
    ca.send(&flood).await.unwrap();
    let answered = until_pong(&mut ca, 3).await;
    assert!(answered.is_empty(), "{answered:?}");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = until_pong(&mut cb, 4).await;
    let typing = got.iter().filter(|m| matches!(m, Message::Typing(_))).count();
    assert!((5..=7).contains(&typing), "{typing} of 200 typing notices passed a burst of 5");
}
