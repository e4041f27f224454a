//! `pipit`: the chat server binary.

use std::net::SocketAddr;
use std::path::PathBuf;
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
    /// for clients to pin.
    Key {
        /// Data directory.
        #[arg(long, default_value = "pipit-data")]
        data_dir: PathBuf,
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
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PIPIT_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
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
                cfg.registration = Registration::Invite;
            }
            serve(cfg)
        }
        Command::Key { data_dir } => {
            std::fs::create_dir_all(&data_dir)?;
            let key = pipit::server::load_or_create_key(&data_dir)?;
            println!("{}", key.public());
            Ok(())
        }
        Command::Admin { data_dir, command } => {
            let line = match command {
                AdminCommand::Invite { ttl_secs } => format!("invite {ttl_secs}"),
                AdminCommand::Accounts => "accounts".into(),
                AdminCommand::Inbox { account, device } => format!("inbox {account} {device}"),
                AdminCommand::Group { id } => format!("group {id}"),
                AdminCommand::Storage => "storage".into(),
                AdminCommand::Stats => "stats".into(),
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

fn serve(cfg: Config) -> anyhow::Result<()> {
    if let Some(addr) = cfg.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("starting the metrics endpoint on {addr}"))?;
    }
    let grace = Duration::from_secs(cfg.shutdown_grace_secs);
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
