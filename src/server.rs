//! Wiring: opens the store, starts the writer, the expiry sweeper, the
//! shards and the admin socket, and stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::commit::EngineConfig;
use crate::config::Config;
use crate::net::{listener, ConnCtx, NetConfig};
use crate::route::Registry;
use crate::service::{self, KeyRules, Rules, Services};
use crate::store::Store;

/// A running server.
pub struct Running {
    /// The address clients connect to.
    pub local_addr: SocketAddr,
    /// The server's public key, for clients to pin.
    pub public_key: pipit_protocol::PublicKey,
    services: Services,
    registry: Arc<Registry>,
    shutdown: CancellationToken,
    shards: Vec<std::thread::JoinHandle<()>>,
    writer_thread: Option<std::thread::JoinHandle<()>>,
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
    let key_files = crate::keys::load_or_create(&config.data_dir)?;
    let public_key = *key_files.current.public();
    let keys = Arc::new(crate::keys::KeyRing::new(key_files.server_keys()));
    let store = Store::open(&config.data_dir.join("db")).context("opening the database")?;
    let registry = Arc::new(Registry::default());
    let key_rules = KeyRules {
        low_water: config.one_time_keys_low,
        fetch_burst: config.keys_fetch_burst,
        fetch_per_minute: config.keys_fetch_per_minute,
    };
    let rules = Rules { ttl_secs: config.message_ttl_secs, registration: config.registration, keys: key_rules };
    let engine = EngineConfig { max_batch: config.max_batch, capacity: config.storage_queue, sync: config.sync_writes };
    let (services, writer_thread) =
        service::start(store, rules, registry.clone(), engine).context("starting the storage writer")?;
    let shutdown = CancellationToken::new();
    service::expiry::spawn_sweeper(
        services.writer.clone(),
        Duration::from_secs(config.expiry_sweep_secs),
        shutdown.clone(),
    )
    .context("starting the expiry sweeper")?;

    let n = config.shard_count();
    let first = listener::bind(config.listen)?;
    let local_addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..n {
        listeners.push(listener::bind(local_addr)?);
    }
    let ctx = Arc::new(ConnCtx::new(net_config(&config), keys, services.clone(), registry.clone(), shutdown.clone()));
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
        keys: ctx.keys.clone(),
        shutdown: shutdown.clone(),
    };
    crate::admin::spawn(admin).context("starting the admin socket")?;
    spawn_gauges(services.clone(), registry.clone(), shutdown.clone());
    tracing::info!(%local_addr, shards = n, server_key = %public_key, retired_keys = key_files.retired.len(), "listening");
    Ok(Running { local_addr, public_key, services, registry, shutdown, shards, writer_thread: Some(writer_thread) })
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
    }
}

/// Refreshes gauges that are cheaper to sample than to keep exact.
fn spawn_gauges(services: Services, registry: Arc<Registry>, shutdown: CancellationToken) {
    let spawned = std::thread::Builder::new().name("pipit-gauges".into()).spawn(move || {
        while !shutdown.is_cancelled() {
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
