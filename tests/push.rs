//! Push wake-ups over real TCP, with RocksDB in a temp dir and real
//! handshakes. The push gateway is a real HTTP server on 127.0.0.1 that
//! the test starts (the one thing standing in for sygnal, APNs and FCM):
//! it records every request and answers as the test tells it.

mod common;

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::*;
use pipit::Config;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How the gateway answers one request.
#[derive(Debug, Clone)]
enum Reply {
    Status(u16, &'static str),
    /// Reads the request and never answers.
    Hang,
    /// Answers bytes that are not HTTP.
    Garbage,
}

#[derive(Debug, Clone)]
struct Request {
    path: String,
    body: Vec<u8>,
    at: Instant,
}

#[derive(Default)]
struct State {
    /// Replies for the next requests, in order; then `fallback`.
    script: VecDeque<Reply>,
    fallback: Option<Reply>,
    seen: Vec<Request>,
}

#[derive(Clone)]
struct Gateway {
    port: u16,
    state: Arc<Mutex<State>>,
}

impl Gateway {
    async fn start(fallback: Reply) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = Arc::new(Mutex::new(State { fallback: Some(fallback), ..State::default() }));
        let st = state.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(serve(stream, st.clone()));
            }
        });
        Self { port, state }
    }

    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/_matrix/push/v1/notify", self.port)
    }

    fn script(&self, replies: &[Reply]) {
        self.state.lock().unwrap().script.extend(replies.iter().cloned());
    }

    fn seen(&self) -> Vec<Request> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Waits until `n` requests arrived (or `T`), then returns them all.
    async fn wait_for(&self, n: usize) -> Vec<Request> {
        let deadline = Instant::now() + T;
        while self.seen().len() < n && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.seen()
    }
}

/// One request per connection (`Connection: close`), bodies by
/// Content-Length: enough HTTP for a client that sends one POST.
async fn serve(mut stream: tokio::net::TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let (head_len, content_len) = loop {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let len = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:").map(|v| v.trim().parse::<usize>().unwrap_or(0)))
                .unwrap_or(0);
            break (end + 4, len);
        }
    };
    while buf.len() < head_len + content_len {
        let Ok(n) = stream.read(&mut chunk).await else { return };
        if n == 0 {
            return;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    let head = String::from_utf8_lossy(&buf[..head_len]).to_string();
    let path = head.split_whitespace().nth(1).unwrap_or("").to_string();
    let body = buf[head_len..head_len + content_len].to_vec();
    let reply = {
        let mut st = state.lock().unwrap();
        st.seen.push(Request { path, body, at: Instant::now() });
        st.script.pop_front().or_else(|| st.fallback.clone()).unwrap()
    };
    match reply {
        Reply::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        Reply::Garbage => {
            let _ = stream.write_all(b"\x00\x01not http at all\xff\r\n\r\n").await;
        }
        Reply::Status(code, body) => {
            let text = format!(
                "HTTP/1.1 {code} X\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = stream.write_all(text.as_bytes()).await;
        }
    }
    let _ = stream.shutdown().await;
}

const OK: Reply = Reply::Status(200, r#"{"rejected":[]}"#);
const APP: &str = "org.pipit.test";

fn matrix(gw: &Gateway) -> impl FnOnce(&mut Config) {
    let url = gw.url();
    move |c: &mut Config| {
        c.push.gateway_url = url;
        c.push.fcm_app_id = APP.into();
        c.push.apns_app_id = "org.pipit.test.ios".into();
        c.push.interval_secs = 60;
        c.push.retry_base_ms = 50;
        c.push.timeout_secs = 2;
    }
}

async fn set_token(c: &mut Connection, req: u64, platform: pb::PushPlatform, token: &[u8]) -> Message {
    let m = pb::PushToken { platform: platform as i32, token: Bytes::copy_from_slice(token), req };
    c.send(&[m.into()]).await.unwrap();
    expect(c, |m| match &m {
        Message::Done(d) if d.req == req => Some(m),
        Message::Error(e) if e.req == req => Some(m),
        _ => None,
    })
    .await
}

async fn token(c: &mut Connection, req: u64, token: &str) {
    let answer = set_token(c, req, pb::PushPlatform::Fcm, token.as_bytes()).await;
    assert!(matches!(answer, Message::Done(_)), "{answer:?}");
}

fn json(r: &Request) -> serde_json::Value {
    serde_json::from_slice(&r.body).unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&r.body)))
}

async fn send_all(c: &mut Connection, first_id: u64, n: u64, to: u64, body: &str) {
    let msgs: Vec<Message> = (first_id..first_id + n).map(|id| text(id, to, body)).collect();
    c.send(&msgs).await.unwrap();
    for id in first_id..first_id + n {
        expect_sent(c, id).await;
    }
}

#[tokio::test]
async fn one_content_free_wake_up_for_fifty_messages_to_an_offline_device() {
    let gw = Gateway::start(OK).await;
    let s = TestServer::start(matrix(&gw));
    let (a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    assert!(cb.login().features.contains(&(pb::Feature::Push as i32)));
    token(&mut cb, 1, "fcm-token-of-b").await;
    drop(cb);
    tokio::time::sleep(Duration::from_millis(200)).await;

    let secret = "SECRET-PAYLOAD-7f3a";
    send_all(&mut ca, 1, 1, b.account, secret).await;
    let seen = gw.wait_for(1).await;
    assert_eq!(seen.len(), 1);
    let r = &seen[0];
    assert_eq!(r.path, "/_matrix/push/v1/notify");
    assert!(!r.body.windows(secret.len()).any(|w| w == secret.as_bytes()), "the message content reached the gateway");
    let v = json(r);
    let device = &v["notification"]["devices"][0];
    assert_eq!(device["pushkey"], "fcm-token-of-b");
    assert_eq!(device["app_id"], APP);
    assert_eq!(device["data"]["account"], b.account);
    assert_eq!(v["notification"]["counts"]["unread"], 1);
    for key in ["content", "sender", "room_id", "event_id", "type"] {
        assert!(v["notification"].get(key).is_none(), "{key} in a content-free wake-up: {v}");
    }

    // Fifty more within the interval: still one request.
    send_all(&mut ca, 2, 50, b.account, secret).await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(gw.seen().len(), 1, "coalesced into the first wake-up");

    // Nothing was lost: the device finds all 51 when it connects.
    let mut cb = login(&s, &b).await;
    let mut got = 0;
    while got < 51 {
        expect_deliver(&mut cb).await;
        got += 1;
    }
    // Online devices are not woken.
    send_all(&mut ca, 100, 1, b.account, "hi").await;
    expect_deliver(&mut cb).await;
    let _ = a;
    assert_eq!(gw.seen().len(), 1);
}

#[tokio::test]
async fn push_requests_per_thousand_messages_to_offline_devices() {
    let gw = Gateway::start(OK).await;
    let s = TestServer::start(matrix(&gw));
    let (_a, mut ca) = register(s.addr).await;
    let mut offline = Vec::new();
    for i in 0..10 {
        let (d, mut cd) = register(s.addr).await;
        token(&mut cd, 1, &format!("token-{i}")).await;
        offline.push(d);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut id = 1;
    for round in 0..10 {
        for d in &offline {
            send_all(&mut ca, id, 10, d.account, &format!("round {round}")).await;
            id += 10;
        }
    }
    let seen = gw.wait_for(10).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let seen_after = gw.seen().len();
    println!("push requests per 1,000 messages to 10 offline devices (interval 60 s): {seen_after}");
    assert_eq!(seen.len(), 10);
    assert_eq!(seen_after, 10, "one per device per interval");
}

#[tokio::test]
async fn a_gateway_answering_500_is_retried_and_garbage_too() {
    let gw = Gateway::start(OK).await;
    gw.script(&[Reply::Status(500, ""), Reply::Garbage, Reply::Status(503, "")]);
    let s = TestServer::start(matrix(&gw));
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    token(&mut cb, 1, "tok").await;
    drop(cb);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&mut ca, 1, 1, b.account, "x").await;
    let seen = gw.wait_for(4).await;
    assert_eq!(seen.len(), 4, "three failures, then the one that worked");
    for w in seen.windows(2) {
        assert!(w[1].at >= w[0].at + Duration::from_millis(40), "retried without a pause");
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(gw.seen().len(), 4, "no retry after success");
}

#[tokio::test]
async fn a_410_removes_the_token_and_a_404_does_not() {
    let gw = Gateway::start(Reply::Status(404, "")).await;
    gw.script(&[Reply::Status(410, "")]);
    let s = TestServer::start(|c| {
        matrix(&gw)(c);
        c.push.interval_secs = 1;
    });
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let (c, mut cc) = register(s.addr).await;
    token(&mut cb, 1, "tok-b").await;
    token(&mut cc, 1, "tok-c").await;
    drop(cb);
    drop(cc);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // b: 410, once; the token is gone, so no request after the interval.
    send_all(&mut ca, 1, 1, b.account, "x").await;
    assert_eq!(gw.wait_for(1).await.len(), 1);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    send_all(&mut ca, 2, 1, b.account, "x").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(gw.seen().len(), 1, "a token the gateway called gone was used again");

    // c: the gateway answers 404 (a wrong gateway URL, not a dead token):
    // dropped, not retried, and the token stays.
    send_all(&mut ca, 3, 1, c.account, "x").await;
    assert_eq!(gw.wait_for(2).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    send_all(&mut ca, 4, 1, c.account, "x").await;
    let seen = gw.wait_for(3).await;
    assert_eq!(seen.len(), 3, "the token survived a 404");
    assert_eq!(json(&seen[2])["notification"]["devices"][0]["pushkey"], "tok-c");
}

#[tokio::test]
async fn a_gateway_that_never_answers_delays_nobody() {
    let gw = Gateway::start(Reply::Hang).await;
    let s = TestServer::start(|c| {
        matrix(&gw)(c);
        c.push.timeout_secs = 30;
        c.push.concurrency = 2;
    });
    let (_a, mut ca) = register(s.addr).await;
    let mut asleep = Vec::new();
    for i in 0..10 {
        let (d, mut cd) = register(s.addr).await;
        token(&mut cd, 1, &format!("t{i}")).await;
        asleep.push(d);
    }
    let (d, mut cd) = register(s.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut id = 1;
    for x in &asleep {
        send_all(&mut ca, id, 1, x.account, "x").await;
        id += 1;
    }
    assert_eq!(gw.wait_for(2).await.len(), 2, "two requests hang, holding both permits");
    // Deliveries to an online device are not held up by it.
    let started = Instant::now();
    for _ in 0..20 {
        send_all(&mut ca, id, 1, d.account, "hello").await;
        let got = expect_deliver(&mut cd).await;
        assert_eq!(got.seq, id - 10);
        id += 1;
    }
    let took = started.elapsed();
    println!("20 round trips to an online device while the gateway hangs: {took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}

#[tokio::test]
async fn unifiedpush_endpoints_are_posted_to_and_forgotten_when_gone() {
    let gw = Gateway::start(Reply::Status(201, "")).await;
    gw.script(&[Reply::Status(201, ""), Reply::Status(404, "")]);
    let s = TestServer::start(|c| {
        c.push.unifiedpush = true;
        c.push.allow_private_endpoints = true;
        c.push.interval_secs = 1;
    });
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    assert!(cb.login().features.contains(&(pb::Feature::Push as i32)));
    let endpoint = format!("http://127.0.0.1:{}/up/b?k=1", gw.port);
    let answer = set_token(&mut cb, 1, pb::PushPlatform::UnifiedPush, endpoint.as_bytes()).await;
    assert!(matches!(answer, Message::Done(_)), "{answer:?}");
    // No Matrix gateway on this server: APNs and FCM tokens are refused.
    let answer = set_token(&mut cb, 2, pb::PushPlatform::Fcm, b"x").await;
    assert!(matches!(&answer, Message::Error(e) if e.code == pb::ErrorCode::NotSupported as i32), "{answer:?}");
    drop(cb);
    tokio::time::sleep(Duration::from_millis(200)).await;

    send_all(&mut ca, 1, 1, b.account, "x").await;
    let seen = gw.wait_for(1).await;
    assert_eq!(seen[0].path, "/up/b?k=1");
    assert_eq!(json(&seen[0]), serde_json::json!({ "unread": 1 }));
    // The next wake-up finds the endpoint gone (404) and forgets it.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    send_all(&mut ca, 2, 1, b.account, "x").await;
    assert_eq!(gw.wait_for(2).await.len(), 2);
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    send_all(&mut ca, 3, 1, b.account, "x").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert_eq!(gw.seen().len(), 2, "a UnifiedPush endpoint that is gone was used again");
}

#[tokio::test]
async fn bad_tokens_get_clear_answers_and_an_empty_one_removes() {
    let gw = Gateway::start(OK).await;
    let s = TestServer::start(|c| {
        matrix(&gw)(c);
        c.push.unifiedpush = true;
        c.push.interval_secs = 1;
    });
    let (_a, mut ca) = register(s.addr).await;
    let (b, mut cb) = register(s.addr).await;
    let code = |m: Message| match m {
        Message::Error(e) => pb::ErrorCode::try_from(e.code).unwrap(),
        Message::Done(_) => pb::ErrorCode::Unspecified,
        other => panic!("{other:?}"),
    };
    use pb::PushPlatform::*;
    assert_eq!(code(set_token(&mut cb, 1, Fcm, &[b'a'; 513]).await), pb::ErrorCode::TooLarge);
    assert_eq!(code(set_token(&mut cb, 2, Unspecified, b"abc").await), pb::ErrorCode::BadRequest);
    assert_eq!(code(set_token(&mut cb, 3, Fcm, b"\xff\xfe").await), pb::ErrorCode::BadRequest);
    assert_eq!(code(set_token(&mut cb, 4, UnifiedPush, b"not a url").await), pb::ErrorCode::BadRequest);
    assert_eq!(code(set_token(&mut cb, 5, UnifiedPush, b"http://127.0.0.1:1/x").await), pb::ErrorCode::Forbidden);
    assert_eq!(code(set_token(&mut cb, 6, UnifiedPush, b"http://10.0.0.1/x").await), pb::ErrorCode::Forbidden);
    assert_eq!(code(set_token(&mut cb, 7, Fcm, &[b'a'; 512]).await), pb::ErrorCode::Unspecified, "512 bytes fit");
    assert_eq!(code(set_token(&mut cb, 8, Fcm, b"").await), pb::ErrorCode::Unspecified, "empty removes");
    // The connection is still fine.
    let got = until_pong(&mut cb, 9).await;
    assert!(got.is_empty(), "{got:?}");
    drop(cb);
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&mut ca, 1, 3, b.account, "x").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(gw.seen().is_empty(), "a removed token was woken: {:?}", gw.seen());
}

#[tokio::test]
async fn copies_of_what_its_own_account_sent_do_not_wake_a_device() {
    let gw = Gateway::start(OK).await;
    let s = TestServer::start(matrix(&gw));
    let (_a, mut ca) = register(s.addr).await;
    let tablet = link(&s, &mut ca, 1).await;
    let mut ct = login(&s, &tablet).await;
    token(&mut ct, 1, "tablet-token").await;
    drop(ct);
    let (b, _cb) = register(s.addr).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    send_all(&mut ca, 1, 3, b.account, "from my phone").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    assert!(gw.seen().is_empty(), "the tablet was woken for its own account's message: {:?}", gw.seen());
}
