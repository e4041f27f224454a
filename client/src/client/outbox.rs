//! The outbox: the app's messages numbered, kept, sealed (with
//! encryption) and sent until the server has them.

use std::time::Instant;

use pipit_protocol::message::pb;
use pipit_protocol::Message;

use crate::e2e::Sealed;
use crate::ClientError;

use super::order::Conv;
use super::task::{emit, End, Task};
use super::Event;

/// A message is sealed again at most this often after `DeviceMismatch`s
/// (devices changing while it is under way) before it fails.
pub(super) const MAX_RESEALS: u32 = 3;

impl Task {
    /// Takes a message from the app: into the outbox as it is, or (with
    /// encryption) into `pending` until it is sealed. Returns its id.
    pub(super) fn enqueue(&mut self, mut send: pb::Send) -> Result<u64, ClientError> {
        send.id = self.state.next_id;
        self.state.next_id += 1;
        // The counter first: an id must never be reused for another
        // message, even if the app dies between the two writes.
        self.store.save_state(&self.state)?;
        if let Some(e2e) = &mut self.e2e {
            e2e.stash(&mut *self.store, &send)?;
            self.pending.insert(send.id, send.clone());
            return Ok(send.id);
        }
        self.store.put_outbox(&send)?;
        self.outbox.insert(send.id, send.clone());
        self.offer(&send);
        Ok(send.id)
    }

    /// An outbox entry is ready to go: written now, unless an earlier one
    /// of its conversation was refused for now (then it waits for that).
    pub(super) fn offer(&mut self, send: &pb::Send) {
        if self.lanes.ready(Conv::of(send), send.id) {
            self.out.push(send.clone().into());
        }
    }

    /// Writes the outbox entries that `ids` names (released by the lanes).
    pub(super) fn write_released(&mut self, ids: Vec<u64>) {
        for id in ids {
            if let Some(send) = self.outbox.get(&id) {
                self.out.push(send.clone().into());
            }
        }
    }

    /// Seals pending messages in order, as far as their keys allow: each
    /// goes to the outbox and the wire; the first that waits for keys
    /// stops the rest (so messages keep their order), after its fetches
    /// are queued to send.
    pub(super) async fn seal_pending(&mut self) -> Result<(), End> {
        if self.e2e.is_none() {
            return Ok(());
        }
        if self.reseal_at.is_some_and(|at| at > Instant::now()) {
            return Ok(());
        }
        self.reseal_at = None;
        let ids: Vec<u64> = self.pending.keys().copied().filter(|id| !self.outbox.contains_key(id)).collect();
        for id in ids {
            let plain = self.pending[&id].clone();
            let e2e = self.e2e.as_mut().expect("checked above");
            let sealed = e2e.seal(&mut *self.store, &plain).map_err(|e| End::Lost(e.into()))?;
            match sealed {
                Sealed::Ready(send) => {
                    if Message::from(send.clone()).encoded_len() > pipit_protocol::limits::MAX_PACKET_LEN {
                        // One ciphertext per device made it too large for a
                        // frame: it could never be sent.
                        self.drop_pending(id)?;
                        if !emit(&self.events, Event::SendFailed { id, code: pb::ErrorCode::TooLarge }).await {
                            return Err(End::Closed(None));
                        }
                        continue;
                    }
                    self.store.put_outbox(&send).map_err(|e| End::Lost(e.into()))?;
                    self.outbox.insert(id, send.clone());
                    self.offer(&send);
                }
                Sealed::Wait(requests) => {
                    for m in requests {
                        match m {
                            // A send of the end-to-end layer's own (group keys
                            // that go ahead of a message): an id, the outbox.
                            Message::Send(mut internal) => {
                                internal.id = self.state.next_id;
                                self.state.next_id += 1;
                                self.store.save_state(&self.state).map_err(|e| End::Lost(e.into()))?;
                                self.store.put_outbox(&internal).map_err(|e| End::Lost(e.into()))?;
                                self.outbox.insert(internal.id, internal.clone());
                                self.offer(&internal);
                            }
                            other => self.out.push(other),
                        }
                    }
                    break;
                }
                Sealed::Fail(code) => {
                    self.drop_pending(id)?;
                    if !emit(&self.events, Event::SendFailed { id, code }).await {
                        return Err(End::Closed(None));
                    }
                }
            }
        }
        Ok(())
    }

    /// With encryption, an outbox entry without a plaintext behind it is
    /// one of the end-to-end layer's own sends (group keys ahead of a
    /// message): the app never hears of it.
    pub(super) fn is_internal(&self, id: u64) -> bool {
        self.e2e.is_some() && !self.pending.contains_key(&id) && self.outbox.contains_key(&id)
    }

    /// The server has a message, or refused it for good: its plaintext
    /// goes.
    pub(super) fn drop_pending(&mut self, id: u64) -> Result<(), End> {
        self.reseals.remove(&id);
        if self.pending.remove(&id).is_some() {
            if let Some(e2e) = &mut self.e2e {
                e2e.unstash(&mut *self.store, id).map_err(|e| End::Lost(e.into()))?;
            }
        }
        Ok(())
    }
}
