//! A client and a server, both real state machines, talking through memory.

mod common;

use std::sync::Arc;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use common::*;
use pipit_protocol::error::{Error, FrameError, HandshakeError, MessageError};
use pipit_protocol::handshake::{refuse, Hello, IkStep, Pattern, ServerHandshake, ServerKeys, ServerStep};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{ClientHandshake, Message, StaticKeypair};

fn send_msg() -> Message {
    pb::Send { id: 1, to: 815, payload: Bytes::from_static(b"hello"), ..Default::default() }.into()
}

#[test]
fn ik_logs_in_and_delivers_queued_messages_in_one_round_trip() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut p = ik_pair(&device, &keys);
    assert_eq!(p.accepted_pattern, Pattern::IK);
    assert_eq!(p.flights.len(), 2, "one flight each way");
    assert_eq!(p.first_messages, vec![login_ok(4_711), deliver(1), deliver(2)]);
    assert_eq!(p.server.remote_key(), device.public());

    let (_, got) = send(&mut p.client, &mut p.server, &[send_msg()]);
    assert_eq!(got, vec![send_msg()]);
    let sent: Message = pb::Sent { id: 1, seq: 7, time: 1_795_000_001 }.into();
    let (_, got) = send(&mut p.server, &mut p.client, std::slice::from_ref(&sent));
    assert_eq!(got, vec![sent]);
}

#[test]
fn xx_first_contact_takes_two_round_trips_and_teaches_both_keys() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut p = xx_pair(&device, &keys);
    assert_eq!(p.accepted_pattern, Pattern::XX);
    assert_eq!(p.flights.len(), 4, "e / e,ee,s,es / s,se+login / login result");
    assert_eq!(p.first_messages, vec![login_ok(4_711), deliver(1), deliver(2)]);
    assert_eq!(p.server.remote_key(), device.public());
    assert_eq!(p.client.remote_key(), keys.current().public());
    let (_, got) = send(&mut p.client, &mut p.server, &[send_msg()]);
    assert_eq!(got, vec![send_msg()]);
}

#[test]
fn stale_server_key_costs_one_more_round_trip() {
    let (real, keys) = server_keys();
    let stale = StaticKeypair::generate();
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let mut s2c = BytesMut::new();
    let hs = ClientHandshake::ik(&device, stale.public(), login(), &mut c2s).unwrap();
    let server = ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT);
    let server = need_more(server_feed(server, &mut c2s, &mut s2c));
    // Round trip 1 ends: the client learns the current key.
    let IkStep::Retry(offer) = hs.read(&mut s2c).unwrap() else { panic!("expected a retry") };
    assert_eq!(offer.server_key(), real.public());
    let hs = offer.retry(&mut c2s).unwrap();
    let acc = accepted(server_feed(server, &mut c2s, &mut s2c));
    assert_eq!(acc.pattern, Pattern::IK);
    let mut server = acc.finish(&[login_ok(4_711)], &mut s2c).unwrap();
    // Round trip 2 ends with the login result.
    let IkStep::Established { mut session, messages } = hs.read(&mut s2c).unwrap() else { panic!() };
    assert_eq!(messages, vec![login_ok(4_711)]);
    let (_, got) = send(&mut session, &mut server, &[send_msg()]);
    assert_eq!(got, vec![send_msg()]);
}

#[test]
fn a_retired_server_key_still_logs_in_and_is_flagged() {
    let old = StaticKeypair::generate();
    let new = StaticKeypair::generate();
    let keys = Arc::new(ServerKeys::new(new).with_retired(vec![old.clone()]));
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let mut s2c = BytesMut::new();
    let _hs = ClientHandshake::ik(&device, old.public(), login(), &mut c2s).unwrap();
    let acc = accepted(server_feed(ServerHandshake::new(keys, Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    assert!(acc.retired_key);
    assert!(s2c.is_empty(), "no retry needed");
}

#[test]
fn a_wrong_server_key_twice_is_refused() {
    let (_, keys) = server_keys();
    let wrong = StaticKeypair::generate();
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let mut s2c = BytesMut::new();
    let hs = ClientHandshake::ik(&device, wrong.public(), login(), &mut c2s).unwrap();
    let server = need_more(server_feed(ServerHandshake::new(keys, Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    let IkStep::Retry(_) = hs.read(&mut s2c).unwrap() else { panic!() };
    // A client that ignores the offer and insists on the wrong key.
    let mut again = BytesMut::new();
    let _ = ClientHandshake::ik(&device, wrong.public(), login(), &mut again).unwrap();
    let err = server.read(&mut again.split_off(4), Instant::now(), &mut s2c).unwrap_err();
    assert!(matches!(err, HandshakeError::Crypto(_)), "{err}");
}

#[test]
fn a_client_told_to_retry_twice_gives_up() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::ik(&device, StaticKeypair::generate().public(), login(), &mut c2s).unwrap();
    let mut retry = BytesMut::new();
    let server =
        need_more(server_feed(ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT), &mut c2s, &mut retry));
    drop(server);
    let mut s2c = retry.clone();
    let IkStep::Retry(offer) = hs.read(&mut s2c).unwrap() else { panic!() };
    let hs = offer.retry(&mut BytesMut::new()).unwrap();
    // A (malicious) server keeps saying "retry".
    let mut s2c = retry;
    assert!(matches!(hs.read(&mut s2c), Err(HandshakeError::TooManyRetries)));
}

#[test]
fn an_unknown_device_key_gets_an_authenticated_error() {
    // The protocol authenticates the key; whether it is registered is the
    // server's decision, answered inside the encrypted reply.
    let (_, keys) = server_keys();
    let stranger = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let mut s2c = BytesMut::new();
    let hs = ClientHandshake::ik(&stranger, keys.current().public(), login(), &mut c2s).unwrap();
    let acc = accepted(server_feed(ServerHandshake::new(keys, Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    assert_eq!(acc.client_key, *stranger.public());
    let err: Message = pb::Error { code: pb::ErrorCode::UnknownDevice as i32, ..Default::default() }.into();
    acc.finish(std::slice::from_ref(&err), &mut s2c).unwrap();
    let IkStep::Established { messages, .. } = hs.read(&mut s2c).unwrap() else { panic!() };
    assert_eq!(messages, vec![err]);
}

#[test]
fn registration_rides_in_the_first_flight() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let reg = Hello::Register(pb::Register {
        invite: Bytes::from_static(b"ABCD-1234"),
        device_name: "phone".into(),
        ..Default::default()
    });
    ClientHandshake::ik(&device, keys.current().public(), reg.clone(), &mut c2s).unwrap();
    let acc =
        accepted(server_feed(ServerHandshake::new(keys, Instant::now(), TIMEOUT), &mut c2s, &mut BytesMut::new()));
    assert_eq!(acc.hello, reg);
}

fn server_error(input: &[u8]) -> (HandshakeError, BytesMut) {
    let (_, keys) = server_keys();
    let mut out = BytesMut::new();
    let mut buf = BytesMut::from(input);
    match ServerHandshake::new(keys, Instant::now(), TIMEOUT).read(&mut buf, Instant::now(), &mut out) {
        Err(e) => (e, out),
        Ok(ServerStep::NeedMore(_)) => panic!("wanted more bytes for {input:?}"),
        Ok(ServerStep::Accepted(_)) => panic!("accepted garbage"),
    }
}

#[test]
fn garbage_before_the_handshake_is_rejected_at_once() {
    let (e, _) = server_error(b"GET / HTTP/1.1\r\n\r\n");
    assert!(matches!(e, HandshakeError::Frame(FrameError::BadPreamble)));
    let (e, _) = server_error(&[0x16, 0x03, 0x01, 0x02, 0x00]); // a TLS ClientHello
    assert!(matches!(e, HandshakeError::Frame(FrameError::BadPreamble)));
    let (e, _) = server_error(b"pip\x01\x00\x03\x09\x09\x09");
    assert!(matches!(e, HandshakeError::UnexpectedKind(9)));
    let (e, _) = server_error(b"pip\x01\x00\x00");
    assert!(matches!(e, HandshakeError::Frame(FrameError::EmptyHandshakeFrame)));
}

#[test]
fn an_oversized_handshake_frame_is_rejected_from_its_length() {
    let (e, _) = server_error(b"pip\x01\x13\x88"); // 5,000 bytes announced, none sent
    assert!(matches!(e, HandshakeError::Frame(FrameError::TooLong { len: 5000, .. })), "{e}");
}

#[test]
fn an_unsupported_version_gets_a_refusal_the_client_understands() {
    let (e, out) = server_error(b"pip\x09");
    assert!(matches!(e, HandshakeError::UnsupportedVersion(9)));
    let mut reply = out;
    let (_, keys) = server_keys();
    let hs = ClientHandshake::ik(&StaticKeypair::generate(), keys.current().public(), login(), &mut BytesMut::new())
        .unwrap();
    let err = hs.read(&mut reply).unwrap_err();
    assert!(matches!(err, HandshakeError::Refused(c) if c == pb::ErrorCode::UnsupportedVersion as i32));
}

#[test]
fn truncated_handshakes_wait_then_time_out_and_garbage_bodies_fail() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut full = BytesMut::new();
    ClientHandshake::ik(&device, keys.current().public(), login(), &mut full).unwrap();
    let t0 = Instant::now();
    // Every strict prefix is "need more", never an error or a panic.
    for cut in 0..full.len() {
        let mut part = BytesMut::from(&full[..cut]);
        let mut out = BytesMut::new();
        let step = ServerHandshake::new(keys.clone(), t0, TIMEOUT).read(&mut part, t0, &mut out).unwrap();
        assert!(matches!(step, ServerStep::NeedMore(_)), "prefix {cut}");
        assert!(out.is_empty());
    }
    // A peer that stops half way is timed out at the deadline.
    let mut part = BytesMut::from(&full[..20]);
    let hs =
        need_more(ServerHandshake::new(keys.clone(), t0, TIMEOUT).read(&mut part, t0, &mut BytesMut::new()).unwrap());
    assert_eq!(hs.deadline(), t0 + TIMEOUT);
    let err = hs.read(&mut BytesMut::new(), t0 + TIMEOUT, &mut BytesMut::new()).unwrap_err();
    assert!(matches!(err, HandshakeError::Timeout));

    // A whole frame whose Noise message was cut short cannot be told from a
    // stale key: the server offers a retry, then gives up.
    let mut short = BytesMut::from(&b"pip\x01\x00\x29\x01"[..]);
    short.extend_from_slice(&[7u8; 40]);
    let mut out = BytesMut::new();
    let hs = need_more(ServerHandshake::new(keys.clone(), t0, TIMEOUT).read(&mut short, t0, &mut out).unwrap());
    assert_eq!(out[2], 6, "a Retry frame");
    let mut again = BytesMut::from(&b"\x00\x29\x01"[..]);
    again.extend_from_slice(&[7u8; 40]);
    assert!(matches!(hs.read(&mut again, t0, &mut out), Err(HandshakeError::Crypto(_))));
}

#[test]
fn a_tampered_replayed_or_reordered_frame_is_rejected() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut p = ik_pair(&device, &keys);
    let mut one = BytesMut::new();
    p.client.seal(&[send_msg()], &mut one).unwrap();
    let mut two = BytesMut::new();
    p.client.seal(&[send_msg()], &mut two).unwrap();

    // Tampered.
    let mut q = ik_pair(&device, &keys);
    let mut fresh = BytesMut::new();
    q.client.seal(&[send_msg()], &mut fresh).unwrap();
    let l = fresh.len() - 1;
    fresh[l] ^= 1;
    assert!(matches!(q.server.open(&mut fresh), Err(Error::Decrypt)));

    // Reordered: frame two before frame one.
    let mut r = two.clone();
    assert!(matches!(p.server.open(&mut r), Err(Error::Decrypt)));

    // Replayed: frame one twice (on a fresh pair so state is clean).
    let mut p = ik_pair(&device, &keys);
    let mut one = BytesMut::new();
    p.client.seal(&[send_msg()], &mut one).unwrap();
    let mut replay = one.clone();
    assert!(p.server.open(&mut one).unwrap().is_some());
    assert!(matches!(p.server.open(&mut replay), Err(Error::Decrypt)));
}

#[test]
fn a_truncated_transport_frame_waits_and_a_short_one_fails() {
    let (_, keys) = server_keys();
    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let mut wire = BytesMut::new();
    p.client.seal(&[send_msg()], &mut wire).unwrap();
    let mut part = BytesMut::from(&wire[..wire.len() - 1]);
    assert!(p.server.open(&mut part).unwrap().is_none());
    part.extend_from_slice(&wire[wire.len() - 1..]);
    assert!(p.server.open(&mut part).unwrap().is_some());
    // A frame shorter than a tag.
    let mut tiny = BytesMut::from(&[0u8, 3, 1, 2, 3][..]);
    assert!(matches!(p.server.open(&mut tiny), Err(Error::Decrypt)));
}

#[test]
fn a_client_cannot_send_server_messages_nor_a_second_login() {
    let (_, keys) = server_keys();
    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let mut wire = BytesMut::new();
    p.client.seal(&[deliver(1)], &mut wire).unwrap();
    assert!(matches!(p.server.open(&mut wire), Err(Error::Message(MessageError::WrongDirection { .. }))));

    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let login: Message = pb::Login::default().into();
    let mut wire = BytesMut::new();
    p.client.seal(&[login], &mut wire).unwrap();
    assert!(matches!(p.server.open(&mut wire), Err(Error::Message(MessageError::WrongDirection { .. }))));
}

#[test]
fn keepalive_frames_pass_in_both_directions() {
    let (_, keys) = server_keys();
    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let mut wire = BytesMut::new();
    p.client.write_keepalive(&mut wire);
    assert_eq!(&wire[..], &[0, 0]);
    assert_eq!(p.server.open(&mut wire).unwrap(), Some(Incoming::Keepalive));
    p.server.write_keepalive(&mut wire);
    assert_eq!(p.client.open(&mut wire).unwrap(), Some(Incoming::Keepalive));
    // Keepalives do not disturb the nonce sequence.
    let (_, got) = send(&mut p.client, &mut p.server, &[send_msg()]);
    assert_eq!(got.len(), 1);
}

#[test]
fn many_messages_share_frames_and_big_batches_split() {
    let (_, keys) = server_keys();
    let mut p = ik_pair(&StaticKeypair::generate(), &keys);
    let acks: Vec<Message> = (0..50).map(|i| pb::Ack { through: i, ids: vec![] }.into()).collect();
    let mut wire = BytesMut::new();
    assert_eq!(p.client.seal(&acks, &mut wire).unwrap(), 1, "fifty acks, one frame");
    assert_eq!(p.server.open(&mut wire).unwrap(), Some(Incoming::Messages(acks)));
    let big: Vec<Message> = (0..3)
        .map(|i| pb::Send { id: i, to: 1, payload: Bytes::from(vec![1u8; 30_000]), ..Default::default() }.into())
        .collect();
    let (_, got) = send(&mut p.client, &mut p.server, &big);
    assert_eq!(got, big);
    let too_big: Message =
        pb::Send { id: 9, to: 1, payload: Bytes::from(vec![0u8; 70_000]), ..Default::default() }.into();
    assert!(matches!(
        p.client.seal(&[too_big], &mut BytesMut::new()),
        Err(Error::Message(MessageError::TooLarge { .. }))
    ));
}

#[test]
fn an_ik_reply_too_big_for_one_frame_continues_in_transport_frames() {
    let (_, keys) = server_keys();
    let device = StaticKeypair::generate();
    let mut c2s = BytesMut::new();
    let mut s2c = BytesMut::new();
    let hs = ClientHandshake::ik(&device, keys.current().public(), login(), &mut c2s).unwrap();
    let acc = accepted(server_feed(ServerHandshake::new(keys, Instant::now(), TIMEOUT), &mut c2s, &mut s2c));
    let mut reply = vec![login_ok(1)];
    reply.extend((1..=1_000).map(deliver)); // ~120 KB
    acc.finish(&reply, &mut s2c).unwrap();
    let IkStep::Established { mut session, mut messages } = hs.read(&mut s2c).unwrap() else { panic!() };
    assert!(messages.len() < reply.len());
    while let Some(Incoming::Messages(m)) = session.open(&mut s2c).unwrap() {
        messages.extend(m);
    }
    assert_eq!(messages, reply);
}

#[test]
fn the_server_refusal_helper_writes_a_refuse_frame() {
    let mut out = BytesMut::new();
    refuse(pb::ErrorCode::ShuttingDown, &mut out);
    assert_eq!(&out[..], &[0, 2, 7, pb::ErrorCode::ShuttingDown as u8]);
}
