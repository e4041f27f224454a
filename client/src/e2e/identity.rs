//! Device identities: what a device is known by, trust on first use, and
//! the app accepting a changed identity.

use std::fmt;

use pipit_protocol::e2e::{identity_curve25519, identity_ed25519};
use serde::{Deserialize, Serialize};

use crate::store::{Store, StoreError};

use super::records::PeerRecord;
use super::{E2e, CACHE_MAX};

/// A device's end-to-end identity: its Ed25519 key (known once a bundle
/// of it was fetched) and its Curve25519 key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// The Ed25519 key; `None` while known only from its messages.
    pub ed25519: Option<[u8; 32]>,
    /// The Curve25519 key (what Olm sessions are bound to).
    pub curve25519: [u8; 32],
}

impl fmt::Display for DeviceIdentity {
    /// The Curve25519 key in hex: what two people compare.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.curve25519 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl DeviceIdentity {
    pub(super) fn from_published(identity: &[u8]) -> Option<Self> {
        Some(Self { ed25519: Some(*identity_ed25519(identity)?), curve25519: *identity_curve25519(identity)? })
    }

    /// The same device key: the Curve25519 key matches, and the Ed25519
    /// key too when both are known.
    pub(super) fn same(&self, other: &Self) -> bool {
        self.curve25519 == other.curve25519
            && (self.ed25519.is_none() || other.ed25519.is_none() || self.ed25519 == other.ed25519)
    }
}

impl E2e {
    /// The directory entry of `account`, if this device has ever fetched
    /// its keys or heard from it.
    pub(super) fn known_peer(&mut self, store: &mut dyn Store, account: u64) -> Result<Option<PeerRecord>, StoreError> {
        if let Some(p) = self.peers.get(&account) {
            return Ok(Some(p.clone()));
        }
        let r = self.vault.get::<PeerRecord>(store, &format!("peer.{account}"))?;
        if let Some(r) = &r {
            if self.peers.len() >= CACHE_MAX {
                self.peers.clear();
            }
            self.peers.insert(account, r.clone());
        }
        Ok(r)
    }

    pub(super) fn save_peer(&mut self, store: &mut dyn Store, account: u64, r: PeerRecord) -> Result<(), StoreError> {
        self.vault.put(store, &format!("peer.{account}"), &r)?;
        if self.peers.len() >= CACHE_MAX {
            self.peers.clear();
        }
        self.peers.insert(account, r);
        Ok(())
    }

    /// The app accepts the identity `account`/`device` showed.
    pub(crate) fn trust(&mut self, store: &mut dyn Store, account: u64, device: u32) -> Result<bool, StoreError> {
        let Some(mut peer) = self.known_peer(store, account)? else { return Ok(false) };
        let Some(entry) = peer.devices.get_mut(&device) else { return Ok(false) };
        let Some(offered) = entry.offered.take() else { return Ok(false) };
        entry.identity = Some(offered);
        self.save_peer(store, account, peer)?;
        // Sessions with the old identity are worthless now; the next send
        // fetches a bundle of the new one.
        self.drop_sessions(store, (account, device))?;
        Ok(true)
    }
}
