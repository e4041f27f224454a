//! Incoming server messages: dedup, the end-to-end layer's answers,
//! deliveries, and the answers to sends.

use std::sync::atomic::Ordering;
use std::time::Instant;

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::ClientError;

use super::order::{Conv, Refused};
use super::outbox::MAX_RESEALS;
use super::task::{emit, retry_delay, Deferred, End, Task};
use super::Event;

impl Task {
    /// Handles one server message.
    pub(super) async fn handle(&mut self, m: Message) -> Result<Handled, End> {
        let lost = |e: crate::StoreError| End::Lost(e.into());
        let inbox = match &m {
            Message::Deliver(d) => Some(d.inbox),
            Message::Receipt(r) => Some(r.inbox),
            Message::Expired(e) => Some(e.inbox),
            Message::GroupInfo(g) if g.inbox != 0 => Some(g.inbox),
            _ => None,
        };
        if let Some(id) = inbox {
            if id <= self.state.acked_through {
                // Redelivered after a reconnect: processed already. Ack
                // again so the server forgets it.
                self.stats.duplicates_dropped.fetch_add(1, Ordering::Relaxed);
                return Ok(Handled { ack: true, seal: false });
            }
        }
        if let Some(e2e) = &mut self.e2e {
            if m.answered_request().is_some_and(|req| e2e.owns(req)) {
                let answered = e2e.on_answer(&mut *self.store, m).map_err(lost)?;
                if answered.published {
                    self.stats.keys_published.fetch_add(1, Ordering::Relaxed);
                }
                if answered.upload_answered {
                    // Stored, or refused for good: either way the app
                    // should not wait any longer.
                    if let Some(ev) = self.held_connected.take() {
                        if !emit(&self.events, ev).await {
                            return Err(End::Closed(None));
                        }
                    }
                }
                self.out.extend(answered.send);
                if let Some(secs) = answered.retry_after {
                    self.reseal_at = Some(Instant::now() + retry_delay(secs, 1));
                }
                for ev in answered.events {
                    if !emit(&self.events, ev).await {
                        return Err(End::Closed(None));
                    }
                }
                return Ok(Handled { ack: false, seal: true });
            }
        }
        if let Some(req) = m.answered_request() {
            if self.answer_call(req, &m) {
                return Ok(Handled::default());
            }
        }
        let events = match m {
            Message::Deliver(d) => {
                self.stats.received.fetch_add(1, Ordering::Relaxed);
                match &mut self.e2e {
                    None => vec![Event::Message(d)],
                    Some(e2e) => {
                        let events = e2e.decrypt(&mut *self.store, d).map_err(lost)?;
                        let unreadable = events.iter().filter(|e| matches!(e, Event::Undecryptable { .. })).count();
                        self.stats.undecryptable.fetch_add(unreadable as u64, Ordering::Relaxed);
                        events
                    }
                }
            }
            Message::KeysStatus(k) => {
                if let Some(e2e) = &mut self.e2e {
                    let upload = e2e.on_keys_status(&mut *self.store, k.one_time_left).map_err(lost)?;
                    self.out.extend(upload);
                }
                return Ok(Handled::default());
            }
            Message::Receipt(r) => vec![Event::Receipt(r)],
            Message::Expired(e) => vec![Event::Expired(e)],
            Message::GroupInfo(g) if g.inbox != 0 => {
                // A change notice (an inbox entry): the end-to-end layer
                // learns the members (a new Megolm session when they
                // changed), then the app.
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_group_info(&mut *self.store, &g).map_err(lost)?;
                }
                vec![Event::Group(g)]
            }
            Message::Sent(s) => {
                self.deferred.remove(&s.id);
                let internal = self.is_internal(s.id);
                let Some(sealed) = self.outbox.remove(&s.id) else {
                    // A second answer to a resent message: already reported.
                    return Ok(Handled::default());
                };
                let go = self.lanes.answered(Conv::of(&sealed), s.id, true);
                self.write_released(go);
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_sent(&mut *self.store, &sealed).map_err(lost)?;
                }
                self.store.remove_outbox(s.id).map_err(lost)?;
                self.drop_pending(s.id)?;
                if internal {
                    return Ok(Handled { ack: false, seal: true });
                }
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
                vec![Event::Sent(s)]
            }
            Message::Error(e) if e.id != 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                if matches!(code, pb::ErrorCode::Unavailable | pb::ErrorCode::RateLimited | pb::ErrorCode::Internal) {
                    // Not stored, not final: it stays in the outbox and goes
                    // again on this connection after the pause the server
                    // asked for, longer with each refusal in a row. Dropping
                    // the connection instead would turn an overloaded server
                    // into a reconnect storm.
                    // Only the earliest refused message of a conversation
                    // waits for a pause; the later ones wait for it (so
                    // none overtakes it), however many there are.
                    if let Some(conv) = self.outbox.get(&e.id).map(Conv::of) {
                        match self.lanes.refused(conv, e.id) {
                            Refused::Retry { instead_of } => {
                                if let Some(later) = instead_of {
                                    self.deferred.remove(&later);
                                }
                                let refusals = self.deferred.get(&e.id).map_or(0, |d| d.refusals) + 1;
                                let at = Instant::now() + retry_delay(e.retry_after_secs, refusals);
                                self.deferred.insert(e.id, Deferred { at, refusals });
                            }
                            Refused::Wait => {
                                self.deferred.remove(&e.id);
                            }
                        }
                    }
                    return Ok(Handled::default());
                }
                // Final (NOT_SUPPORTED, ID_REUSED, NOT_FOUND, ...): the
                // message leaves the outbox and the app is told why.
                self.deferred.remove(&e.id);
                let internal = self.is_internal(e.id);
                if let Some(sealed) = self.outbox.remove(&e.id) {
                    let go = self.lanes.answered(Conv::of(&sealed), e.id, false);
                    self.write_released(go);
                    self.store.remove_outbox(e.id).map_err(lost)?;
                    if let Some(e2e) = &mut self.e2e {
                        e2e.on_send_failed(&sealed);
                    }
                }
                self.drop_pending(e.id)?;
                if internal {
                    return Ok(Handled { ack: false, seal: true });
                }
                vec![Event::SendFailed { id: e.id, code }]
            }
            Message::Error(e) if e.req == 0 => {
                let code = pb::ErrorCode::try_from(e.code).unwrap_or(pb::ErrorCode::Unspecified);
                return Err(End::Lost(ClientError::Refused(code)));
            }
            Message::DeviceMismatch(m) => {
                self.deferred.remove(&m.id);
                let internal = self.is_internal(m.id);
                if let Some(sealed) = self.outbox.remove(&m.id) {
                    let go = self.lanes.answered(Conv::of(&sealed), m.id, false);
                    self.write_released(go);
                    self.store.remove_outbox(m.id).map_err(lost)?;
                    if let Some(e2e) = &mut self.e2e {
                        e2e.on_send_failed(&sealed);
                    }
                }
                if internal {
                    // Group keys for devices that are no longer members:
                    // the layer learns the devices and shares again.
                    if let Some(e2e) = &mut self.e2e {
                        let fetches = e2e.on_mismatch(&mut *self.store, &m).map_err(lost)?;
                        self.out.extend(fetches);
                    }
                    return Ok(Handled { ack: false, seal: true });
                }
                let reseals = self.reseals.entry(m.id).or_default();
                *reseals += 1;
                match &mut self.e2e {
                    Some(e2e) if self.pending.contains_key(&m.id) && *reseals <= MAX_RESEALS => {
                        // Nothing was stored: the same message, encrypted for
                        // the devices there are now, goes under the same id.
                        let fetches = e2e.on_mismatch(&mut *self.store, &m).map_err(lost)?;
                        self.out.extend(fetches);
                        return Ok(Handled { ack: false, seal: true });
                    }
                    _ => {
                        self.drop_pending(m.id)?;
                        vec![Event::SendFailed { id: m.id, code: pb::ErrorCode::DeviceMismatch }]
                    }
                }
            }
            Message::Presence(p) => vec![Event::Presence(p)],
            Message::Typing(t) => vec![Event::Typing(t)],
            Message::GroupInfo(g) => {
                if let Some(e2e) = &mut self.e2e {
                    e2e.on_group_info(&mut *self.store, &g).map_err(lost)?;
                }
                vec![Event::Other(g.into())]
            }
            other => vec![Event::Other(other)],
        };
        // The app hears of the login before anything that came over it
        // (a held `Connected` waits for the key upload only while nothing
        // else is to be told).
        if !events.is_empty() {
            if let Some(ev) = self.held_connected.take() {
                if !emit(&self.events, ev).await {
                    return Err(End::Closed(None));
                }
            }
        }
        // Hand it over before acking: an ack means "processed".
        for event in events {
            if !emit(&self.events, event).await {
                return Err(End::Closed(None));
            }
        }
        if let Some(id) = inbox {
            self.state.acked_through = id;
            return Ok(Handled { ack: true, seal: false });
        }
        Ok(Handled::default())
    }
}

/// What handling one server message made due.
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct Handled {
    /// An ack.
    pub(super) ack: bool,
    /// Sealing pending messages again (keys arrived).
    pub(super) seal: bool,
}
