//! Server configuration: a TOML file, overridable by command-line flags,
//! with defaults that start a working server with nothing else installed.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// Who may create an account.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Registration {
    /// Anyone whose device completes a handshake.
    #[default]
    Open,
    /// Only with an invite code issued by `pipit admin invite`.
    Invite,
}

/// Everything `pipit serve` can be told.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Address the chat protocol listens on.
    pub listen: SocketAddr,
    /// Where RocksDB, the server key and the admin socket live.
    pub data_dir: PathBuf,
    /// Shards (threads, each with its own listener); 0 = one per core.
    pub shards: usize,
    /// Prometheus metrics address; unset: no metrics endpoint.
    pub metrics_listen: Option<SocketAddr>,
    /// Registration policy.
    pub registration: Registration,
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// Seconds a handshake may take.
    pub handshake_timeout_secs: u64,
    /// Keepalive bounds (seconds) the server grants within.
    pub keepalive_min_secs: u32,
    /// See `keepalive_min_secs`.
    pub keepalive_max_secs: u32,
    /// Interval granted to clients that propose none.
    pub keepalive_default_secs: u32,
    /// Unacknowledged deliveries per connection (the 2G backpressure).
    pub delivery_window: u32,
    /// Sends a connection may have waiting for durability before the
    /// server stops reading from it.
    pub max_pending_sends: usize,
    /// Seconds an undelivered message waits before it expires (30 days).
    pub message_ttl_secs: u64,
    /// Seconds between expiry sweeps.
    pub expiry_sweep_secs: u64,
    /// Most operations in one group commit.
    pub max_batch: usize,
    /// Seconds SIGTERM waits for connections to drain.
    pub shutdown_grace_secs: u64,
    /// Seconds TCP_USER_TIMEOUT allows unacknowledged data to linger.
    pub tcp_user_timeout_secs: u64,
    /// Seconds a write to a client may make no progress before the server
    /// drops it (a peer that stopped reading).
    pub write_timeout_secs: u64,
    /// Operations that may wait for the storage writer. When it is full,
    /// sends are refused with `UNAVAILABLE` (the client retries) and
    /// connections stop reading until acks and receipts fit.
    pub storage_queue: usize,
    /// Fsync every commit (never disable outside benchmarks of the rest).
    pub sync_writes: bool,
    /// Most member accounts of one group (at most the protocol's 1,024).
    pub max_group_members: usize,
    /// Member accounts one fan-out step walks (each account has up to 16
    /// devices, so a step writes at most 16 times this many entries).
    pub fanout_batch: usize,
    /// Groups fanned out at the same time.
    pub fanout_concurrency: usize,
    /// Milliseconds the fan-out pauses between rounds of steps. A tuning
    /// and test knob: 0 runs it flat out.
    pub fanout_step_delay_ms: u64,
    /// Milliseconds between flushes of group receipt counts to senders.
    pub group_receipt_flush_ms: u64,
    /// Most accounts one connection may watch for presence (at most 256,
    /// the protocol's limit).
    pub presence_max_subscriptions: usize,
    /// Milliseconds an account stays online for its watchers after its
    /// last connection ended, so a reconnect on a flaky link does not
    /// flap.
    pub presence_grace_ms: u64,
    /// Seconds between two durable writes of one account's last seen.
    pub last_seen_granularity_secs: u64,
    /// Typing notices one connection may send per minute, sustained.
    pub typing_per_minute: u32,
    /// Typing notices one connection may send at once after a pause.
    pub typing_burst: u32,
    /// The Matrix push gateway's notify URL (sygnal:
    /// `https://HOST/_matrix/push/v1/notify`) for APNs and FCM tokens;
    /// empty: none.
    pub push_gateway_url: String,
    /// The app id the gateway knows the iOS app by; empty: APNs tokens
    /// are refused.
    pub push_apns_app_id: String,
    /// The app id the gateway knows the Android app by; empty: FCM tokens
    /// are refused.
    pub push_fcm_app_id: String,
    /// Accept UnifiedPush endpoints from devices.
    pub push_unifiedpush: bool,
    /// Let UnifiedPush endpoints name loopback, private and link-local
    /// addresses.
    pub push_allow_private_endpoints: bool,
    /// At most one wake-up per device per this many seconds.
    pub push_interval_secs: u64,
    /// Seconds one gateway request may take.
    pub push_timeout_secs: u64,
    /// Retries after a 5xx, 429 or connection error.
    pub push_retries: u32,
    /// Milliseconds before the first retry; doubled for each next one.
    pub push_retry_base_ms: u64,
    /// Longest wait between retries, seconds.
    pub push_retry_max_secs: u64,
    /// Wake-ups waiting or in progress, at most; more are dropped.
    pub push_queue: usize,
    /// Gateway requests in flight at once, at most.
    pub push_concurrency: usize,
    /// Memory budget in MiB for what peers make the server hold in
    /// transient buffers (read buffers and partial frames, sends waiting
    /// for storage, outbound buffers, mailboxes); 0 = an eighth of the
    /// machine's memory. Over it, the heaviest connections stop reading.
    pub memory_budget_mb: u64,
    /// Bytes of sends one connection may have waiting for storage before
    /// the server stops reading from it.
    pub max_pending_send_bytes: usize,
    /// Bytes of sends all connections together may have waiting for
    /// storage; over it, connections with more than a frame's worth
    /// waiting stop reading. Every new send waits behind what is queued,
    /// so this bounds the latency a flood of large sends adds for
    /// everyone else.
    pub max_queued_send_bytes: usize,
    /// Seconds a frame may take from its first byte to its last before the
    /// connection is closed.
    pub partial_frame_timeout_secs: u64,
    /// Handshakes in progress at once; more new connections are refused.
    pub max_handshakes: usize,
    /// New connections per second per source address (IPv6: per /64);
    /// 0 = no limit.
    pub handshake_rate_per_source: u32,
    /// New connections a source may open at once before its rate applies.
    pub handshake_burst_per_source: u32,
    /// Threads for handshake cryptography (below the shards' priority);
    /// 0 = one per shard.
    pub handshake_threads: usize,
    /// MiB of free disk below which new sends and registrations are
    /// refused (`UNAVAILABLE`, retry later), so the database never fills
    /// the disk and a restart always has room to open it. At least 64
    /// (RocksDB resumes after a full disk only with a memtable's worth
    /// free); 0 = no reserve.
    pub storage_reserve_mb: u64,
    /// Seconds a commit waits for a full disk to have room again before
    /// the requests in it are answered `UNAVAILABLE` (retry later).
    pub storage_full_wait_secs: u64,
    /// A device whose stock of one-time prekeys falls below this is told.
    pub one_time_keys_low: u32,
    /// Key bundles one account may fetch at once.
    pub keys_fetch_burst: u32,
    /// Key bundles one account may fetch per minute after its burst.
    pub keys_fetch_per_minute: u32,
    /// Several nodes (`[cluster]`); absent: a single node, no etcd.
    pub cluster: Option<ClusterConfig>,
}

/// The `[cluster]` section: this node's place among several, with the
/// node list and liveness kept in etcd.
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// This node's name in the node list: 1 to 64 of `a-z 0-9 - _`, never
    /// reused for another machine's data directory.
    pub node_id: String,
    /// `host:port` that devices redirected to this node connect to (the
    /// chat listener as reachable from outside).
    pub advertise: String,
    /// Address the node links listen on (other nodes only; keep it off
    /// the public network).
    pub link_listen: SocketAddr,
    /// `host:port` other nodes dial for links; empty: `advertise`'s host
    /// with `link_listen`'s port.
    #[serde(default)]
    pub link_advertise: String,
    /// etcd's client URLs (`http://10.0.0.5:2379`).
    pub etcd_endpoints: Vec<String>,
    /// The key prefix under which this cluster keeps its state in etcd;
    /// two clusters sharing one etcd need two prefixes.
    #[serde(default = "default_etcd_prefix")]
    pub etcd_prefix: String,
    /// Seconds of this node's etcd lease: a node that has not renewed it
    /// for this long is down for the others.
    #[serde(default = "default_lease_secs")]
    pub lease_secs: u64,
    /// Seconds to wait for etcd at start before giving up with an error.
    #[serde(default = "default_etcd_timeout_secs")]
    pub etcd_timeout_secs: u64,
    /// Messages that may wait for one other node (down, or its link
    /// slow); past it, sends to its accounts are refused `UNAVAILABLE`
    /// with a retry time, and nothing is lost.
    #[serde(default = "default_outbound_max")]
    pub outbound_max: u64,
}

fn default_outbound_max() -> u64 {
    1_000_000
}

fn default_etcd_prefix() -> String {
    "/pipit".to_string()
}

fn default_lease_secs() -> u64 {
    10
}

fn default_etcd_timeout_secs() -> u64 {
    5
}

impl ClusterConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: String| Err(ConfigError::Invalid(m));
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self.node_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !id_ok {
            return bad(format!("cluster.node_id {:?} must be 1 to 64 of a-z 0-9 - _", self.node_id));
        }
        if self.advertise_host_port().is_none() {
            return bad(format!("cluster.advertise {:?} must be host:port with a port above 0", self.advertise));
        }
        if self.link_address().is_none() {
            return bad(format!(
                "cluster.link_advertise {:?} must be host:port with a port above 0",
                self.link_advertise
            ));
        }
        if self.etcd_endpoints.is_empty() {
            return bad("cluster.etcd_endpoints must name at least one etcd".to_string());
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
            return bad("cluster.etcd_prefix must start with / and not end with /".to_string());
        }
        if !(2..=3_600).contains(&self.lease_secs) {
            return bad("cluster.lease_secs must be between 2 and 3600".to_string());
        }
        if self.outbound_max == 0 {
            return bad("cluster.outbound_max must be positive".to_string());
        }
        if self.etcd_timeout_secs == 0 {
            return bad("cluster.etcd_timeout_secs must be positive".to_string());
        }
        Ok(())
    }

    /// `host:port` other nodes dial for links.
    pub fn link_address(&self) -> Option<String> {
        if self.link_advertise.is_empty() {
            let (host, _) = self.advertise_host_port()?;
            let host = if host.contains(':') { format!("[{host}]") } else { host.to_string() };
            return Some(format!("{host}:{}", self.link_listen.port())).filter(|_| self.link_listen.port() > 0);
        }
        let (host, port) = self.link_advertise.rsplit_once(':')?;
        let port: u16 = port.parse().ok()?;
        (!host.is_empty() && port > 0).then(|| self.link_advertise.clone())
    }

    /// `advertise` split into host and port.
    pub fn advertise_host_port(&self) -> Option<(&str, u16)> {
        let (host, port) = self.advertise.rsplit_once(':')?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port: u16 = port.parse().ok()?;
        (!host.is_empty() && port > 0).then_some((host, port))
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: "0.0.0.0:5222".parse().expect("valid literal"),
            data_dir: PathBuf::from("pipit-data"),
            shards: 0,
            metrics_listen: None,
            registration: Registration::Open,
            max_connections: 1_000_000,
            handshake_timeout_secs: 10,
            keepalive_min_secs: pipit_protocol::limits::MIN_KEEPALIVE_SECS,
            keepalive_max_secs: pipit_protocol::limits::MAX_KEEPALIVE_SECS,
            keepalive_default_secs: pipit_protocol::limits::DEFAULT_KEEPALIVE_SECS,
            delivery_window: 64,
            max_pending_sends: 256,
            message_ttl_secs: 30 * 86_400,
            expiry_sweep_secs: 3_600,
            max_batch: 4_096,
            shutdown_grace_secs: 10,
            tcp_user_timeout_secs: 120,
            write_timeout_secs: 120,
            storage_queue: 65_536,
            sync_writes: true,
            max_group_members: pipit_protocol::limits::MAX_GROUP_MEMBERS,
            fanout_batch: 128,
            fanout_concurrency: 16,
            fanout_step_delay_ms: 0,
            group_receipt_flush_ms: 1_000,
            presence_max_subscriptions: pipit_protocol::limits::MAX_PRESENCE_SUBSCRIPTIONS,
            presence_grace_ms: 5_000,
            last_seen_granularity_secs: 60,
            typing_per_minute: 60,
            typing_burst: 5,
            push_gateway_url: String::new(),
            push_apns_app_id: String::new(),
            push_fcm_app_id: String::new(),
            push_unifiedpush: false,
            push_allow_private_endpoints: false,
            push_interval_secs: 60,
            push_timeout_secs: 10,
            push_retries: 4,
            push_retry_base_ms: 1_000,
            push_retry_max_secs: 60,
            push_queue: 10_000,
            push_concurrency: 64,
            memory_budget_mb: 0,
            max_pending_send_bytes: 1 << 20,
            max_queued_send_bytes: 4 << 20,
            partial_frame_timeout_secs: 30,
            max_handshakes: 4_096,
            handshake_rate_per_source: 100,
            handshake_burst_per_source: 400,
            handshake_threads: 0,
            storage_reserve_mb: 256,
            storage_full_wait_secs: 30,
            one_time_keys_low: 16,
            keys_fetch_burst: 2_048,
            keys_fetch_per_minute: 600,
            cluster: None,
        }
    }
}

/// A configuration that cannot work.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("{path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("{0}")]
    Invalid(String),
}

impl Config {
    /// Reads a TOML file; missing keys take their defaults.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let cfg: Config = toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks ranges that serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let bad = |m: &str| Err(ConfigError::Invalid(m.to_string()));
        if self.keepalive_min_secs == 0 || self.keepalive_min_secs > self.keepalive_max_secs {
            return bad("keepalive_min_secs must be at least 1 and at most keepalive_max_secs");
        }
        if self.delivery_window == 0 || self.delivery_window > 10_000 {
            return bad("delivery_window must be between 1 and 10000");
        }
        if self.max_batch == 0 || self.max_pending_sends == 0 || self.max_connections == 0 {
            return bad("max_batch, max_pending_sends and max_connections must be positive");
        }
        if self.message_ttl_secs == 0 || self.expiry_sweep_secs == 0 {
            return bad("message_ttl_secs and expiry_sweep_secs must be positive");
        }
        if self.handshake_timeout_secs == 0 || self.write_timeout_secs == 0 {
            return bad("handshake_timeout_secs and write_timeout_secs must be positive");
        }
        if self.storage_queue == 0 {
            return bad("storage_queue must be positive");
        }
        if self.max_group_members == 0 || self.max_group_members > pipit_protocol::limits::MAX_GROUP_MEMBERS {
            return bad("max_group_members must be between 1 and 1024");
        }
        if self.fanout_batch == 0 || self.fanout_batch > 4_096 {
            return bad("fanout_batch must be between 1 and 4096");
        }
        if self.fanout_concurrency == 0 || self.fanout_concurrency > 1_024 {
            return bad("fanout_concurrency must be between 1 and 1024");
        }
        if self.group_receipt_flush_ms < 10 {
            return bad("group_receipt_flush_ms must be at least 10");
        }
        let max_subs = pipit_protocol::limits::MAX_PRESENCE_SUBSCRIPTIONS;
        if self.presence_max_subscriptions == 0 || self.presence_max_subscriptions > max_subs {
            return bad("presence_max_subscriptions must be between 1 and 256");
        }
        if self.last_seen_granularity_secs == 0 {
            return bad("last_seen_granularity_secs must be positive");
        }
        if self.typing_per_minute == 0 || self.typing_burst == 0 {
            return bad("typing_per_minute and typing_burst must be positive");
        }
        if !self.push_gateway_url.is_empty() {
            let ok = reqwest::Url::parse(&self.push_gateway_url)
                .is_ok_and(|u| matches!(u.scheme(), "http" | "https") && u.host_str().is_some());
            if !ok {
                return bad("push_gateway_url must be an http or https URL");
            }
            if self.push_apns_app_id.is_empty() && self.push_fcm_app_id.is_empty() {
                return bad(
                    "push_gateway_url needs push_apns_app_id or push_fcm_app_id (the app ids the gateway knows)",
                );
            }
        }
        if self.push_interval_secs == 0 || self.push_timeout_secs == 0 {
            return bad("push_interval_secs and push_timeout_secs must be positive");
        }
        if self.push_queue == 0 || self.push_concurrency == 0 {
            return bad("push_queue and push_concurrency must be positive");
        }
        if self.max_pending_send_bytes < pipit_protocol::limits::MAX_PACKET_LEN
            || self.max_queued_send_bytes < pipit_protocol::limits::MAX_PACKET_LEN
        {
            return bad("max_pending_send_bytes and max_queued_send_bytes must be at least one packet (65519)");
        }
        if self.storage_reserve_mb != 0 && self.storage_reserve_mb < 64 {
            return bad("storage_reserve_mb must be 0 or at least 64 (RocksDB needs 64 MiB free to resume)");
        }
        if self.storage_full_wait_secs == 0 {
            return bad("storage_full_wait_secs must be positive");
        }
        if self.partial_frame_timeout_secs == 0 || self.max_handshakes == 0 {
            return bad("partial_frame_timeout_secs and max_handshakes must be positive");
        }
        if self.one_time_keys_low as usize > pipit_protocol::limits::MAX_ONE_TIME_PREKEYS {
            return bad("one_time_keys_low must be at most 200 (the most a device holds)");
        }
        if self.keys_fetch_burst == 0 || self.keys_fetch_per_minute == 0 {
            return bad("keys_fetch_burst and keys_fetch_per_minute must be positive");
        }
        if let Some(c) = &self.cluster {
            c.validate()?;
        }
        Ok(())
    }

    /// The memory budget in bytes: the configured one, or an eighth of the
    /// machine's memory (at least 64 MiB).
    pub fn memory_budget_bytes(&self) -> usize {
        if self.memory_budget_mb > 0 {
            return (self.memory_budget_mb as usize).saturating_mul(1 << 20);
        }
        let total = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|t| {
                let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
                line.split_whitespace().nth(1)?.parse::<usize>().ok()
            })
            .map_or(4 << 30, |kib| kib.saturating_mul(1024));
        (total / 8).max(64 << 20)
    }

    /// The partial-frame timeout.
    pub fn partial_frame_timeout(&self) -> Duration {
        Duration::from_secs(self.partial_frame_timeout_secs)
    }

    /// Shards to run: the configured number, or one per core.
    pub fn shard_count(&self) -> usize {
        if self.shards > 0 {
            self.shards
        } else {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        }
    }

    /// The handshake timeout.
    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_secs(self.handshake_timeout_secs)
    }

    /// The offline grace period.
    pub fn presence_grace(&self) -> Duration {
        Duration::from_millis(self.presence_grace_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses_and_unknown_keys_are_errors() {
        let cluster: Config = toml::from_str(include_str!("../systemd/pipit-cluster-node.toml")).unwrap();
        cluster.validate().unwrap();
        assert_eq!(cluster.cluster.as_ref().unwrap().link_address().as_deref(), Some("chat1.example.net:5223"));
        let example = include_str!("../systemd/pipit.toml");
        let cfg: Config = toml::from_str(example).unwrap();
        cfg.validate().unwrap();
        assert!(toml::from_str::<Config>("lisen = \"1.2.3.4:5\"").is_err());
        let bad: Config = toml::from_str("delivery_window = 0").unwrap();
        assert!(bad.validate().is_err());
    }

    #[test]
    fn cluster_section_is_checked() {
        let ok: Config = toml::from_str(
            "[cluster]\nnode_id = \"n1\"\nadvertise = \"chat1.example:5222\"\nlink_listen = \"10.0.0.1:5223\"\netcd_endpoints = [\"http://127.0.0.1:2379\"]\n",
        )
        .unwrap();
        ok.validate().unwrap();
        let c = ok.cluster.as_ref().unwrap();
        assert_eq!((c.etcd_prefix.as_str(), c.lease_secs), ("/pipit", 10));
        assert_eq!(c.advertise_host_port(), Some(("chat1.example", 5222)));
        assert_eq!(c.link_address().as_deref(), Some("chat1.example:5223"));
        for bad in [
            "[cluster]\nnode_id = \"N 1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\n",
            "[cluster]\nnode_id = \"n1\"\nadvertise = \"h\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\n",
            "[cluster]\nnode_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = []\n",
            "[cluster]\nnode_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = [\"x\"]\nlease_secs = 1\n",
        ] {
            let cfg: Config = toml::from_str(bad).unwrap();
            assert!(cfg.validate().is_err(), "{bad}");
        }
        assert!(toml::from_str::<Config>(
            "[cluster]\nnode_id = \"n1\"\nadvertise = \"h:1\"\nlink_listen = \"127.0.0.1:2\"\netcd_endpoints = []\nfoo = 1\n"
        )
        .is_err());
    }
}
