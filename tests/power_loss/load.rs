//! The load: senders that keep unconfirmed messages in an outbox and send
//! them again after every restart (as the client library does), and
//! receivers that record and ack every delivery.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey};
use pipit_client::{ClientError, ConnectOptions, Connection};
use tokio_util::sync::CancellationToken;

use crate::check::{Conv, Delivery, Ledger, SentMsg};
use crate::common::{group_text, text, Device};

pub(crate) type Shared = Arc<Mutex<Ledger>>;

pub(crate) async fn try_login(addr: SocketAddr, key: PublicKey, d: &Device) -> Result<Connection, ClientError> {
    let opts = ConnectOptions { server_key: Some(key), ..ConnectOptions::default() };
    let login = Connection::connect(addr, &d.key, pipit_client::login(d.account, d.device, 0), &opts);
    tokio::time::timeout(Duration::from_secs(10), login).await.map_err(|_| ClientError::Timeout)?
}

fn inbox_of(m: &Message) -> Option<u64> {
    let id = match m {
        Message::Deliver(d) => d.inbox,
        Message::Receipt(r) => r.inbox,
        Message::Expired(e) => e.inbox,
        Message::GroupInfo(g) => g.inbox,
        _ => 0,
    };
    (id != 0).then_some(id)
}

async fn ack(c: &mut Connection, through: u64) -> Result<(), ClientError> {
    c.send(&[pb::Ack { through, ids: vec![] }.into()]).await
}

/// Where a sender's messages go.
#[derive(Clone)]
pub(crate) enum Target {
    Account(u64),
    Group(u64),
}

/// One sending device and its outbox, carried from lifetime to lifetime.
pub(crate) struct Sender {
    pub(crate) dev: Device,
    pub(crate) label: String,
    pub(crate) target: Target,
    /// Who must get each message, and the conversation they see.
    pub(crate) recipients: Vec<(u64, Conv)>,
    pub(crate) window: usize,
    /// New messages per lifetime (the load is bounded in count and time).
    per_lifetime: u64,
    next_id: u64,
    /// Messages not answered "sent" yet, by client id.
    pending: BTreeMap<u64, Message>,
}

impl Sender {
    pub(crate) fn new(
        dev: Device,
        label: &str,
        target: Target,
        recipients: Vec<(u64, Conv)>,
        window: usize,
        per_lifetime: u64,
    ) -> Self {
        let label = label.to_string();
        Self { dev, label, target, recipients, window, per_lifetime, next_id: 1, pending: BTreeMap::new() }
    }

    pub(crate) fn unconfirmed(&self) -> usize {
        self.pending.len()
    }

    pub(crate) fn created(&self) -> u64 {
        self.next_id - 1
    }

    fn make(&mut self) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        let body = format!("{}:{id}", self.label);
        let m = match self.target {
            Target::Account(to) => text(id, to, &body),
            Target::Group(g) => group_text(id, g, &body),
        };
        self.pending.insert(id, m);
        id
    }

    /// Sends the outbox again, then (if `more`) new messages up to the
    /// budget, until done, `stop`, or the connection fails. Returns the
    /// sender with what is still unconfirmed.
    pub(crate) async fn run(
        mut self,
        addr: SocketAddr,
        key: PublicKey,
        ledger: Shared,
        lifetime: usize,
        more: bool,
        stop: CancellationToken,
    ) -> Self {
        let mut new = if more { self.per_lifetime } else { 0 };
        let Ok(mut c) = try_login(addr, key, &self.dev).await else { return self };
        let mut queue: VecDeque<u64> = self.pending.keys().copied().collect();
        let mut inflight = BTreeSet::new();
        loop {
            while inflight.len() < self.window && !stop.is_cancelled() {
                let id = match queue.pop_front() {
                    Some(id) => id,
                    None if new > 0 => {
                        new -= 1;
                        self.make()
                    }
                    None => break,
                };
                if c.send(&[self.pending[&id].clone()]).await.is_err() {
                    return self;
                }
                inflight.insert(id);
            }
            if inflight.is_empty() {
                return self;
            }
            let m = tokio::select! {
                _ = stop.cancelled() => return self,
                m = c.recv_timeout(Duration::from_secs(5)) => m,
            };
            match m {
                Ok(Message::Sent(s)) if inflight.remove(&s.id) => {
                    let Some(sent) = self.pending.remove(&s.id) else { continue };
                    let Message::Send(body) = sent else { unreachable!("only sends are pending") };
                    let msg = SentMsg { seq: s.seq, payload: body.payload, lifetime, to: self.recipients.clone() };
                    ledger.lock().unwrap().record_sent(self.dev.account, s.id, msg);
                }
                Ok(Message::Error(e)) if inflight.remove(&e.id) => {
                    // UNAVAILABLE / INTERNAL while the storage fails (after
                    // a cut, before the kill): keep it for the next lifetime.
                    let final_code = !matches!(
                        pb::ErrorCode::try_from(e.code),
                        Ok(pb::ErrorCode::Unavailable | pb::ErrorCode::Internal | pb::ErrorCode::RateLimited)
                    );
                    assert!(!final_code, "{} id {}: final error {:?}", self.label, e.id, e);
                    queue.push_back(e.id);
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Ok(m) => {
                    if let Some(i) = inbox_of(&m) {
                        if ack(&mut c, i).await.is_err() {
                            return self;
                        }
                    }
                }
                Err(ClientError::Timeout) => {}
                Err(_) => return self,
            }
        }
    }
}

/// Receives on one device until `stop` or the connection fails, or (with
/// `drain`) until everything due has come and a second passed without a
/// delivery, or eight seconds passed without one (what never comes is
/// lost); records and acks everything.
pub(crate) async fn receive(
    addr: SocketAddr,
    key: PublicKey,
    dev: Device,
    ledger: Shared,
    lifetime: usize,
    stop: CancellationToken,
    drain: bool,
) -> bool {
    let Ok(mut c) = try_login(addr, key, &dev).await else { return false };
    let mut last = Instant::now();
    let mut relogged = false;
    loop {
        let m = tokio::select! {
            _ = stop.cancelled() => return true,
            m = c.recv_timeout(Duration::from_millis(500)) => m,
        };
        match m {
            Ok(Message::Deliver(d)) => {
                last = Instant::now();
                let conv = if d.group != 0 { (d.group, 0) } else { (0, d.from) };
                let got = Delivery { seq: d.seq, payload: d.payload.clone(), lifetime };
                ledger.lock().unwrap().record_delivery(dev.account, conv, got);
                if ack(&mut c, d.inbox).await.is_err() {
                    return false;
                }
            }
            Ok(m) => {
                if let Some(i) = inbox_of(&m) {
                    if ack(&mut c, i).await.is_err() {
                        return false;
                    }
                }
            }
            Err(ClientError::Timeout) if drain => {
                let quiet = last.elapsed();
                let complete = ledger.lock().unwrap().complete_for(dev.account);
                if complete && quiet >= Duration::from_secs(1) {
                    return true;
                }
                // Nothing for a while and something missing: log in again
                // once. What comes then was in the inbox all along and the
                // connection was not told (a stall, not a loss).
                if !relogged && quiet >= Duration::from_secs(4) {
                    relogged = true;
                    let Ok(again) = try_login(addr, key, &dev).await else { return false };
                    c = again;
                    last = Instant::now();
                    ledger.lock().unwrap().relogins.push(dev.account);
                    continue;
                }
                if quiet >= Duration::from_secs(8) {
                    return true;
                }
            }
            Err(ClientError::Timeout) => {}
            Err(_) => return false,
        }
    }
}
