//! The end-to-end key directory over real TCP with RocksDB: each one-time
//! prekey goes out once, under concurrent fetches, across a restart and
//! across SIGKILL; low stock is announced; bad uploads and floods of
//! fetches are refused; unlinking a device takes its keys with it.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;

fn fetch(req: u64, account: u64) -> Message {
    pb::KeysFetch { req, account, devices: vec![] }.into()
}

fn bundles(m: Message) -> Vec<pb::KeyBundle> {
    match m {
        Message::KeysResult(r) => r.bundles,
        other => panic!("expected KeysResult, got {other:?}"),
    }
}

/// `n` fetches of `account`'s bundles spread over `conns`, all in flight
/// at once; the one-time prekey ids handed out (`None`: the stock was
/// empty, the signed prekey is all there was).
async fn fetch_many(conns: &mut [Connection], account: u64, n: usize) -> Vec<Option<u32>> {
    let per = n / conns.len();
    let tasks = conns.iter_mut().enumerate().map(|(i, c)| async move {
        let reqs: Vec<Message> = (0..per).map(|k| fetch((i * per + k + 1) as u64, account)).collect();
        c.send(&reqs).await.unwrap();
        let mut got = Vec::new();
        while got.len() < per {
            if let Message::KeysResult(r) = c.recv_timeout(T).await.unwrap() {
                assert_eq!(r.bundles.len(), 1);
                let b = &r.bundles[0];
                assert!(b.signed.is_some() && b.identity.len() == 64);
                got.push(b.one_time.as_ref().map(|k| k.id));
            }
        }
        got
    });
    // Polled together: every connection's requests are in flight at once.
    futures_util::future::join_all(tasks).await.into_iter().flatten().collect()
}

fn config(dir: &std::path::Path) -> pipit::Config {
    pipit::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        shards: 2,
        ..pipit::Config::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_hundred_concurrent_fetches_hand_out_each_one_time_prekey_once_also_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let running = pipit::start(config(dir.path())).unwrap();
    let addr = running.local_addr;
    let (victim, mut cv) = register(addr).await;
    assert_eq!(call(&mut cv, key_upload(1, 7, 1..=60).into()).await, pb::Done { req: 1 }.into());
    let mut requesters = Vec::new();
    let mut accounts = Vec::new();
    for _ in 0..10 {
        let (d, c) = register(addr).await;
        accounts.push(d);
        requesters.push(c);
    }

    let got = fetch_many(&mut requesters, victim.account, 100).await;
    let handed: Vec<u32> = got.iter().flatten().copied().collect();
    let distinct: BTreeSet<u32> = handed.iter().copied().collect();
    assert_eq!(handed.len(), 60, "every one-time prekey went out");
    assert_eq!(distinct, (1..=60).collect(), "each exactly once");
    assert_eq!(got.iter().filter(|k| k.is_none()).count(), 40, "then the signed prekey alone");
    // The victim was told its stock ran low while it was online.
    let status = expect(&mut cv, |m| match m {
        Message::KeysStatus(s) => Some(s),
        _ => None,
    })
    .await;
    assert!(status.one_time_left < 16, "{status:?}");

    // A restart on the same data: nothing handed out comes back.
    drop((cv, requesters));
    running.shutdown(Duration::from_secs(2));
    let running = pipit::start(config(dir.path())).unwrap();
    let (addr, key) = (running.local_addr, running.public_key);
    assert_ne!(key, pipit_client::pipit_protocol::PublicKey([0; 32]));
    let mut cv = login_at(addr, key, &victim).await;
    // Its stock is empty: it hears so at login, right after LoginOk.
    let first = cv.recv_timeout(T).await.unwrap();
    assert_eq!(first, pb::KeysStatus { one_time_left: 0 }.into());
    // A retried upload of old ids adds nothing; new ids go in.
    let retry = pb::KeysUpload { req: 2, identity: Default::default(), signed: None, one_time: one_time_keys(1..=80) };
    assert_eq!(call(&mut cv, retry.into()).await, pb::Done { req: 2 }.into());
    let mut requesters = Vec::new();
    for d in &accounts[..3] {
        requesters.push(login_at(addr, key, d).await);
    }
    let got = fetch_many(&mut requesters, victim.account, 30).await;
    let handed: BTreeSet<u32> = got.iter().flatten().copied().collect();
    assert_eq!(handed, (61..=80).collect(), "only the new ones, each once");
    assert_eq!(got.iter().flatten().count(), 20);
    drop((cv, requesters));
    running.shutdown(Duration::from_secs(2));
}

#[tokio::test]
async fn a_handed_out_one_time_prekey_stays_gone_after_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let server = BinaryServer::spawn(dir.path(), &[], &[]);
    let (victim, mut cv) = register(server.addr).await;
    let (asker, mut ca) = register(server.addr).await;
    assert_eq!(call(&mut cv, key_upload(1, 3, 1..=5).into()).await, pb::Done { req: 1 }.into());
    let first = bundles(call(&mut ca, fetch(1, victim.account)).await);
    let taken = first[0].one_time.as_ref().unwrap().id;
    // The answer is in: SIGKILL before anything else can be flushed.
    let mut server = server;
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(server);
    let server = BinaryServer::spawn(dir.path(), &[], &[]);
    let mut ca = login_at(server.addr, server.key, &asker).await;
    let mut after = Vec::new();
    for req in 2..=6 {
        after.push(bundles(call(&mut ca, fetch(req, victim.account)).await)[0].one_time.as_ref().map(|k| k.id));
    }
    assert!(!after.contains(&Some(taken)), "{taken} handed out twice: {after:?}");
    assert_eq!(after.iter().flatten().count(), 4);
    assert_eq!(after.last(), Some(&None));
}

#[tokio::test]
async fn bad_uploads_unknown_accounts_and_fetch_floods_are_refused() {
    let s = TestServer::start(|c| {
        c.keys.fetch_burst = 5;
        c.keys.fetch_per_minute = 1;
    });
    let (_, mut c) = register(s.addr).await;
    let (other, _co) = register(s.addr).await;
    // One-time prekeys before there is an identity to belong to.
    let orphan = pb::KeysUpload { req: 1, one_time: one_time_keys(1..=3), ..Default::default() };
    assert_eq!(code(&call(&mut c, orphan.into()).await), pb::ErrorCode::BadRequest);
    let mut short = key_upload(2, 1, 1..=3);
    short.identity.truncate(63);
    assert_eq!(code(&call(&mut c, short.into()).await), pb::ErrorCode::BadRequest);
    let mut forged = key_upload(3, 1, 1..=3);
    forged.signed.as_mut().unwrap().key = bytes::Bytes::from(vec![1; 32]);
    assert_eq!(code(&call(&mut c, forged.into()).await), pb::ErrorCode::BadRequest, "bad signature");
    let mut odd_key = key_upload(4, 1, 1..=3);
    odd_key.one_time[1].key.truncate(31);
    assert_eq!(code(&call(&mut c, odd_key.into()).await), pb::ErrorCode::BadRequest);
    assert_eq!(code(&call(&mut c, key_upload(5, 1, 1..=201).into()).await), pb::ErrorCode::TooLarge);
    // Within the limit per upload, over it in stock: refused whole.
    assert_eq!(call(&mut c, key_upload(6, 1, 1..=150).into()).await, pb::Done { req: 6 }.into());
    let more = pb::KeysUpload { req: 7, one_time: one_time_keys(151..=251), ..Default::default() };
    assert_eq!(code(&call(&mut c, more.into()).await), pb::ErrorCode::TooLarge);
    let fits = pb::KeysUpload { req: 8, one_time: one_time_keys(151..=200), ..Default::default() };
    assert_eq!(call(&mut c, fits.into()).await, pb::Done { req: 8 }.into());

    // Fetches: an unknown account, too many devices, then a flood.
    assert_eq!(code(&call(&mut c, fetch(10, 999_999)).await), pb::ErrorCode::NotFound);
    let wide = pb::KeysFetch { req: 11, account: other.account, devices: (0..17).collect() };
    assert_eq!(code(&call(&mut c, wide.into()).await), pb::ErrorCode::TooLarge);
    let (_, mut flood) = register(s.addr).await;
    let mut limited = None;
    for req in 20..40 {
        let answer = call(&mut flood, fetch(req, 1)).await;
        if let Message::Error(e) = &answer {
            assert_eq!(e.code, pb::ErrorCode::RateLimited as i32);
            assert!(e.retry_after_secs >= 1);
            limited = Some(req);
            break;
        }
    }
    assert_eq!(limited, Some(25), "the burst of 5 bundles, then RATE_LIMITED");
    // The connection is still fine.
    flood.send(&[pb::Ping { id: 9 }.into()]).await.unwrap();
    expect(&mut flood, |m| matches!(m, Message::Pong(p) if p.id == 9).then_some(())).await;
}

#[tokio::test]
async fn unlinking_a_device_takes_its_login_its_inbox_and_its_keys() {
    let s = TestServer::start(|_| {});
    let (a, mut ca) = register(s.addr).await;
    let tablet = link(&s, &mut ca, 1).await;
    let mut ct = login(&s, &tablet).await;
    assert_eq!(call(&mut ct, key_upload(1, 9, 1..=5).into()).await, pb::Done { req: 1 }.into());
    let (_, mut cb) = register(s.addr).await;
    assert_eq!(bundles(call(&mut cb, fetch(1, a.account)).await).len(), 1, "the tablet's bundle");

    let unlink = |req, device| Message::from(pb::UnlinkDevice { req, device });
    assert_eq!(code(&call(&mut ca, unlink(2, 7)).await), pb::ErrorCode::NotFound);
    assert_eq!(call(&mut ca, unlink(3, tablet.device)).await, pb::Done { req: 3 }.into());
    // The tablet's connection is told and closed.
    loop {
        match ct.recv_timeout(T).await {
            Ok(_) => continue,
            Err(pipit_client::ClientError::Refused(code)) => {
                assert_eq!(code, pb::ErrorCode::UnknownDevice);
                break;
            }
            Err(e) => panic!("the unlinked device was not told: {e}"),
        }
    }
    // Its keys are gone, and it cannot log in again.
    assert!(bundles(call(&mut cb, fetch(2, a.account)).await).is_empty());
    let opts = s.opts();
    let again = Connection::connect(s.addr, &tablet.key, pipit_client::login(a.account, tablet.device, 0), &opts).await;
    assert!(again.is_err());
    // A phone cannot unlink itself when it is the last device; a new device
    // never gets the unlinked one's number.
    assert_eq!(code(&call(&mut ca, unlink(4, 0)).await), pb::ErrorCode::Forbidden);
    let newer = link(&s, &mut ca, 5).await;
    assert!(newer.device > tablet.device);
    // A device may unlink itself.
    let mut cn = login(&s, &newer).await;
    assert_eq!(call(&mut cn, unlink(6, newer.device)).await, pb::Done { req: 6 }.into());
}
