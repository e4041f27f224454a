//! Typing indicators (SPEC.md 5.8): relayed at most once to the devices of
//! the peer that are connected at that moment, never stored, never
//! answered. A device that is offline simply never sees it. Each
//! connection may send a few per second (a token bucket); the rest are
//! dropped silently and counted.
//!
//! Group typing needs the group's members and arrives with groups; until
//! then a `Typing` with `group` is a kind of a feature this server does
//! not offer and is dropped before it gets here.

use std::sync::Arc;
use std::time::Instant;

use pipit_protocol::message::pb;

use crate::model::DeviceAddr;
use crate::route::Registry;

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
    cfg: TypingConfig,
}

impl Typing {
    pub(crate) fn new(registry: Arc<Registry>, cfg: TypingConfig) -> Self {
        Self { registry, cfg }
    }

    /// A full allowance for a new connection.
    pub fn limiter(&self, now: Instant) -> TypingLimiter {
        TypingLimiter { tokens: self.cfg.burst as f32, last: now }
    }

    /// `from` says it is (or stopped) typing to `t.peer`: hands it to the
    /// peer's connected devices, as `Typing{peer: from}`.
    pub fn relay(&self, limiter: &mut TypingLimiter, from: DeviceAddr, t: &pb::Typing, now: Instant) {
        if t.peer == 0 || t.peer == from.account || t.group != 0 {
            dropped("invalid");
            return;
        }
        if !limiter.allow(&self.cfg, now) {
            dropped("rate");
            return;
        }
        let out = pb::Typing { peer: from.account, group: 0, typing: t.typing, from: 0 };
        match self.registry.relay_typing(t.peer, &out) {
            0 => dropped("offline"),
            n => metrics::counter!("pipit_typing_relayed_total").increment(n as u64),
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
