//! An in-memory client/server pair: both ends run the real state machines
//! and exchange bytes through buffers, counting flights (one flight = the
//! bytes one side writes before it must wait for the other).
#![allow(dead_code, unreachable_pub)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use pipit_protocol::handshake::{Accepted, Hello, IkStep, ServerHandshake, ServerKeys, ServerStep, XxStep};
use pipit_protocol::message::pb;
use pipit_protocol::session::Incoming;
use pipit_protocol::{ClientHandshake, Message, Session, StaticKeypair};

pub const TIMEOUT: Duration = Duration::from_secs(10);

pub fn login() -> Hello {
    Hello::Login(pb::Login {
        account: 4_711,
        device: 0,
        acked_through: 1_234,
        keepalive_secs: 420,
        user_agent: String::new(),
    })
}

pub fn login_ok(account: u64) -> Message {
    pb::LoginOk {
        account,
        device: 0,
        server_time: 1_795_000_000,
        keepalive_secs: 420,
        pending: 2,
        window: 64,
        ..Default::default()
    }
    .into()
}

pub fn deliver(inbox: u64) -> Message {
    pb::Deliver {
        inbox,
        from: 815,
        from_device: 0,
        seq: inbox + 10,
        time: 1_795_000_000,
        payload: Bytes::from(vec![0xAB; 100]),
        ..Default::default()
    }
    .into()
}

/// Drives a server handshake over `input` until it needs more or accepts.
pub fn server_feed(hs: ServerHandshake, input: &mut BytesMut, out: &mut BytesMut) -> ServerStep {
    hs.read(input, Instant::now(), out).expect("server handshake step")
}

pub fn accepted(step: ServerStep) -> Accepted {
    match step {
        ServerStep::Accepted(a) => *a,
        ServerStep::NeedMore(_) => panic!("server wanted more bytes"),
    }
}

pub fn need_more(step: ServerStep) -> ServerHandshake {
    match step {
        ServerStep::NeedMore(h) => h,
        ServerStep::Accepted(a) => panic!("server accepted early: {a:?}"),
    }
}

pub struct Pair {
    pub client: Session,
    pub server: Session,
    /// What the client received with the session (IK reply payload, or the
    /// first transport frame for XX).
    pub first_messages: Vec<Message>,
    /// Round trips from the client's first byte until it held `first_messages`.
    pub round_trips: u32,
    pub accepted_pattern: pipit_protocol::handshake::Pattern,
    /// Bytes of each flight, in order (client, server, client, ...).
    pub flights: Vec<usize>,
}

pub fn server_keys() -> (StaticKeypair, Arc<ServerKeys>) {
    let kp = StaticKeypair::generate();
    (kp.clone(), Arc::new(ServerKeys::new(kp)))
}

/// Full IK: the server answers with LoginOk and two deliveries.
pub fn ik_pair(client: &StaticKeypair, keys: &Arc<ServerKeys>) -> Pair {
    let mut flights = Vec::new();
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::ik(client, keys.current().public(), login(), &mut c2s).unwrap();
    flights.push(c2s.len());
    let mut s2c = BytesMut::new();
    let server = ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT);
    let acc = accepted(server_feed(server, &mut c2s, &mut s2c));
    assert_eq!(acc.client_key, *client.public());
    let pattern = acc.pattern;
    let server = acc.finish(&[login_ok(4_711), deliver(1), deliver(2)], &mut s2c).unwrap();
    flights.push(s2c.len());
    let IkStep::Established { session, messages } = hs.read(&mut s2c).unwrap() else { panic!("IK not established") };
    assert!(s2c.is_empty());
    Pair { client: session, server, first_messages: messages, round_trips: 1, accepted_pattern: pattern, flights }
}

/// Full XX: the server's login answer is its first transport frame.
pub fn xx_pair(client: &StaticKeypair, keys: &Arc<ServerKeys>) -> Pair {
    let mut flights = Vec::new();
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::xx(client, &mut c2s).unwrap();
    flights.push(c2s.len());
    let mut s2c = BytesMut::new();
    let server = ServerHandshake::new(keys.clone(), Instant::now(), TIMEOUT);
    let server = need_more(server_feed(server, &mut c2s, &mut s2c));
    flights.push(s2c.len());
    let XxStep::ServerKnown(known) = hs.read(&mut s2c).unwrap() else { panic!("no XX reply") };
    assert_eq!(known.server_key(), keys.current().public());
    let mut client = known.finish(login(), &mut c2s).unwrap();
    flights.push(c2s.len());
    let acc = accepted(server_feed(server, &mut c2s, &mut s2c));
    let pattern = acc.pattern;
    let server = acc.finish(&[login_ok(4_711), deliver(1), deliver(2)], &mut s2c).unwrap();
    flights.push(s2c.len());
    let mut first = Vec::new();
    while let Some(inc) = client.open(&mut s2c).unwrap() {
        let Incoming::Messages(m) = inc else { panic!("keepalive") };
        first.extend(m);
    }
    Pair { client, server, first_messages: first, round_trips: 2, accepted_pattern: pattern, flights }
}

/// Seals `msgs` on `from` and opens them on `to`.
pub fn send(from: &mut Session, to: &mut Session, msgs: &[Message]) -> (usize, Vec<Message>) {
    let mut wire = BytesMut::new();
    from.seal(msgs, &mut wire).unwrap();
    let n = wire.len();
    let mut got = Vec::new();
    while let Some(inc) = to.open(&mut wire).unwrap() {
        match inc {
            Incoming::Messages(m) => got.extend(m),
            Incoming::Keepalive => panic!("unexpected keepalive"),
        }
    }
    (n, got)
}
