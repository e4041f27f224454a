//! The server: shards, listeners, shared state, startup and shutdown.
//!
//! One shard per core: a thread running a single-threaded tokio runtime
//! with its own `SO_REUSEPORT` listener, so the kernel spreads new
//! connections across shards and a connection's task never migrates.
//! Shards share the storage writer (a bounded queue), the store (reads on
//! blocking threads) and the device registry.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use pipit_protocol::handshake::ServerKeys;
use pipit_protocol::StaticKeypair;
use socket2::{Domain, Protocol, SockRef, Socket, TcpKeepalive, Type};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::registry::Registry;
use crate::storage::{spawn_sweeper, Store, Writer, WriterConfig};

/// State every shard and connection shares.
pub struct Shared {
    /// The configuration in force.
    pub config: Config,
    /// Server static keys.
    pub keys: Arc<ServerKeys>,
    /// The database (reads).
    pub store: Arc<Store>,
    /// The writer queue (writes).
    pub writer: Writer,
    /// Online devices.
    pub registry: Arc<Registry>,
    /// Cancelled on shutdown.
    pub shutdown: CancellationToken,
    conn_ids: AtomicU64,
    connections: AtomicUsize,
}

impl Shared {
    /// A fresh connection id.
    pub fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Loads the server key from `data_dir/server.key`, creating it (mode
/// 0600) on first start.
pub fn load_or_create_key(data_dir: &Path) -> anyhow::Result<StaticKeypair> {
    let path = data_dir.join("server.key");
    match std::fs::read_to_string(&path) {
        Ok(text) => StaticKeypair::from_hex(&text).with_context(|| format!("{} is not a valid key", path.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = StaticKeypair::generate();
            write_private(&path, &kp.to_hex())?;
            tracing::info!(path = %path.display(), "generated a new server key");
            Ok(kp)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.write_all(b"\n")?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(())
}

fn listener(addr: SocketAddr) -> anyhow::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into()).with_context(|| format!("binding {addr}"))?;
    socket.listen(4096)?;
    Ok(socket.into())
}

/// Socket options for a mobile client: no Nagle delay (we coalesce
/// ourselves), TCP keepalive as a backstop to app keepalives, and
/// TCP_USER_TIMEOUT so data stuck unacknowledged on a dead path is
/// abandoned instead of retransmitted for 15 minutes.
fn tune(stream: &tokio::net::TcpStream, cfg: &Config) {
    let s = SockRef::from(stream);
    let _ = s.set_tcp_nodelay(true);
    let ka = TcpKeepalive::new()
        .with_time(Duration::from_secs(u64::from(cfg.keepalive_max_secs) + 60))
        .with_interval(Duration::from_secs(30))
        .with_retries(4);
    let _ = s.set_tcp_keepalive(&ka);
    let _ = s.set_tcp_user_timeout(Some(Duration::from_secs(cfg.tcp_user_timeout_secs)));
}

/// A running server.
pub struct Running {
    /// The address clients connect to.
    pub local_addr: SocketAddr,
    /// The server's public key, for clients to pin.
    pub public_key: pipit_protocol::PublicKey,
    shared: Arc<Shared>,
    shards: Vec<std::thread::JoinHandle<()>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
}

impl Running {
    /// State shared with connections (tests, admin).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Stops accepting, tells connections to close, waits up to `grace`
    /// for them, makes everything queued durable and stops the writer.
    pub fn shutdown(mut self, grace: Duration) {
        self.shared.shutdown.cancel();
        let deadline = std::time::Instant::now() + grace;
        for shard in self.shards.drain(..) {
            while !shard.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if shard.is_finished() {
                let _ = shard.join();
            }
        }
        let writer = self.shared.writer.clone();
        let _ = writer.barrier_blocking(Duration::from_secs(5));
        drop(self.shared);
        drop(writer);
        if let Some(w) = self.writer_thread.take() {
            // The writer exits once every shard's handle is gone; shards
            // that missed the grace period still hold theirs, and the
            // process exit ends them.
            if std::time::Instant::now() < deadline {
                let _ = w.join();
            }
        }
    }
}

/// Starts a server: storage, writer, shards. Returns once every shard is
/// listening.
pub fn start(config: Config) -> anyhow::Result<Running> {
    config.validate()?;
    std::fs::create_dir_all(&config.data_dir).with_context(|| format!("creating {}", config.data_dir.display()))?;
    let key = load_or_create_key(&config.data_dir)?;
    let public_key = *key.public();
    let keys = Arc::new(ServerKeys::new(key));
    let store = Store::open(&config.data_dir.join("db")).context("opening the database")?;
    let registry = Arc::new(Registry::default());
    let writer_cfg = WriterConfig {
        max_batch: config.max_batch,
        ttl_secs: config.message_ttl_secs,
        registration: config.registration,
        sync: config.sync_writes,
    };
    let (writer, writer_thread) = Writer::start(store.clone(), writer_cfg, registry.clone(), 65_536);
    let shutdown = CancellationToken::new();
    spawn_sweeper(writer.clone(), Duration::from_secs(config.expiry_sweep_secs), shutdown.clone());

    let n = config.shard_count();
    let first = listener(config.listen)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(listener(local_addr)?);
    }
    let shared = Arc::new(Shared {
        config,
        keys,
        store,
        writer,
        registry,
        shutdown,
        conn_ids: AtomicU64::new(0),
        connections: AtomicUsize::new(0),
    });
    let mut shards = Vec::with_capacity(n);
    for (i, l) in listeners.into_iter().enumerate() {
        let shared = shared.clone();
        let handle = std::thread::Builder::new()
            .name(format!("pipit-shard-{i}"))
            .spawn(move || run_shard(i, l, shared))
            .context("spawning a shard")?;
        shards.push(handle);
    }
    crate::admin::spawn(shared.clone()).context("starting the admin socket")?;
    spawn_gauges(shared.clone());
    tracing::info!(%local_addr, shards = n, server_key = %public_key, "listening");
    Ok(Running { local_addr, public_key, shared, shards, writer_thread: Some(writer_thread) })
}

fn run_shard(index: usize, listener: std::net::TcpListener, shared: Arc<Shared>) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("shard runtime");
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
        let tracker = TaskTracker::new();
        loop {
            tokio::select! {
                _ = shared.shutdown.cancelled() => break,
                accepted = listener.accept() => {
                    let (stream, peer) = match accepted {
                        Ok(x) => x,
                        Err(e) => {
                            // EMFILE and friends: back off instead of spinning.
                            tracing::warn!(error = %e, shard = index, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            continue;
                        }
                    };
                    if shared.connections.fetch_add(1, Ordering::AcqRel) >= shared.config.max_connections {
                        shared.connections.fetch_sub(1, Ordering::AcqRel);
                        metrics::counter!("pipit_connections_refused_total").increment(1);
                        drop(stream);
                        continue;
                    }
                    tune(&stream, &shared.config);
                    metrics::counter!("pipit_connections_accepted_total").increment(1);
                    let shared = shared.clone();
                    tracker.spawn(async move {
                        tracing::trace!(%peer, "accepted");
                        crate::connection::run(stream, shared.clone()).await;
                        shared.connections.fetch_sub(1, Ordering::AcqRel);
                    });
                }
            }
        }
        drop(listener);
        tracker.close();
        tracker.wait().await;
    });
}

/// Refreshes gauges that are cheaper to sample than to keep exact.
fn spawn_gauges(shared: Arc<Shared>) {
    let spawned = std::thread::Builder::new().name("pipit-gauges".into()).spawn(move || {
        while !shared.shutdown.is_cancelled() {
            metrics::gauge!("pipit_inbox_entries").set(shared.store.inbox_estimate() as f64);
            metrics::gauge!("pipit_online_devices").set(shared.registry.online() as f64);
            for _ in 0..50 {
                if shared.shutdown.is_cancelled() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    });
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no gauge thread; inbox depth will not be reported");
    }
}
