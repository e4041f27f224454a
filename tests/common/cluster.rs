//! Real `pipit` processes that form a cluster through a real etcd
//! (`super::etcd`). Both are killed when their guards drop.

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use pipit_client::pipit_protocol::PublicKey;

pub(crate) use super::etcd::Etcd;
use super::free_port;

/// One `pipit serve` process of a cluster, with its own data directory
/// and config file.
pub struct Node {
    pub child: Option<Child>,
    pub id: String,
    pub addr: SocketAddr,
    pub key: PublicKey,
    pub dir: PathBuf,
}

/// The TOML of a cluster node listening on `port`.
pub fn node_config(dir: &Path, id: &str, port: u16, etcd: &str, extra: &str) -> String {
    let link = link_port(port);
    format!(
        "listen = \"127.0.0.1:{port}\"\ndata_dir = \"{}\"\nshards = 1\n{extra}\n\n[cluster]\nnode_id = \"{id}\"\nadvertise = \"127.0.0.1:{port}\"\nlink_listen = \"127.0.0.1:{link}\"\netcd_endpoints = [\"{etcd}\"]\nlease_secs = 3\n",
        dir.display()
    )
}

/// The link port of the node whose chat port is `port`: a free port
/// picked once and remembered, so a restarted node keeps both.
pub fn link_port(port: u16) -> u16 {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static PORTS: OnceLock<Mutex<HashMap<u16, u16>>> = OnceLock::new();
    *PORTS.get_or_init(Default::default).lock().unwrap().entry(port).or_insert_with(free_port)
}

impl Node {
    /// Starts node `id` on a fresh port in `dir` (created), joined to `etcd`.
    pub fn start(dir: &Path, id: &str, etcd: &str) -> Self {
        Self::start_on(dir, id, etcd, free_port())
    }

    /// Starts (or restarts) node `id` on `port`.
    pub fn start_on(dir: &Path, id: &str, etcd: &str, port: u16) -> Self {
        Self::start_with(dir, id, etcd, port, "")
    }

    /// Starts node `id` on `port` with `cluster_extra` lines added to its
    /// `[cluster]` section.
    pub fn start_with(dir: &Path, id: &str, etcd: &str, port: u16, cluster_extra: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let cfg = dir.join("pipit.toml");
        std::fs::write(&cfg, node_config(dir, id, port, etcd, "") + cluster_extra).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_pipit"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env("PIPIT_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start pipit");
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        // "pipit listening on ADDR server key KEY"
        let words: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(words.get(..3), Some(&["pipit", "listening", "on"][..]), "node {id} did not start: {line:?}");
        Self {
            addr: words[3].parse().unwrap(),
            key: words[6].parse().unwrap(),
            child: Some(child),
            id: id.to_string(),
            dir: dir.to_path_buf(),
        }
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Three nodes `n1`..`n3` on one etcd, each in its own directory under
/// `root`.
pub fn three_nodes(root: &Path, etcd: &Etcd) -> Vec<Node> {
    (1..=3).map(|i| Node::start(&root.join(format!("n{i}")), &format!("n{i}"), &etcd.endpoint)).collect()
}
