//! The network layer: listeners, the connection driver around the
//! protocol crate's state machines, and dispatch from message kind to the
//! service that handles it. It holds no product rules and no storage.

mod admission;
mod answers;
mod connection;
mod dispatch;
mod groups;
mod handshake;
pub mod listener;
pub mod nodes;
mod send_order;
mod serve;
pub mod settings;

pub use admission::AdmissionConfig;

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::keys::KeyRing;
use crate::route::{Budget, Registry};
use crate::service::Services;

/// What the network layer needs to know from the configuration.
#[derive(Debug, Clone)]
pub struct NetConfig {
    /// Most simultaneous connections; more are refused at accept.
    pub max_connections: usize,
    /// Time a handshake may take, all steps together.
    pub handshake_timeout: Duration,
    /// Time a handshake may wait for the peer's next bytes.
    pub handshake_idle_timeout: Duration,
    /// Time one handshake message may take to arrive whole.
    pub handshake_step_timeout: Duration,
    /// Keepalive bounds the server grants within, and its default.
    pub keepalive_min_secs: u32,
    /// See `keepalive_min_secs`.
    pub keepalive_max_secs: u32,
    /// See `keepalive_min_secs`.
    pub keepalive_default_secs: u32,
    /// Unacknowledged deliveries per connection.
    pub delivery_window: usize,
    /// Sends a connection may have waiting for storage before it stops
    /// reading.
    pub max_pending_sends: usize,
    /// Time a socket write may stay blocked before the peer is dropped.
    pub write_timeout: Duration,
    /// TCP_USER_TIMEOUT.
    pub tcp_user_timeout: Duration,
    /// Time a draining connection waits for answers at shutdown.
    pub shutdown_grace: Duration,
    /// Bytes of sends a connection may have waiting for storage before it
    /// stops reading.
    pub max_pending_send_bytes: usize,
    /// Bytes of sends all connections together may have waiting for
    /// storage before the heaviest stop reading.
    pub max_queued_send_bytes: usize,
    /// Time a frame may take from its first byte to its last.
    pub partial_frame_timeout: Duration,
    /// Handshake admission.
    pub admission: AdmissionConfig,
}

/// The handles a connection uses, and nothing else.
pub struct ConnCtx {
    /// Settings.
    pub cfg: NetConfig,
    /// The server's static keys, current and retired; replaceable while
    /// the server runs.
    pub keys: Arc<KeyRing>,
    /// The services a connection calls.
    pub services: Services,
    /// Online devices.
    pub registry: Arc<Registry>,
    /// Cancelled when the server stops.
    pub shutdown: CancellationToken,
    /// The server's memory budget.
    pub budget: Arc<Budget>,
    /// A cluster node's links to the others (lookups at login).
    pub links: Option<Arc<nodes::Links>>,
    /// Payload bytes of sends waiting for storage, server-wide: kept
    /// small so that a light sender's message waits behind little of a
    /// flood (what waits in the queue is what every new send waits for).
    pub queued: Arc<Budget>,
    admission: admission::Admission,
    conn_ids: AtomicU64,
    connections: AtomicUsize,
}

impl ConnCtx {
    /// A context for the connections of one server; starts its handshake
    /// threads.
    pub fn new(
        cfg: NetConfig,
        keys: Arc<KeyRing>,
        services: Services,
        registry: Arc<Registry>,
        budget: Arc<Budget>,
        links: Option<Arc<nodes::Links>>,
        shutdown: CancellationToken,
    ) -> std::io::Result<Self> {
        let admission = admission::Admission::start(cfg.admission)?;
        let queued = Budget::named("storage_queue", cfg.max_queued_send_bytes);
        Ok(Self {
            queued,
            cfg,
            keys,
            services,
            registry,
            shutdown,
            budget,
            links,
            admission,
            conn_ids: AtomicU64::new(0),
            connections: AtomicUsize::new(0),
        })
    }

    /// Handshakes in progress (metrics, admin).
    pub fn handshakes_in_progress(&self) -> usize {
        self.admission.in_progress()
    }

    fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed) + 1
    }
}

/// Why a connection ended. Logged; the peer saw at most a coarse code.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConnError {
    /// Socket error.
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    /// The peer closed.
    #[error("closed by peer")]
    Closed,
    /// The handshake failed.
    #[error("handshake: {0}")]
    Handshake(#[from] pipit_protocol::HandshakeError),
    /// The peer broke the protocol after the handshake.
    #[error("protocol: {0}")]
    Protocol(#[from] pipit_protocol::Error),
    /// The peer stayed silent too long, or stopped reading.
    #[error("timed out")]
    Timeout,
    /// Storage failed.
    #[error("storage: {0}")]
    Storage(#[from] crate::store::StorageError),
    /// Refused at login, or closed after a request that broke a rule
    /// (the code was sent to the peer).
    #[error("refused: {0:?}")]
    Refused(pipit_protocol::message::pb::ErrorCode),
    /// A frame did not complete within the partial-frame timeout.
    #[error("a frame stayed incomplete too long")]
    SlowFrame,
}

impl ConnError {
    /// Whether the peer broke the protocol (as opposed to going away).
    fn is_violation(&self) -> bool {
        matches!(self, ConnError::Handshake(_) | ConnError::Protocol(_) | ConnError::SlowFrame)
    }
}
