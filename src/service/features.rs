//! The optional protocol features this server offers: the one list that
//! `LoginOk.features` advertises and dispatch consults. A kind whose
//! feature is not offered is answered `NOT_SUPPORTED` (SPEC.md 5.10),
//! final, so a client never retries it. A new feature adds itself here
//! when its service lands, together with its arm in `net/dispatch.rs`.

use pipit_protocol::message::pb::Feature;

/// What every server of this version offers beyond the core (push is
/// added at start when a gateway is configured).
pub const OFFERED: &[Feature] =
    &[Feature::Groups, Feature::Presence, Feature::Typing, Feature::KeyDirectory, Feature::UnlinkDevice];

/// What this server offers: [`OFFERED`], and push when the operator
/// configured a way to deliver wake-ups (a token nobody can use would
/// only make a device believe it will be woken).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Features {
    list: Vec<Feature>,
}

impl Features {
    /// The features of a server that can (`push`) or cannot deliver push
    /// wake-ups.
    pub fn new(push: bool) -> Self {
        let mut list = OFFERED.to_vec();
        if push {
            list.push(Feature::Push);
        }
        Self { list }
    }

    /// Whether this server offers `f`.
    pub fn offers(&self, f: Feature) -> bool {
        self.list.contains(&f)
    }

    /// Everything offered, for `LoginOk.features`.
    pub fn list(&self) -> &[Feature] {
        &self.list
    }
}
