//! The Prometheus endpoint: every metric the server exports, with its
//! help text and its histogram buckets.
//!
//! The metrics themselves are recorded where things happen (`counter!`,
//! `gauge!`, `histogram!` at each site); this file is the one list of
//! their names, which the dashboard and the alert rules in `deploy/`
//! depend on. A test keeps the list and the recording sites in step, and
//! `tests/monitoring.rs` checks every name the dashboard and rules use
//! against a running server. Imports nothing of the server.

use std::net::SocketAddr;

use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder};

/// What a metric is, for its `# TYPE` and whether it starts at zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// Counts since start; exported at 0 before the first event, so
    /// `increase()` sees that event too.
    Counter,
    /// Counts, with labels whose values appear with their first event.
    LabeledCounter,
    /// A level, set where it is measured.
    Gauge,
    /// A distribution, exported with the buckets below.
    Histogram,
}

use Kind::*;

/// Every metric: name, kind, help, and whether only cluster nodes export
/// it (a single node must not show an etcd that is "down").
const METRICS: &[(&str, Kind, &str, bool)] = &[
    // Connections and handshakes.
    ("pipit_connections", Gauge, "Client connections open (handshaking or logged in).", false),
    ("pipit_online_devices", Gauge, "Devices with a logged-in connection.", false),
    ("pipit_connections_accepted_total", Counter, "TCP connections accepted by the chat listeners.", false),
    ("pipit_connections_refused_total", LabeledCounter, "Connections refused before any cryptography, by reason (max_connections, busy: the source holds its share of the handshakes in progress, throttled: the source's rate).", false),
    ("pipit_handshakes_in_progress", Gauge, "Handshakes between accept and login.", false),
    ("pipit_handshakes_total", LabeledCounter, "Handshakes finished, by Noise pattern and result.", false),
    ("pipit_handshake_seconds", Histogram, "Time from accept to the end of the handshake.", false),
    ("pipit_retired_key_logins_total", Counter, "Logins that used a retired server key (rotation in progress).", false),
    ("pipit_login_lookups_found_total", Counter, "Logins without an account id found on another node and redirected there.", true),
    ("pipit_protocol_violations_total", LabeledCounter, "Connections closed for breaking the protocol, by stage (handshake, session).", false),
    ("pipit_partial_frame_timeouts_total", Counter, "Connections closed for a frame that did not complete in time.", false),
    ("pipit_write_timeouts_total", Counter, "Connections dropped because their socket accepted no bytes for write_timeout_secs.", false),
    // Traffic.
    ("pipit_frames_in_total", Counter, "Frames received from clients.", false),
    ("pipit_frames_out_total", Counter, "Frames sent to clients.", false),
    ("pipit_received_bytes_total", Counter, "Bytes received from clients, handshakes included.", false),
    ("pipit_transmitted_bytes_total", Counter, "Bytes sent to clients.", false),
    // Messages.
    ("pipit_messages_stored_total", Counter, "Messages made durable (new sends, not retries).", false),
    ("pipit_messages_sent_total", Counter, "Sends answered \"sent\" (retries included).", false),
    ("pipit_messages_delivered_total", Counter, "Messages handed to a device's connection.", false),
    ("pipit_messages_deduplicated_total", Counter, "Retried sends answered from their dedup record, not stored again.", false),
    ("pipit_messages_id_reused_total", Counter, "Sends refused for reusing a message id with other content.", false),
    ("pipit_messages_expired_total", Counter, "Undelivered messages expired after message_ttl_secs.", false),
    ("pipit_undeliverable_total", Counter, "Inbox entries skipped because they could not be encoded for delivery.", false),
    ("pipit_inbox_acked_total", Counter, "Inbox entries deleted on a device's ack.", false),
    ("pipit_inbox_entries", Gauge, "Inbox entries waiting for devices (an estimate).", false),
    ("pipit_send_durable_seconds", Histogram, "Time from a send's arrival to its \"sent\" (durable).", false),
    ("pipit_sends_refused_total", LabeledCounter, "Sends refused with UNAVAILABLE (the client retries), by reason (storage_queue, storage_low, storage_full, stopping).", false),
    // Storage and group commit.
    ("pipit_storage_queue", Gauge, "Operations waiting for the storage writer.", false),
    ("pipit_writer_backpressure_total", Counter, "Acks or receipts that found the writer's queue full (the connection stops reading until it fits).", false),
    ("pipit_group_commit_ops", Histogram, "Operations per group commit (one synced write).", false),
    ("pipit_group_commit_seconds", Histogram, "Time to write and sync one group commit.", false),
    ("pipit_storage_errors_total", Counter, "Operations or commits that failed in storage.", false),
    ("pipit_storage_free_bytes", Gauge, "Free space on the data directory's file system.", false),
    ("pipit_storage_low", Gauge, "1 while free space is below storage_reserve_mb (new sends are refused).", false),
    ("pipit_storage_full", Gauge, "1 while the disk is full (commits wait for room).", false),
    // Memory.
    ("pipit_memory_budget_limit_bytes", Gauge, "The memory budget for what peers make the server hold.", false),
    ("pipit_memory_budget_used_bytes", Gauge, "Bytes held against the memory budget.", false),
    ("pipit_memory_budget_hits_total", LabeledCounter, "Times a budget was exhausted, by budget and what was held back.", false),
    // Groups and fan-out.
    ("pipit_group_sends_total", Counter, "Group messages stored (each fanned out afterwards).", false),
    ("pipit_group_changes_total", Counter, "Group membership changes committed.", false),
    ("pipit_fanout_entries_total", Counter, "Inbox references written by the fan-out.", false),
    ("pipit_fanout_jobs_total", Counter, "Fan-out jobs finished.", false),
    ("pipit_fanout_backlog_jobs", Gauge, "Group messages not yet fanned out to every member.", false),
    ("pipit_fanout_backlog_members", Gauge, "Member accounts the fan-out still has to reach.", false),
    ("pipit_fanout_lag_seconds", Histogram, "Time from a group message's \"sent\" to its last inbox entry.", false),
    // Presence and typing.
    ("pipit_presence_subscriptions", Gauge, "Accounts watched by connections, summed.", false),
    ("pipit_presence_updates_total", Counter, "Presence updates sent to watchers.", false),
    ("pipit_presence_dropped_total", Counter, "Presence updates a full mailbox slot replaced or dropped.", false),
    ("pipit_last_seen_written_total", Counter, "Last-seen times written.", false),
    ("pipit_last_seen_dropped_total", Counter, "Last-seen writes the writer had no room for.", false),
    ("pipit_typing_relayed_total", Counter, "Typing notices relayed.", false),
    ("pipit_typing_dropped_total", LabeledCounter, "Typing notices dropped, by reason (rate, offline, invalid).", false),
    // Push.
    ("pipit_push_queue", Gauge, "Push wake-ups waiting or in progress.", false),
    ("pipit_push_sent_total", Counter, "Push wake-ups the gateway accepted.", false),
    ("pipit_push_failed_total", LabeledCounter, "Push wake-ups that failed for good, by reason.", false),
    ("pipit_push_retries_total", LabeledCounter, "Push requests retried, by reason.", false),
    ("pipit_push_coalesced_total", Counter, "Wake-ups folded into one already due for the device.", false),
    ("pipit_push_dropped_total", LabeledCounter, "Wake-ups dropped, by reason (queue_full); the message is kept.", false),
    ("pipit_push_skipped_total", LabeledCounter, "Wake-ups not sent, by reason (online: the device connected meanwhile).", false),
    // End-to-end key directory.
    ("pipit_keys_uploaded_total", Counter, "One-time prekeys uploaded.", false),
    ("pipit_keys_handed_out_total", Counter, "One-time prekeys handed out (each once).", false),
    ("pipit_keys_fallback_total", Counter, "Key bundles answered with the signed prekey alone (no one-time prekey left).", false),
    ("pipit_keys_fetch_rate_limited_total", Counter, "Key fetches refused with RATE_LIMITED.", false),
    // Cluster.
    ("pipit_cluster_epoch", Gauge, "Version of the node list in etcd.", true),
    ("pipit_cluster_nodes", Gauge, "Nodes in the node list.", true),
    ("pipit_cluster_nodes_alive", Gauge, "Nodes in the list holding their lease.", true),
    ("pipit_cluster_etcd_up", Gauge, "1 while this node reaches etcd.", true),
    ("pipit_cluster_etcd_errors_total", Counter, "Failed etcd requests.", true),
    ("pipit_node_link_up", Gauge, "1 while the link to a peer node is up.", true),
    ("pipit_node_link_rtt_seconds", Gauge, "Round trip of the last ping on a node link.", true),
    ("pipit_node_link_queue", Gauge, "Messages waiting on this node for a peer node.", true),
    ("pipit_node_link_connects_total", LabeledCounter, "Node links established, per peer.", true),
    ("pipit_node_link_forwarded_total", LabeledCounter, "Messages forwarded over a node link and acknowledged, per peer.", true),
    ("pipit_node_link_received_bytes_total", LabeledCounter, "Bytes received on a node link, per peer.", true),
    ("pipit_node_link_transmitted_bytes_total", LabeledCounter, "Bytes sent on a node link, per peer.", true),
    ("pipit_node_link_refused_total", Counter, "Node link handshakes refused (a key not in the node list).", true),
    ("pipit_forwards_applied_total", Counter, "Forwarded messages stored on this node, their owner.", true),
    ("pipit_forwards_deduplicated_total", Counter, "Forwarded messages received again and dropped as repeats.", true),
    ("pipit_forwards_dropped_total", Counter, "Forwarded messages for accounts that do not exist here.", true),
    ("pipit_forward_queue_full_total", Counter, "Sends refused because outbound_max messages already wait for their node.", true),
];

/// One series' labels.
type LabelSet = &'static [(&'static str, &'static str)];

/// Label values known in advance, exported at 0 from the start like the
/// counters without labels: the refusal and failure reasons that alerts
/// and the dashboard's "by reason" panels sum over.
const KNOWN_LABELS: &[(&str, &[LabelSet])] = &[
    (
        "pipit_connections_refused_total",
        &[&[("reason", "max_connections")], &[("reason", "busy")], &[("reason", "throttled")]],
    ),
    ("pipit_protocol_violations_total", &[&[("stage", "handshake")], &[("stage", "session")]]),
    (
        "pipit_sends_refused_total",
        &[
            &[("reason", "storage_queue")],
            &[("reason", "storage_low")],
            &[("reason", "storage_full")],
            &[("reason", "stopping")],
        ],
    ),
    (
        "pipit_memory_budget_hits_total",
        &[
            &[("budget", "memory"), ("what", "read")],
            &[("budget", "memory"), ("what", "mailbox")],
            &[("budget", "storage_queue"), ("what", "read")],
        ],
    ),
    ("pipit_typing_dropped_total", &[&[("reason", "rate")], &[("reason", "offline")], &[("reason", "invalid")]]),
    ("pipit_push_failed_total", &[&[("reason", "refused")], &[("reason", "token_gone")], &[("reason", "gave_up")]]),
    ("pipit_push_dropped_total", &[&[("reason", "queue_full")]]),
    (
        "pipit_push_retries_total",
        &[&[("reason", "timeout")], &[("reason", "connection")], &[("reason", "busy")], &[("reason", "server_error")]],
    ),
    ("pipit_push_skipped_total", &[&[("reason", "online")]]),
];

/// Gauges set only when their state changes: 0 until then, or a healthy
/// server would not export them at all (and "low == 0" would match
/// nothing).
const ZERO_GAUGES: &[&str] = &["pipit_storage_low", "pipit_storage_full"];

/// Latency buckets (seconds): sub-millisecond syncs up to a fan-out that
/// takes minutes.
const SECONDS_BUCKETS: &[f64] =
    &[0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0];

/// Operations per group commit, up to the largest `max_batch`.
const BATCH_BUCKETS: &[f64] = &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0];

/// Serves `/metrics` on `addr` and declares every metric. Histograms get
/// buckets (not the exporter's default summaries) so that quantiles can
/// be taken over any window and summed across nodes.
pub fn serve(addr: SocketAddr, clustered: bool) -> Result<(), BuildError> {
    PrometheusBuilder::new()
        .with_http_listener(addr)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)?
        .set_buckets_for_metric(Matcher::Full("pipit_group_commit_ops".into()), BATCH_BUCKETS)?
        .install()?;
    declare(clustered);
    Ok(())
}

/// Help texts for every metric, and a zero for each counter without
/// labels (Prometheus sees no increase in a counter that first appears
/// at 1).
fn declare(clustered: bool) {
    for &(name, kind, help, cluster_only) in METRICS {
        if cluster_only && !clustered {
            continue;
        }
        match kind {
            Counter => {
                metrics::describe_counter!(name, help);
                metrics::counter!(name).increment(0);
            }
            LabeledCounter => {
                metrics::describe_counter!(name, help);
                for (_, sets) in KNOWN_LABELS.iter().filter(|(n, _)| *n == name) {
                    for set in *sets {
                        let labels: Vec<metrics::Label> = set.iter().map(|&(k, v)| metrics::Label::new(k, v)).collect();
                        metrics::counter!(name, labels).increment(0);
                    }
                }
            }
            Gauge => {
                metrics::describe_gauge!(name, help);
                if ZERO_GAUGES.contains(&name) {
                    metrics::gauge!(name).set(0.0);
                }
            }
            Histogram => metrics::describe_histogram!(name, help),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;
    use std::path::Path;

    /// Every `counter!("name"`, `gauge!(...)`, `histogram!(...)` under `src/`.
    fn recorded(dir: &Path, out: &mut BTreeMap<String, Kind>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                recorded(&path, out);
                continue;
            }
            if path.extension().is_none_or(|e| e != "rs") || path.ends_with("telemetry.rs") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            for (mac, kind) in [("counter!(", Counter), ("gauge!(", Gauge), ("histogram!(", Histogram)] {
                for (i, _) in text.match_indices(mac) {
                    let rest = text[i + mac.len()..].trim_start();
                    let Some(rest) = rest.strip_prefix('"') else { continue };
                    let name = &rest[..rest.find('"').unwrap()];
                    let labeled = rest[name.len() + 1..].trim_start().starts_with(',');
                    let kind = if kind == Counter && labeled { LabeledCounter } else { kind };
                    if let Some(old) = out.insert(name.to_string(), kind) {
                        assert_eq!(old, kind, "{name} is recorded with and without labels (or as two kinds)");
                    }
                }
            }
        }
    }

    #[test]
    fn the_list_names_exactly_what_the_server_records() {
        let mut sites = BTreeMap::new();
        recorded(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut sites);
        let listed: BTreeMap<String, Kind> = METRICS.iter().map(|&(n, k, _, _)| (n.to_string(), k)).collect();
        let missing: Vec<_> = sites.iter().filter(|(n, k)| listed.get(*n) != Some(k)).collect();
        let stale: Vec<_> = listed.iter().filter(|(n, _)| !sites.contains_key(*n)).collect();
        assert!(missing.is_empty(), "recorded but not listed in METRICS (or listed as another kind): {missing:?}");
        assert!(stale.is_empty(), "listed in METRICS but recorded nowhere: {stale:?}");
    }

    #[test]
    fn known_labels_belong_to_labeled_counters() {
        for (name, _) in KNOWN_LABELS {
            assert!(METRICS.iter().any(|&(n, k, _, _)| n == *name && k == LabeledCounter), "{name}");
        }
        for name in ZERO_GAUGES {
            assert!(METRICS.iter().any(|&(n, k, _, _)| n == *name && k == Gauge), "{name}");
        }
    }

    #[test]
    fn names_follow_prometheus_conventions() {
        for &(name, kind, help, _) in METRICS {
            assert!(name.starts_with("pipit_") && name.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'), "{name}");
            let counter = matches!(kind, Counter | LabeledCounter);
            assert_eq!(counter, name.ends_with("_total"), "{name}: counters, and only counters, end in _total");
            let base = name.trim_end_matches("_total");
            for unit in ["_ms", "_millis", "_milliseconds", "_secs", "_mb", "_kb", "_mib", "_kib"] {
                assert!(!base.ends_with(unit), "{name}: use base units (_seconds, _bytes)");
            }
            // A unit, when there is one, comes last (before _total).
            for unit in ["_bytes_", "_seconds_"] {
                assert!(!base.contains(unit), "{name}: the unit goes at the end");
            }
            assert!(!help.is_empty() && help.ends_with('.'), "{name}: help is a sentence");
        }
    }
}
