//! Wiring: opens the store, starts the writer, the expiry sweeper, the
//! shards and the admin socket, and stops them in order.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use pipit_protocol::handshake::ServerKeys;
use pipit_protocol::StaticKeypair;
use tokio_util::sync::CancellationToken;

use crate::commit::EngineConfig;
use crate::config::Config;
use crate::net::{listener, AdmissionConfig, ConnCtx, NetConfig};
use crate::route::{Budget, Registry};
use crate::service::{self, Rules, Services};
use crate::store::Store;

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

/// A running server.
pub struct Running {
    /// The address clients connect to.
    pub local_addr: SocketAddr,
    /// The server's public key, for clients to pin.
    pub public_key: pipit_protocol::PublicKey,
    services: Services,
    registry: Arc<Registry>,
    budget: Arc<Budget>,
    shutdown: CancellationToken,
    shards: Vec<std::thread::JoinHandle<()>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
    /// Held while the server runs: the data directory's lock and the
    /// listening address's.
    _locks: (std::fs::File, Option<listener::Shared>),
}

impl Running {
    /// The services (tests, admin).
    pub fn services(&self) -> &Services {
        &self.services
    }

    /// Online devices (tests, admin).
    pub fn registry(&self) -> &Arc<Registry> {
        &self.registry
    }

    /// The memory budget (tests, admin).
    pub fn budget(&self) -> &Arc<Budget> {
        &self.budget
    }

    /// Stops accepting, tells connections to close, waits up to `grace`
    /// for them, makes everything queued durable and stops the writer.
    pub fn shutdown(mut self, grace: Duration) {
        self.shutdown.cancel();
        // Connections drain for up to `grace`; give their shards a moment
        // past it to notice.
        let deadline = Instant::now() + grace + Duration::from_millis(500);
        for shard in self.shards.drain(..) {
            while !shard.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            if shard.is_finished() {
                let _ = shard.join();
            }
        }
        let writer = self.services.writer.clone();
        let _ = writer.barrier_blocking(Duration::from_secs(5));
        drop(self.services);
        drop(writer);
        if let Some(w) = self.writer_thread.take() {
            // The writer exits once every handle is gone; shards that
            // missed the grace period still hold theirs, and the process
            // exit ends them.
            if Instant::now() < deadline {
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
    let dir_lock = lock_data_dir(&config.data_dir)?;
    let n = config.shard_count();
    let mut shared = listener::bind_all(config.listen, n)?;
    let listeners = std::mem::take(&mut shared.listeners);
    let local_addr = listeners[0].local_addr()?;
    let key = load_or_create_key(&config.data_dir)?;
    let public_key = *key.public();
    let keys = Arc::new(ServerKeys::new(key));
    let store = Store::open(&config.data_dir.join("db")).context("opening the database")?;
    let registry = Arc::new(Registry::default());
    let budget = Budget::new(config.memory_budget_bytes());
    let rules = Rules { ttl_secs: config.message_ttl_secs, registration: config.registration };
    let engine = EngineConfig {
        max_batch: config.max_batch,
        capacity: config.storage_queue,
        sync: config.sync_writes,
        reserve_bytes: config.storage_reserve_mb.saturating_mul(1 << 20),
        full_wait: Duration::from_secs(config.storage_full_wait_secs),
    };
    let (services, writer_thread) =
        service::start(store, rules, registry.clone(), engine).context("starting the storage writer")?;
    let shutdown = CancellationToken::new();
    service::expiry::spawn_sweeper(
        services.writer.clone(),
        Duration::from_secs(config.expiry_sweep_secs),
        shutdown.clone(),
    )
    .context("starting the expiry sweeper")?;

    let ctx = Arc::new(
        ConnCtx::new(net_config(&config), keys, services.clone(), registry.clone(), budget.clone(), shutdown.clone())
            .context("starting the handshake threads")?,
    );
    let mut shards = Vec::with_capacity(n);
    for (i, l) in listeners.into_iter().enumerate() {
        let ctx = ctx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("pipit-shard-{i}"))
            .spawn(move || listener::run_shard(i, l, ctx))
            .context("spawning a shard")?;
        shards.push(handle);
    }
    let admin = crate::admin::AdminCtx {
        data_dir: config.data_dir.clone(),
        services: services.clone(),
        registry: registry.clone(),
        budget: budget.clone(),
        shutdown: shutdown.clone(),
    };
    crate::admin::spawn(admin).context("starting the admin socket")?;
    spawn_gauges(services.clone(), registry.clone(), budget.clone(), ctx.clone(), shutdown.clone());
    tracing::info!(%local_addr, shards = n, server_key = %public_key, "listening");
    Ok(Running {
        local_addr,
        public_key,
        services,
        registry,
        budget,
        shutdown,
        shards,
        writer_thread: Some(writer_thread),
        _locks: (dir_lock, Some(shared)),
    })
}

/// Locks `data_dir` for this process (`pipit.lock`, holding the pid of
/// the server that has it): a second server on the same directory would
/// take over its admin socket and fail on RocksDB's own lock with a less
/// helpful message. The kernel releases the lock when the process ends,
/// however it ends.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    use std::io::{Read as _, Seek as _, Write as _};
    let path = data_dir.join("pipit.lock");
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match rustix::fs::flock(&f, rustix::fs::FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => {}
        Err(rustix::io::Errno::WOULDBLOCK) => {
            let mut holder = String::new();
            let _ = f.read_to_string(&mut holder);
            anyhow::bail!(
                "data directory {} is in use by another pipit server (pid {})",
                data_dir.display(),
                holder.trim()
            );
        }
        Err(e) => {
            return Err(std::io::Error::from(e)).with_context(|| format!("locking {}", path.display()));
        }
    }
    f.set_len(0)?;
    f.rewind()?;
    writeln!(f, "{}", std::process::id())?;
    Ok(f)
}

fn net_config(c: &Config) -> NetConfig {
    NetConfig {
        max_connections: c.max_connections,
        handshake_timeout: c.handshake_timeout(),
        keepalive_min_secs: c.keepalive_min_secs,
        keepalive_max_secs: c.keepalive_max_secs,
        keepalive_default_secs: c.keepalive_default_secs,
        delivery_window: c.delivery_window as usize,
        max_pending_sends: c.max_pending_sends,
        write_timeout: Duration::from_secs(c.write_timeout_secs),
        tcp_user_timeout: Duration::from_secs(c.tcp_user_timeout_secs),
        shutdown_grace: Duration::from_secs(c.shutdown_grace_secs),
        max_pending_send_bytes: c.max_pending_send_bytes,
        max_queued_send_bytes: c.max_queued_send_bytes,
        partial_frame_timeout: c.partial_frame_timeout(),
        admission: AdmissionConfig {
            max_handshakes: c.max_handshakes,
            rate_per_source: f64::from(c.handshake_rate_per_source),
            burst_per_source: f64::from(c.handshake_burst_per_source),
            threads: if c.handshake_threads > 0 { c.handshake_threads } else { c.shard_count() },
        },
    }
}

/// Refreshes gauges that are cheaper to sample than to keep exact.
fn spawn_gauges(
    services: Services,
    registry: Arc<Registry>,
    budget: Arc<Budget>,
    ctx: Arc<ConnCtx>,
    shutdown: CancellationToken,
) {
    let spawned = std::thread::Builder::new().name("pipit-gauges".into()).spawn(move || {
        metrics::gauge!("pipit_memory_budget_limit_bytes").set(budget.limit() as f64);
        while !shutdown.is_cancelled() {
            metrics::gauge!("pipit_memory_budget_used_bytes").set(budget.used() as f64);
            metrics::gauge!("pipit_handshakes_in_progress").set(ctx.handshakes_in_progress() as f64);
            metrics::gauge!("pipit_inbox_entries").set(services.inbox.estimate() as f64);
            metrics::gauge!("pipit_online_devices").set(registry.online() as f64);
            metrics::gauge!("pipit_storage_queue").set(services.writer.queued() as f64);
            for _ in 0..50 {
                if shutdown.is_cancelled() {
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
