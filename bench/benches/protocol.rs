//! Micro-benchmarks of the wire: framing, Noise transport, handshakes per
//! side, protobuf packets. `cargo bench -p pipit-bench --bench protocol`.

use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use pipit_protocol::frame::{self, FrameDecoder};
use pipit_protocol::handshake::{Hello, IkStep, ServerHandshake, ServerKeys, ServerStep, XxStep};
use pipit_protocol::message::{decode_packet, encode_packet, pb};
use pipit_protocol::resolver::Resolver;
use pipit_protocol::{ClientHandshake, Message, Session, StaticKeypair};

fn send_100() -> Message {
    pb::Send { id: 1_000, to: 100_000, payload: Bytes::from(vec![0x5A; 100]), ..Default::default() }.into()
}

fn login() -> Hello {
    Hello::Login(pb::Login {
        account: 123_456,
        device: 0,
        acked_through: 98_765,
        keepalive_secs: 420,
        user_agent: String::new(),
    })
}

fn keys() -> Arc<ServerKeys> {
    Arc::new(ServerKeys::new(StaticKeypair::from_private([0x42; 32])))
}

fn accept(keys: &Arc<ServerKeys>, input: &mut BytesMut, out: &mut BytesMut) -> pipit_protocol::handshake::Accepted {
    let now = Instant::now();
    match ServerHandshake::new(keys.clone(), now, Duration::from_secs(10)).read(input, now, out).unwrap() {
        ServerStep::Accepted(a) => *a,
        ServerStep::NeedMore(_) => unreachable!(),
    }
}

fn pair() -> (Session, Session) {
    let keys = keys();
    let device = StaticKeypair::from_private([7; 32]);
    let mut c2s = BytesMut::new();
    let hs = ClientHandshake::ik(&device, keys.current().public(), login(), &mut c2s).unwrap();
    let mut s2c = BytesMut::new();
    let server = accept(&keys, &mut c2s, &mut s2c).finish(&[], &mut s2c).unwrap();
    let IkStep::Established { session, .. } = hs.read(&mut s2c).unwrap() else { unreachable!() };
    (session, server)
}

fn framing(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    let body = vec![0u8; 129];
    g.throughput(Throughput::Elements(1));
    g.bench_function("encode_129B", |b| {
        let mut out = BytesMut::with_capacity(256);
        b.iter(|| {
            out.clear();
            frame::encode(black_box(&body), &mut out);
        })
    });
    let mut wire = BytesMut::new();
    frame::encode(&body, &mut wire);
    let wire = wire.freeze();
    let d = FrameDecoder::default();
    g.bench_function("decode_129B", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| black_box(d.decode(&mut buf).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn transport(c: &mut Criterion) {
    let mut g = c.benchmark_group("transport");
    g.throughput(Throughput::Elements(1));
    let msg = [send_100()];
    let (mut client, _server) = pair();
    g.bench_function("seal_send_100B", |b| {
        let mut out = BytesMut::with_capacity(256);
        b.iter(|| {
            out.clear();
            client.seal(black_box(&msg), &mut out).unwrap();
        })
    });
    // Opening needs frames sealed in nonce order by a peer whose nonces
    // match: a fresh pair, sealing one frame per opened frame.
    let (mut client, mut server) = pair();
    g.bench_function("open_send_100B", |b| {
        b.iter_batched(
            || {
                let mut wire = BytesMut::new();
                client.seal(&msg, &mut wire).unwrap();
                wire
            },
            |mut wire| black_box(server.open(&mut wire).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn handshakes(c: &mut Criterion) {
    let mut g = c.benchmark_group("handshake");
    g.throughput(Throughput::Elements(1));
    let keys = keys();
    let device = StaticKeypair::from_private([7; 32]);
    let server_key = *keys.current().public();
    g.bench_function("ik_client_write", |b| {
        b.iter(|| {
            let mut out = BytesMut::new();
            black_box(ClientHandshake::ik(&device, &server_key, login(), &mut out).unwrap())
        })
    });
    let mut first = BytesMut::new();
    let _ = ClientHandshake::ik(&device, &server_key, login(), &mut first).unwrap();
    let ok: Message = pb::LoginOk { account: 123_456, window: 64, keepalive_secs: 420, ..Default::default() }.into();
    g.bench_function("ik_server_accept_and_reply", |b| {
        b.iter_batched(
            || first.clone(),
            |mut input| {
                let mut out = BytesMut::new();
                black_box(accept(&keys, &mut input, &mut out).finish(std::slice::from_ref(&ok), &mut out).unwrap())
            },
            BatchSize::SmallInput,
        )
    });
    g.bench_function("ik_client_read_reply", |b| {
        b.iter_batched(
            || {
                let mut c2s = BytesMut::new();
                let hs = ClientHandshake::ik(&device, &server_key, login(), &mut c2s).unwrap();
                let mut s2c = BytesMut::new();
                accept(&keys, &mut c2s, &mut s2c).finish(std::slice::from_ref(&ok), &mut s2c).unwrap();
                (hs, s2c)
            },
            |(hs, mut s2c)| black_box(hs.read(&mut s2c).unwrap()),
            BatchSize::SmallInput,
        )
    });
    g.bench_function("xx_full_both_sides", |b| {
        b.iter(|| {
            let mut c2s = BytesMut::new();
            let hs = ClientHandshake::xx(&device, &mut c2s).unwrap();
            let mut s2c = BytesMut::new();
            let now = Instant::now();
            let ServerStep::NeedMore(sh) =
                ServerHandshake::new(keys.clone(), now, Duration::from_secs(10)).read(&mut c2s, now, &mut s2c).unwrap()
            else {
                unreachable!()
            };
            let XxStep::ServerKnown(known) = hs.read(&mut s2c).unwrap() else { unreachable!() };
            let _client = known.finish(login(), &mut c2s).unwrap();
            let ServerStep::Accepted(acc) = sh.read(&mut c2s, now, &mut s2c).unwrap() else { unreachable!() };
            black_box(acc.finish(std::slice::from_ref(&ok), &mut s2c).unwrap())
        })
    });
    // XX per side: run the whole exchange, time only one side's steps.
    let xx = |server_side: bool, iters: u64| {
        let mut timed = Duration::ZERO;
        for _ in 0..iters {
            let now = Instant::now();
            let t = Instant::now();
            let mut c2s = BytesMut::new();
            let hs = ClientHandshake::xx(&device, &mut c2s).unwrap();
            let client_1 = t.elapsed();
            let t = Instant::now();
            let mut s2c = BytesMut::new();
            let ServerStep::NeedMore(sh) =
                ServerHandshake::new(keys.clone(), now, Duration::from_secs(10)).read(&mut c2s, now, &mut s2c).unwrap()
            else {
                unreachable!()
            };
            let server_1 = t.elapsed();
            let t = Instant::now();
            let XxStep::ServerKnown(known) = hs.read(&mut s2c).unwrap() else { unreachable!() };
            let client = known.finish(login(), &mut c2s).unwrap();
            let client_2 = t.elapsed();
            let t = Instant::now();
            let ServerStep::Accepted(acc) = sh.read(&mut c2s, now, &mut s2c).unwrap() else { unreachable!() };
            let server = acc.finish(std::slice::from_ref(&ok), &mut s2c).unwrap();
            let server_2 = t.elapsed();
            black_box((client, server));
            timed += if server_side { server_1 + server_2 } else { client_1 + client_2 };
        }
        timed
    };
    g.bench_function("xx_client_side", |b| b.iter_custom(|iters| xx(false, iters)));
    g.bench_function("xx_server_side", |b| b.iter_custom(|iters| xx(true, iters)));
    g.finish();
}

/// X25519 per operation through snow's `Dh` trait: snow's built-in
/// backend (curve25519-dalek) beside the one this build's handshakes use
/// (`Resolver::x25519_backend`), in one run.
fn x25519(c: &mut Criterion) {
    use snow::params::DHChoice;
    use snow::resolvers::{CryptoResolver, DefaultResolver};
    let mut g = c.benchmark_group("x25519");
    g.throughput(Throughput::Elements(1));
    let backends: [(&str, Box<dyn CryptoResolver>); 2] =
        [("curve25519-dalek", Box::new(DefaultResolver)), (Resolver::x25519_backend(), Box::new(Resolver))];
    for (name, resolver) in backends {
        let mut local = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut peer = resolver.resolve_dh(&DHChoice::Curve25519).unwrap();
        let mut rng = resolver.resolve_rng().unwrap();
        local.generate(&mut *rng).unwrap();
        peer.generate(&mut *rng).unwrap();
        let peer_public = peer.pubkey().to_vec();
        let mut out = [0u8; 32];
        g.bench_function(format!("dh/{name}"), |b| {
            b.iter(|| local.dh(black_box(&peer_public), &mut out).unwrap());
        });
        // A key pair: what the responder's ephemeral key and snow's
        // loading of a static key each cost.
        g.bench_function(format!("keypair/{name}"), |b| {
            b.iter(|| local.generate(&mut *rng).unwrap());
        });
    }
    g.finish();
}

fn protobuf(c: &mut Criterion) {
    let mut g = c.benchmark_group("packet");
    g.throughput(Throughput::Elements(1));
    let msgs = vec![
        send_100(),
        Message::from(pb::Ack { through: 50_000, ids: vec![] }),
        Message::from(pb::Receipt { kind: 2, peer: 123_456, through: 5_000, ..Default::default() }),
    ];
    g.bench_function("encode_send_ack_receipt", |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            encode_packet(black_box(&msgs), &mut out);
        })
    });
    let mut encoded = Vec::new();
    encode_packet(&msgs, &mut encoded);
    let encoded = Bytes::from(encoded);
    g.bench_function("decode_send_ack_receipt", |b| b.iter(|| black_box(decode_packet(encoded.clone()).unwrap())));
    g.finish();
}

criterion_group!(benches, framing, transport, x25519, handshakes, protobuf);
criterion_main!(benches);
