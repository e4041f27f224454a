//! The one tokio runtime the bindings run the client on.

use std::future::Future;
use std::sync::LazyLock;

use crate::PipitError;

/// Created on first use and never shut down: it lives as long as the app's
/// process. Two workers are plenty for one client's network task and the
/// app's calls; file writes go to tokio's blocking pool.
static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("pipit")
        .enable_all()
        .build()
        .expect("pipit: cannot start the tokio runtime (out of threads?)")
});

/// Runs `fut` on the runtime and waits for it without blocking the
/// caller: the foreign executor only polls the join handle. A caller that
/// cancels does not cancel the work (a send still reaches the outbox).
pub(crate) async fn run<F, T>(fut: F) -> Result<T, PipitError>
where
    F: Future<Output = Result<T, PipitError>> + Send + 'static,
    T: Send + 'static,
{
    RUNTIME.spawn(fut).await.map_err(|e| PipitError::Internal { reason: e.to_string() })?
}

/// Runs blocking `f` (file I/O) on the runtime's blocking pool, inside the
/// runtime's context so it may spawn tasks.
pub(crate) async fn run_blocking<F, T>(f: F) -> Result<T, PipitError>
where
    F: FnOnce() -> Result<T, PipitError> + Send + 'static,
    T: Send + 'static,
{
    RUNTIME.spawn_blocking(f).await.map_err(|e| PipitError::Internal { reason: e.to_string() })?
}
