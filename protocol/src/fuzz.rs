//! Fuzz bodies. Each cargo-fuzz target in `fuzz/` is one line calling one
//! of these, and the checked-in corpus is replayed through them by an
//! ordinary `cargo test`, so stable CI covers what the fuzzers found.
//!
//! Each body must never panic, whatever the input.

use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use crate::frame::{Frame, FrameDecoder};
use crate::handshake::{ServerHandshake, ServerKeys, ServerStep};
use crate::keys::StaticKeypair;
use crate::message::{decode_packet, encode_packet};

/// The fixed server key the handshake target answers with; the seed corpus
/// is made against its public half.
pub fn fuzz_server_keys() -> Arc<ServerKeys> {
    static KEYS: OnceLock<Arc<ServerKeys>> = OnceLock::new();
    KEYS.get_or_init(|| Arc::new(ServerKeys::new(StaticKeypair::from_private([0x42; 32])))).clone()
}

/// Splits `data` into frames; the first byte picks the limit and the
/// chunking so both partial and whole reads are exercised.
pub fn frame_decoder(data: &[u8]) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let decoder = FrameDecoder::new(usize::from(sel) * 257);
    let chunk = usize::from(sel % 7) + 1;
    let mut buf = BytesMut::new();
    let mut consumed = 0;
    for piece in data.chunks(chunk) {
        buf.extend_from_slice(piece);
        loop {
            match decoder.decode(&mut buf) {
                Ok(Some(Frame::Keepalive)) => consumed += 2,
                Ok(Some(Frame::Data(b))) => {
                    assert!(b.len() <= decoder.max_len());
                    consumed += 2 + b.len();
                }
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
    assert_eq!(consumed + buf.len(), data.len(), "the decoder neither loses nor invents bytes");
}

/// Feeds `data` to a server handshake as if a client sent it, split at a
/// point chosen by the first byte. `now` comes from the caller: this crate
/// reads no clock.
pub fn server_handshake(data: &[u8], now: Instant) {
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    let mut hs = ServerHandshake::new(fuzz_server_keys(), now, Duration::from_secs(10));
    let mut out = BytesMut::new();
    let split = usize::from(sel).min(data.len());
    let mut input = BytesMut::new();
    for piece in [&data[..split], &data[split..]] {
        input.extend_from_slice(piece);
        match hs.read(&mut input, now, &mut out) {
            Ok(ServerStep::NeedMore(next)) => hs = next,
            Ok(ServerStep::Accepted(acc)) => {
                let _ = acc.finish(&[], &mut out);
                return;
            }
            Err(_) => return,
        }
    }
}

/// Decodes `data` as a decrypted packet; whatever decodes must re-encode
/// and decode to the same messages.
pub fn packet(data: &[u8]) {
    if let Ok(msgs) = decode_packet(Bytes::copy_from_slice(data)) {
        let mut again = Vec::new();
        encode_packet(&msgs, &mut again);
        let back = decode_packet(Bytes::from(again)).expect("our own encoding decodes");
        assert_eq!(back, msgs);
        for m in &msgs {
            let _ = m.allowed_in_session_from(crate::role::Role::Server);
        }
    }
}

/// Decodes `data` as what the end-to-end layer reads from a peer or the
/// directory, the first byte choosing which: an envelope, the content
/// inside a ciphertext, a media reference, a key upload (checked as the
/// server checks it) or a fetched bundle (checked as a client does).
pub fn e2e(data: &[u8]) {
    use prost::Message as _;

    use crate::e2e::{check_bundle, check_upload, decode_envelope};
    use crate::message::pb;
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    match sel % 5 {
        0 => {
            if let Ok((kind, e)) = decode_envelope(data) {
                assert_eq!(e.kind, kind as i32);
            }
        }
        1 => {
            let _ = pb::E2eContent::decode(data);
        }
        2 => {
            let _ = pb::MediaRef::decode(data);
        }
        3 => {
            if let Ok(u) = pb::KeysUpload::decode(data) {
                let _ = check_upload(&u);
            }
        }
        _ => {
            if let Ok(b) = pb::KeyBundle::decode(data) {
                let _ = check_bundle(&b);
            }
        }
    }
}

/// The fixed keys of the node-link target: the acceptor it plays and the
/// one dialer it knows; the seed corpus is made with them.
pub fn fuzz_node_keys() -> (StaticKeypair, StaticKeypair) {
    (StaticKeypair::from_private([0x51; 32]), StaticKeypair::from_private([0x52; 32]))
}

/// Feeds `data` to a node link. First byte odd: `data` is a decrypted
/// node packet, which must re-encode to what decodes again. Even: `data`
/// is what a dialer sends, split at a point the first byte picks; an init
/// claiming the known dialer's key is accepted as the server would.
pub fn node_link(data: &[u8]) {
    use prost::Message as _;

    use crate::node::{decode_packet, pb, LinkAcceptor};
    let Some((&sel, data)) = data.split_first() else {
        return;
    };
    if sel % 2 == 1 {
        if let Ok(p) = decode_packet(Bytes::copy_from_slice(data)) {
            let again = decode_packet(Bytes::from(p.encode_to_vec())).expect("our own encoding decodes");
            assert_eq!(again, p);
        }
        return;
    }
    let (acceptor, dialer) = fuzz_node_keys();
    let mut acc = LinkAcceptor::new();
    let split = usize::from(sel / 2).min(data.len());
    let mut input = BytesMut::new();
    for piece in [&data[..split], &data[split..]] {
        input.extend_from_slice(piece);
        match acc.read(&mut input) {
            Ok(None) => {}
            Ok(Some(offer)) => {
                if offer.claimed_key() == dialer.public() {
                    let hello = pb::NodeHello { node_id: "fuzz".into(), epoch: 1, max_in_flight: 0 };
                    let mut out = BytesMut::new();
                    if let Ok((_, mut session)) = offer.accept(&acceptor, &hello, &mut out) {
                        while let Ok(Some(_)) = session.open(&mut input) {}
                    }
                }
                return;
            }
            Err(_) => return,
        }
    }
}
