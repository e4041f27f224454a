//! `pipit`: the chat server binary.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use pipit::config::{Config, Registration};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "pipit", version, about = "pipit chat server")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the server.
    Serve {
        /// TOML configuration file.
        #[arg(long, short)]
        config: Option<PathBuf>,
        /// Listen address (overrides the file).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Data directory (overrides the file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// Shards; 0 = one per core (overrides the file).
        #[arg(long)]
        shards: Option<usize>,
        /// Prometheus metrics address (overrides the file).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Require invite codes to register.
        #[arg(long)]
        invite_only: bool,
    },
    /// Print the server's public key (generating the key pair if needed),
    /// for clients to pin; or rotate it.
    Key {
        /// Data directory.
        #[arg(long, default_value = "pipit-data", global = true)]
        data_dir: PathBuf,
        #[command(subcommand)]
        action: Option<KeyAction>,
    },
    /// Administer a running server through its admin socket.
    Admin {
        /// The server's data directory (where its admin socket is).
        #[arg(long, default_value = "pipit-data")]
        data_dir: PathBuf,
        #[command(subcommand)]
        command: AdminCommand,
    },
}

#[derive(Subcommand)]
enum KeyAction {
    /// Make a new server key; the old one stays accepted as retired, so
    /// devices that pinned it log in as before and learn the new one.
    Rotate,
    /// The current key and the retired ones.
    List,
    /// Forget the retired keys, once devices have moved to the current one
    /// (`pipit_retired_key_logins_total` stopped growing).
    DropRetired,
}

#[derive(Subcommand)]
enum AdminCommand {
    /// Issue a single-use invite code.
    Invite {
        /// Validity in seconds.
        #[arg(long, default_value_t = 7 * 86_400)]
        ttl_secs: u64,
    },
    /// List accounts and their devices.
    Accounts,
    /// Show a device's inbox depth and whether it is online.
    Inbox {
        /// Account id.
        account: u64,
        /// Device number.
        device: u32,
    },
    /// Show a group: members, version, fan-out backlog, stored bodies.
    Group {
        /// Group id.
        id: u64,
    },
    /// Keys and bytes per table (a full scan: a diagnostic).
    Storage,
    /// Server statistics.
    Stats,
    /// A cluster node: the node list, its epoch, each node's liveness
    /// and this node's links to them.
    Cluster,
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIPIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    // The error and its causes in one line, never Debug output or a
    // backtrace: operators read this.
    match run(Cli::parse().command) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("pipit: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Serve { config, listen, data_dir, shards, metrics_listen, invite_only } => {
            let mut cfg = match config {
                Some(path) => Config::load(&path)?,
                None => Config::default(),
            };
            if let Some(v) = listen {
                cfg.listen = v;
            }
            if let Some(v) = data_dir {
                cfg.data_dir = v;
            }
            if let Some(v) = shards {
                cfg.shards = v;
            }
            if let Some(v) = metrics_listen {
                cfg.metrics_listen = Some(v);
            }
            if invite_only {
                cfg.accounts.registration = Registration::Invite;
            }
            serve(cfg)
        }
        Command::Key { data_dir, action } => key(&data_dir, action),
        Command::Admin { data_dir, command } => {
            let line = match command {
                AdminCommand::Invite { ttl_secs } => format!("invite {ttl_secs}"),
                AdminCommand::Accounts => "accounts".into(),
                AdminCommand::Inbox { account, device } => format!("inbox {account} {device}"),
                AdminCommand::Group { id } => format!("group {id}"),
                AdminCommand::Storage => "storage".into(),
                AdminCommand::Stats => "stats".into(),
                AdminCommand::Cluster => "cluster".into(),
            };
            let answer = pipit::admin::request(&data_dir, &line)?;
            print!("{answer}");
            if answer.starts_with("error:") {
                std::process::exit(1);
            }
            Ok(())
        }
    }
}

fn key(data_dir: &Path, action: Option<KeyAction>) -> anyhow::Result<()> {
    use pipit::keys;
    std::fs::create_dir_all(data_dir).with_context(|| format!("creating {}", data_dir.display()))?;
    // The key file inside is synced with its directory; the directory's
    // own entry must be too, or a power cut could take the new key away.
    pipit::server::sync_entry(data_dir)?;
    match action {
        None => println!("{}", keys::load_or_create(data_dir)?.current.public()),
        Some(KeyAction::List) => {
            let files = keys::load_or_create(data_dir)?;
            let now = pipit::model::unix_now();
            println!("current {}", files.current.public());
            for r in files.retired.iter().rev() {
                let days = now.saturating_sub(r.since) / 86_400;
                println!("retired {} ({days} days ago)", r.key.public());
            }
        }
        Some(KeyAction::Rotate) => {
            let before = keys::load_or_create(data_dir)?.current;
            let after = keys::rotate(data_dir, pipit::model::unix_now())?;
            println!("new server key {}", after.current.public());
            println!(
                "the old key {} stays accepted: devices that pinned it log in as before and are given the new one",
                before.public()
            );
            reload(data_dir);
        }
        Some(KeyAction::DropRetired) => {
            let dropped = keys::drop_retired(data_dir)?;
            if dropped.is_empty() {
                println!("no retired keys");
                return Ok(());
            }
            for k in &dropped {
                println!("dropped {k}");
            }
            println!("devices still pinning a dropped key get a Retry and must accept the current key to log in");
            reload(data_dir);
        }
    }
    Ok(())
}

/// Tells a running server to read its key files again; says what to do
/// when that is not possible.
fn reload(data_dir: &Path) {
    match pipit::admin::request(data_dir, "keys reload") {
        Ok(answer) if answer.starts_with("error:") => {
            eprintln!("the running server did not reload its keys ({}); restart it", answer.trim());
        }
        Ok(_) => println!("the running server uses the new keys now"),
        Err(_) => println!("no server is running on {}; it uses these keys when it starts", data_dir.display()),
    }
}

fn serve(cfg: Config) -> anyhow::Result<()> {
    if let Some(addr) = cfg.metrics_listen {
        pipit::telemetry::serve(addr, cfg.cluster.is_some())
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
    }
    let grace = cfg.net.shutdown_grace();
    // Take over SIGTERM and SIGINT before anyone can learn we are up: a
    // signal that arrived between "ready" and installing the handlers
    // would kill the process without draining.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let (mut term, mut int) = rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        Ok::<_, std::io::Error>((signal(SignalKind::terminate())?, signal(SignalKind::interrupt())?))
    })?;
    let running = pipit::start(cfg)?;
    // One line on stdout that scripts and tests can read.
    println!("pipit listening on {} server key {}", running.local_addr, running.public_key);
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Ready]);
    let fast = rt.block_on(async {
        tokio::select! {
            _ = term.recv() => false,
            _ = int.recv() => true,
        }
    });
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    if fast {
        // Everything acknowledged is already synced; skip the drain.
        tracing::info!("SIGINT: stopping now");
        running.shutdown(Duration::from_millis(200));
    } else {
        tracing::info!(grace_secs = grace.as_secs(), "SIGTERM: draining");
        running.shutdown(grace);
    }
    Ok(())
}
