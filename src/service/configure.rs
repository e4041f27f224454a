//! From the configuration file's tables (`settings`, in the operator's
//! units) to what each service runs with (durations, its own shapes).
//! Kept apart from `settings` so that file stays a leaf every service can
//! read, while this one may name every service.

use std::time::Duration;

use super::fanout::FanoutConfig;
use super::keys::KeyRules;
use super::presence::PresenceConfig;
use super::push::PushConfig;
use super::settings::{GroupSettings, KeySettings, PresenceSettings, PushSettings, TypingSettings};
use super::typing::TypingConfig;

impl From<&GroupSettings> for FanoutConfig {
    fn from(s: &GroupSettings) -> Self {
        FanoutConfig { batch: s.fanout_batch, concurrency: s.fanout_concurrency }
    }
}

impl From<&PresenceSettings> for PresenceConfig {
    fn from(s: &PresenceSettings) -> Self {
        PresenceConfig {
            grace: Duration::from_millis(s.grace_ms),
            granularity: Duration::from_secs(s.last_seen_granularity_secs),
            max_subscriptions: s.max_subscriptions,
        }
    }
}

impl From<&TypingSettings> for TypingConfig {
    fn from(s: &TypingSettings) -> Self {
        TypingConfig { per_minute: s.per_minute, burst: s.burst }
    }
}

impl From<&PushSettings> for PushConfig {
    fn from(s: &PushSettings) -> Self {
        PushConfig {
            gateway_url: s.gateway_url.clone(),
            apns_app_id: s.apns_app_id.clone(),
            fcm_app_id: s.fcm_app_id.clone(),
            unifiedpush: s.unifiedpush,
            allow_private_endpoints: s.allow_private_endpoints,
            interval: Duration::from_secs(s.interval_secs),
            timeout: Duration::from_secs(s.timeout_secs),
            retries: s.retries,
            retry_base: Duration::from_millis(s.retry_base_ms),
            retry_max: Duration::from_secs(s.retry_max_secs),
            queue: s.queue,
            concurrency: s.concurrency,
        }
    }
}

impl From<&KeySettings> for KeyRules {
    fn from(s: &KeySettings) -> Self {
        KeyRules { low_water: s.one_time_keys_low, fetch_burst: s.fetch_burst, fetch_per_minute: s.fetch_per_minute }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The services' own defaults (their unit tests run with them) and the
    /// file's must not drift apart.
    #[test]
    fn the_tables_defaults_are_the_services_defaults() {
        let presence = PresenceConfig::from(&PresenceSettings::default());
        assert_eq!(format!("{presence:?}"), format!("{:?}", PresenceConfig::default()));
        let typing = TypingConfig::from(&TypingSettings::default());
        assert_eq!(format!("{typing:?}"), format!("{:?}", TypingConfig::default()));
        let push = PushConfig::from(&PushSettings::default());
        assert_eq!(format!("{push:?}"), format!("{:?}", PushConfig::default()));
    }

    #[test]
    fn units_are_converted() {
        let s = PushSettings { retry_base_ms: 50, retry_max_secs: 2, ..PushSettings::default() };
        let c = PushConfig::from(&s);
        assert_eq!((c.retry_base, c.retry_max), (Duration::from_millis(50), Duration::from_secs(2)));
        let p = PresenceConfig::from(&PresenceSettings { grace_ms: 250, ..PresenceSettings::default() });
        assert_eq!(p.grace, Duration::from_millis(250));
        let k = KeyRules::from(&KeySettings { one_time_keys_low: 3, ..KeySettings::default() });
        assert_eq!(k.low_water, 3);
    }
}
