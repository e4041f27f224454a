//! Replays the checked-in fuzz corpus through the fuzz bodies, so stable
//! `cargo test` covers every input the fuzzers kept. With `PIPIT_BLESS=1`
//! it first writes the seed inputs.

use std::path::{Path, PathBuf};

use bytes::BytesMut;
use pipit_protocol::fuzz;
use pipit_protocol::handshake::Hello;
use pipit_protocol::message::{encode_packet, pb};
use pipit_protocol::{ClientHandshake, Message, StaticKeypair};

fn corpus_dir(target: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus").join(target)
}

fn write_seeds() {
    let seed = |target: &str, name: &str, data: &[u8]| {
        let dir = corpus_dir(target);
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let server = fuzz::fuzz_server_keys();
    let device = StaticKeypair::from_private([7; 32]);
    let login = Hello::Login(pb::Login {
        account: 12,
        device: 0,
        acked_through: 3,
        keepalive_secs: 300,
        user_agent: "fuzz".into(),
    });

    // Handshake: a valid IK first flight (first byte picks the split
    // point), a valid XX first flight, a stale-key IK, and garbage.
    let mut ik = BytesMut::new();
    ClientHandshake::ik(&device, server.current().public(), login.clone(), &mut ik).unwrap();
    seed("server_handshake", "ik", &[&[40u8][..], &ik].concat());
    let mut xx = BytesMut::new();
    ClientHandshake::xx(&device, &mut xx).unwrap();
    seed("server_handshake", "xx", &[&[0u8][..], &xx].concat());
    let mut stale = BytesMut::new();
    ClientHandshake::ik(&device, &StaticKeypair::from_private([9; 32]).public().clone(), login, &mut stale).unwrap();
    seed("server_handshake", "stale", &[&[255u8][..], &stale, &stale[4..]].concat());
    seed("server_handshake", "http", b"\x05GET / HTTP/1.1\r\n\r\n");
    seed("server_handshake", "version", b"\x00pip\x09");

    // Frames: keepalives, a small frame, an oversized length.
    seed("frame_decoder", "mixed", &[255, 0, 0, 0, 3, 1, 2, 3, 0, 0, 0, 1, 9]);
    seed("frame_decoder", "toolong", &[1, 0xff, 0xff, 1, 2]);

    // Packets: one of each kind, and a coalesced cycle.
    let mut all = Vec::new();
    encode_packet(&Message::one_of_each(), &mut all);
    seed("packet", "one_of_each", &all);
    let mut cycle = Vec::new();
    let msgs: Vec<Message> = vec![
        pb::Ack { through: 5, ids: vec![7, 9] }.into(),
        pb::Receipt { kind: 2, peer: 4, through: 3, ..Default::default() }.into(),
        pb::Deliver { inbox: 6, from: 4, seq: 3, payload: bytes::Bytes::from_static(b"x"), ..Default::default() }
            .into(),
    ];
    encode_packet(&msgs, &mut cycle);
    seed("packet", "cycle", &cycle);

    // End-to-end: an envelope of each kind, a content with a room key, a
    // media reference, an upload and a bundle (signature not valid: the
    // fuzzer explores the checks either way).
    use prost::Message as _;
    for (i, kind) in
        [pb::E2eKind::OlmPreKey, pb::E2eKind::Olm, pb::E2eKind::Megolm, pb::E2eKind::Withheld, pb::E2eKind::Keys]
            .into_iter()
            .enumerate()
    {
        let e = pipit_protocol::e2e::encode_envelope(kind, vec![3; 40], vec![4; 32]);
        seed("e2e", &format!("envelope-{i}"), &[&[0u8][..], &e].concat());
    }
    let content = pb::E2eContent {
        body: bytes::Bytes::from_static(b"hello"),
        group: 7,
        room_key: Some(pb::E2eRoomKey { group: 7, session_key: bytes::Bytes::from(vec![1; 229]) }),
        ..Default::default()
    };
    seed("e2e", "content", &[&[1u8][..], &content.encode_to_vec()].concat());
    let media = pb::MediaRef {
        url: "https://blobs.example/1".into(),
        key: bytes::Bytes::from(vec![2; 32]),
        sha256: bytes::Bytes::from(vec![3; 32]),
        size: 1000,
        mime: "image/jpeg".into(),
    };
    seed("e2e", "media", &[&[2u8][..], &media.encode_to_vec()].concat());
    let signed =
        pb::SignedPreKey { id: 1, key: bytes::Bytes::from(vec![5; 32]), signature: bytes::Bytes::from(vec![6; 64]) };
    let upload = pb::KeysUpload {
        req: 1,
        identity: bytes::Bytes::from(vec![7; 64]),
        signed: Some(signed.clone()),
        one_time: vec![pb::PreKey { id: 1, key: bytes::Bytes::from(vec![8; 32]) }],
    };
    seed("e2e", "upload", &[&[3u8][..], &upload.encode_to_vec()].concat());
    let bundle = pb::KeyBundle {
        device: 1,
        identity: bytes::Bytes::from(vec![7; 64]),
        signed: Some(signed),
        one_time: Some(pb::PreKey { id: 2, key: bytes::Bytes::from(vec![9; 32]) }),
    };
    seed("e2e", "bundle", &[&[4u8][..], &bundle.encode_to_vec()].concat());
}

/// Node-link seeds (written apart from the others: their IK and XX seeds
/// use fresh ephemeral keys and would change on every bless).
fn write_node_seeds() {
    use pipit_protocol::node::{pb as node_pb, LinkDialer};
    use prost::Message as _;
    let seed = |name: &str, data: &[u8]| {
        let dir = corpus_dir("node_link");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join(format!("seed-{name}")), data).unwrap();
    };
    let (acceptor, dialer) = fuzz::fuzz_node_keys();
    let hello = node_pb::NodeHello { node_id: "n1".into(), epoch: 3, max_in_flight: 64 };
    let mut init = BytesMut::new();
    LinkDialer::dial(&dialer, acceptor.public(), &hello, &mut init).unwrap();
    seed("init", &[&[20u8][..], &init].concat());
    let mut stranger = BytesMut::new();
    LinkDialer::dial(&StaticKeypair::from_private([0x53; 32]), acceptor.public(), &hello, &mut stranger).unwrap();
    seed("stranger", &[&[0u8][..], &stranger].concat());
    // A valid init followed by garbage where transport frames go.
    seed("init-then-frames", &[&[200u8][..], &init, &[0, 0, 0, 20], &[7u8; 20]].concat());
    seed("client-preamble", b"\x04pip\x01");
    let packet = node_pb::NodePacket {
        ping: vec![node_pb::LinkPing { id: 1 }, node_pb::LinkPing { id: u64::MAX }],
        pong: vec![node_pb::LinkPong { id: 9 }],
        forward: vec![
            node_pb::Forward {
                entry: 7,
                send: Some(node_pb::ForwardedSend {
                    from_account: 1_025,
                    from_device: 1,
                    to: 2_049,
                    seq: 4,
                    time: 1_700_000_000,
                    payload: bytes::Bytes::from_static(b"forwarded"),
                }),
                receipt: None,
            },
            node_pb::Forward {
                entry: 8,
                send: None,
                receipt: Some(node_pb::ForwardedReceipt {
                    to: 2_049,
                    kind: 2,
                    peer: 1_025,
                    through: 4,
                    time: 1_700_000_001,
                }),
            },
        ],
        forward_ack: vec![node_pb::ForwardAck { through: 6 }],
        lookup: vec![node_pb::Lookup { req: 1, key: bytes::Bytes::from(vec![5; 32]) }],
        lookup_result: vec![node_pb::LookupResult { req: 1, account: 1_025, device: 2 }],
        typing: vec![node_pb::NodeTyping { to: 2_049, from: 1_025, typing: true }],
    };
    seed("packet", &[&[1u8][..], &packet.encode_to_vec()].concat());
}

fn replay(target: &str, body: fn(&[u8])) -> usize {
    let dir = corpus_dir(target);
    let mut n = 0;
    for entry in std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display())) {
        let path = entry.unwrap().path();
        body(&std::fs::read(&path).unwrap());
        n += 1;
    }
    assert!(n > 0, "{target} corpus is empty");
    n
}

#[test]
fn corpus_replays_without_panics() {
    if std::env::var_os("PIPIT_BLESS").is_some() {
        write_seeds();
    }
    if std::env::var_os("PIPIT_BLESS_NODE").is_some() {
        write_node_seeds();
    }
    let frames = replay("frame_decoder", fuzz::frame_decoder);
    let handshakes = replay("server_handshake", |d| fuzz::server_handshake(d, std::time::Instant::now()));
    let packets = replay("packet", fuzz::packet);
    let e2e = replay("e2e", fuzz::e2e);
    let links = replay("node_link", fuzz::node_link);
    println!(
        "replayed {frames} frame, {handshakes} handshake, {packets} packet, {e2e} end-to-end, {links} node-link inputs"
    );
}

#[test]
fn the_node_link_seed_is_a_handshake_the_target_accepts() {
    use pipit_protocol::node::{pb as node_pb, LinkAcceptor};
    let data = std::fs::read(corpus_dir("node_link").join("seed-init")).unwrap();
    let mut input = BytesMut::from(&data[1..]);
    let offer = LinkAcceptor::new().read(&mut input).unwrap().expect("a whole init");
    let (acceptor, dialer) = fuzz::fuzz_node_keys();
    assert_eq!(offer.claimed_key(), dialer.public());
    let hello = node_pb::NodeHello { node_id: "fuzz".into(), epoch: 1, max_in_flight: 0 };
    let (theirs, _) = offer.accept(&acceptor, &hello, &mut BytesMut::new()).unwrap();
    assert_eq!(theirs.node_id, "n1");
}
