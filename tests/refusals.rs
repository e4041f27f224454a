//! The real client library while the server refuses sends for now
//! (`UNAVAILABLE`): an overloaded storage queue, or storage that has
//! stopped. Per-conversation order holds (nothing overtakes a refused
//! message), nothing is lost, and the refusals cost the app nothing but
//! the wait: no spinning, and `Client::send` never blocks.

mod common;

use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::writer::{Block, Noop};
use common::*;
use pipit::commit::SubmitError;
use pipit_client::{Client, Config, Encryption, Event, Events, MemoryStore};

/// Stops the server's writer; `fill` also fills its queue, so that every
/// send is refused `UNAVAILABLE` until the returned sender releases it.
async fn stall_writer(s: &TestServer, fill: bool) -> mpsc::Sender<()> {
    let writer = s.running.as_ref().unwrap().services().writer.clone();
    let (entered_tx, entered) = mpsc::channel();
    let (release, release_rx) = mpsc::channel();
    writer.try_submit(Box::new(Block { entered: Some(entered_tx), release: release_rx })).unwrap();
    tokio::task::spawn_blocking(move || entered.recv_timeout(T).unwrap()).await.unwrap();
    if fill {
        loop {
            if let Err(r) = writer.try_submit(Box::new(Noop)) {
                assert_eq!(r.reason, SubmitError::Full);
                break;
            }
        }
    }
    release
}

/// A client of the real library, encryption off (the server alone is
/// under test here), once it is connected; and its account.
async fn client(s: &TestServer) -> (Client, Events, u64) {
    let mut config = Config::new(s.addr.to_string());
    config.encryption = Encryption::Off;
    config.event_buffer = 1 << 16;
    let (client, mut events) = Client::start(config, MemoryStore::default()).unwrap();
    loop {
        match tokio::time::timeout(T, events.next()).await.unwrap().unwrap() {
            Event::Connected { account, .. } => return (client, events, account),
            Event::Disconnected { reason } => panic!("{reason}"),
            _ => {}
        }
    }
}

/// Waits until the client has `n` sends confirmed.
async fn until_sent(c: &Client, n: u64, within: Duration) {
    let deadline = Instant::now() + within;
    while c.stats().sent.load(Ordering::Relaxed) < n {
        assert!(
            Instant::now() < deadline,
            "{} of {n} sent (deferred {})",
            c.stats().sent.load(Ordering::Relaxed),
            c.stats().deferred.load(Ordering::Relaxed)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads `n` deliveries from `from` and counts those that arrive ahead
/// of an earlier message (payloads are the sender's numbers).
async fn read_in_order(c: &mut pipit_client::Connection, from: u64, n: u64) -> (u64, Vec<u64>) {
    let mut out_of_order = 0;
    let mut seen = Vec::new();
    let mut last = 0u64;
    while (seen.len() as u64) < n {
        let d = expect_deliver(c).await;
        assert_eq!(d.from, from);
        let k: u64 = std::str::from_utf8(&d.payload).unwrap().parse().unwrap();
        if k < last {
            out_of_order += 1;
        }
        last = last.max(k);
        seen.push(k);
        ack(c, d.inbox).await;
    }
    (out_of_order, seen)
}

/// A burst of sends to one conversation into a storage queue far too
/// small for it: most are refused `UNAVAILABLE` at first. The recipient
/// gets every one, each once, in the order they were sent; and a second
/// conversation is not held up by the first one's refusals.
#[tokio::test]
async fn one_conversation_stays_in_order_through_an_overload() {
    const N: u64 = 1_000;
    let s = TestServer::start(|c| c.storage.queue = 64);
    let (b, mut cb) = register(s.addr).await;
    let (c, mut cc) = register(s.addr).await;
    let (a, _events, a_account) = client(&s).await;
    for k in 1..=N {
        a.send(b.account, Bytes::from(k.to_string())).await.unwrap();
        if k % 10 == 0 {
            // The other conversation: fewer, in between.
            a.send(c.account, Bytes::from((k / 10).to_string())).await.unwrap();
        }
    }
    until_sent(&a, N + N / 10, Duration::from_secs(120)).await;
    let refused_again = a.stats().deferred.load(Ordering::Relaxed);
    assert!(refused_again > 0, "no send was refused: the test made no overload");
    let (late, seen) = read_in_order(&mut cb, a_account, N).await;
    let (late_c, _) = read_in_order(&mut cc, a_account, N / 10).await;
    let mut sorted = seen.clone();
    sorted.sort_unstable();
    sorted.dedup();
    println!(
        "{N} sends to one conversation, {} retransmitted after a refusal: {late} of {N} arrived \
         out of order ({late_c} in the other), {} distinct",
        refused_again,
        sorted.len()
    );
    assert_eq!(sorted.len() as u64, N, "lost or duplicated");
    assert_eq!((late, late_c), (0, 0), "messages overtook an earlier refused one");
    quiet(&mut cb, Duration::from_millis(200)).await;
}

/// CPU time this thread has used (the test's runtime is one thread: the
/// app's loop and the client library's task both run on it).
fn thread_cpu() -> Duration {
    let stat = std::fs::read_to_string("/proc/thread-self/stat").unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<u64> = after.split(' ').skip(11).take(2).map(|x| x.parse().unwrap()).collect();
    // utime + stime, in clock ticks (100 per second on Linux).
    Duration::from_millis((f[0] + f[1]) * 10)
}

/// Calls `Client::send` as fast as it returns, for `d` or `max` sends;
/// returns how many per second, how many, and the longest one call took.
async fn send_flat_out(a: &Client, to: u64, from: u64, d: Duration, max: u64, size: usize) -> (f64, u64, Duration) {
    let started = Instant::now();
    let mut n = 0;
    let mut longest = Duration::ZERO;
    while started.elapsed() < d && n < max {
        let mut body = (from + n).to_string().into_bytes();
        body.resize(size.max(body.len()), b' ');
        let t = Instant::now();
        a.send(to, Bytes::from(body)).await.unwrap();
        longest = longest.max(t.elapsed());
        n += 1;
    }
    (n as f64 / started.elapsed().as_secs_f64(), n, longest)
}

/// What refusals cost the app: the rate of `Client::send` while every
/// send is refused, against a server that takes them; and the client's
/// CPU while the app is idle and a backlog waits through the refusals.
/// Prints the figures; bounds them loosely (a debug build on a shared
/// machine).
#[tokio::test]
async fn refusals_cost_the_app_only_the_wait() {
    const PHASE: Duration = Duration::from_secs(3);
    let s = TestServer::start(|_| {});
    let (b, cb) = register(s.addr).await;
    drop(cb);
    let (a, _events, _) = client(&s).await;

    // Taken at once.
    let (taken_rate, taken, _) = send_flat_out(&a, b.account, 0, PHASE, 20_000, 0).await;
    until_sent(&a, taken, Duration::from_secs(60)).await;

    // Refused: the queue is full and storage stands still.
    let release = stall_writer(&s, true).await;
    let (refused_rate, refused, _) = send_flat_out(&a, b.account, taken, PHASE, 20_000, 0).await;
    // The app does nothing; the backlog waits through the refusals.
    let cpu = thread_cpu();
    tokio::time::sleep(PHASE).await;
    let idle_cpu = thread_cpu() - cpu;
    println!(
        "Client::send: {taken_rate:.0}/s taken ({taken}), {refused_rate:.0}/s refused ({refused}); client CPU \
         while idle under refusals: {} ms in {} ms ({:.1}% of a core)",
        idle_cpu.as_millis(),
        PHASE.as_millis(),
        100.0 * idle_cpu.as_secs_f64() / PHASE.as_secs_f64(),
    );
    release.send(()).unwrap();
    let started = Instant::now();
    until_sent(&a, taken + refused, Duration::from_secs(120)).await;
    println!("the backlog of {refused} was sent within {} ms of the release", started.elapsed().as_millis());

    assert!(refused_rate > taken_rate / 2.0, "Client::send slows down under refusals");
    assert!(idle_cpu < PHASE / 10, "the client spins while refused: {idle_cpu:?} in {PHASE:?}");
}

/// Storage stops while sends are taken (a disk that filled with no
/// reserve left did this for 35 s): the server stops reading once a
/// connection has enough waiting, and TCP pushes back. `Client::send`
/// still returns at once: the message is in the outbox.
#[tokio::test]
async fn send_never_blocks_while_the_server_stops_reading() {
    const PHASE: Duration = Duration::from_secs(3);
    let s = TestServer::start(|_| {});
    let (b, cb) = register(s.addr).await;
    drop(cb);
    let (a, _events, _) = client(&s).await;
    let release = stall_writer(&s, false).await;
    let (_, stalled, longest) = send_flat_out(&a, b.account, 0, PHASE, 2_000, 16 * 1024).await;
    println!("longest Client::send while the server stopped reading: {} ms ({stalled} sends)", longest.as_millis());
    // (Already gone if the stall outlived the block's own 60 s.)
    let _ = release.send(());
    until_sent(&a, stalled, Duration::from_secs(120)).await;
    assert!(longest < Duration::from_secs(1), "Client::send blocked for {longest:?}");
}

/// `[storage] reserve_mb = 0` once meant "no reserve": the database could
/// fill the disk, and then neither recover nor restart until the disk
/// grew. The server's configuration now refuses a reserve below what a
/// restart needs, and says what that is; so the binary does not start.
#[test]
fn a_reserve_below_what_a_restart_needs_is_refused_at_startup() {
    let dir = tempfile::tempdir().unwrap();
    for below in [0, 63] {
        let path = dir.path().join("pipit.toml");
        std::fs::write(&path, format!("[storage]\nreserve_mb = {below}\n")).unwrap();
        let err = pipit::Config::load(&path).expect_err("read a reserve below the minimum");
        let err = err.to_string();
        assert!(err.contains(&format!("reserve_mb = {below} is below the minimum of 64")), "{err}");
    }
    std::fs::write(dir.path().join("ok.toml"), "[storage]\nreserve_mb = 64\n").unwrap();
    assert_eq!(pipit::Config::load(&dir.path().join("ok.toml")).unwrap().storage.reserve_mb, 64);
}

/// With encryption on, a message grows when it is sealed: the largest
/// unencrypted payload (65,280 bytes) can never be sent encrypted.
/// `Client::send` says so at once, with the largest plaintext that fits,
/// instead of taking it and failing it later with `SendFailed TOO_LARGE`.
#[tokio::test]
async fn an_encrypted_send_too_large_once_sealed_is_refused_at_send() {
    let s = TestServer::start(|_| {});
    let (b, cb) = register(s.addr).await;
    drop(cb);
    let (a, _events) = Client::start(Config::new(s.addr.to_string()), MemoryStore::default()).unwrap();
    let max_plain = pipit_client::pipit_protocol::limits::MAX_PAYLOAD_LEN;
    let started = Instant::now();
    let err = a.send(b.account, vec![0u8; max_plain]).await.expect_err("taken, though it can never be sent");
    assert!(started.elapsed() < Duration::from_secs(1));
    let pipit_client::ClientError::TooLarge { len, max } = err else { panic!("{err}") };
    assert_eq!(len, max_plain);
    assert!(max < max_plain && max > max_plain - 256, "largest plaintext {max}");
    // The largest that fits is taken (and one more byte is not), for a
    // group too.
    a.send(b.account, vec![0u8; max]).await.unwrap();
    assert!(a.send(b.account, vec![0u8; max + 1]).await.is_err());
    let err = a.send_group(5, vec![0u8; max_plain]).await.expect_err("a group message that can never be sent");
    assert!(matches!(err, pipit_client::ClientError::TooLarge { .. }), "{err}");
}
