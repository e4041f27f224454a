//! The end-to-end layer between several devices, with a small in-memory
//! stand-in for the server's key directory and fan-out (the real ones are
//! tested over TCP in `tests/e2e.rs`). Group fan-out is simulated here as
//! SPEC.md describes it: one payload for every member device, plus each
//! device's own `per_device` entry as `device_payload`.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use pipit_protocol::e2e::{decode_envelope, encode_envelope};
use vodozemac::megolm::GroupSession;

use super::records::OutboundRecord;
use super::*;
use crate::{Event, MemoryStore};

struct Dev {
    e2e: E2e,
    store: MemoryStore,
    addr: Addr,
}

#[derive(Default)]
struct Directory {
    published: HashMap<Addr, (Bytes, pb::SignedPreKey, VecDeque<pb::PreKey>)>,
}

struct World {
    devs: Vec<Dev>,
    dir: Directory,
    accounts: BTreeMap<u64, Vec<u32>>,
    groups: HashMap<u64, Vec<u64>>,
    /// Key carriers delivered while sealing.
    carriers: usize,
}

fn login_ok(addr: Addr) -> pb::LoginOk {
    pb::LoginOk {
        account: addr.0,
        device: addr.1,
        features: vec![pb::Feature::KeyDirectory as i32],
        ..Default::default()
    }
}

impl World {
    fn new() -> Self {
        Self {
            devs: Vec::new(),
            dir: Directory::default(),
            accounts: BTreeMap::new(),
            groups: HashMap::new(),
            carriers: 0,
        }
    }

    /// A new device, logged in with its keys published.
    fn add(&mut self, account: u64, device: u32) -> usize {
        let mut store = MemoryStore::new();
        let key = [(account * 16 + u64::from(device)) as u8; 32];
        let e2e = E2e::load(&mut store, Vault::new(&key)).unwrap();
        self.devs.push(Dev { e2e, store, addr: (account, device) });
        self.accounts.entry(account).or_default().push(device);
        let i = self.devs.len() - 1;
        self.relogin(i);
        i
    }

    fn relogin(&mut self, i: usize) {
        let d = &mut self.devs[i];
        let reqs = d.e2e.on_login(&mut d.store, &login_ok(d.addr)).unwrap();
        self.serve(i, reqs);
    }

    fn find(&self, addr: Addr) -> usize {
        self.devs.iter().rposition(|d| d.addr == addr).unwrap()
    }

    /// Answers device `i`'s requests as the server would, until none are
    /// left.
    fn serve(&mut self, i: usize, mut reqs: Vec<Message>) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(m) = reqs.pop() {
            let answer: Message = match m {
                Message::KeysUpload(u) => {
                    pipit_protocol::e2e::check_upload(&u).unwrap();
                    let addr = self.devs[i].addr;
                    let entry = self
                        .dir
                        .published
                        .entry(addr)
                        .or_insert_with(|| (u.identity.clone(), u.signed.clone().unwrap(), VecDeque::new()));
                    if let Some(s) = u.signed.clone() {
                        *entry = (u.identity.clone(), s, VecDeque::new());
                    }
                    entry.2.extend(u.one_time);
                    pb::Done { req: u.req }.into()
                }
                Message::KeysFetch(f) => {
                    let me = self.devs[i].addr;
                    let mut bundles = Vec::new();
                    for &device in &self.accounts[&f.account] {
                        if (f.account, device) == me || !(f.devices.is_empty() || f.devices.contains(&device)) {
                            continue;
                        }
                        if let Some((identity, signed, stock)) = self.dir.published.get_mut(&(f.account, device)) {
                            bundles.push(pb::KeyBundle {
                                device,
                                identity: identity.clone(),
                                signed: Some(signed.clone()),
                                one_time: stock.pop_front(),
                            });
                        }
                    }
                    pb::KeysResult { req: f.req, account: f.account, bundles }.into()
                }
                other => panic!("unexpected request {other:?}"),
            };
            let d = &mut self.devs[i];
            let a = d.e2e.on_answer(&mut d.store, answer).unwrap();
            assert_eq!(a.retry_after, None);
            reqs.extend(a.send);
            events.extend(a.events);
        }
        events
    }

    /// The server's device check of a 1:1 send (SPEC.md 5.1).
    fn mismatch(&self, i: usize, s: &pb::Send) -> Option<pb::DeviceMismatch> {
        let from = self.devs[i].addr;
        let mut want: BTreeSet<Addr> = self.accounts[&s.to].iter().map(|d| (s.to, *d)).collect();
        if s.to != from.0 {
            want.extend(self.accounts[&from.0].iter().map(|d| (from.0, *d)));
        }
        want.remove(&from);
        let named: BTreeSet<Addr> = s.per_device.iter().map(|c| (c.account, c.device)).collect();
        let r = |a: &Addr| pb::DeviceRef { account: a.0, device: a.1 };
        let missing: Vec<pb::DeviceRef> = want.difference(&named).map(r).collect();
        let extra: Vec<pb::DeviceRef> = named.difference(&want).map(r).collect();
        (!missing.is_empty() || !extra.is_empty()).then_some(pb::DeviceMismatch { id: s.id, missing, extra })
    }

    /// Seals `send` on device `i`, serving the key fetches it needs,
    /// delivering the key carriers it sends ahead, and answering a 1:1
    /// send that names the wrong devices as the server would.
    fn seal(&mut self, i: usize, send: pb::Send) -> pb::Send {
        for _ in 0..8 {
            let d = &mut self.devs[i];
            match d.e2e.seal(&mut d.store, &send).unwrap() {
                Sealed::Ready(s) if s.group == 0 => match self.mismatch(i, &s) {
                    None => return s,
                    Some(m) => {
                        let d = &mut self.devs[i];
                        let fetches = d.e2e.on_mismatch(&mut d.store, &m).unwrap();
                        self.serve(i, fetches);
                    }
                },
                Sealed::Ready(s) => return s,
                Sealed::Wait(reqs) => {
                    assert!(!reqs.is_empty(), "waits for nothing it asked");
                    let (carriers, reqs): (Vec<Message>, Vec<Message>) =
                        reqs.into_iter().partition(|m| matches!(m, Message::Send(_)));
                    self.serve(i, reqs);
                    for c in carriers {
                        let Message::Send(c) = c else { unreachable!() };
                        assert!(Message::from(c.clone()).encoded_len() <= pipit_protocol::limits::MAX_PACKET_LEN);
                        let members = self.groups[&c.group].clone();
                        for (addr, events) in self.deliver_group(i, &c, &members) {
                            assert!(events.is_empty(), "a carrier is nothing for the app: {addr:?} {events:?}");
                        }
                        self.carriers += 1;
                    }
                }
                Sealed::Fail(code) => panic!("sealing failed: {code:?}"),
            }
        }
        panic!("sealing never finished");
    }

    fn decrypt(&mut self, j: usize, d: pb::Deliver) -> Vec<Event> {
        let dev = &mut self.devs[j];
        dev.e2e.decrypt(&mut dev.store, d).unwrap()
    }

    /// Delivers a sealed 1:1 send from `i` to every device it names, as the
    /// server does; returns each device's events.
    fn deliver(&mut self, i: usize, sealed: &pb::Send) -> Vec<(Addr, Vec<Event>)> {
        let from = self.devs[i].addr;
        let mut out = Vec::new();
        for c in &sealed.per_device {
            let j = self.find((c.account, c.device));
            let peer = if c.account == from.0 && sealed.to != from.0 { sealed.to } else { 0 };
            let d = deliver(from, c.payload.clone(), peer, 0);
            out.push(((c.account, c.device), self.decrypt(j, d)));
        }
        let d = &mut self.devs[i];
        d.e2e.on_sent(&mut d.store, sealed).unwrap();
        out
    }

    /// Delivers a group send to every device of `members` but the sender.
    fn deliver_group(&mut self, i: usize, sealed: &pb::Send, members: &[u64]) -> Vec<(Addr, Vec<Event>)> {
        let from = self.devs[i].addr;
        let mut out = Vec::new();
        for j in 0..self.devs.len() {
            let addr = self.devs[j].addr;
            if addr == from || !members.contains(&addr.0) {
                continue;
            }
            let mut d = deliver(from, sealed.payload.clone(), 0, sealed.group);
            if let Some(c) = sealed.per_device.iter().find(|c| (c.account, c.device) == addr) {
                d.device_payload = c.payload.clone();
            }
            out.push((addr, self.decrypt(j, d)));
        }
        let d = &mut self.devs[i];
        d.e2e.on_sent(&mut d.store, sealed).unwrap();
        out
    }

    fn set_group(&mut self, group: u64, members: &[u64], version: u64) {
        self.groups.insert(group, members.to_vec());
        let g = pb::GroupInfo { group, members: members.to_vec(), version, ..Default::default() };
        for d in &mut self.devs {
            d.e2e.on_group_info(&mut d.store, &g).unwrap();
        }
    }
}

fn deliver(from: Addr, payload: Bytes, peer: u64, group: u64) -> pb::Deliver {
    pb::Deliver {
        inbox: 1,
        from: from.0,
        from_device: from.1,
        seq: 1,
        time: 1,
        payload,
        peer,
        group,
        ..Default::default()
    }
}

fn text(to: u64, body: &str) -> pb::Send {
    pb::Send { id: 1, to, payload: Bytes::copy_from_slice(body.as_bytes()), ..Default::default() }
}

fn plaintext(events: &[Event]) -> Option<&[u8]> {
    match events {
        [Event::Message(d)] => Some(&d.payload[..]),
        _ => None,
    }
}

fn kind(payload: &[u8]) -> pb::E2eKind {
    decode_envelope(payload).unwrap().0
}

#[test]
fn one_to_one_reaches_every_device_of_both_accounts_in_both_directions() {
    let mut w = World::new();
    let a0 = w.add(1, 0);
    let _a1 = w.add(1, 1);
    let b0 = w.add(2, 0);
    let _b1 = w.add(2, 1);
    let sealed = w.seal(a0, text(2, "hello bob"));
    assert!(sealed.payload.is_empty());
    let named: BTreeSet<Addr> = sealed.per_device.iter().map(|c| (c.account, c.device)).collect();
    assert_eq!(named, BTreeSet::from([(1, 1), (2, 0), (2, 1)]), "every device but the sender's");
    for c in &sealed.per_device {
        assert_eq!(kind(&c.payload), pb::E2eKind::OlmPreKey);
        assert!(!c.payload.windows(9).any(|w| w == b"hello bob"), "no plaintext on the wire");
    }
    for (addr, events) in w.deliver(a0, &sealed) {
        assert_eq!(plaintext(&events), Some(&b"hello bob"[..]), "{addr:?}: {events:?}");
    }
    // The reply goes the other way, again to all four devices but its sender.
    let reply = w.seal(b0, text(1, "hi alice"));
    assert_eq!(reply.per_device.len(), 3);
    let to_a0 = reply.per_device.iter().find(|c| (c.account, c.device) == (1, 0)).unwrap();
    assert_eq!(kind(&to_a0.payload), pb::E2eKind::Olm, "answers in the session Alice started");
    for (addr, events) in w.deliver(b0, &reply) {
        assert_eq!(plaintext(&events), Some(&b"hi alice"[..]), "{addr:?}: {events:?}");
    }
    // Alice's next message to Bob's first device no longer starts a session.
    let again = w.seal(a0, text(2, "again"));
    let to_b0 = again.per_device.iter().find(|c| (c.account, c.device) == (2, 0)).unwrap();
    assert_eq!(kind(&to_b0.payload), pb::E2eKind::Olm);
    for (_, events) in w.deliver(a0, &again) {
        assert_eq!(plaintext(&events), Some(&b"again"[..]));
    }
}

#[test]
fn what_cannot_be_read_is_reported_and_never_handed_over_as_a_message() {
    let mut w = World::new();
    let a0 = w.add(1, 0);
    let a1 = w.add(1, 1);
    let b0 = w.add(2, 0);
    let sealed = w.seal(a0, text(2, "for bob"));
    let for_b0 = sealed.per_device.iter().find(|c| c.account == 2).unwrap().payload.clone();
    let for_a1 = sealed.per_device.iter().find(|c| c.account == 1).unwrap().payload.clone();
    let reason = |events: Vec<Event>| match &events[..] {
        [Event::Undecryptable { reason, .. }] => *reason,
        other => panic!("expected one Undecryptable, got {other:?}"),
    };
    // Not an envelope at all (a sender with encryption off, or a forgery).
    assert_eq!(reason(w.decrypt(b0, deliver((1, 0), Bytes::from_static(b"plain"), 0, 0))), Undecryptable::NotEncrypted);
    // A flipped byte.
    let mut bad = for_b0.to_vec();
    let last = bad.len() - 1;
    bad[last] ^= 1;
    assert_eq!(reason(w.decrypt(b0, deliver((1, 0), Bytes::from(bad), 0, 0))), Undecryptable::Damaged);
    // Alice's own copy moved by the server into another conversation.
    assert_eq!(reason(w.decrypt(a1, deliver((1, 0), for_a1.clone(), 3, 0))), Undecryptable::WrongConversation);
    // ... and what follows still decrypts (a ciphertext decrypts once, so
    // the moved one is spent).
    assert_eq!(plaintext(&w.decrypt(b0, deliver((1, 0), for_b0.clone(), 0, 0))), Some(&b"for bob"[..]));
    let next = w.seal(a0, text(2, "next"));
    let for_a1 = next.per_device.iter().find(|c| c.account == 1).unwrap().payload.clone();
    assert_eq!(plaintext(&w.decrypt(a1, deliver((1, 0), for_a1, 2, 0))), Some(&b"next"[..]));
    // A replay does not decrypt twice.
    assert_eq!(reason(w.decrypt(b0, deliver((1, 0), for_b0, 0, 0))), Undecryptable::NoSession);
    // A withheld ciphertext says so.
    let withheld = encode_envelope(pb::E2eKind::Withheld, Vec::new(), Vec::new());
    assert_eq!(reason(w.decrypt(b0, deliver((1, 0), withheld, 0, 0))), Undecryptable::Withheld);
}

#[test]
fn a_changed_identity_is_reported_and_not_believed_until_accepted() {
    let mut w = World::new();
    let a0 = w.add(1, 0);
    let b0 = w.add(2, 0);
    let first = w.seal(a0, text(2, "one"));
    w.deliver(a0, &first);
    // Bob's device comes back with a new Olm account under the same ids
    // (or the server swaps in a key of its own).
    w.devs.remove(b0);
    w.accounts.get_mut(&2).unwrap().clear();
    let b0 = w.add(2, 0);
    let a0 = w.find((1, 0));
    let from_new = w.seal(b0, text(1, "it is me"));
    let events = w.deliver(b0, &from_new);
    let (_, events) = &events[0];
    assert!(matches!(&events[0], Event::IdentityChanged { account: 2, device: 0, old: Some(_), .. }), "{events:?}");
    assert!(matches!(&events[1], Event::Undecryptable { reason: Undecryptable::UntrustedIdentity, .. }));
    // Until accepted, Alice encrypts nothing for it.
    let withheld = w.seal(a0, text(2, "two"));
    assert_eq!(kind(&withheld.per_device[0].payload), pb::E2eKind::Withheld);
    let d = &mut w.devs[a0];
    assert!(d.e2e.trust(&mut d.store, 2, 0).unwrap());
    let after = w.seal(a0, text(2, "three"));
    let got = w.deliver(a0, &after);
    assert_eq!(plaintext(&got[0].1), Some(&b"three"[..]));
}

#[test]
fn a_group_message_is_one_ciphertext_for_nine_devices_and_a_removed_member_cannot_read_the_next() {
    let mut w = World::new();
    for account in 1..=5 {
        w.add(account, 0);
        w.add(account, 1);
    }
    let members: Vec<u64> = (1..=5).collect();
    w.set_group(7, &members, 1);
    let sender = w.find((1, 0));
    let send = |body: &str| pb::Send {
        id: 1,
        group: 7,
        payload: Bytes::copy_from_slice(body.as_bytes()),
        ..Default::default()
    };
    let first = w.seal(sender, send("hello group"));
    assert_eq!(kind(&first.payload), pb::E2eKind::Megolm);
    assert_eq!(first.per_device.len(), 9, "the session key for each other device, pairwise");
    let got = w.deliver_group(sender, &first, &members);
    assert_eq!(got.len(), 9);
    for (addr, events) in &got {
        assert_eq!(plaintext(events), Some(&b"hello group"[..]), "{addr:?}: {events:?}");
    }
    // The next message carries no key: everyone has the session.
    let second = w.seal(sender, send("second"));
    assert!(second.per_device.is_empty());
    for (_, events) in w.deliver_group(sender, &second, &members) {
        assert_eq!(plaintext(&events), Some(&b"second"[..]));
    }
    let session = |s: &pb::Send| decode_envelope(&s.payload).unwrap().1.session;
    // Member 5 is removed: the next message is under a new session that
    // only the remaining eight devices get.
    let remaining: Vec<u64> = (1..=4).collect();
    w.set_group(7, &remaining, 2);
    let third = w.seal(sender, send("without five"));
    assert_ne!(session(&third), session(&second), "a new session");
    assert_eq!(third.per_device.len(), 7);
    assert!(third.per_device.iter().all(|c| c.account != 5));
    for (addr, events) in w.deliver_group(sender, &third, &members) {
        if addr.0 == 5 {
            assert!(
                matches!(&events[..], [Event::Undecryptable { reason: Undecryptable::NoGroupSession, .. }]),
                "{addr:?} must not read it: {events:?}"
            );
        } else {
            assert_eq!(plaintext(&events), Some(&b"without five"[..]), "{addr:?}");
        }
    }
}

#[test]
fn the_group_session_is_replaced_after_its_message_budget() {
    let mut w = World::new();
    let s = w.add(1, 0);
    w.add(2, 0);
    w.set_group(3, &[1, 2], 1);
    let send = pb::Send { id: 1, group: 3, payload: Bytes::from_static(b"x"), ..Default::default() };
    let mut sessions = BTreeSet::new();
    for _ in 0..=MEGOLM_MAX_MESSAGES {
        let sealed = w.seal(s, send.clone());
        sessions.insert(decode_envelope(&sealed.payload).unwrap().1.session);
        w.deliver_group(s, &sealed, &[1, 2]);
    }
    assert_eq!(sessions.len(), 2);
}

#[test]
fn state_survives_a_restart_from_the_store() {
    let mut w = World::new();
    let a0 = w.add(1, 0);
    let b0 = w.add(2, 0);
    let m = w.seal(a0, text(2, "before"));
    w.deliver(a0, &m);
    // Bob's app restarts: the account and sessions come back from the store.
    let key = [(2 * 16) as u8; 32];
    let d = &mut w.devs[b0];
    d.e2e = E2e::load(&mut d.store, Vault::new(&key)).unwrap();
    w.relogin(b0);
    let m = w.seal(a0, text(2, "after"));
    assert_eq!(kind(&m.per_device[0].payload), pb::E2eKind::OlmPreKey, "Bob has not answered yet");
    assert_eq!(plaintext(&w.deliver(a0, &m)[0].1), Some(&b"after"[..]));
    // The wrong pickle key opens nothing.
    let d = &mut w.devs[b0];
    assert!(E2e::load(&mut d.store, Vault::new(&[0; 32])).is_err());
}

#[test]
fn keys_for_a_large_group_go_ahead_in_carriers_when_they_do_not_fit_beside_the_message() {
    let mut w = World::new();
    for account in 1..=90 {
        w.add(account, 0);
        w.add(account, 1);
    }
    let members: Vec<u64> = (1..=90).collect();
    w.set_group(4, &members, 1);
    let sender = w.find((1, 0));
    let send = pb::Send { id: 1, group: 4, payload: Bytes::from_static(b"to the many"), ..Default::default() };
    let sealed = w.seal(sender, send);
    assert!(w.carriers >= 2, "179 keys take more than one packet: {} carriers", w.carriers);
    assert!(sealed.per_device.is_empty(), "every key went ahead");
    let got = w.deliver_group(sender, &sealed, &members);
    assert_eq!(got.len(), 179);
    for (addr, events) in got {
        assert_eq!(plaintext(&events), Some(&b"to the many"[..]), "{addr:?}");
    }
}

/// Sizes and times for the report: `cargo test -p pipit-client --release
/// --lib -- --ignored --nocapture measure`.
#[test]
#[ignore = "a measurement, run by hand in release"]
fn measure() {
    let body = Bytes::from(vec![b'x'; 100]);
    let wire = |s: &pb::Send| Message::from(s.clone()).encoded_len() + 2 + 16;
    // 1:1 to a peer with two devices, from a sender with one.
    let mut w = World::new();
    let a = w.add(1, 0);
    let b0 = w.add(2, 0);
    let b1 = w.add(2, 1);
    let send = pb::Send { id: 1000, to: 2, payload: body.clone(), ..Default::default() };
    let first = w.seal(a, send.clone());
    println!(
        "1:1, 100-byte message, peer with 2 devices, first (pre-key) messages: {} bytes on the wire",
        wire(&first)
    );
    w.deliver(a, &first);
    // Both of Bob's devices answer, so every session has heard back.
    for b in [b0, b1] {
        let reply = w.seal(b, pb::Send { id: 1, to: 1, payload: body.clone(), ..Default::default() });
        w.deliver(b, &reply);
    }
    let steady = w.seal(a, send.clone());
    println!(
        "1:1, 100-byte message, peer with 2 devices, established sessions: {} bytes on the wire ({} plaintext Send: {})",
        wire(&steady),
        100,
        wire(&send)
    );

    // 1,024 devices with established sessions: one account per device.
    let mut w = World::new();
    let me = w.add(1, 0);
    for account in 2..=1025 {
        w.add(account, 0);
    }
    let members: Vec<u64> = (1..=1025).collect();
    w.set_group(9, &members, 1);
    let send_1to1 = |to| pb::Send { id: 1, to, payload: body.clone(), ..Default::default() };
    for to in 2..=1025u64 {
        let s = w.seal(me, send_1to1(to));
        w.deliver(me, &s);
        let j = w.find((to, 0));
        let reply = w.seal(j, send_1to1(1));
        w.deliver(j, &reply);
    }
    let t = std::time::Instant::now();
    let mut total = 0;
    for to in 2..=1025 {
        total += wire(&w.seal(me, send_1to1(to)));
    }
    let per_device = t.elapsed();
    println!("Olm: a 100-byte message encrypted for 1,024 devices (established sessions, store writes included): {per_device:?}, {total} bytes");
    let group = pb::Send { id: 2, group: 9, payload: body.clone(), ..Default::default() };
    // The session key for 1,024 devices, each Olm-encrypted pairwise.
    let t = std::time::Instant::now();
    let d = &mut w.devs[me];
    let Sealed::Wait(carriers) = d.e2e.seal(&mut d.store, &group).unwrap() else { panic!("keys go ahead") };
    let share = t.elapsed();
    let carrier_bytes: usize = carriers
        .iter()
        .map(|c| match c {
            Message::Send(c) => wire(c),
            _ => 0,
        })
        .sum();
    println!(
        "Olm: a group session key encrypted for 1,024 devices: {share:?}; {} carriers, {carrier_bytes} bytes on the wire",
        carriers.len()
    );
    for c in carriers {
        let Message::Send(c) = c else { continue };
        w.deliver_group(me, &c, &members);
    }
    let first = w.seal(me, group.clone());
    println!("group of 1,025 members, the message after its keys: {} bytes on the wire", wire(&first));
    let t = std::time::Instant::now();
    let n = 50;
    let mut last = None;
    for _ in 0..n {
        last = Some(w.seal(me, group.clone()));
    }
    println!(
        "group message with Megolm (session shared): {:?} each, {} bytes on the wire",
        t.elapsed() / n,
        wire(&last.unwrap())
    );
    // The ciphers alone, without the library's bookkeeping and store.
    let mut megolm = GroupSession::new(vodozemac::megolm::SessionConfig::version_1());
    let t = std::time::Instant::now();
    for _ in 0..1000 {
        std::hint::black_box(megolm.encrypt(&body));
    }
    println!("vodozemac Megolm encrypt of 100 bytes alone: {:?}", t.elapsed() / 1000);
    let d = &mut w.devs[me];
    let mut sessions = d.e2e.load_sessions(&mut d.store, (2, 0)).unwrap();
    let t = std::time::Instant::now();
    for _ in 0..1024 {
        std::hint::black_box(sessions[0].encrypt(&body).unwrap());
    }
    println!("vodozemac Olm encrypt of 100 bytes alone, 1,024 times: {:?}", t.elapsed());
}

#[test]
fn a_low_stock_is_topped_up_and_a_dry_one_gets_a_new_signed_prekey() {
    let mut w = World::new();
    let a = w.add(1, 0);
    let d = &mut w.devs[a];
    let reqs = d.e2e.on_keys_status(&mut d.store, 12).unwrap();
    let [Message::KeysUpload(u)] = &reqs[..] else { panic!("{reqs:?}") };
    assert_eq!(u.one_time.len(), ONE_TIME_TARGET - 12);
    assert!(u.signed.is_none() && u.identity.is_empty(), "the signed prekey stays while one-time keys last");
    // A second notice while the upload is under way asks for nothing more.
    assert!(d.e2e.on_keys_status(&mut d.store, 10).unwrap().is_empty());
    w.serve(a, reqs);
    let d = &mut w.devs[a];
    let reqs = d.e2e.on_keys_status(&mut d.store, 0).unwrap();
    let [Message::KeysUpload(u)] = &reqs[..] else { panic!("{reqs:?}") };
    assert_eq!(u.one_time.len(), ONE_TIME_TARGET);
    assert!(u.signed.is_some(), "the stock ran dry, so the signed prekey was in use: a new one");
    pipit_protocol::e2e::check_upload(u).unwrap();
}

#[test]
fn a_member_cannot_pass_off_another_members_session_as_its_own() {
    let mut w = World::new();
    let a = w.add(1, 0);
    let m = w.add(2, 0);
    let c = w.add(3, 0);
    w.set_group(5, &[1, 2, 3], 1);
    let honest = w.seal(a, pb::Send { id: 1, group: 5, payload: Bytes::from_static(b"from a"), ..Default::default() });
    w.deliver_group(a, &honest, &[1, 2, 3]);
    // Member 2 has a's session key; it shares it with 3 as if it were its
    // own, then speaks under it.
    let dev = &mut w.devs[a];
    let out: OutboundRecord = dev.e2e.vault.get(&mut dev.store, "out.5").unwrap().unwrap();
    let session_key = GroupSession::from_pickle(out.pickle).session_key().to_bytes();
    let room_key = pb::E2eRoomKey { group: 5, session_key: Bytes::from(session_key) };
    let share = pb::E2eContent { group: 5, room_key: Some(room_key), ..Default::default() }.encode_to_vec();
    let sealed = w.seal(m, text(3, "hi"));
    w.deliver(m, &sealed);
    let dev = &mut w.devs[m];
    let forged = dev.e2e.olm_encrypt(&mut dev.store, (3, 0), &share).unwrap().unwrap();
    let mut d = deliver((2, 0), honest.payload.clone(), 0, 5);
    d.device_payload = forged;
    let events = w.decrypt(c, d);
    assert!(
        matches!(&events[..], [Event::Undecryptable { .. }]),
        "a message under a's session from member 2 is not believed: {events:?}"
    );
    // And 3 still reads a's own next message under that session.
    let next = w.seal(a, pb::Send { id: 2, group: 5, payload: Bytes::from_static(b"still a"), ..Default::default() });
    let got = w.deliver_group(a, &next, &[1, 2, 3]);
    assert!(got.iter().all(|(_, e)| plaintext(e) == Some(&b"still a"[..])), "{got:?}");
}
