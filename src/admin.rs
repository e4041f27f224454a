//! The admin socket: a Unix socket in the data directory (mode 0600, so
//! only the server's user may use it) taking one command line per
//! connection. `pipit admin ...` is its client.
//!
//! Commands: `invite [ttl_secs]`, `accounts`, `inbox <account> <device>`,
//! `group <id>`, `storage`, `stats`, `cluster` (the node list, its
//! epoch, liveness and links), `keys reload` (read the key files again
//! after a rotation). Answers are text lines; errors start with
//! `error:`. The client side is `pipit_client::admin`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;

use crate::commit::StorageState;
use crate::model::DeviceAddr;
use crate::route::{Budget, Registry};
use crate::service::Services;

pub use pipit_client::admin::{request, socket_path};

/// Longest command line accepted.
const MAX_LINE: usize = 256;

/// What the admin commands use.
pub struct AdminCtx {
    /// Where the socket lives.
    pub data_dir: PathBuf,
    /// The services the commands call.
    pub services: Services,
    /// Online devices.
    pub registry: Arc<Registry>,
    /// The keys handshakes use, reloaded by `keys reload`.
    pub keys: Arc<crate::keys::KeyRing>,
    /// The memory budget.
    pub budget: Arc<Budget>,
    /// The node links (a cluster node).
    pub links: Option<Arc<crate::net::nodes::Links>>,
    /// Stops the socket.
    pub shutdown: CancellationToken,
}

/// Serves the admin socket until shutdown, on its own thread.
pub fn spawn(ctx: AdminCtx) -> anyhow::Result<()> {
    let shared = Arc::new(ctx);
    let path = socket_path(&shared.data_dir);
    let _ = std::fs::remove_file(&path);
    let std_listener = std::os::unix::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    std_listener.set_nonblocking(true)?;
    std::thread::Builder::new().name("pipit-admin".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("admin runtime");
        rt.block_on(async move {
            let listener = UnixListener::from_std(std_listener).expect("admin listener");
            loop {
                tokio::select! {
                    _ = shared.shutdown.cancelled() => break,
                    // Match every result: an arm whose pattern fails is
                    // disabled for the rest of the select, which would
                    // leave only shutdown to wait for.
                    accepted = listener.accept() => match accepted {
                        Ok((stream, _)) => {
                            let shared = shared.clone();
                            tokio::spawn(async move {
                                let _ = tokio::time::timeout(Duration::from_secs(10), handle(stream, shared)).await;
                            });
                        }
                        Err(e) => {
                            // EMFILE and friends pass; back off, keep serving.
                            tracing::warn!(error = %e, "admin accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    },
                }
            }
            let _ = std::fs::remove_file(&path);
        });
    })?;
    Ok(())
}

async fn handle(stream: UnixStream, shared: Arc<AdminCtx>) -> std::io::Result<()> {
    let (r, mut w) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(r).take(MAX_LINE as u64);
    use tokio::io::AsyncReadExt as _;
    reader.read_line(&mut line).await?;
    let answer = match execute(line.trim(), &shared).await {
        Ok(text) => text,
        Err(e) => format!("error: {e}\n"),
    };
    w.write_all(answer.as_bytes()).await?;
    w.shutdown().await
}

async fn execute(line: &str, shared: &Arc<AdminCtx>) -> anyhow::Result<String> {
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["invite"] | ["invite", _] => {
            let ttl: u64 = words.get(1).map_or(Ok(7 * 86_400), |s| s.parse())?;
            Ok(format!("{}\n", shared.services.accounts.create_invite(ttl).await?))
        }
        ["accounts"] => {
            let list = shared.services.accounts.list(10_000).await?;
            let mut out = String::new();
            for a in list {
                let devices: Vec<String> = a.devices.iter().map(|d| format!("{}:{}", d.device, d.name)).collect();
                out.push_str(&format!("{} {}\n", a.account, devices.join(",")));
            }
            Ok(out)
        }
        ["inbox", account, device] => {
            let addr = DeviceAddr { account: account.parse()?, device: device.parse()? };
            let depth = shared.services.inbox.depth(addr).await?;
            let online = shared.registry.is_online(addr);
            Ok(format!("{depth} waiting, {}\n", if online { "online" } else { "offline" }))
        }
        ["group", id] => group(shared, id.parse()?).await,
        ["storage"] => storage(shared).await,
        ["cluster"] => cluster(shared),
        ["keys", "reload"] => {
            // Read the files again (after `pipit key rotate` or
            // `drop-retired`); handshakes from now on use them.
            let dir = shared.data_dir.clone();
            let files = tokio::task::spawn_blocking(move || crate::keys::load_or_create(&dir)).await??;
            shared.keys.set(files.server_keys());
            tracing::info!(current = %files.current.public(), retired = files.retired.len(), "server keys reloaded");
            Ok(format!("current {} retired {}\n", files.current.public(), files.retired.len()))
        }
        ["stats"] => {
            let backlog = shared.services.fanout.backlog(None, 100_000).await?;
            let b = &shared.budget;
            let w = &shared.services.writer;
            let storage = match w.storage() {
                StorageState::Ok => "ok",
                StorageState::Low => "low: free space below the reserve, refusing new sends",
                StorageState::Full => "full: commits wait for room, refusing new sends",
            };
            Ok(format!(
                "online_devices {}\nfanout_jobs {}\nfanout_members {}\nmemory_budget {} of {} bytes used, {} waits\nstorage {storage} ({} bytes free)\n",
                shared.registry.online(),
                backlog.jobs,
                backlog.members,
                b.used(),
                b.limit(),
                b.hits(),
                w.free_bytes()
            ))
        }
        _ => anyhow::bail!(
            "unknown command; try: invite [ttl_secs] | accounts | inbox <account> <device> | group <id> | storage | stats | keys reload"
        ),
    }
}

/// `group <id>`: members (admins starred), version, sequence, fan-out
/// backlog and stored bodies.
async fn group(shared: &Arc<AdminCtx>, id: u64) -> anyhow::Result<String> {
    let Some(g) = shared.services.groups.summary(id).await? else {
        anyhow::bail!("no group {id}");
    };
    let members: Vec<String> =
        g.record.current().map(|m| format!("{}{}", m.account, if m.admin { "*" } else { "" })).collect();
    let leaving = g.record.members.iter().filter(|m| m.left != 0).count();
    Ok(format!(
        "group {id} name {:?} version {} next_seq {}\n\
         members {} (admins starred; removed, until fanned out: {leaving}): {}\n\
         fanout {} jobs, {} members to reach\n\
         bodies {} messages, {} notices, {} device ciphertexts, {} bytes\n",
        String::from_utf8_lossy(&g.record.name),
        g.record.version,
        g.next_seq,
        members.len(),
        members.join(" "),
        g.backlog.jobs,
        g.backlog.members,
        g.bodies.messages,
        g.bodies.notices,
        g.bodies.extras,
        g.bodies.bytes,
    ))
}

/// `storage`: keys and bytes per table, counted (up to 10 million keys a
/// table: a diagnostic, not for a busy server's hot hours), with RocksDB's
/// own estimate of live data in table files beside it.
async fn storage(shared: &Arc<AdminCtx>) -> anyhow::Result<String> {
    let usage = shared.services.groups.storage(10_000_000).await?;
    let mut out = String::from("table keys key_bytes value_bytes estimated_live_bytes\n");
    for (name, u) in usage {
        let more = if u.complete { "" } else { "+" };
        out.push_str(&format!(
            "{name} {}{more} {} {} {}\n",
            u.keys, u.key_bytes, u.value_bytes, u.estimated_live_bytes
        ));
    }
    Ok(out)
}

/// The cluster as this node sees it: one line for this node, then one per
/// member: `<id> <address> slot <n> ring <share>% alive|down me`, or for
/// another node
/// `... link <state> [rtt <ms>ms] queue <entries waiting for it>`.
fn cluster(shared: &Arc<AdminCtx>) -> anyhow::Result<String> {
    let Some(cluster) = &shared.services.cluster else {
        anyhow::bail!("not a cluster node (no [cluster] in the config)");
    };
    let view = cluster.view();
    let links = shared.links.as_ref().map(|l| l.snapshot()).unwrap_or_default();
    let mut out = format!(
        "node {} slot {} epoch {} etcd {}\n",
        cluster.me(),
        cluster.slot(),
        view.epoch,
        if cluster.etcd_up() { "up" } else { "unreachable (the list below stays in force)" }
    );
    let shares = view.ring.shares(4_096);
    for (i, m) in view.members.iter().enumerate() {
        let alive = if view.alive.contains(&m.id) { "alive" } else { "down" };
        let share = shares.get(i).copied().unwrap_or(0.0) * 100.0;
        out.push_str(&format!("{} {} slot {} ring {share:.0}% {alive}", m.id, m.advertise, m.slot));
        if m.id == cluster.me() {
            out.push_str(" me");
        } else {
            match links.get(&m.id) {
                Some(l) => {
                    out.push_str(&format!(" link {}", l.state.as_str()));
                    if let Some(rtt) = l.rtt {
                        out.push_str(&format!(" rtt {:.1}ms", rtt.as_secs_f64() * 1e3));
                    }
                }
                None => out.push_str(" link none"),
            }
            // Two point reads, on the admin thread.
            let depth = shared.services.forward.depth_blocking(m.slot)?;
            out.push_str(&format!(" queue {depth}"));
        }
        out.push('\n');
    }
    Ok(out)
}
