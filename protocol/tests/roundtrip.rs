//! Property tests: whatever we encode decodes to the same messages, through
//! the packet codec alone and through a real encrypted session.

mod common;

use bytes::{Bytes, BytesMut};
use pipit_protocol::message::{decode_packet, encode_packet, pb};
use pipit_protocol::session::Incoming;
use pipit_protocol::{Message, StaticKeypair};
use proptest::prelude::*;

fn bytes_upto(n: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from)
}

fn client_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), bytes_upto(300)).prop_map(|(id, to, payload)| pb::Send {
            id,
            to,
            payload,
            ..Default::default()
        }
        .into()),
        (any::<u64>(), any::<u64>(), proptest::collection::vec((any::<u64>(), any::<u32>(), bytes_upto(64)), 0..4))
            .prop_map(|(id, group, pd)| pb::Send {
                id,
                group,
                per_device: pd
                    .into_iter()
                    .map(|(account, device, payload)| pb::DeviceCiphertext { account, device, payload })
                    .collect(),
                ..Default::default()
            }
            .into()),
        (any::<u64>(), proptest::collection::vec(any::<u64>(), 0..20)).prop_map(|(through, ids)| pb::Ack {
            through,
            ids
        }
        .into()),
        (0i32..3, any::<u64>(), any::<u64>()).prop_map(|(kind, peer, through)| pb::Receipt {
            kind,
            peer,
            through,
            ..Default::default()
        }
        .into()),
        (any::<u64>(), any::<bool>())
            .prop_map(|(peer, typing)| pb::Typing { peer, typing, ..Default::default() }.into()),
        (proptest::collection::vec(any::<u64>(), 0..50), any::<u64>())
            .prop_map(|(accounts, req)| pb::PresenceSubscribe { accounts, req }.into()),
        any::<u64>().prop_map(|id| pb::Ping { id }.into()),
        (any::<u64>(), bytes_upto(40), proptest::collection::vec(any::<u64>(), 0..30), any::<u64>())
            .prop_map(|(req, name, members, id)| pb::GroupCreate { req, name, members, id }.into()),
        (any::<u64>(), bytes_upto(33), proptest::collection::vec((any::<u32>(), bytes_upto(33)), 0..5)).prop_map(
            |(req, identity, otks)| pb::KeysUpload {
                req,
                identity,
                signed: Some(pb::SignedPreKey {
                    id: 1,
                    key: Bytes::from_static(&[9; 32]),
                    signature: Bytes::from_static(&[8; 64])
                }),
                one_time: otks.into_iter().map(|(id, key)| pb::PreKey { id, key }).collect(),
            }
            .into()
        ),
    ]
}

fn server_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(id, seq, time)| pb::Sent { id, seq, time }.into()),
        (any::<u64>(), any::<u64>(), any::<u32>(), any::<u64>(), bytes_upto(300), any::<u64>()).prop_map(
            |(inbox, from, from_device, seq, payload, group)| pb::Deliver {
                inbox,
                from,
                from_device,
                seq,
                payload,
                group,
                ..Default::default()
            }
            .into()
        ),
        (any::<u64>(), any::<bool>(), any::<u64>())
            .prop_map(|(account, online, last_seen)| { pb::Presence { account, online, last_seen }.into() }),
        (0i32..17, any::<u64>()).prop_map(|(code, req)| pb::Error { code, req, ..Default::default() }.into()),
        (any::<u64>(), any::<u64>(), any::<u64>()).prop_map(|(peer, seq, group)| pb::Expired {
            peer,
            seq,
            group,
            devices: 1,
            inbox: seq / 2,
        }
        .into()),
        any::<u64>().prop_map(|id| pb::Pong { id }.into()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn packets_round_trip(msgs in proptest::collection::vec(prop_oneof![client_message(), server_message()], 0..20)) {
        let mut buf = Vec::new();
        encode_packet(&msgs, &mut buf);
        prop_assert_eq!(decode_packet(Bytes::from(buf)).unwrap(), msgs);
    }

    #[test]
    fn arbitrary_bytes_decode_to_a_canonical_form_or_an_error(data in proptest::collection::vec(any::<u8>(), 0..200)) {
        if let Ok(msgs) = decode_packet(Bytes::from(data)) {
            let mut buf = Vec::new();
            encode_packet(&msgs, &mut buf);
            prop_assert_eq!(decode_packet(Bytes::from(buf)).unwrap(), msgs);
        }
    }

    #[test]
    fn sessions_carry_any_sequence_of_messages(
        up in proptest::collection::vec(client_message(), 1..10),
        down in proptest::collection::vec(server_message(), 1..10),
    ) {
        let (_, keys) = common::server_keys();
        let mut p = common::ik_pair(&StaticKeypair::generate(), &keys);
        let mut wire = BytesMut::new();
        p.client.seal(&up, &mut wire).unwrap();
        let mut got = Vec::new();
        while let Some(Incoming::Messages(m)) = p.server.open(&mut wire).unwrap() { got.extend(m); }
        prop_assert_eq!(got, up);
        p.server.seal(&down, &mut wire).unwrap();
        let mut got = Vec::new();
        while let Some(Incoming::Messages(m)) = p.client.open(&mut wire).unwrap() { got.extend(m); }
        prop_assert_eq!(got, down);
    }
}

/// A backlog of small messages (a client's outbox after a refusal, a
/// server's answers to it) goes in as many packets as the per-packet
/// message limit needs, not one packet the receiver must refuse.
#[test]
fn many_small_messages_are_split_at_the_per_packet_limit() {
    let (_, keys) = common::server_keys();
    let mut p = common::ik_pair(&StaticKeypair::generate(), &keys);
    let pings: Vec<Message> = (1..=3_000).map(|id| pb::Ping { id }.into()).collect();
    let mut wire = BytesMut::new();
    let frames = p.client.seal(&pings, &mut wire).unwrap();
    assert_eq!(frames, 3, "3,000 pings of 3-4 bytes fit one packet's bytes but not its 1,024 messages");
    let mut got = Vec::new();
    while let Some(Incoming::Messages(m)) = p.server.open(&mut wire).unwrap() {
        assert!(m.len() <= pipit_protocol::limits::MAX_MESSAGES_PER_PACKET);
        got.extend(m);
    }
    assert_eq!(got, pings);
}
