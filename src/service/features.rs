//! The optional protocol features this server offers: the one list that
//! `LoginOk.features` advertises and dispatch consults. A kind whose
//! feature is not here is answered `NOT_SUPPORTED` (SPEC.md 5.10), final,
//! so a client never retries it. A new feature adds itself here when its
//! service lands, together with its arm in `net/dispatch.rs`.

use pipit_protocol::message::pb::Feature;

/// What this server offers beyond the core every server has.
pub const OFFERED: &[Feature] = &[Feature::KeyDirectory, Feature::UnlinkDevice];

/// Whether this server offers `f`.
pub fn offers(f: Feature) -> bool {
    OFFERED.contains(&f)
}
