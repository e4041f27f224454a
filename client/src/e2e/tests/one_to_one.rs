//! 1:1 messages between devices over Olm: fan-out to every device,
//! what cannot be read, changed identities, restarts, the prekey stock.

use pipit_protocol::e2e::encode_envelope;

use super::*;

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
