//! The ledger of what the server answered "sent" and what devices got, and
//! the verdict: every "sent" message delivered, in order, never twice in
//! one server lifetime.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bytes::Bytes;

/// A conversation as a recipient sees it: (group, 0) or (0, peer account).
pub(crate) type Conv = (u64, u64);

/// A message the server answered "sent".
#[derive(Debug, Clone)]
pub(crate) struct SentMsg {
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    /// The server lifetime (0 = first start) in which "sent" arrived.
    pub(crate) lifetime: usize,
    /// Who must get it: (recipient account, the conversation it sees).
    pub(crate) to: Vec<(u64, Conv)>,
}

#[derive(Debug, Clone)]
pub(crate) struct Delivery {
    pub(crate) seq: u64,
    pub(crate) payload: Bytes,
    pub(crate) lifetime: usize,
}

#[derive(Default)]
pub(crate) struct Ledger {
    /// (sender account, client id) -> the message.
    pub(crate) sent: BTreeMap<(u64, u64), SentMsg>,
    /// (recipient account, conversation) -> deliveries in arrival order.
    pub(crate) delivered: HashMap<(u64, Conv), Vec<Delivery>>,
    /// A retry answered with another seq than the first "sent": the first
    /// answer promised a message the server then lost.
    pub(crate) reanswered: Vec<String>,
    /// Accounts whose last drain stalled with messages missing and logged
    /// in again.
    pub(crate) relogins: Vec<u64>,
    /// (account, conversation, seq) first delivered after such a login.
    pub(crate) after_relogin: usize,
}

impl Ledger {
    pub(crate) fn record_sent(&mut self, sender: u64, id: u64, msg: SentMsg) {
        match self.sent.get(&(sender, id)) {
            Some(first) if first.seq != msg.seq => self.reanswered.push(format!(
                "account {sender} id {id}: \"sent\" seq {} in lifetime {}, its retry got seq {} in lifetime {}",
                first.seq, first.lifetime, msg.seq, msg.lifetime
            )),
            Some(_) => {}
            None => {
                self.sent.insert((sender, id), msg);
            }
        }
    }

    pub(crate) fn record_delivery(&mut self, to: u64, conv: Conv, d: Delivery) {
        let ds = self.delivered.entry((to, conv)).or_default();
        if self.relogins.contains(&to) && !ds.iter().any(|x| x.seq == d.seq) {
            self.after_relogin += 1;
        }
        ds.push(d);
    }

    /// Whether `to` has every message it should have.
    pub(crate) fn complete_for(&self, to: u64) -> bool {
        self.sent.values().all(|m| {
            m.to.iter()
                .filter(|(a, _)| *a == to)
                .all(|(a, conv)| self.delivered.get(&(*a, *conv)).is_some_and(|ds| ds.iter().any(|d| d.seq == m.seq)))
        })
    }

    pub(crate) fn verify(&self) -> Verdict {
        let mut v = Verdict { reanswered: self.reanswered.clone(), ..Verdict::default() };
        // Order and duplicates, per recipient and conversation.
        for ((to, conv), ds) in &self.delivered {
            let mut last_seen: HashMap<u64, usize> = HashMap::new();
            let mut max = 0;
            for d in ds {
                match last_seen.get(&d.seq) {
                    Some(&lt) if lt == d.lifetime => v
                        .duplicated
                        .push(format!("account {to} conv {conv:?} seq {} delivered twice in lifetime {lt}", d.seq)),
                    // Acked in a lifetime a cut ended: the ack may not have
                    // been durable (SPEC.md 5.2: the device discards it).
                    Some(_) => v.redelivered_after_cut += 1,
                    None if d.seq < max => v.out_of_order.push(format!(
                        "account {to} conv {conv:?}: seq {} arrived first after seq {max} (lifetime {})",
                        d.seq, d.lifetime
                    )),
                    None => max = d.seq,
                }
                last_seen.insert(d.seq, d.lifetime);
            }
        }
        // Every "sent" message reached every recipient, intact.
        let mut known: HashMap<(u64, Conv), BTreeMap<u64, &Bytes>> = HashMap::new();
        for ((sender, id), m) in &self.sent {
            for (to, conv) in &m.to {
                known.entry((*to, *conv)).or_default().insert(m.seq, &m.payload);
                let got = self
                    .delivered
                    .get(&(*to, *conv))
                    .map(|ds| ds.iter().filter(|d| d.seq == m.seq).collect::<Vec<_>>());
                match got.as_deref() {
                    None | Some([]) => {
                        v.lost.push(format!(
                            "account {sender} id {id} seq {} ({:?}) \"sent\" in lifetime {}, never reached account {to}",
                            m.seq,
                            String::from_utf8_lossy(&m.payload),
                            m.lifetime
                        ));
                        v.lost_in.insert(m.lifetime);
                    }
                    Some(ds) => {
                        v.checked += 1;
                        if ds.iter().any(|d| d.payload != m.payload) {
                            v.corrupt.push(format!("account {to} conv {conv:?} seq {}: another payload", m.seq));
                        }
                    }
                }
            }
        }
        // Nothing delivered that nobody sent.
        for ((to, conv), ds) in &self.delivered {
            for d in ds {
                if known.get(&(*to, *conv)).is_none_or(|k| !k.contains_key(&d.seq)) {
                    v.phantom.push(format!(
                        "account {to} conv {conv:?} seq {} ({:?}) matches no \"sent\"",
                        d.seq,
                        String::from_utf8_lossy(&d.payload)
                    ));
                }
            }
        }
        v.deliveries = self.delivered.values().map(Vec::len).sum();
        v
    }
}

#[derive(Debug, Default)]
pub(crate) struct Verdict {
    /// (message, recipient) pairs found delivered.
    pub(crate) checked: usize,
    /// Deliveries seen in all (with redeliveries).
    pub(crate) deliveries: usize,
    /// Deliveries repeated in a later lifetime (allowed: the ack may have
    /// been lost with the power).
    pub(crate) redelivered_after_cut: usize,
    pub(crate) lost: Vec<String>,
    /// Lifetimes in which lost messages were answered "sent".
    pub(crate) lost_in: BTreeSet<usize>,
    pub(crate) duplicated: Vec<String>,
    pub(crate) out_of_order: Vec<String>,
    pub(crate) corrupt: Vec<String>,
    pub(crate) phantom: Vec<String>,
    pub(crate) reanswered: Vec<String>,
}

impl Verdict {
    pub(crate) fn clean(&self) -> bool {
        self.lost.is_empty()
            && self.duplicated.is_empty()
            && self.out_of_order.is_empty()
            && self.corrupt.is_empty()
            && self.phantom.is_empty()
            && self.reanswered.is_empty()
    }

    /// The problems, at most `n` lines of each kind.
    pub(crate) fn describe(&self, n: usize) -> String {
        let mut out = String::new();
        for (what, list) in [
            ("lost", &self.lost),
            ("duplicated", &self.duplicated),
            ("out of order", &self.out_of_order),
            ("corrupt", &self.corrupt),
            ("phantom", &self.phantom),
            ("re-answered", &self.reanswered),
        ] {
            if !list.is_empty() {
                out.push_str(&format!("{} {what}:\n", list.len()));
                for l in list.iter().take(n) {
                    out.push_str(&format!("  {l}\n"));
                }
            }
        }
        out
    }
}
