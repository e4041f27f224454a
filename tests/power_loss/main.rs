//! The real `pipit` binary with its data directory on the power-loss file
//! system (`tools/powerloss`), under load from the real client library:
//! the power is cut at chosen moments (between a WAL write and its fsync,
//! right after it, while RocksDB recovers, flushes or compacts, writes its
//! MANIFEST or renames CURRENT, while a group fans out, in the middle of a
//! key rotation), the server is killed, the file system comes back with
//! only what was synced, the server restarts on it, and the senders send
//! what was never confirmed again. In the end every message answered
//! "sent" must have reached every recipient, in order, never twice within
//! one server lifetime.
//!
//! `PIPIT_POWERLOSS_CUTS` (default 6), `PIPIT_POWERLOSS_SEED` (default:
//! the clock; printed), `PIPIT_POWERLOSS_MODEL` (`strict`, `ext4-ordered`,
//! `passthrough`; default strict) and `PIPIT_POWERLOSS_LOAD_MS` (1200)
//! shape the run; `bench/powerloss.sh` runs hundreds of cuts. Needs FUSE
//! (/dev/fuse, root or fusermount3): without it the test fails and says so.

#[path = "../common/mod.rs"]
mod common;

mod check;
mod load;
mod run;

use run::{CutKind, Plan};

fn env<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

#[tokio::test]
async fn acknowledged_messages_survive_power_cuts() {
    let seed = env("PIPIT_POWERLOSS_SEED", run::clock_seed());
    let model = std::env::var("PIPIT_POWERLOSS_MODEL").unwrap_or_else(|_| "strict".into());
    let model = pipit_powerloss::Model::from_name(&model).unwrap_or_else(|| panic!("unknown model {model}"));
    let plan = Plan {
        seed,
        cuts: env("PIPIT_POWERLOSS_CUTS", 6),
        model,
        sync_writes: true,
        load_ms: env("PIPIT_POWERLOSS_LOAD_MS", 1200),
        kinds: CutKind::ALL.to_vec(),
    };
    let out = run::run(plan).await;
    assert!(out.verdict.clean(), "seed {seed}: acknowledged messages lost or mangled:\n{}", out.describe_failure());
    assert!(out.key_violations.is_empty(), "seed {seed}: {:?}", out.key_violations);
    assert!(out.verdict.checked > 0 && out.cuts > 0, "the run checked nothing");
}

/// The checker is not vacuous: with `sync_writes = false` (the benchmark
/// setting, WAL never fsynced) a cut loses messages the server answered
/// "sent", and the check says which and after which cut.
#[tokio::test]
async fn without_synced_writes_a_cut_loses_acknowledged_messages() {
    let seed = env("PIPIT_POWERLOSS_SEED", run::clock_seed());
    let plan = Plan {
        seed,
        cuts: 2,
        model: pipit_powerloss::Model::Strict,
        sync_writes: false,
        load_ms: 1200,
        kinds: vec![CutKind::Timed],
    };
    let out = run::run(plan).await;
    println!("{}", out.describe_failure());
    assert!(!out.verdict.lost.is_empty(), "seed {seed}: no loss found with the WAL never synced: the checker is blind");
    assert!(out.verdict.lost_in.iter().all(|l| *l < out.cuts), "losses come from lifetimes a cut ended");
}
