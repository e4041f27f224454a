//! `pipit-conformance`: checks a pipit server against the MUSTs of
//! `protocol/SPEC.md`, one line per check with its section and result.
//!
//! ```sh
//! pipit-conformance --server 127.0.0.1:5222 --server-key "$(pipit key)"
//! ```
//!
//! Exit status 0 when every check that ran passed, 1 otherwise.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use pipit_client::pipit_protocol::PublicKey;
use pipit_tools::conformance::{self, Target, Verdict};

#[derive(Parser)]
#[command(name = "pipit-conformance", version, about = "Check a pipit server against protocol/SPEC.md")]
struct Args {
    /// The server's address.
    #[arg(long, default_value = "127.0.0.1:5222")]
    server: SocketAddr,
    /// The server's public key (`pipit key`).
    #[arg(long, required_unless_present = "list")]
    server_key: Option<PublicKey>,
    /// A retired key the server still accepts (after `pipit key rotate`),
    /// to check rotation (SPEC.md 3.6); skipped without it.
    #[arg(long)]
    retired_key: Option<PublicKey>,
    /// The handshake timeout the server promises, seconds.
    #[arg(long, default_value_t = 10)]
    handshake_timeout: u64,
    /// Longest wait for an idle session to be closed, seconds: the idle
    /// check is skipped when twice the server's keepalive is longer.
    #[arg(long, default_value_t = 120)]
    max_idle_wait: u64,
    /// An invite code for one registration; repeat for a server that
    /// requires invites (the checker registers about 80 accounts).
    #[arg(long)]
    invite: Vec<String>,
    /// Run only the checks whose name contains this.
    #[arg(long, default_value = "")]
    only: String,
    /// List the checks and exit.
    #[arg(long)]
    list: bool,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    if args.list {
        for (section, id, title) in conformance::list() {
            println!("§{section:<5} {id:<34} {title}");
        }
        return std::process::ExitCode::SUCCESS;
    }
    let Some(key) = args.server_key else {
        eprintln!("pipit-conformance: --server-key is required");
        return std::process::ExitCode::FAILURE;
    };
    let target = Target {
        addr: args.server,
        key,
        retired: args.retired_key,
        handshake_timeout: Duration::from_secs(args.handshake_timeout),
        max_idle_wait: Duration::from_secs(args.max_idle_wait),
        invites: args.invite,
    };
    let rt = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pipit-conformance: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    println!("pipit-conformance: {} server key {key}", args.server);
    let reports = rt.block_on(conformance::run(target, &args.only, |r| println!("{r}")));
    let count = |f: fn(&Verdict) -> bool| reports.iter().filter(|r| f(&r.verdict)).count();
    let failed = count(|v| matches!(v, Verdict::Fail(_)));
    println!(
        "{} checks: {} passed, {failed} failed, {} skipped",
        reports.len(),
        count(|v| *v == Verdict::Pass),
        count(|v| matches!(v, Verdict::Skip(_)))
    );
    if failed == 0 {
        std::process::ExitCode::SUCCESS
    } else {
        std::process::ExitCode::FAILURE
    }
}
