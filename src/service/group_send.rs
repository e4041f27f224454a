//! A group send (`Send.group`): the body is stored once, with a durable
//! fan-out job, and "sent" is answered as soon as those are committed;
//! `super::fanout` writes the members' inbox entries afterwards. The
//! sender must be a member now; who receives the message is decided by
//! its seq (`super::groups::receives`).
//!
//! End-to-end encryption without plaintext: `payload` is the one
//! ciphertext every member device gets (a sender-key / Megolm message),
//! and `per_device` optionally adds a ciphertext for some devices (the
//! sender key, for devices that lack it), delivered beside it as
//! `Deliver.device_payload`.

use std::collections::HashSet;

use bytes::Bytes;
use pipit_protocol::limits::MAX_PACKET_LEN;
use pipit_protocol::message::pb;

use super::messaging::outcome::{Digest, SendFailure};
use crate::model::{unix_now, DeviceAddr};
use crate::store::counters::Counter;
use crate::store::dedup::DedupRecord;
use crate::store::fanout::FanoutJob;
use crate::store::group_receipts::GroupCounts;
use crate::store::{StorageError, Txn};

/// Whether the largest form of this message a member device can get fits
/// one packet: a `Deliver` with every id at its widest, the shared
/// payload and the largest per-device ciphertext.
fn fits(send: &pb::Send) -> bool {
    use prost::encoding::encoded_len_varint;
    use prost::Message as _;
    let widest = send.per_device.iter().map(|c| c.payload.len()).max().unwrap_or(0);
    let d = pb::Deliver {
        inbox: u64::MAX,
        from: u64::MAX,
        from_device: u32::MAX,
        seq: u64::MAX,
        time: u64::MAX,
        payload: send.payload.clone(),
        peer: 0,
        group: u64::MAX,
        device_payload: Bytes::new(),
    };
    let extra = if widest == 0 { 0 } else { 1 + encoded_len_varint(widest as u64) + widest };
    let body = d.encoded_len() + extra;
    // The packet's field key for Deliver (one byte) and the body's length.
    1 + encoded_len_varint(body as u64) + body <= MAX_PACKET_LEN
}

/// Stores a group send from `from` (whose dedup record the caller has
/// already looked for). `job` is set when a fan-out job was created.
pub(crate) fn store(
    txn: &mut Txn<'_>,
    from: DeviceAddr,
    send: &pb::Send,
    digest: Digest,
    job: &mut bool,
) -> Result<Result<pb::Sent, SendFailure>, StorageError> {
    let fail = |c| Ok(Err(SendFailure::Code(c)));
    if send.to != 0 {
        return fail(pb::ErrorCode::BadRequest);
    }
    let Some(g) = txn.group(send.group)? else {
        return fail(pb::ErrorCode::NotFound);
    };
    if g.member(from.account).is_none() {
        return fail(pb::ErrorCode::Forbidden);
    }
    if !fits(send) {
        return fail(pb::ErrorCode::TooLarge);
    }
    // Per-device ciphertexts may name only devices of current members,
    // each once; the sending device needs none.
    let mut named = HashSet::new();
    let mut extra = Vec::new();
    for c in &send.per_device {
        let addr = DeviceAddr::new(c.account, c.device);
        if c.account == 0 || !named.insert(addr) {
            return fail(pb::ErrorCode::BadRequest);
        }
        let known = addr != from
            && g.member(c.account).is_some()
            && txn.account(c.account)?.is_some_and(|l| l.devices.iter().any(|d| d.device == c.device));
        if !known {
            extra.push(pb::DeviceRef { account: c.account, device: c.device });
        }
    }
    if !extra.is_empty() {
        return Ok(Err(SendFailure::Mismatch(pb::DeviceMismatch { id: send.id, missing: Vec::new(), extra })));
    }
    let now = unix_now();
    let seq = txn.next(Counter::GroupSeq(send.group))?;
    let body = pb::Deliver {
        inbox: 0,
        from: from.account,
        from_device: from.device,
        seq,
        time: now,
        payload: send.payload.clone(),
        peer: 0,
        group: send.group,
        device_payload: Bytes::new(),
    };
    txn.put_group_body(send.group, seq, &body.into());
    for c in &send.per_device {
        txn.put_group_extra(send.group, seq, DeviceAddr::new(c.account, c.device), &c.payload);
    }
    // The job's own reference keeps the body until the fan-out is done.
    txn.set_counter(Counter::BodyRefs { group: send.group, seq }, 1);
    let mut accounts: Vec<u64> = g.members.iter().map(|m| m.account).collect();
    accounts.dedup();
    let fanout = FanoutJob {
        remaining: accounts.len() as u64,
        created_ms: super::fanout::now_ms(),
        notice: false,
        from: from.account,
        from_device: from.device,
        time: now,
        extras: send.per_device.len() as u32,
        ..Default::default()
    };
    txn.put_fanout_job(send.group, seq, &fanout);
    txn.put_group_counts(send.group, seq, GroupCounts { sender: from.account, time: now, ..Default::default() })?;
    txn.put_dedup(from, send.id, DedupRecord { seq, time: now, digest: Some(digest) });
    *job = true;
    Ok(Ok(pb::Sent { id: send.id, seq, time: now }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use pipit_protocol::Message;

    #[test]
    fn the_size_check_agrees_with_the_encoder() {
        let mut outcomes = Vec::new();
        for (payload, key) in [(0, 0), (100, 0), (65_400, 0), (65_000, 400), (30_000, 35_400), (65_460, 0)] {
            let send = pb::Send {
                group: 1,
                payload: Bytes::from(vec![1; payload]),
                per_device: vec![pb::DeviceCiphertext { account: 1, device: 0, payload: Bytes::from(vec![2; key]) }],
                ..Default::default()
            };
            let d = pb::Deliver {
                inbox: u64::MAX,
                from: u64::MAX,
                from_device: u32::MAX,
                seq: u64::MAX,
                time: u64::MAX,
                payload: send.payload.clone(),
                peer: 0,
                group: u64::MAX,
                device_payload: Bytes::from(vec![2; key]),
            };
            let len = Message::from(d).encoded_len();
            assert_eq!(fits(&send), len <= MAX_PACKET_LEN, "payload {payload}, key {key}: {len}");
            outcomes.push(fits(&send));
        }
        assert!(outcomes.contains(&true) && outcomes.contains(&false), "both sides of the limit: {outcomes:?}");
    }
}
