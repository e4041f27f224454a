//! The byte budget: what each message costs on the wire, framing and
//! encryption included. SPEC.md §11's table is checked against it, row by
//! row; run with `--nocapture` to see it.

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

/// The features a reference server offers by default (`OFFERED` in
/// `src/service/features.rs`; push only when a gateway is configured):
/// the login result carries them. `tests/spec_rules.rs`
/// (`login_ok_lists_the_features_the_byte_budget_counts`) checks that a
/// real server lists exactly these.
const REFERENCE_FEATURES: [pb::Feature; 5] = [
    pb::Feature::Groups,
    pb::Feature::Presence,
    pb::Feature::Typing,
    pb::Feature::KeyDirectory,
    pb::Feature::UnlinkDevice,
];

/// The login result of the typical login: what a reference server with
/// its default settings (window 64) answers `hello()` with, `pending`
/// entries waiting.
fn typical_login_ok(pending: u32) -> Message {
    pb::LoginOk {
        account: 123_456,
        device: 0,
        server_time: 1_795_000_000,
        keepalive_secs: 420,
        pending,
        window: 64,
        features: REFERENCE_FEATURES.iter().map(|f| *f as i32).collect(),
        ..Default::default()
    }
    .into()
}

/// A 100-byte message as delivered (typical ids).
fn typical_deliver() -> Message {
    pb::Deliver {
        inbox: 50_000,
        from: 123_456,
        from_device: 0,
        seq: 5_000,
        time: 1_795_000_000,
        payload: Bytes::from(vec![0x5A; 100]),
        ..Default::default()
    }
    .into()
}

/// Rows of a size table: what, and its bytes on the wire.
type Rows = Vec<(&'static str, usize)>;

/// The rows of SPEC.md §11's table, computed: labels exactly as the table
/// has them, in its order. Then rows the table leaves out, printed only.
fn sizes() -> (Rows, Rows) {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut rows: Rows = Vec::new();
    let mut extra: Rows = Vec::new();

    // IK with a typical login, answered by LoginOk and one queued message.
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::ik(&device, keys.current().public(), hello(), &mut c2s).unwrap();
    rows.push(("IK message 1 (preamble + login), client → server", c2s.len()));
    let mut s2c = BytesMut::new();
    let acc = accepted(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    acc.finish(&[typical_login_ok(0)], &mut s2c).unwrap();
    rows.push(("IK message 2 (login result), server → client", s2c.len()));
    drop(hs);
    let mut c2s = BytesMut::new();
    let _ = ClientHandshake::ik(&device, keys.current().public(), hello(), &mut c2s).unwrap();
    let mut s2c = BytesMut::new();
    let acc = accepted(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    acc.finish(&[typical_login_ok(1), typical_deliver()], &mut s2c).unwrap();
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
    extra.push(("XX: the server's first frame (the login result alone)", frame_len(&[typical_login_ok(0)])));

    // Transport.
    rows.push(("`Send`, 100-byte payload (client id 1,000, to 100,000)", frame_len(&[send(1_000, 100_000)])));
    rows.push(("`Sent`", frame_len(&[pb::Sent { id: 1_000, seq: 5_000, time: 1_795_000_000 }.into()])));
    rows.push(("`Deliver`, 100-byte payload", frame_len(&[typical_deliver()])));
    rows.push(("`Ack`", frame_len(&[pb::Ack { through: 50_000, ids: vec![] }.into()])));
    let r: Message =
        pb::Receipt { kind: pb::ReceiptKind::Read as i32, peer: 123_456, through: 5_000, ..Default::default() }.into();
    extra.push(("READ `Receipt` alone", frame_len(std::slice::from_ref(&r))));
    rows.push((
        "`Ack` + READ `Receipt` in one frame",
        frame_len(&[pb::Ack { through: 50_000, ids: vec![] }.into(), r]),
    ));
    // Groups.
    let gs: Message =
        pb::Send { id: 1_000, group: 5_000, payload: Bytes::from(vec![0x5A; 100]), ..Default::default() }.into();
    rows.push(("group `Send`, 100-byte payload (group 5,000)", frame_len(&[gs])));
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
    rows.push(("group `Deliver`, 100-byte payload", frame_len(&[gd])));
    let (delivered, read) = group_counts();
    rows.push(("group `Receipt` (one message's count, §5.3)", frame_len(std::slice::from_ref(&delivered))));
    rows.push(("group delivered + read counts in one frame", frame_len(&[delivered, read])));
    extra.push(("per-member group `Receipt` (`by`), for comparison", frame_len(&[per_member_receipt()])));
    rows.push(("keepalive", 2));
    extra.push(("`Ping` (authenticated)", frame_len(&[pb::Ping { id: 1 }.into()])));

    // Presence: a chat list of 50 contacts (accounts near 123,456), 10 of
    // them online; the states and the Done share one frame.
    let contacts: Vec<u64> = (0..50).map(|i| 123_456 + i * 37).collect();
    let subscribe: Message = pb::PresenceSubscribe { accounts: contacts.clone(), req: 12 }.into();
    rows.push(("`PresenceSubscribe`, 50 accounts (near 123,456)", frame_len(&[subscribe])));
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
    rows.push(("its answer: 50 `Presence` (10 online) + `Done`, one frame", frame_len(&answer)));
    let online: Message = pb::Presence { account: 123_456, online: true, last_seen: 0 }.into();
    rows.push(("`Presence`, came online", frame_len(&[online])));
    let offline: Message = pb::Presence { account: 123_456, online: false, last_seen: 1_795_000_000 }.into();
    rows.push(("`Presence`, went offline (with last seen)", frame_len(&[offline])));
    let typing: Message = pb::Typing { peer: 123_456, typing: true, ..Default::default() }.into();
    rows.push(("`Typing`", frame_len(&[typing])));
    (rows, extra)
}

/// The `| what | bytes |` rows of SPEC.md §11's table, numbers without
/// their thousands separators.
fn spec_table() -> Vec<(String, usize)> {
    let spec = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/SPEC.md")).unwrap();
    let start = spec.find("\n## 11. Byte budget").expect("SPEC.md has §11");
    let section = &spec[start + 1..];
    let section = &section[..section.find("\n## ").unwrap_or(section.len())];
    section
        .lines()
        .filter(|l| l.starts_with('|') && !l.starts_with("| what") && !l.starts_with("|---"))
        .map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            assert_eq!(cells.len(), 4, "a row of two cells: {l}");
            let n = cells[2].replace(',', "").parse().unwrap_or_else(|_| panic!("a number of bytes: {l}"));
            (cells[1].to_string(), n)
        })
        .collect()
}

/// SPEC.md §11's table is what the code sends: every row, computed here
/// with the protocol crate, in the table's order. When the wire changes,
/// this fails and prints the table to paste. Run with `--nocapture` to see
/// it and the rows the table leaves out.
#[test]
fn the_spec_table_is_what_the_code_sends() {
    let (rows, extra) = sizes();
    let mut table = String::from("| what | bytes |\n|---|---|\n");
    for (what, n) in &rows {
        table += &format!("| {what} | {} |\n", thousands(*n));
    }
    println!("{table}\nnot in the table:");
    for (what, n) in &extra {
        println!("  {what}: {n}");
    }
    let computed: Vec<(String, usize)> = rows.iter().map(|(w, n)| (w.to_string(), *n)).collect();
    assert_eq!(spec_table(), computed, "SPEC.md §11 differs from the code; the computed table:\n{table}");
    // The table is only useful if the budget it documents holds.
    assert!(rows.iter().any(|(w, n)| w.starts_with("`Send`") && *n <= 100 + SEND_OVERHEAD_BUDGET));
}

/// `1234` as `1,234`, as SPEC.md writes numbers.
fn thousands(n: usize) -> String {
    let s = n.to_string();
    let mut out = String::new();
    for (i, c) in s.chars().enumerate() {
        if i > 0 && (s.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
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
