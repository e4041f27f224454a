//! Wiring: opens the store, starts the writer, the expiry sweeper, the
//! group fan-out and receipt flusher, the shards and the admin socket,
//! and stops them in order.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::net::{listener, ConnCtx};
use crate::route::{Budget, Registry};
use crate::service::{self, Live, Rules, Services};
use crate::store::Store;

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
    /// The etcd membership thread (a cluster node); it gives the lease
    /// back on shutdown.
    cluster_thread: Option<std::thread::JoinHandle<()>>,
    /// The node links' thread (a cluster node).
    links_thread: Option<std::thread::JoinHandle<()>>,
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
        // Every connection is gone: end the grace periods and save the last
        // seen they held before the final barrier.
        self.services.presence.stop(Duration::from_secs(5));
        let writer = self.services.writer.clone();
        let _ = writer.barrier_blocking(Duration::from_secs(5));
        drop(self.services);
        drop(writer);
        if let Some(l) = self.links_thread.take() {
            let _ = l.join();
        }
        if let Some(c) = self.cluster_thread.take() {
            // Bounded: revoking the lease waits at most 2 s for etcd.
            let _ = c.join();
        }
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
    sync_entry(&config.data_dir)?;
    let dir_lock = lock_data_dir(&config.data_dir)?;
    let n = config.shard_count();
    let mut shared = listener::bind_all(config.listen, n)?;
    let listeners = std::mem::take(&mut shared.listeners);
    let local_addr = listeners[0].local_addr()?;
    let key_files = crate::keys::load_or_create(&config.data_dir)?;
    let public_key = *key_files.current.public();
    let keys = Arc::new(crate::keys::KeyRing::new(key_files.server_keys()));
    let store = Store::open(&config.data_dir.join("db")).context("opening the database")?;
    sync_entry(&config.data_dir.join("db"))?;
    let shutdown = CancellationToken::new();
    // A cluster node joins before it listens: a login must never be
    // answered before this node knows who owns what.
    // Should anything below fail, the membership thread gives the lease
    // back and ends.
    let stop_on_error = shutdown.clone().drop_guard();
    let (cluster, cluster_thread, link_listener) = match &config.cluster {
        None => (None, None, None),
        Some(c) => {
            // Bound before joining: the list must never advertise a link
            // address this node cannot serve.
            let link_listener = std::net::TcpListener::bind(c.link_listen)
                .with_context(|| format!("node links: listening on {}", c.link_listen))?;
            let (cluster, thread) = crate::route::cluster::join(c, public_key, shutdown.clone())
                .with_context(|| format!("joining the cluster as node {:?}", c.node_id))?;
            tracing::info!(node = %c.node_id, slot = cluster.slot(), epoch = cluster.view().epoch, "joined the cluster");
            (Some(cluster), Some(thread), Some(link_listener))
        }
    };
    let registry = Arc::new(Registry::default());
    let budget = Budget::new(config.net.memory_budget_bytes());
    let rules = Rules {
        ttl_secs: config.messages.ttl_secs,
        registration: config.accounts.registration,
        max_group_members: config.groups.max_members,
        keys: (&config.keys).into(),
        cluster: cluster.clone(),
    };
    let cluster_handle = cluster;
    let live = Live {
        registry: registry.clone(),
        presence: (&config.presence).into(),
        typing: (&config.typing).into(),
        push: (&config.push).into(),
        shutdown: shutdown.clone(),
    };
    let (services, writer_thread) =
        service::start(store.clone(), rules, registry.clone(), config.storage.engine(), live)
            .context("starting the services")?;
    service::expiry::spawn_sweeper(services.writer.clone(), config.messages.expiry_sweep(), shutdown.clone())
        .context("starting the expiry sweeper")?;
    services.fanout.set_step_delay(config.groups.fanout_step_delay());
    let fanout = (&config.groups).into();
    service::fanout::spawn_driver(services.writer.clone(), store.clone(), &services.fanout, fanout, shutdown.clone())
        .context("starting the group fan-out")?;
    service::group_receipts::spawn_flusher(services.writer.clone(), config.groups.receipt_flush(), shutdown.clone())
        .context("starting the group receipt flusher")?;

    // A cluster node's links, made before the connections that ask them
    // (whose device is this key?) and the thread that runs them.
    let links = cluster_handle.as_ref().map(|_| Arc::new(crate::net::nodes::Links::default()));
    let ctx = Arc::new(
        ConnCtx::new(
            config.net.config(n),
            keys,
            services.clone(),
            registry.clone(),
            budget.clone(),
            links.clone(),
            shutdown.clone(),
        )
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
    let links_thread = match (&cluster_handle, link_listener, &links) {
        (Some(cluster), Some(l), Some(links)) => Some({
            cluster.set_relay(links.clone());
            crate::net::nodes::spawn(cluster.clone(), &services, ctx.keys.clone(), links.clone(), l, shutdown.clone())
                .context("starting the node links")?
        }),
        _ => None,
    };
    let admin = crate::admin::AdminCtx {
        data_dir: config.data_dir.clone(),
        services: services.clone(),
        registry: registry.clone(),
        keys: ctx.keys.clone(),
        budget: budget.clone(),
        links,
        shutdown: shutdown.clone(),
    };
    crate::admin::spawn(admin).context("starting the admin socket")?;
    spawn_gauges(services.clone(), registry.clone(), budget.clone(), ctx.clone(), shutdown.clone());
    stop_on_error.disarm();
    tracing::info!(%local_addr, shards = n, server_key = %public_key, retired_keys = key_files.retired.len(), "listening");
    Ok(Running {
        local_addr,
        public_key,
        services,
        registry,
        budget,
        shutdown,
        shards,
        writer_thread: Some(writer_thread),
        cluster_thread,
        links_thread,
        _locks: (dir_lock, Some(shared)),
    })
}

/// Makes the entry of directory `dir` in its parent durable. A new entry
/// is durable only once its directory is fsynced (POSIX): RocksDB syncs
/// the entries inside its directory, never that directory's own entry, and
/// `create_dir_all` syncs nothing, so after a power cut soon after the
/// first start the data directory, or the database in it with every
/// message answered "sent", could be gone (found by tests/power_loss under
/// the strict model). Cheap: once per start.
pub fn sync_entry(dir: &std::path::Path) -> anyhow::Result<()> {
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => std::path::Path::new("."),
    };
    std::fs::File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("syncing {} (to keep the entry of {})", parent.display(), dir.display()))
}

/// Locks `data_dir` for this process (`pipit.lock`, holding the pid of
/// the server that has it): a second server on the same directory would
/// take over its admin socket and fail on RocksDB's own lock with a less
/// helpful message. The kernel releases the lock when the process ends,
/// however it ends.
fn lock_data_dir(data_dir: &std::path::Path) -> anyhow::Result<std::fs::File> {
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
            if let Ok(b) = services.fanout.backlog_blocking(100_000) {
                metrics::gauge!("pipit_fanout_backlog_jobs").set(b.jobs as f64);
                metrics::gauge!("pipit_fanout_backlog_members").set(b.members as f64);
            }
            metrics::gauge!("pipit_push_queue").set(services.push.queued() as f64);
            if let Some(cluster) = &services.cluster {
                for m in cluster.view().members.iter().filter(|m| m.id != cluster.me()) {
                    if let Ok(depth) = services.forward.depth_blocking(m.slot) {
                        metrics::gauge!("pipit_node_link_queue", "peer" => m.id.clone()).set(depth as f64);
                    }
                }
            }
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
