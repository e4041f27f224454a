//! The byte budget: what each message costs on the wire, framing and
//! encryption included. Run with `--nocapture` to see the table SPEC.md
//! quotes.

mod common;

use bytes::{Bytes, BytesMut};
use common::*;
use pipit_protocol::handshake::{Hello, ServerHandshake, XxStep};
use pipit_protocol::message::pb;
use pipit_protocol::{ClientHandshake, Message, StaticKeypair};
use std::time::Instant;

/// SPEC.md's budget: a 1:1 send of a 100-byte payload costs at most this
/// many bytes above the payload, for ids and accounts below 2^28.
const SEND_OVERHEAD_BUDGET: usize = 36;

fn send(id: u64, to: u64) -> Message {
    pb::Send { id, to, payload: Bytes::from(vec![0x5A; 100]), ..Default::default() }.into()
}

fn frame_len(msgs: &[Message]) -> usize {
    let (_, keys) = server_keys();
    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let mut out = BytesMut::new();
    p.client.seal(msgs, &mut out).unwrap();
    out.len()
}

#[test]
fn a_100_byte_send_fits_the_budget() {
    for (id, to) in [(1, 1), (1_000, 100_000), ((1 << 28) - 1, (1 << 28) - 1)] {
        let wire = frame_len(&[send(id, to)]);
        assert!(
            wire - 100 <= SEND_OVERHEAD_BUDGET,
            "id {id}, to {to}: {wire} bytes on the wire, {} over the payload",
            wire - 100
        );
    }
}

fn hello() -> Hello {
    Hello::Login(pb::Login {
        account: 123_456,
        device: 0,
        acked_through: 98_765,
        keepalive_secs: 420,
        user_agent: String::new(),
    })
}

#[test]
fn report_sizes() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut rows: Vec<(&str, usize)> = Vec::new();

    // IK with a typical login, answered by LoginOk and one queued message.
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::ik(&device, keys.current().public(), hello(), &mut c2s).unwrap();
    rows.push(("IK message 1 (preamble + login), client -> server", c2s.len()));
    let mut s2c = BytesMut::new();
    let acc = accepted(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    let ok = login_ok(123_456);
    acc.finish(std::slice::from_ref(&ok), &mut s2c).unwrap();
    rows.push(("IK message 2 (login result), server -> client", s2c.len()));
    drop(hs);
    let mut c2s = BytesMut::new();
    let _ = ClientHandshake::ik(&device, keys.current().public(), hello(), &mut c2s).unwrap();
    let mut s2c = BytesMut::new();
    let acc = accepted(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    acc.finish(&[ok.clone(), deliver(1)], &mut s2c).unwrap();
    rows.push(("IK message 2 + one queued 100-byte message", s2c.len()));

    // XX, with the same typical login as IK above.
    let p = xx_pair(&device, &keys);
    rows.push(("XX message 1 (preamble + e)", p.flights[0]));
    rows.push(("XX message 2 (e, ee, s, es)", p.flights[1]));
    let mut c2s = BytesMut::new();
    let xx = ClientHandshake::xx(&device, &mut c2s).unwrap();
    let mut s2c = BytesMut::new();
    let _server =
        need_more(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    let XxStep::ServerKnown(known) = xx.read(&mut s2c).unwrap() else { panic!("no XX reply") };
    let mut c2s = BytesMut::new();
    known.finish(hello(), &mut c2s).unwrap();
    rows.push(("XX message 3 (s, se + login)", c2s.len()));
    rows.push(("XX: server's first frame (login result + 2 queued)", p.flights[3]));

    // Transport.
    let s = send(1_000, 100_000);
    rows.push(("Send, 100-byte payload", frame_len(&[s])));
    rows.push(("Sent (id, seq, time)", frame_len(&[pb::Sent { id: 1_000, seq: 5_000, time: 1_795_000_000 }.into()])));
    let d: Message = pb::Deliver {
        inbox: 50_000,
        from: 123_456,
        from_device: 0,
        seq: 5_000,
        time: 1_795_000_000,
        payload: Bytes::from(vec![0x5A; 100]),
        ..Default::default()
    }
    .into();
    rows.push(("Deliver, 100-byte payload", frame_len(&[d])));
    rows.push(("Ack (cumulative)", frame_len(&[pb::Ack { through: 50_000, ids: vec![] }.into()])));
    let r: Message =
        pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer: 123_456, through: 5_000, ..Default::default() }.into();
    rows.push(("Receipt (read, cumulative)", frame_len(std::slice::from_ref(&r))));
    rows.push(("Ack + read Receipt coalesced", frame_len(&[pb::Ack { through: 50_000, ids: vec![] }.into(), r])));
    // Groups.
    let gs: Message =
        pb::Send { id: 1_000, group: 5_000, payload: Bytes::from(vec![0x5A; 100]), ..Default::default() }.into();
    rows.push(("group Send, 100-byte payload", frame_len(&[gs])));
    let gd: Message = pb::Deliver {
        inbox: 50_000,
        from: 123_456,
        seq: 5_000,
        time: 1_795_000_000,
        payload: Bytes::from(vec![0x5A; 100]),
        group: 5_000,
        ..Default::default()
    }
    .into();
    rows.push(("group Deliver, 100-byte payload", frame_len(&[gd])));
    let (delivered, read) = group_counts();
    rows.push(("group Receipt (one message's count)", frame_len(std::slice::from_ref(&delivered))));
    rows.push(("group Receipts, delivered + read counts in one frame", frame_len(&[delivered, read])));
    rows.push(("per-member group Receipt (`by`), for comparison", frame_len(&[per_member_receipt()])));
    rows.push(("Keepalive (zero-length frame)", 2));
    rows.push(("Ping (authenticated)", frame_len(&[pb::Ping { id: 1 }.into()])));

    // Presence: a chat list of 50 contacts (accounts near 123,456), 10 of
    // them online; the states and the Done share one frame.
    let contacts: Vec<u64> = (0..50).map(|i| 123_456 + i * 37).collect();
    let subscribe: Message = pb::PresenceSubscribe { accounts: contacts.clone(), req: 12 }.into();
    rows.push(("PresenceSubscribe, 50 accounts", frame_len(&[subscribe])));
    let mut answer: Vec<Message> = contacts
        .iter()
        .enumerate()
        .map(|(i, &account)| {
            let online = i % 5 == 0;
            let last_seen = if online { 0 } else { 1_795_000_000 - i as u64 * 3_600 };
            pb::Presence { account, online, last_seen }.into()
        })
        .collect();
    answer.push(pb::Done { req: 12 }.into());
    rows.push(("its answer: 50 Presence + Done", frame_len(&answer)));
    let online: Message = pb::Presence { account: 123_456, online: true, last_seen: 0 }.into();
    rows.push(("Presence, came online", frame_len(&[online])));
    let offline: Message = pb::Presence { account: 123_456, online: false, last_seen: 1_795_000_000 }.into();
    rows.push(("Presence, went offline (with last seen)", frame_len(&[offline])));
    let typing: Message = pb::Typing { peer: 123_456, typing: true, ..Default::default() }.into();
    rows.push(("Typing", frame_len(&[typing])));

    println!("| what | bytes on the wire (before TCP/IP) |\n|---|---|");
    for (what, n) in &rows {
        println!("| {what} | {n} |");
    }
    // The report is only useful if the budget it documents holds.
    assert!(rows.iter().any(|(w, n)| w.starts_with("Send") && *n <= 136));
}

/// The counts a sender gets for one message to a 1,024-member group.
fn group_counts() -> (Message, Message) {
    let r = |kind: pb::ReceiptKind| -> Message {
        pb::Receipt {
            kind: kind as i32,
            group: 5_000,
            seq: 5_000,
            count: 1_023,
            time: 1_795_000_000,
            inbox: 50_000,
            ..Default::default()
        }
        .into()
    };
    (r(pb::ReceiptKind::Delivered), r(pb::ReceiptKind::Read))
}

/// What one member's receipt would be in the 1:1 form (`by` names it).
fn per_member_receipt() -> Message {
    pb::Receipt {
        kind: pb::ReceiptKind::Delivered as i32,
        group: 5_000,
        through: 5_000,
        by: 123_456,
        time: 1_795_000_000,
        inbox: 50_000,
        ..Default::default()
    }
    .into()
}

/// SPEC.md §5.3: per message and flush, a sender gets at most one frame of
/// counts, where per-member receipts would cost a frame per member and
/// kind (each member acks and reads at its own moment).
#[test]
fn group_receipt_counts_cost_a_fraction_of_per_member_receipts() {
    let (delivered, read) = group_counts();
    let flush = frame_len(&[delivered, read]);
    let per_member = 2 * 1_023 * frame_len(&[per_member_receipt()]);
    println!("one flush of counts: {flush} B; per-member receipts for a 1,024-member group: {per_member} B");
    assert!(flush <= 64, "{flush}");
    assert!(per_member > 1_000 * flush);
}
