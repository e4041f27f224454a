//! Group messages over Megolm: one ciphertext for many devices, session
//! replacement, key carriers, sessions bound to their sender; and the
//! hand-run measurement.

use vodozemac::megolm::GroupSession;

use super::*;
use crate::e2e::records::OutboundRecord;

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

#[test]
fn a_group_message_delivered_again_as_a_new_message_is_a_replay() {
    let mut w = World::new();
    let a = w.add(1, 0);
    let b = w.add(2, 0);
    w.set_group(5, &[1, 2], 1);
    let sealed = w.seal(a, pb::Send { id: 1, group: 5, payload: Bytes::from_static(b"once"), ..Default::default() });
    let got = w.deliver_group(a, &sealed, &[1, 2]);
    assert_eq!(plaintext(&got[0].1), Some(&b"once"[..]));
    // The same delivery again (a reconnect before the ack): read again.
    let again = deliver((1, 0), sealed.payload.clone(), 0, 5);
    assert_eq!(plaintext(&w.decrypt(b, again)), Some(&b"once"[..]));
    // The same ciphertext as a new group message: not shown twice.
    let replay = pb::Deliver { seq: 2, inbox: 2, ..deliver((1, 0), sealed.payload.clone(), 0, 5) };
    let events = w.decrypt(b, replay);
    assert!(matches!(&events[..], [Event::Undecryptable { reason: Undecryptable::Replayed, .. }]), "{events:?}");
    // The sender's next message still reads.
    let next = w.seal(a, pb::Send { id: 2, group: 5, payload: Bytes::from_static(b"twice"), ..Default::default() });
    let got = w.deliver_group(a, &next, &[1, 2]);
    assert_eq!(plaintext(&got[0].1), Some(&b"twice"[..]));
}
