//! Typing indicators (SPEC.md 5.8): relayed at most once to the devices of
//! the peer that are connected at that moment, never stored, never
//! answered. A device that is offline simply never sees it. Each
//! connection may send a few per second (a token bucket); the rest are
//! dropped silently and counted.
//!
//! In a group, a notice from a member goes to the connected devices of
//! every other member (`Typing{group, from}`); the member list is read
//! off the async threads, and a notice from a non-member is dropped.

use std::sync::Arc;
use std::time::Instant;

use pipit_protocol::message::pb;

use crate::model::DeviceAddr;
use crate::route::cluster::{Cluster, Placement};
use crate::route::Registry;
use crate::store::Store;

/// Typing settings.
#[derive(Debug, Clone, Copy)]
pub struct TypingConfig {
    /// Notices one connection may send per minute, sustained.
    pub per_minute: u32,
    /// Notices one connection may send at once after a pause.
    pub burst: u32,
}

impl Default for TypingConfig {
    fn default() -> Self {
        Self { per_minute: 60, burst: 5 }
    }
}

/// One connection's allowance (a token bucket).
#[derive(Debug, Clone, Copy)]
pub struct TypingLimiter {
    tokens: f32,
    last: Instant,
}

impl TypingLimiter {
    fn allow(&mut self, cfg: &TypingConfig, now: Instant) -> bool {
        let rate = cfg.per_minute as f32 / 60.0;
        let elapsed = now.saturating_duration_since(self.last).as_secs_f32();
        self.tokens = (self.tokens + elapsed * rate).min(cfg.burst as f32);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Why a notice went nowhere (the `reason` of
/// `pipit_typing_dropped_total`).
fn dropped(reason: &'static str) {
    metrics::counter!("pipit_typing_dropped_total", "reason" => reason).increment(1);
}

/// Relays typing notices.
#[derive(Clone)]
pub struct Typing {
    registry: Arc<Registry>,
    store: Arc<Store>,
    cfg: TypingConfig,
    cluster: Option<Cluster>,
}

impl Typing {
    pub(crate) fn new(registry: Arc<Registry>, store: Arc<Store>, cfg: TypingConfig, cluster: Option<Cluster>) -> Self {
        Self { registry, store, cfg, cluster }
    }

    /// A typing notice from `from`, an account of another node, for `to`,
    /// an account of this one (a node link's `NodeTyping`): relayed to
    /// its connected devices, never stored.
    pub fn from_node(&self, to: u64, from: u64, typing: bool) {
        let out = pb::Typing { peer: from, group: 0, typing, from: 0 };
        match self.registry.relay_typing(to, &out) {
            0 => dropped("offline"),
            n => metrics::counter!("pipit_typing_relayed_total").increment(n as u64),
        }
    }

    /// A full allowance for a new connection.
    pub fn limiter(&self, now: Instant) -> TypingLimiter {
        TypingLimiter { tokens: self.cfg.burst as f32, last: now }
    }

    /// `from` says it is (or stopped) typing to `t.peer`: hands it to the
    /// peer's connected devices, as `Typing{peer: from}`.
    ///
    /// A group notice needs the member list from storage: it is returned
    /// as a future for the caller to spawn (never awaited in the
    /// connection's loop, and at most the rate limit's worth at a time).
    pub fn relay(
        &self,
        limiter: &mut TypingLimiter,
        from: DeviceAddr,
        t: &pb::Typing,
        now: Instant,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if t.group != 0 && t.peer == 0 {
            if !limiter.allow(&self.cfg, now) {
                dropped("rate");
                return None;
            }
            return Some(self.relay_group(from, t.group, t.typing));
        }
        if t.peer == 0 || t.peer == from.account || t.group != 0 {
            dropped("invalid");
            return None;
        }
        if !limiter.allow(&self.cfg, now) {
            dropped("rate");
            return None;
        }
        if let Some(c) = &self.cluster {
            match c.place(t.peer) {
                Placement::Remote(m) => {
                    let sent = c.relay().is_some_and(|r| r.typing(&m.id, t.peer, from.account, t.typing));
                    if sent {
                        metrics::counter!("pipit_typing_relayed_total").increment(1);
                    } else {
                        dropped("link");
                    }
                    return None;
                }
                Placement::Down(_) => {
                    dropped("offline");
                    return None;
                }
                _ => {}
            }
        }
        let out = pb::Typing { peer: from.account, group: 0, typing: t.typing, from: 0 };
        match self.registry.relay_typing(t.peer, &out) {
            0 => dropped("offline"),
            n => metrics::counter!("pipit_typing_relayed_total").increment(n as u64),
        }
        None
    }

    fn relay_group(
        &self,
        from: DeviceAddr,
        group: u64,
        typing: bool,
    ) -> impl std::future::Future<Output = ()> + Send + 'static {
        let (store, registry) = (self.store.clone(), self.registry.clone());
        async move {
            let record = tokio::task::spawn_blocking(move || store.group(group)).await;
            let Ok(Ok(Some(record))) = record else {
                dropped("invalid");
                return;
            };
            if record.member(from.account).is_none() {
                dropped("invalid");
                return;
            }
            let out = pb::Typing { peer: 0, group, typing, from: from.account };
            let mut reached = 0;
            let mut last = 0;
            for m in record.members.iter().filter(|m| m.left == 0) {
                if m.account != from.account && m.account != last {
                    reached += registry.relay_typing(m.account, &out);
                }
                last = m.account;
            }
            match reached {
                0 => dropped("offline"),
                n => metrics::counter!("pipit_typing_relayed_total").increment(n as u64),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn the_bucket_allows_a_burst_then_the_rate() {
        let cfg = TypingConfig { per_minute: 60, burst: 3 };
        let t0 = Instant::now();
        let mut l = TypingLimiter { tokens: 3.0, last: t0 };
        let allowed = (0..10).filter(|_| l.allow(&cfg, t0)).count();
        assert_eq!(allowed, 3, "the burst");
        assert!(!l.allow(&cfg, t0 + Duration::from_millis(500)));
        assert!(l.allow(&cfg, t0 + Duration::from_millis(1_100)), "one a second after that");
        assert!(!l.allow(&cfg, t0 + Duration::from_millis(1_200)));
    }
}
