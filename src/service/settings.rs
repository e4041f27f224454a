//! The service layer's tables of the configuration file: `[accounts]`,
//! `[messages]`, `[groups]`, `[presence]`, `[typing]`, `[push]` and
//! `[keys]`, one per concern.
//!
//! Each is kept in the operator's units and checked here. This file is a
//! leaf that imports nothing of the server, so any service may read a
//! table (and [`Registration`], a setting and a rule at once) without an
//! import circle; `configure` turns the tables into the settings each
//! service runs with.

use std::time::Duration;

use pipit_protocol::limits;
use serde::{Deserialize, Serialize};

/// Who may create an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone whose device completes a handshake.
    #[default]
    Open,
    /// Only with an invite code issued by `pipit admin invite`.
    Invite,
}

/// The `[accounts]` table.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AccountSettings {
    /// Registration policy: `open`, or `invite` for codes from
    /// `pipit admin invite`.
    pub registration: Registration,
}

/// The `[messages]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MessageSettings {
    /// Seconds an undelivered message waits before it expires (30 days).
    pub ttl_secs: u64,
    /// Seconds between expiry sweeps.
    pub expiry_sweep_secs: u64,
}

impl Default for MessageSettings {
    fn default() -> Self {
        Self { ttl_secs: 30 * 86_400, expiry_sweep_secs: 3_600 }
    }
}

impl MessageSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.ttl_secs == 0 || self.expiry_sweep_secs == 0 {
            return Err("[messages] ttl_secs and expiry_sweep_secs must be positive".into());
        }
        Ok(())
    }

    /// Time between expiry sweeps.
    pub fn expiry_sweep(&self) -> Duration {
        Duration::from_secs(self.expiry_sweep_secs)
    }
}

/// The `[groups]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GroupSettings {
    /// Most member accounts of one group (at most the protocol's 1,024).
    pub max_members: usize,
    /// Member accounts one fan-out step walks (each account has up to 16
    /// devices, so a step writes at most 16 times this many entries).
    pub fanout_batch: usize,
    /// Groups fanned out at the same time.
    pub fanout_concurrency: usize,
    /// Milliseconds the fan-out pauses between rounds of steps. A tuning
    /// and test knob: 0 runs it flat out.
    pub fanout_step_delay_ms: u64,
    /// Milliseconds between flushes of group receipt counts to senders.
    pub receipt_flush_ms: u64,
}

impl Default for GroupSettings {
    fn default() -> Self {
        Self {
            max_members: limits::MAX_GROUP_MEMBERS,
            fanout_batch: 128,
            fanout_concurrency: 16,
            fanout_step_delay_ms: 0,
            receipt_flush_ms: 1_000,
        }
    }
}

impl GroupSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: &str| Err(format!("[groups] {m}"));
        if self.max_members == 0 || self.max_members > limits::MAX_GROUP_MEMBERS {
            return bad("max_members must be between 1 and 1024");
        }
        if self.fanout_batch == 0 || self.fanout_batch > 4_096 {
            return bad("fanout_batch must be between 1 and 4096");
        }
        if self.fanout_concurrency == 0 || self.fanout_concurrency > 1_024 {
            return bad("fanout_concurrency must be between 1 and 1024");
        }
        if self.receipt_flush_ms < 10 {
            return bad("receipt_flush_ms must be at least 10");
        }
        Ok(())
    }

    /// The fan-out's pause between rounds.
    pub fn fanout_step_delay(&self) -> Duration {
        Duration::from_millis(self.fanout_step_delay_ms)
    }

    /// Time between flushes of group receipt counts.
    pub fn receipt_flush(&self) -> Duration {
        Duration::from_millis(self.receipt_flush_ms)
    }
}

/// The `[presence]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PresenceSettings {
    /// Most accounts one connection may watch for presence (at most 256,
    /// the protocol's limit).
    pub max_subscriptions: usize,
    /// Milliseconds an account stays online for its watchers after its
    /// last connection ended, so a reconnect on a flaky link does not
    /// flap.
    pub grace_ms: u64,
    /// Seconds between two durable writes of one account's last seen.
    pub last_seen_granularity_secs: u64,
}

impl Default for PresenceSettings {
    fn default() -> Self {
        Self { max_subscriptions: limits::MAX_PRESENCE_SUBSCRIPTIONS, grace_ms: 5_000, last_seen_granularity_secs: 60 }
    }
}

impl PresenceSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_subscriptions == 0 || self.max_subscriptions > limits::MAX_PRESENCE_SUBSCRIPTIONS {
            return Err("[presence] max_subscriptions must be between 1 and 256".into());
        }
        if self.last_seen_granularity_secs == 0 {
            return Err("[presence] last_seen_granularity_secs must be positive".into());
        }
        Ok(())
    }
}

/// The `[typing]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TypingSettings {
    /// Typing notices one connection may send per minute, sustained.
    pub per_minute: u32,
    /// Typing notices one connection may send at once after a pause.
    pub burst: u32,
}

impl Default for TypingSettings {
    fn default() -> Self {
        Self { per_minute: 60, burst: 5 }
    }
}

impl TypingSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.per_minute == 0 || self.burst == 0 {
            return Err("[typing] per_minute and burst must be positive".into());
        }
        Ok(())
    }
}

/// The `[push]` table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PushSettings {
    /// The Matrix push gateway's notify URL (sygnal:
    /// `https://HOST/_matrix/push/v1/notify`) for APNs and FCM tokens;
    /// empty: none.
    pub gateway_url: String,
    /// The app id the gateway knows the iOS app by; empty: APNs tokens
    /// are refused.
    pub apns_app_id: String,
    /// The app id the gateway knows the Android app by; empty: FCM tokens
    /// are refused.
    pub fcm_app_id: String,
    /// Accept UnifiedPush endpoints from devices.
    pub unifiedpush: bool,
    /// Let UnifiedPush endpoints name loopback, private and link-local
    /// addresses.
    pub allow_private_endpoints: bool,
    /// At most one wake-up per device per this many seconds.
    pub interval_secs: u64,
    /// Seconds one gateway request may take.
    pub timeout_secs: u64,
    /// Retries after a 5xx, 429 or connection error.
    pub retries: u32,
    /// Milliseconds before the first retry; doubled for each next one.
    pub retry_base_ms: u64,
    /// Longest wait between retries, seconds.
    pub retry_max_secs: u64,
    /// Wake-ups waiting or in progress, at most; more are dropped.
    pub queue: usize,
    /// Gateway requests in flight at once, at most.
    pub concurrency: usize,
}

impl Default for PushSettings {
    fn default() -> Self {
        Self {
            gateway_url: String::new(),
            apns_app_id: String::new(),
            fcm_app_id: String::new(),
            unifiedpush: false,
            allow_private_endpoints: false,
            interval_secs: 60,
            timeout_secs: 10,
            retries: 4,
            retry_base_ms: 1_000,
            retry_max_secs: 60,
            queue: 10_000,
            concurrency: 64,
        }
    }
}

impl PushSettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: &str| Err(format!("[push] {m}"));
        if !self.gateway_url.is_empty() {
            let ok = reqwest::Url::parse(&self.gateway_url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return bad("gateway_url must be an http or https URL");
            }
            if self.apns_app_id.is_empty() && self.fcm_app_id.is_empty() {
                return bad("gateway_url needs apns_app_id or fcm_app_id (the app ids the gateway knows)");
            }
        }
        if self.interval_secs == 0 || self.timeout_secs == 0 {
            return bad("interval_secs and timeout_secs must be positive");
        }
        if self.queue == 0 || self.concurrency == 0 {
            return bad("queue and concurrency must be positive");
        }
        Ok(())
    }
}

/// The `[keys]` table: the end-to-end key directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KeySettings {
    /// A device whose stock of one-time prekeys falls below this is told.
    pub one_time_keys_low: u32,
    /// Key bundles one account may fetch at once.
    pub fetch_burst: u32,
    /// Key bundles one account may fetch per minute after its burst.
    pub fetch_per_minute: u32,
}

impl Default for KeySettings {
    fn default() -> Self {
        Self { one_time_keys_low: 16, fetch_burst: 2_048, fetch_per_minute: 600 }
    }
}

impl KeySettings {
    /// Checks ranges that serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        if self.one_time_keys_low as usize > limits::MAX_ONE_TIME_PREKEYS {
            return Err("[keys] one_time_keys_low must be at most 200 (the most a device holds)".into());
        }
        if self.fetch_burst == 0 || self.fetch_per_minute == 0 {
            return Err("[keys] fetch_burst and fetch_per_minute must be positive".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_table_names_its_own_key_when_out_of_range() {
        let cases: [(Result<(), String>, &str); 6] = [
            (MessageSettings { ttl_secs: 0, ..Default::default() }.validate(), "[messages] ttl_secs"),
            (GroupSettings { receipt_flush_ms: 1, ..Default::default() }.validate(), "[groups] receipt_flush_ms"),
            (PresenceSettings { max_subscriptions: 257, ..Default::default() }.validate(), "[presence] max_sub"),
            (TypingSettings { burst: 0, ..Default::default() }.validate(), "[typing]"),
            (PushSettings { gateway_url: "ftp://x".into(), ..Default::default() }.validate(), "[push] gateway_url"),
            (KeySettings { one_time_keys_low: 201, ..Default::default() }.validate(), "[keys] one_time_keys_low"),
        ];
        for (got, want) in cases {
            let err = got.unwrap_err();
            assert!(err.starts_with(want), "{err} (wanted {want})");
        }
    }
}
