//! The end-to-end layer between several devices, with a small in-memory
//! stand-in for the server's key directory and fan-out (the real ones are
//! tested over TCP in `tests/e2e.rs`). Group fan-out is simulated here as
//! SPEC.md describes it: one payload for every member device, plus each
//! device's own `per_device` entry as `device_payload`.

use std::collections::{BTreeMap, VecDeque};

use bytes::Bytes;
use pipit_protocol::e2e::decode_envelope;

use super::*;
use crate::{Event, MemoryStore};

mod groups;
mod one_to_one;

struct Dev {
    e2e: E2e,
    store: MemoryStore,
    addr: Addr,
}

#[derive(Default)]
struct Directory {
    published: HashMap<Addr, (Bytes, pb::SignedPreKey, VecDeque<pb::PreKey>)>,
}

struct World {
    devs: Vec<Dev>,
    dir: Directory,
    accounts: BTreeMap<u64, Vec<u32>>,
    groups: HashMap<u64, Vec<u64>>,
    /// Key carriers delivered while sealing.
    carriers: usize,
}

fn login_ok(addr: Addr) -> pb::LoginOk {
    pb::LoginOk {
        account: addr.0,
        device: addr.1,
        features: vec![pb::Feature::KeyDirectory as i32],
        ..Default::default()
    }
}

impl World {
    fn new() -> Self {
        Self {
            devs: Vec::new(),
            dir: Directory::default(),
            accounts: BTreeMap::new(),
            groups: HashMap::new(),
            carriers: 0,
        }
    }

    /// A new device, logged in with its keys published.
    fn add(&mut self, account: u64, device: u32) -> usize {
        let mut store = MemoryStore::new();
        let key = [(account * 16 + u64::from(device)) as u8; 32];
        let e2e = E2e::load(&mut store, Vault::new(&key)).unwrap();
        self.devs.push(Dev { e2e, store, addr: (account, device) });
        self.accounts.entry(account).or_default().push(device);
        let i = self.devs.len() - 1;
        self.relogin(i);
        i
    }

    fn relogin(&mut self, i: usize) {
        let d = &mut self.devs[i];
        let reqs = d.e2e.on_login(&mut d.store, &login_ok(d.addr)).unwrap();
        self.serve(i, reqs);
    }

    fn find(&self, addr: Addr) -> usize {
        self.devs.iter().rposition(|d| d.addr == addr).unwrap()
    }

    /// Answers device `i`'s requests as the server would, until none are
    /// left.
    fn serve(&mut self, i: usize, mut reqs: Vec<Message>) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(m) = reqs.pop() {
            let answer: Message = match m {
                Message::KeysUpload(u) => {
                    pipit_protocol::e2e::check_upload(&u).unwrap();
                    let addr = self.devs[i].addr;
                    let entry = self
                        .dir
                        .published
                        .entry(addr)
                        .or_insert_with(|| (u.identity.clone(), u.signed.clone().unwrap(), VecDeque::new()));
                    if let Some(s) = u.signed.clone() {
                        *entry = (u.identity.clone(), s, VecDeque::new());
                    }
                    entry.2.extend(u.one_time);
                    pb::Done { req: u.req }.into()
                }
                Message::KeysFetch(f) => {
                    let me = self.devs[i].addr;
                    let mut bundles = Vec::new();
                    for &device in &self.accounts[&f.account] {
                        if (f.account, device) == me || !(f.devices.is_empty() || f.devices.contains(&device)) {
                            continue;
                        }
                        if let Some((identity, signed, stock)) = self.dir.published.get_mut(&(f.account, device)) {
                            bundles.push(pb::KeyBundle {
                                device,
                                identity: identity.clone(),
                                signed: Some(signed.clone()),
                                one_time: stock.pop_front(),
                            });
                        }
                    }
                    pb::KeysResult { req: f.req, account: f.account, bundles }.into()
                }
                other => panic!("unexpected request {other:?}"),
            };
            let d = &mut self.devs[i];
            let a = d.e2e.on_answer(&mut d.store, answer).unwrap();
            assert_eq!(a.retry_after, None);
            reqs.extend(a.send);
            events.extend(a.events);
        }
        events
    }

    /// The server's device check of a 1:1 send (SPEC.md 5.1).
    fn mismatch(&self, i: usize, s: &pb::Send) -> Option<pb::DeviceMismatch> {
        let from = self.devs[i].addr;
        let mut want: BTreeSet<Addr> = self.accounts[&s.to].iter().map(|d| (s.to, *d)).collect();
        if s.to != from.0 {
            want.extend(self.accounts[&from.0].iter().map(|d| (from.0, *d)));
        }
        want.remove(&from);
        let named: BTreeSet<Addr> = s.per_device.iter().map(|c| (c.account, c.device)).collect();
        let r = |a: &Addr| pb::DeviceRef { account: a.0, device: a.1 };
        let missing: Vec<pb::DeviceRef> = want.difference(&named).map(r).collect();
        let extra: Vec<pb::DeviceRef> = named.difference(&want).map(r).collect();
        (!missing.is_empty() || !extra.is_empty()).then_some(pb::DeviceMismatch { id: s.id, missing, extra })
    }

    /// Seals `send` on device `i`, serving the key fetches it needs,
    /// delivering the key carriers it sends ahead, and answering a 1:1
    /// send that names the wrong devices as the server would.
    fn seal(&mut self, i: usize, send: pb::Send) -> pb::Send {
        for _ in 0..8 {
            let d = &mut self.devs[i];
            match d.e2e.seal(&mut d.store, &send).unwrap() {
                Sealed::Ready(s) if s.group == 0 => match self.mismatch(i, &s) {
                    None => return s,
                    Some(m) => {
                        let d = &mut self.devs[i];
                        let fetches = d.e2e.on_mismatch(&mut d.store, &m).unwrap();
                        self.serve(i, fetches);
                    }
                },
                Sealed::Ready(s) => return s,
                Sealed::Wait(reqs) => {
                    assert!(!reqs.is_empty(), "waits for nothing it asked");
                    let (carriers, reqs): (Vec<Message>, Vec<Message>) =
                        reqs.into_iter().partition(|m| matches!(m, Message::Send(_)));
                    self.serve(i, reqs);
                    for c in carriers {
                        let Message::Send(c) = c else { unreachable!() };
                        assert!(Message::from(c.clone()).encoded_len() <= pipit_protocol::limits::MAX_PACKET_LEN);
                        let members = self.groups[&c.group].clone();
                        for (addr, events) in self.deliver_group(i, &c, &members) {
                            assert!(events.is_empty(), "a carrier is nothing for the app: {addr:?} {events:?}");
                        }
                        self.carriers += 1;
                    }
                }
                Sealed::Fail(code) => panic!("sealing failed: {code:?}"),
            }
        }
        panic!("sealing never finished");
    }

    fn decrypt(&mut self, j: usize, d: pb::Deliver) -> Vec<Event> {
        let dev = &mut self.devs[j];
        dev.e2e.decrypt(&mut dev.store, d).unwrap()
    }

    /// Delivers a sealed 1:1 send from `i` to every device it names, as the
    /// server does; returns each device's events.
    fn deliver(&mut self, i: usize, sealed: &pb::Send) -> Vec<(Addr, Vec<Event>)> {
        let from = self.devs[i].addr;
        let mut out = Vec::new();
        for c in &sealed.per_device {
            let j = self.find((c.account, c.device));
            let peer = if c.account == from.0 && sealed.to != from.0 { sealed.to } else { 0 };
            let d = deliver(from, c.payload.clone(), peer, 0);
            out.push(((c.account, c.device), self.decrypt(j, d)));
        }
        let d = &mut self.devs[i];
        d.e2e.on_sent(&mut d.store, sealed).unwrap();
        out
    }

    /// Delivers a group send to every device of `members` but the sender.
    fn deliver_group(&mut self, i: usize, sealed: &pb::Send, members: &[u64]) -> Vec<(Addr, Vec<Event>)> {
        let from = self.devs[i].addr;
        let mut out = Vec::new();
        for j in 0..self.devs.len() {
            let addr = self.devs[j].addr;
            if addr == from || !members.contains(&addr.0) {
                continue;
            }
            let mut d = deliver(from, sealed.payload.clone(), 0, sealed.group);
            if let Some(c) = sealed.per_device.iter().find(|c| (c.account, c.device) == addr) {
                d.device_payload = c.payload.clone();
            }
            out.push((addr, self.decrypt(j, d)));
        }
        let d = &mut self.devs[i];
        d.e2e.on_sent(&mut d.store, sealed).unwrap();
        out
    }

    fn set_group(&mut self, group: u64, members: &[u64], version: u64) {
        self.groups.insert(group, members.to_vec());
        let g = pb::GroupInfo { group, members: members.to_vec(), version, ..Default::default() };
        for d in &mut self.devs {
            d.e2e.on_group_info(&mut d.store, &g).unwrap();
        }
    }
}

fn deliver(from: Addr, payload: Bytes, peer: u64, group: u64) -> pb::Deliver {
    pb::Deliver {
        inbox: 1,
        from: from.0,
        from_device: from.1,
        seq: 1,
        time: 1,
        payload,
        peer,
        group,
        ..Default::default()
    }
}

fn text(to: u64, body: &str) -> pb::Send {
    pb::Send { id: 1, to, payload: Bytes::copy_from_slice(body.as_bytes()), ..Default::default() }
}

fn plaintext(events: &[Event]) -> Option<&[u8]> {
    match events {
        [Event::Message(d)] => Some(&d.payload[..]),
        _ => None,
    }
}

fn kind(payload: &[u8]) -> pb::E2eKind {
    decode_envelope(payload).unwrap().0
}
