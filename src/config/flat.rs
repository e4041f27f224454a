//! The flat keys of the previous release (`delivery_window = 64` at the
//! top of the file), each moved to its table before the file is read, and
//! reported so the operator is told the new name. Read for one release;
//! then this file goes.

use std::fmt;

use super::ConfigError;

/// Old flat key, its table now, its name there.
const MOVED: [(&str, &str, &str); 51] = [
    ("max_connections", "net", "max_connections"),
    ("handshake_timeout_secs", "net", "handshake_timeout_secs"),
    ("keepalive_min_secs", "net", "keepalive_min_secs"),
    ("keepalive_max_secs", "net", "keepalive_max_secs"),
    ("keepalive_default_secs", "net", "keepalive_default_secs"),
    ("delivery_window", "net", "delivery_window"),
    ("max_pending_sends", "net", "max_pending_sends"),
    ("shutdown_grace_secs", "net", "shutdown_grace_secs"),
    ("tcp_user_timeout_secs", "net", "tcp_user_timeout_secs"),
    ("write_timeout_secs", "net", "write_timeout_secs"),
    ("memory_budget_mb", "net", "memory_budget_mb"),
    ("max_pending_send_bytes", "net", "max_pending_send_bytes"),
    ("max_queued_send_bytes", "net", "max_queued_send_bytes"),
    ("partial_frame_timeout_secs", "net", "partial_frame_timeout_secs"),
    ("max_handshakes", "net", "max_handshakes"),
    ("handshake_rate_per_source", "net", "handshake_rate_per_source"),
    ("handshake_burst_per_source", "net", "handshake_burst_per_source"),
    ("handshake_threads", "net", "handshake_threads"),
    ("max_batch", "storage", "max_batch"),
    ("storage_queue", "storage", "queue"),
    ("sync_writes", "storage", "sync_writes"),
    ("storage_reserve_mb", "storage", "reserve_mb"),
    ("storage_full_wait_secs", "storage", "full_wait_secs"),
    ("registration", "accounts", "registration"),
    ("message_ttl_secs", "messages", "ttl_secs"),
    ("expiry_sweep_secs", "messages", "expiry_sweep_secs"),
    ("max_group_members", "groups", "max_members"),
    ("fanout_batch", "groups", "fanout_batch"),
    ("fanout_concurrency", "groups", "fanout_concurrency"),
    ("fanout_step_delay_ms", "groups", "fanout_step_delay_ms"),
    ("group_receipt_flush_ms", "groups", "receipt_flush_ms"),
    ("presence_max_subscriptions", "presence", "max_subscriptions"),
    ("presence_grace_ms", "presence", "grace_ms"),
    ("last_seen_granularity_secs", "presence", "last_seen_granularity_secs"),
    ("typing_per_minute", "typing", "per_minute"),
    ("typing_burst", "typing", "burst"),
    ("push_gateway_url", "push", "gateway_url"),
    ("push_apns_app_id", "push", "apns_app_id"),
    ("push_fcm_app_id", "push", "fcm_app_id"),
    ("push_unifiedpush", "push", "unifiedpush"),
    ("push_allow_private_endpoints", "push", "allow_private_endpoints"),
    ("push_interval_secs", "push", "interval_secs"),
    ("push_timeout_secs", "push", "timeout_secs"),
    ("push_retries", "push", "retries"),
    ("push_retry_base_ms", "push", "retry_base_ms"),
    ("push_retry_max_secs", "push", "retry_max_secs"),
    ("push_queue", "push", "queue"),
    ("push_concurrency", "push", "concurrency"),
    ("one_time_keys_low", "keys", "one_time_keys_low"),
    ("keys_fetch_burst", "keys", "fetch_burst"),
    ("keys_fetch_per_minute", "keys", "fetch_per_minute"),
];

/// A flat key that was read and moved to its table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deprecated {
    /// The flat key as the file gave it.
    pub old: &'static str,
    /// Its table now.
    pub table: &'static str,
    /// Its name in that table.
    pub key: &'static str,
}

impl fmt::Display for Deprecated {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "config: `{}` is deprecated; use `[{}] {}`", self.old, self.table, self.key)
    }
}

/// Moves every flat key of `doc` into its table, in the order of the
/// tables. A key given both ways is refused: which one was meant cannot
/// be known.
pub(super) fn lift(doc: &mut toml::Table) -> Result<Vec<Deprecated>, ConfigError> {
    let mut moved = Vec::new();
    for (old, table, key) in MOVED {
        if !doc.contains_key(old) {
            continue;
        }
        let section = doc.entry(table).or_insert_with(|| toml::Value::Table(toml::Table::new()));
        // Not a table: leave both where they are for the schema to refuse
        // `[table]` by its name.
        let Some(section) = section.as_table_mut() else { continue };
        if section.contains_key(key) {
            return Err(ConfigError::BothWays { old, new: format!("[{table}] {key}") });
        }
        let value = doc.remove(old).expect("checked above");
        doc[table].as_table_mut().expect("a table, checked above").insert(key.to_string(), value);
        moved.push(Deprecated { old, table, key });
    }
    Ok(moved)
}

/// Every flat key and where it went (tests).
#[cfg(test)]
pub(super) fn all() -> impl Iterator<Item = Deprecated> {
    MOVED.into_iter().map(|(old, table, key)| Deprecated { old, table, key })
}
