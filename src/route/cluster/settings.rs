//! The `[cluster]` table of the configuration file: this node's place
//! among several, with the node list and liveness kept in etcd. Absent:
//! a single node, no etcd.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// The `[cluster]` section: this node's place among several, with the
/// node list and liveness kept in etcd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
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
    /// Checks what serde cannot; the message names the key.
    pub fn validate(&self) -> Result<(), String> {
        let bad = |m: String| Err(format!("[cluster] {m}"));
        let id_ok = !self.node_id.is_empty()
            && self.node_id.len() <= 64
            && self.node_id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
        if !id_ok {
            return bad(format!("node_id {:?} must be 1 to 64 of a-z 0-9 - _", self.node_id));
        }
        if self.advertise_host_port().is_none() {
            return bad(format!("advertise {:?} must be host:port with a port above 0", self.advertise));
        }
        if self.link_address().is_none() {
            return bad(format!(
                "cluster.link_advertise {:?} must be host:port with a port above 0",
                self.link_advertise
            ));
        }
        if self.etcd_endpoints.is_empty() {
            return bad("etcd_endpoints must name at least one etcd".to_string());
        }
        if !self.etcd_prefix.starts_with('/') || self.etcd_prefix.ends_with('/') {
            return bad("etcd_prefix must start with / and not end with /".to_string());
        }
        if !(2..=3_600).contains(&self.lease_secs) {
            return bad("lease_secs must be between 2 and 3600".to_string());
        }
        if self.outbound_max == 0 {
            return bad("outbound_max must be positive".to_string());
        }
        if self.etcd_timeout_secs == 0 {
            return bad("etcd_timeout_secs must be positive".to_string());
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
