//! End-to-end encryption through a real server: the client library's
//! Olm sessions over real TCP, real handshakes and RocksDB. Afterwards no
//! plaintext is anywhere in the server's data directory.

mod common;

use std::path::Path;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, StaticKeypair};
use pipit_client::{media, Client, Config, Event, Events, MemoryStore, State, Store, Undecryptable};

/// One-time prekeys the client library keeps on the server (SPEC.md 13.2).
const ONE_TIME_TARGET: usize = 50;

async fn next<R>(ev: &mut Events, mut pick: impl FnMut(Event) -> Option<R>) -> R {
    let wait = async {
        loop {
            let e = ev.next().await.expect("the client stopped");
            if let Some(r) = pick(e) {
                return r;
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(20), wait).await.expect("timed out waiting for an event")
}

fn message(e: Event) -> Option<pb::Deliver> {
    match e {
        Event::Message(d) => Some(d),
        _ => None,
    }
}

struct Dev {
    client: Client,
    events: Events,
    account: u64,
    device: u32,
}

async fn start(addr: std::net::SocketAddr, store: MemoryStore) -> Dev {
    let (client, mut events) = Client::start(Config::new(addr.to_string()), store).unwrap();
    let (account, device) = next(&mut events, |e| match e {
        Event::Connected { account, device, .. } => Some((account, device)),
        _ => None,
    })
    .await;
    let dev = Dev { client, events, account, device };
    // Its keys are on the server before anyone encrypts for it.
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while dev.client.stats().keys_published.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < until, "keys never published");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    dev
}

/// A new device linked by `owner`, running its own client.
async fn link_client(addr: std::net::SocketAddr, owner: &mut Dev, req: u64) -> Dev {
    let key = StaticKeypair::generate();
    let link = pb::LinkDevice { req, key: Bytes::copy_from_slice(key.public().as_bytes()), name: "tablet".into() };
    owner.client.request(vec![link.into()]).await.unwrap();
    let device = next(&mut owner.events, |e| match e {
        Event::Other(Message::Linked(l)) if l.req == req => Some(l.device),
        _ => None,
    })
    .await;
    let mut store = MemoryStore::new();
    let mut state = State::new(key);
    state.account = owner.account;
    state.device = device;
    store.save_state(&state).unwrap();
    start(addr, store).await
}

/// Whether `needle` occurs in any file under `dir`.
fn found_in(dir: &Path, needle: &[u8]) -> Vec<std::path::PathBuf> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else if let Ok(bytes) = std::fs::read(&path) {
                if bytes.windows(needle.len()).any(|w| w == needle) {
                    hits.push(path);
                }
            }
        }
    }
    hits
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn encrypted_one_to_one_reaches_every_device_and_no_plaintext_reaches_the_server_disk() {
    let mut s = TestServer::start(|_| {});
    let mut a0 = start(s.addr, MemoryStore::new()).await;
    let mut b0 = start(s.addr, MemoryStore::new()).await;
    let mut a1 = link_client(s.addr, &mut a0, 1).await;
    let mut b1 = link_client(s.addr, &mut b0, 2).await;

    // Alice to Bob: both of Bob's devices, and Alice's other device.
    let one = "secret-one: the cake is in the blue cupboard";
    let id = a0.client.send(b0.account, one).await.unwrap();
    next(&mut a0.events, |e| matches!(e, Event::Sent(ref s) if s.id == id).then_some(())).await;
    for dev in [&mut b0, &mut b1] {
        let d = next(&mut dev.events, message).await;
        assert_eq!((&d.payload[..], d.from, d.from_device, d.peer), (one.as_bytes(), a0.account, 0, 0));
    }
    let copy = next(&mut a1.events, message).await;
    assert_eq!((&copy.payload[..], copy.peer), (one.as_bytes(), b0.account), "the sender's own copy");

    // Bob back to Alice, from his second device.
    let two = "secret-two: and the key is under the mat";
    b1.client.send(a0.account, two).await.unwrap();
    for dev in [&mut a0, &mut a1] {
        assert_eq!(&next(&mut dev.events, message).await.payload[..], two.as_bytes());
    }
    assert_eq!(&next(&mut b0.events, message).await.payload[..], two.as_bytes());

    // A file by reference: the server sees neither file nor reference.
    let file = b"secret-three: a picture of the cupboard".repeat(50);
    let sealed = media::encrypt(&file);
    let reference = sealed.reference("https://blobs.example/secret-url-4", "image/png");
    a0.client.send(b0.account, reference.to_bytes()).await.unwrap();
    let got = next(&mut b0.events, message).await;
    let r = media::MediaRef::from_bytes(&got.payload).unwrap();
    assert_eq!(r.url, "https://blobs.example/secret-url-4");
    assert_eq!(r.decrypt(&sealed.ciphertext).unwrap(), file);
    next(&mut b1.events, message).await;
    next(&mut a1.events, message).await;

    // Something that does not decrypt is reported, acknowledged, and does
    // not stall what follows.
    let (_, mut raw) = register(s.addr).await;
    raw.send(&[text(1, b0.account, "not an envelope")]).await.unwrap();
    expect_sent(&mut raw, 1).await;
    let bad = next(&mut b0.events, |e| match e {
        Event::Undecryptable { message, reason } => Some((message, reason)),
        _ => None,
    })
    .await;
    assert_eq!(bad.1, Undecryptable::NotEncrypted);
    let five = "secret-five: after the junk";
    a0.client.send(b0.account, five).await.unwrap();
    for dev in [&mut b0, &mut b1, &mut a1] {
        assert_eq!(&next(&mut dev.events, message).await.payload[..], five.as_bytes());
    }

    // Bob links a third device: Alice's next message names devices the
    // server does not know of yet in her list, gets DeviceMismatch, fetches
    // the new device's keys and sends the same message again, same id.
    let mut b2 = link_client(s.addr, &mut b0, 3).await;
    let six = "secret-six: for all three of Bob's devices";
    let id = a0.client.send(b0.account, six).await.unwrap();
    next(&mut a0.events, |e| match e {
        Event::Sent(s) if s.id == id => Some(()),
        Event::SendFailed { id: failed, code } if failed == id => panic!("send failed: {code:?}"),
        _ => None,
    })
    .await;
    for dev in [&mut b0, &mut b1, &mut b2] {
        assert_eq!(&next(&mut dev.events, message).await.payload[..], six.as_bytes());
    }
    assert_eq!(b2.device, 2);

    // A control message in plaintext, which the scan must find: proof the
    // scan would see a plaintext if there were one.
    raw.send(&[text(2, b0.account, "control-plaintext-marker")]).await.unwrap();
    expect_sent(&mut raw, 2).await;

    for d in [a0, a1, b0, b1, b2] {
        d.client.close().await;
    }
    drop(raw);
    s.running.take().unwrap().shutdown(Duration::from_secs(2));
    assert!(!found_in(s.dir.path(), b"control-plaintext-marker").is_empty(), "the scan sees plaintext");
    for secret in ["secret-one", "secret-two", "secret-three", "secret-url-4", "secret-five", "secret-six", "cupboard"]
    {
        let hits = found_in(s.dir.path(), secret.as_bytes());
        assert!(hits.is_empty(), "{secret:?} is on the server's disk: {hits:?}");
    }
}

/// Over TCP against a server that offers groups. The Megolm logic itself
/// (one ciphertext for nine devices, a new session that a removed member
/// cannot read) is tested without a server in the client library
/// (`e2e::tests`); this checks the same through the groups server's wire
/// (`Deliver.device_payload`, change notices).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_group_of_five_members_with_two_devices_each_reads_one_megolm_message_and_a_removed_member_nothing_after() {
    let s = TestServer::start(|_| {});
    let mut devs = Vec::new();
    for i in 0..5 {
        let mut first = start(s.addr, MemoryStore::new()).await;
        let second = link_client(s.addr, &mut first, 10 + i).await;
        devs.push(first);
        devs.push(second);
    }
    let members: Vec<u64> = devs.iter().step_by(2).map(|d| d.account).collect();
    let group = devs[0].client.create_group("five", &members).await.unwrap().group;
    devs[0].client.send_group(group, "secret-group: hello all nine").await.unwrap();
    for d in devs.iter_mut().skip(1) {
        let m = next(&mut d.events, message).await;
        assert_eq!((&m.payload[..], m.group), (&b"secret-group: hello all nine"[..], group));
    }
    // Member 5 is removed; the sender learns the new membership, and its
    // next message (a new session) reaches the remaining seven only.
    devs[0].client.remove_members(group, &[members[4]]).await.unwrap();
    next(&mut devs[0].events, |e| match e {
        Event::Group(g) if g.group == group && !g.members.contains(&members[4]) => Some(()),
        _ => None,
    })
    .await;
    devs[0].client.send_group(group, "secret-group: without five").await.unwrap();
    for d in devs.iter_mut().skip(1).take(7) {
        assert_eq!(&next(&mut d.events, message).await.payload[..], b"secret-group: without five");
    }
    for d in devs.iter_mut().skip(8) {
        let got = tokio::time::timeout(Duration::from_secs(1), async {
            loop {
                if let Some(Event::Message(m)) = d.events.next().await {
                    return m;
                }
            }
        })
        .await;
        assert!(got.is_err(), "a removed member's device got {got:?}");
    }
}

/// A device whose one-time prekeys were all taken while it was away still
/// gets messages (the sender used its signed prekey), hears at login that
/// its stock is empty, and uploads new keys.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drained_device_is_reached_through_its_signed_prekey_and_tops_up_at_login() {
    let s = TestServer::start(|_| {});
    let profile = tempfile::tempdir().unwrap();
    let b = {
        let (client, mut events) =
            Client::start(Config::new(s.addr.to_string()), pipit_client::FileStore::open(profile.path()).unwrap())
                .unwrap();
        let account = next(&mut events, |e| match e {
            Event::Connected { account, .. } => Some(account),
            _ => None,
        })
        .await;
        let until = std::time::Instant::now() + Duration::from_secs(20);
        while client.stats().keys_published.load(Ordering::Relaxed) == 0 {
            assert!(std::time::Instant::now() < until, "keys never published");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        client.close().await;
        account
    };
    // While it is away, someone takes every one-time prekey it has.
    let (_, mut raw) = register(s.addr).await;
    let mut taken = std::collections::BTreeSet::new();
    for req in 1..=60 {
        raw.send(&[pb::KeysFetch { req, account: b, devices: vec![] }.into()]).await.unwrap();
        let r = expect(&mut raw, |m| match m {
            Message::KeysResult(r) if r.req == req => Some(r),
            _ => None,
        })
        .await;
        if let Some(k) = &r.bundles[0].one_time {
            assert!(taken.insert(k.id), "prekey {} handed out twice", k.id);
        }
    }
    assert_eq!(taken.len(), ONE_TIME_TARGET, "all of them, each once; then the signed prekey alone");
    // A new contact writes to it: its session starts on the signed prekey.
    let mut a = start(s.addr, MemoryStore::new()).await;
    let id = a.client.send(b, "secret-seven: through the fallback key").await.unwrap();
    next(&mut a.events, |e| matches!(e, Event::Sent(ref x) if x.id == id).then_some(())).await;
    // It comes back, reads it, and tops its stock up.
    let (client, mut events) =
        Client::start(Config::new(s.addr.to_string()), pipit_client::FileStore::open(profile.path()).unwrap()).unwrap();
    let got = next(&mut events, message).await;
    assert_eq!(&got.payload[..], b"secret-seven: through the fallback key");
    let until = std::time::Instant::now() + Duration::from_secs(20);
    while client.stats().keys_published.load(Ordering::Relaxed) == 0 {
        assert!(std::time::Instant::now() < until, "no top-up after KeysStatus");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    raw.send(&[pb::KeysFetch { req: 100, account: b, devices: vec![] }.into()]).await.unwrap();
    let r = expect(&mut raw, |m| match m {
        Message::KeysResult(r) if r.req == 100 => Some(r),
        _ => None,
    })
    .await;
    let fresh = r.bundles[0].one_time.as_ref().expect("a new one-time prekey").id;
    assert!(!taken.contains(&fresh));
    client.close().await;
    a.client.close().await;
}
