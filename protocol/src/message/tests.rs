//! Tests of the message codec.

use super::*;

fn roundtrip(msgs: &[Message]) -> Vec<Message> {
    let mut buf = Vec::new();
    encode_packet(msgs, &mut buf);
    assert_eq!(buf.len(), packet_len(msgs));
    decode_packet(Bytes::from(buf)).unwrap()
}

#[test]
fn order_across_kinds_is_kept() {
    let msgs: Vec<Message> = vec![
        pb::Deliver { inbox: 1, from: 9, seq: 4, payload: Bytes::from_static(b"hi"), ..Default::default() }.into(),
        pb::Sent { id: 3, seq: 5, time: 1_700_000_000 }.into(),
        pb::Deliver { inbox: 2, from: 9, seq: 6, ..Default::default() }.into(),
    ];
    assert_eq!(roundtrip(&msgs), msgs);
}

#[test]
fn every_kind_maps_to_the_schema_field_number() {
    // Our codec and prost's generated Packet must agree on which field
    // number carries which kind, or another implementation built from
    // pipit.proto would misread us.
    let ours = Message::one_of_each();
    let mut buf = Vec::new();
    encode_packet(&ours, &mut buf);
    let theirs = pb::Packet::decode(&buf[..]).unwrap();
    let reencoded = theirs.encode_to_vec();
    let mut back = decode_packet(Bytes::from(reencoded)).unwrap();
    back.sort_by_key(Message::field_number);
    assert_eq!(back, ours, "each kind round-trips through pb::Packet under the same field");
    for m in &ours {
        assert!(m.encoded_len() > 2, "{} sample is not empty", m.kind());
    }
}

#[test]
fn unknown_fields_are_skipped() {
    let mut buf = Vec::new();
    // field 1000, varint; field 1001, length-delimited; field 1002 fixed32.
    encode_varint(1000 << 3, &mut buf);
    encode_varint(5, &mut buf);
    encode_varint((1001 << 3) | 2, &mut buf);
    encode_varint(2, &mut buf);
    buf.extend_from_slice(&[1, 2]);
    encode_varint((1002 << 3) | 5, &mut buf);
    buf.extend_from_slice(&[0; 4]);
    let ping: Message = pb::Ping { id: 7 }.into();
    ping.encode(&mut buf);
    assert_eq!(decode_packet(Bytes::from(buf)).unwrap(), vec![ping]);
}

#[test]
fn a_known_field_with_the_wrong_wire_type_is_malformed_at_both_levels() {
    // Packet level: Ping (field 8) as a varint, and as fixed32.
    for bad in [&[0x40, 0x01][..], &[0x45, 0, 0, 0, 0][..]] {
        assert!(decode_packet(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
    }
    // Message level: Ping { id (field 1, a varint) as length-delimited }.
    let inner = [0x0a, 0x01, 0x07];
    let mut buf = vec![0x42, inner.len() as u8];
    buf.extend_from_slice(&inner);
    assert!(decode_packet(Bytes::from(buf)).is_err());
    // An unknown field number keeps any wire type, at both levels.
    let mut buf = vec![0xc0, 0x3e, 0x01]; // field 1000, varint
    buf.extend_from_slice(&[0x42, 0x04, 0x08, 0x07, 0x10, 0x01]); // Ping{id 7, field 2 = 1}
    assert_eq!(decode_packet(Bytes::from(buf)).unwrap(), vec![pb::Ping { id: 7 }.into()]);
}

#[test]
fn every_client_request_has_a_request_id_and_every_optional_kind_a_feature() {
    for m in Message::one_of_each() {
        if !m.allowed_in_session_from(Role::Client) {
            assert_eq!(m.request_id(), None, "{}", m.kind());
            continue;
        }
        // Send is answered by its own id, Ping by Pong with its id;
        // Ack, Receipt, Typing and Pong are never answered.
        let by_req = m.request_id().is_some();
        let other = matches!(
            m,
            Message::Send(_)
                | Message::Ping(_)
                | Message::Ack(_)
                | Message::Receipt(_)
                | Message::Typing(_)
                | Message::Pong(_)
        );
        assert!(by_req != other, "{}: a request id, or one of the kinds without", m.kind());
    }
    for mut m in Message::one_of_each() {
        let carries = m.request_id().is_some();
        assert_eq!(m.set_request_id(77), carries, "{}", m.kind());
        if carries {
            assert_eq!(m.request_id(), Some(77), "{}", m.kind());
        }
    }
    let group_send: Message = pb::Send { id: 1, group: 3, ..Default::default() }.into();
    assert_eq!(group_send.feature(), Some(pb::Feature::Groups));
    let send: Message = pb::Send { id: 1, to: 3, ..Default::default() }.into();
    assert_eq!(send.feature(), None);
}

#[test]
fn malformed_packets_are_errors() {
    for bad in [&[0x0a, 0x05, 1][..], &[0x0b][..], &[0x00, 0x00][..], &[0x0a][..], &[0xff; 11][..]] {
        assert!(decode_packet(Bytes::copy_from_slice(bad)).is_err(), "{bad:?}");
    }
}

/// The poison-message rule: the largest payload a `Send` may carry
/// still fits the recipient's `Deliver` with every id at its largest,
/// in a transport frame and in an `IkReply`, with room to spare for
/// later envelope forms.
#[test]
fn the_largest_payload_fits_the_largest_deliver() {
    let deliver = |n: usize| -> Message {
        pb::Deliver {
            inbox: u64::MAX,
            from: u64::MAX,
            from_device: u32::MAX,
            seq: u64::MAX,
            time: u64::MAX,
            payload: Bytes::from(vec![0xAB; n]),
            peer: u64::MAX,
            group: u64::MAX,
            // A group entry carries either one payload for every
            // member or a device's own; the group send check bounds
            // their sum (`group_send::fits`).
            device_payload: Bytes::new(),
        }
        .into()
    };
    let largest = deliver(MAX_PAYLOAD_LEN).encoded_len();
    assert_eq!(largest, 65_360);
    assert!(largest <= crate::handshake::IK_REPLY_MAX_PACKET);
    assert!(MAX_PACKET_LEN - largest >= 128, "room for later envelope fields");
    assert!(deliver(MAX_PAYLOAD_LEN).fits_packet());

    let ok =
        pb::Send { id: u64::MAX, to: u64::MAX, payload: Bytes::from(vec![1; MAX_PAYLOAD_LEN]), ..Default::default() };
    assert_eq!(check_send(&ok), Ok(()));
    // What the old check (the Send within a packet) let through.
    let poison = pb::Send { id: 1, to: 2, payload: Bytes::from(vec![1; 65_498]), ..Default::default() };
    assert!(Message::Send(poison.clone()).encoded_len() <= MAX_PACKET_LEN);
    assert!(!deliver(65_498).fits_packet(), "its Deliver would not fit");
    assert_eq!(check_send(&poison), Err(MessageError::TooLarge { len: 65_498 }));
    let per_device = pb::Send {
        id: 1,
        to: 2,
        per_device: vec![
            pb::DeviceCiphertext { account: 0, device: 0, payload: Bytes::from_static(b"x") },
            pb::DeviceCiphertext { account: 0, device: 1, payload: Bytes::from(vec![1; MAX_PAYLOAD_LEN + 1]) },
        ],
        ..Default::default()
    };
    assert_eq!(check_send(&per_device), Err(MessageError::TooLarge { len: MAX_PAYLOAD_LEN + 1 }));
    // Ciphertexts that fit one by one but not together in one Send.
    let together = pb::Send {
        id: 1,
        to: 2,
        per_device: (0..2)
            .map(|d| pb::DeviceCiphertext { account: 0, device: d, payload: Bytes::from(vec![1; 40_000]) })
            .collect(),
        ..Default::default()
    };
    assert!(matches!(check_send(&together), Err(MessageError::TooLarge { .. })));
}

#[test]
fn message_count_is_bounded() {
    let ping: Message = pb::Ping { id: 0 }.into();
    let msgs = vec![ping; MAX_MESSAGES_PER_PACKET + 1];
    let mut buf = Vec::new();
    encode_packet(&msgs, &mut buf);
    assert_eq!(decode_packet(Bytes::from(buf)), Err(MessageError::TooMany));
}
