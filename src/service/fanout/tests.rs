//! Tests of group fan-out: one stored body, references, order, receipts.

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::Message;

use super::*;
use crate::service::groups::Change;
use crate::service::messaging::SendFailure;
use crate::service::settings::Registration;
use crate::service::testing::{setup, Setup};

/// The group entries (seq, kind) in a device's inbox, in inbox order.
fn group_entries(s: &Setup, d: DeviceAddr) -> Vec<(u64, &'static str)> {
    s.store
        .inbox_after(d, 0, 1_000)
        .unwrap()
        .into_iter()
        .filter_map(|(_, m)| match m {
            Message::Deliver(d) if d.group != 0 => Some((d.seq, "message")),
            Message::GroupInfo(g) => Some((g.seq, "notice")),
            _ => None,
        })
        .collect()
}

fn ids(s: &Setup, d: DeviceAddr) -> Vec<u64> {
    s.store.inbox_after(d, 0, 1_000).unwrap().into_iter().map(|(id, _)| id).collect()
}

#[test]
fn a_group_message_is_stored_once_and_its_body_goes_with_the_last_reference() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let c = s.register(3, "").unwrap();
    let b2 = s.link(b.account, 4);
    let a2 = s.link(a.account, 5);
    let info = s.create_group(a, &[b.account, c.account]).unwrap();
    assert_eq!((info.group, info.version, info.seq), (1, 1, 1));
    assert_eq!(info.members, vec![a.account, b.account, c.account]);
    assert_eq!(info.admins, vec![a.account]);
    s.fan_out(128);
    for d in [a, a2, b, b2, c] {
        assert_eq!(group_entries(&s, d), vec![(1, "notice")], "{d}");
    }

    let sent = s.group_send(a, 1, info.group).unwrap();
    assert_eq!(sent.seq, 2);
    // Durable and answered before any member has it.
    assert_eq!(s.store.fanout_backlog(None, 10).unwrap().jobs, 1);
    assert_eq!(group_entries(&s, b), vec![(1, "notice")]);
    assert_eq!(s.group_send(a, 1, info.group).unwrap(), sent, "a retry gets the original answer");
    assert_eq!(s.store.fanout_backlog(None, 10).unwrap().jobs, 1, "and no second job");

    // One member account per step: the cursor moves, nobody twice.
    let mut steps = Vec::new();
    loop {
        let step = s.step(info.group, 2, 1);
        steps.push(step.entries);
        if step.finished {
            break;
        }
    }
    assert_eq!(steps, vec![1, 2, 1], "a's other device, b's two devices, then c");
    for d in [a2, b, b2, c] {
        assert_eq!(group_entries(&s, d), vec![(1, "notice"), (2, "message")], "{d}");
    }
    assert_eq!(group_entries(&s, a), vec![(1, "notice")], "the sending device has its message");
    let Message::Deliver(got) = &s.store.inbox_after(c, 1, 10).unwrap()[0].1 else { panic!() };
    assert_eq!((got.from, got.from_device, got.group, &got.payload[..]), (a.account, 0, 1, &b"hello group"[..]));
    assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 4);
    let stats = s.store.group_body_stats(Some(1)).unwrap();
    assert_eq!((stats.messages, stats.notices), (1, 1));

    // Acks drop the count once per entry, however often they come.
    let last = |d| *ids(&s, d).last().unwrap();
    s.ack(b, &[last(b)]);
    s.ack(b, &[last(b)]);
    assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 3);
    for d in [a2, b2, c] {
        s.ack(d, &ids(&s, d));
    }
    assert_eq!(s.store.group_body_stats(Some(1)).unwrap().messages, 0, "the last ack deleted the body");
    assert_eq!(s.store.counter(Counter::BodyRefs { group: 1, seq: 2 }).unwrap(), 0);
}

#[test]
fn who_gets_what_is_decided_by_seq_not_by_when_the_fan_out_runs() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let c = s.register(3, "").unwrap();
    let g = s.create_group(a, &[b.account]).unwrap().group;
    // Nothing is fanned out until the end.
    assert_eq!(s.group_send(a, 1, g).unwrap().seq, 2);
    s.change(a, g, Change::Remove(vec![b.account])).unwrap(); // seq 3
    s.change(a, g, Change::Add(vec![c.account])).unwrap(); // seq 4
    assert_eq!(s.group_send(a, 2, g).unwrap().seq, 5);
    assert_eq!(s.group_send(b, 1, g), Err(SendFailure::Code(pb::ErrorCode::Forbidden)), "b was removed");
    assert_eq!(s.store.group(g).unwrap().unwrap().members.len(), 3, "b is kept until the fan-out passes 3");
    s.fan_out(1);
    assert_eq!(group_entries(&s, b), vec![(1, "notice"), (2, "message"), (3, "notice")]);
    assert_eq!(group_entries(&s, c), vec![(4, "notice"), (5, "message")]);
    assert_eq!(group_entries(&s, a), vec![(1, "notice"), (3, "notice"), (4, "notice")]);
    let record = s.store.group(g).unwrap().unwrap();
    assert_eq!(record.members.iter().map(|m| m.account).collect::<Vec<_>>(), vec![a.account, c.account]);
    // The notice b got says it is out; c's says it is in.
    let notices: Vec<pb::GroupInfo> = s
        .store
        .inbox_after(b, 0, 10)
        .unwrap()
        .into_iter()
        .filter_map(|(_, m)| if let Message::GroupInfo(i) = m { Some(i) } else { None })
        .collect();
    assert_eq!((notices[1].version, notices[1].by, &notices[1].members), (2, a.account, &vec![a.account]));
    // Removed and added again: one membership at a time, each entry once.
    s.change(a, g, Change::Add(vec![b.account])).unwrap(); // seq 6
    s.change(a, g, Change::Remove(vec![b.account])).unwrap(); // seq 7
    s.change(a, g, Change::Add(vec![b.account])).unwrap(); // seq 8
    assert_eq!(s.group_send(a, 3, g).unwrap().seq, 9);
    s.fan_out(128);
    let seqs: Vec<u64> = group_entries(&s, b).into_iter().map(|(seq, _)| seq).collect();
    assert_eq!(seqs, vec![1, 2, 3, 6, 7, 8, 9]);
}

#[test]
fn membership_rules_and_bad_requests_change_nothing() {
    let s = setup(Registration::Open);
    let accounts: Vec<DeviceAddr> = (1..=10).map(|k| s.register(k, "").unwrap()).collect();
    let [a, b, c, d] = [accounts[0], accounts[1], accounts[2], accounts[3]];
    use pb::ErrorCode::*;
    assert_eq!(s.create_group(a, &[b.account, b.account]).unwrap_err(), BadRequest);
    assert_eq!(s.create_group(a, &[0]).unwrap_err(), BadRequest);
    assert_eq!(s.create_group(a, &[999]).unwrap_err(), NotFound);
    let nine: Vec<u64> = accounts[1..].iter().map(|x| x.account).collect();
    assert_eq!(s.create_group(a, &nine).unwrap_err(), TooLarge, "the test limit is 8");
    let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
    assert_eq!(g, 1, "refused creations used no id");
    assert_eq!(s.change(a, 0, Change::Leave), Err(BadRequest));
    assert_eq!(s.change(a, 77, Change::Add(vec![d.account])), Err(NotFound));
    assert_eq!(s.change(b, g, Change::Add(vec![d.account])), Err(Forbidden), "b is no admin");
    assert_eq!(s.change(d, g, Change::Leave), Err(Forbidden), "d is no member");
    assert_eq!(s.change(a, g, Change::Add(vec![d.account, d.account])), Err(BadRequest));
    assert_eq!(s.change(a, g, Change::Add(vec![])), Err(BadRequest));
    assert_eq!(s.change(a, g, Change::Add(nine[2..].to_vec())), Err(TooLarge));
    assert_eq!(s.group_send(d, 1, g), Err(SendFailure::Code(Forbidden)));
    assert_eq!(s.group_send(a, 1, 0), Err(SendFailure::Code(BadRequest)), "neither to nor group");
    assert_eq!(s.group_send(a, 2, 77), Err(SendFailure::Code(NotFound)));
    let record = s.store.group(g).unwrap().unwrap();
    assert_eq!((record.version, record.members.len()), (1, 3), "nothing changed");
    assert_eq!(s.store.counter(Counter::GroupSeq(g)).unwrap(), 2);
    // Adding someone already in changes nothing either (a retry).
    s.change(a, g, Change::Add(vec![b.account])).unwrap();
    assert_eq!(s.store.group(g).unwrap().unwrap().version, 1);
    // The last admin leaves: the oldest member (the earliest to join,
    // then the lowest account) becomes admin.
    s.change(a, g, Change::Add(vec![d.account])).unwrap();
    s.change(a, g, Change::Leave).unwrap();
    let record = s.store.group(g).unwrap().unwrap();
    let admins: Vec<u64> = record.current().filter(|m| m.admin).map(|m| m.account).collect();
    assert_eq!(admins, vec![b.account]);
    assert_eq!(record.version, 3);
    assert_eq!(s.change(b, g, Change::Remove(vec![c.account, d.account])), Ok(()));
    assert_eq!(s.group_send(c, 1, g), Err(SendFailure::Code(Forbidden)), "a removed member cannot send");
    assert_eq!(s.store.groups_of(b.account, 0, 10).unwrap(), vec![g]);
    assert!(s.store.groups_of(c.account, 0, 10).unwrap().is_empty());
}

#[test]
fn per_device_ciphertexts_reach_only_their_device_and_must_name_member_devices() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let b2 = s.link(b.account, 3);
    let outsider = s.register(4, "").unwrap();
    let g = s.create_group(a, &[b.account]).unwrap().group;
    let key =
        |account, device, p: &'static [u8]| pb::DeviceCiphertext { account, device, payload: Bytes::from_static(p) };
    let send = |id, per_device| pb::Send {
        id,
        group: g,
        payload: Bytes::from_static(b"megolm"),
        per_device,
        ..Default::default()
    };
    let run = |m: pb::Send| s.rt.block_on(s.services().messaging.send(a, m).unwrap());
    let Err(SendFailure::Mismatch(m)) = run(send(1, vec![key(outsider.account, 0, b"x"), key(b.account, 9, b"y")]))
    else {
        panic!("expected a mismatch");
    };
    assert_eq!(m.extra.len(), 2);
    assert!(m.missing.is_empty());
    assert_eq!(run(send(2, vec![key(0, 0, b"x")])), Err(SendFailure::Code(pb::ErrorCode::BadRequest)));
    let huge = pb::Send { payload: Bytes::from(vec![0u8; 65_500]), ..send(3, vec![]) };
    assert_eq!(run(huge), Err(SendFailure::Code(pb::ErrorCode::TooLarge)));
    let sent = run(send(4, vec![key(b2.account, b2.device, b"sender key for b2")])).unwrap();
    s.fan_out(128);
    let got = |d| match s.store.inbox_after(d, 0, 10).unwrap().pop().unwrap().1 {
        Message::Deliver(x) => x,
        other => panic!("{other:?}"),
    };
    let (d1, d2) = (got(b), got(b2));
    assert_eq!((d1.seq, &d1.payload[..], &d1.device_payload[..]), (sent.seq, &b"megolm"[..], &b""[..]));
    assert_eq!(
        (d2.seq, &d2.payload[..], &d2.device_payload[..]),
        (sent.seq, &b"megolm"[..], &b"sender key for b2"[..])
    );
    assert_eq!(s.store.group_body_stats(Some(g)).unwrap().extras, 0, "copied into the entry, then deleted");
}

#[test]
fn group_receipts_count_each_member_once_and_reach_the_sender_coalesced() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let b2 = s.link(b.account, 3);
    let c = s.register(4, "").unwrap();
    let g = s.create_group(a, &[b.account, c.account]).unwrap().group;
    let seq = s.group_send(a, 1, g).unwrap().seq;
    s.fan_out(128);
    let before = ids(&s, a).len();
    for d in [b, b2, c] {
        s.ack(d, &ids(&s, d));
    }
    for d in [b, b2] {
        let op = s.services().groups.read(d, g, seq);
        assert!(op.try_submit(&s.services().writer).is_ok());
    }
    s.barrier();
    let counts = s.store.group_counts(g, seq).unwrap().unwrap();
    assert_eq!((counts.recipients, counts.delivered, counts.read), (2, 2, 1), "b's two devices count once");
    s.flush_group_receipts();
    let receipts: Vec<(i32, u64, u64, u32)> = s
        .store
        .inbox_after(a, 0, 100)
        .unwrap()
        .into_iter()
        .skip(before)
        .filter_map(|(_, m)| if let Message::Receipt(r) = m { Some((r.kind, r.group, r.seq, r.count)) } else { None })
        .collect();
    let (dl, rd) = (pb::ReceiptKind::Delivered as i32, pb::ReceiptKind::Read as i32);
    assert_eq!(receipts, vec![(dl, g, seq, 2), (rd, g, seq, 1)], "one receipt per kind, with the counts");
    s.flush_group_receipts();
    assert_eq!(ids(&s, a).len(), before + 2, "nothing new to tell");
    // c reads too: everyone has; the sender is told and the counts go.
    assert!(s.services().groups.read(c, g, seq).try_submit(&s.services().writer).is_ok());
    s.barrier();
    s.flush_group_receipts();
    let receipts: Vec<(i32, u32)> = s
        .store
        .inbox_after(a, 0, 100)
        .unwrap()
        .into_iter()
        .skip(before)
        .filter_map(|(_, m)| if let Message::Receipt(r) = m { Some((r.kind, r.count)) } else { None })
        .collect();
    assert_eq!(receipts, vec![(dl, 2), (rd, 2)], "the new read count replaced the one not acked yet");
    assert!(s.store.group_counts(g, seq).unwrap().is_none());
}

/// A group whose last member has left (and heard so) is deleted with its
/// sequence counter; its last bodies go with their references.
#[test]
fn a_group_is_deleted_once_its_last_member_has_left() {
    let s = setup(Registration::Open);
    let a = s.register(1, "").unwrap();
    let b = s.register(2, "").unwrap();
    let g = s.create_group(a, &[b.account]).unwrap().group;
    s.group_send(a, 1, g).unwrap();
    s.change(b, g, Change::Leave).unwrap();
    s.fan_out(128);
    assert!(s.store.group(g).unwrap().is_some(), "a is still in it");
    s.change(a, g, Change::Leave).unwrap();
    s.fan_out(128);
    assert!(s.store.group(g).unwrap().is_none());
    assert_eq!(s.store.counter(Counter::GroupSeq(g)).unwrap(), 1, "deleted: reads as new");
    assert_eq!(s.group_send(a, 2, g).map_err(|e| format!("{e:?}")), Err("Code(NotFound)".into()));
    for d in [a, b] {
        s.ack(d, &ids(&s, d));
    }
    let stats = s.store.group_body_stats(Some(g)).unwrap();
    assert_eq!((stats.messages, stats.notices), (0, 0));
}
