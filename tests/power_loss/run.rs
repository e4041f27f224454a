//! One run: lifetimes of the server, each ended by a power cut of some
//! kind, then a last lifetime that delivers everything, and the verdict.

use std::io::BufRead as _;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::{Message, PublicKey};
use pipit_powerloss::{mount, Control, CutReport, Marker, Model, Mounted, Op, Trigger};
use rand::{Rng as _, SeedableRng as _};
use tokio_util::sync::CancellationToken;

use crate::check::{Ledger, Verdict};
use crate::common::{expect, register};
use crate::load::{receive, try_login, Sender, Shared, Target};

/// Where the power goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum CutKind {
    /// At a random moment of the load.
    Timed,
    /// Group commit: a batch is in the WAL, its fsync has not happened.
    WalBeforeSync,
    /// Group commit: the fsync happened, "sent" may not have gone out.
    WalAfterSync,
    /// While group messages fan out to members (a slowed fan-out).
    FanOut,
    /// In the middle of `pipit key rotate`.
    KeyRotation,
    /// At a MANIFEST write or sync (recovery, flush, compaction).
    Manifest,
    /// At the rename that replaces CURRENT (every open makes a MANIFEST).
    Current,
    /// At a table write while the LOG says a compaction is running.
    Compaction,
    /// At a table write while RocksDB recovers its WAL into tables.
    Recovery,
}

impl CutKind {
    /// In the order a run takes them (round-robin): the first six are what
    /// CI's six cuts cover. A compaction needs four tables on level 0 of a
    /// column family, and every restart recovers the WAL into one, so
    /// `Compaction` comes after five restarts.
    pub(crate) const ALL: [CutKind; 9] = [
        CutKind::WalBeforeSync,
        CutKind::WalAfterSync,
        CutKind::FanOut,
        CutKind::KeyRotation,
        CutKind::Current,
        CutKind::Compaction,
        CutKind::Recovery,
        CutKind::Manifest,
        CutKind::Timed,
    ];

    /// The trigger armed before the server starts (cuts during its open).
    fn at_start(self, rng: &mut rand::rngs::StdRng) -> Option<Trigger> {
        Some(match self {
            CutKind::Recovery => Trigger::after(Op::Write, ".sst").during("recovery").skip(rng.random_range(0..4)),
            CutKind::Current => {
                if rng.random_bool(0.5) {
                    Trigger::before(Op::Rename, "CURRENT")
                } else {
                    Trigger::after(Op::Rename, "CURRENT")
                }
            }
            CutKind::Manifest => Trigger::after(Op::Write, "MANIFEST").skip(rng.random_range(0..6)),
            CutKind::Compaction => Trigger::after(Op::Write, ".sst").during("compaction").skip(rng.random_range(0..8)),
            _ => return None,
        })
    }

    /// The trigger armed once the load runs.
    fn during_load(self, rng: &mut rand::rngs::StdRng) -> Option<Trigger> {
        Some(match self {
            CutKind::WalBeforeSync => Trigger::before(Op::Fsync, ".log").skip(rng.random_range(10..200)),
            CutKind::WalAfterSync => Trigger::after(Op::Fsync, ".log").skip(rng.random_range(10..200)),
            CutKind::KeyRotation => {
                let op = [Op::Create, Op::Write, Op::Fsync, Op::Rename][rng.random_range(0..4)];
                let name = if rng.random_bool(0.5) { "server.tmp" } else { "server.key" };
                let t = if rng.random_bool(0.5) { Trigger::before(op, name) } else { Trigger::after(op, name) };
                t.skip(rng.random_range(0..2))
            }
            _ => return None,
        })
    }
}

pub(crate) struct Plan {
    pub(crate) seed: u64,
    pub(crate) cuts: usize,
    pub(crate) model: Model,
    pub(crate) sync_writes: bool,
    pub(crate) load_ms: u64,
    pub(crate) kinds: Vec<CutKind>,
}

pub(crate) fn clock_seed() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1)
}

pub(crate) struct Outcome {
    pub(crate) cuts: usize,
    pub(crate) verdict: Verdict,
    pub(crate) key_violations: Vec<String>,
    /// The report of the cut that ended each lifetime.
    pub(crate) reports: Vec<CutReport>,
}

impl Outcome {
    pub(crate) fn describe_failure(&self) -> String {
        let mut s = self.verdict.describe(20);
        for l in &self.verdict.lost_in {
            if let Some(r) = self.reports.get(*l) {
                s.push_str(&format!("the cut that ended lifetime {l}:\n{r}"));
            }
        }
        s
    }
}

/// A running server: its process, address and key.
struct Server {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    key: PublicKey,
}

impl Server {
    /// Starts the binary on `dir`; `Err` if it ends before it listens (the
    /// power went while it opened its database).
    fn start(dir: &Path, config: &Path) -> Result<Self, String> {
        let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pipit"))
            .args(["serve", "--listen", "127.0.0.1:0", "--shards", "1", "--data-dir"])
            .arg(dir)
            .arg("--config")
            .arg(config)
            .env("PIPIT_LOG", "error")
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("start pipit");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = std::io::BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(60)).unwrap_or_default();
        let words: Vec<&str> = line.split_whitespace().collect();
        if words.len() < 7 || words[..3] != ["pipit", "listening", "on"] {
            let _ = child.kill();
            let status = child.wait();
            return Err(format!("the server did not start ({status:?}): {line:?}"));
        }
        Ok(Self { addr: words[3].parse().unwrap(), key: words[6].parse().unwrap(), child })
    }

    fn kill(self) {}
}

impl Drop for Server {
    /// SIGKILL: the power is already off when this runs (and a test that
    /// panics must not leave a server behind on a mount that is gone).
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `pipit key drop-retired` then `pipit key rotate` on `dir`; the new key
/// if the rotation said it succeeded.
fn rotate(dir: &Path) -> Option<PublicKey> {
    let key = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pipit"))
            .arg("key")
            .args(args)
            .arg("--data-dir")
            .arg(dir)
            .stderr(std::process::Stdio::null())
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
    };
    key(&["drop-retired"])?;
    let out = key(&["rotate"])?;
    out.lines().find_map(|l| l.strip_prefix("new server key ")).and_then(|k| k.trim().parse().ok())
}

fn markers() -> Vec<Marker> {
    let m = |name: &str, begin: &str, end: &str| Marker {
        name: name.into(),
        file_suffix: "LOG".into(),
        begin: begin.into(),
        end: end.into(),
    };
    vec![
        m("compaction", "\"compaction_started\"", "\"compaction_finished\""),
        m("flush", "\"flush_started\"", "\"flush_finished\""),
        m("recovery", "\"recovery_started\"", "\"recovery_finished\""),
    ]
}

struct Fs {
    backing: PathBuf,
    mnt: PathBuf,
    model: Model,
    mounted: Option<Mounted>,
}

impl Fs {
    fn mount(&mut self) -> Control {
        let m = mount(&self.backing, &self.mnt, self.model).unwrap_or_else(|e| panic!("{e}"));
        for marker in markers() {
            m.control().add_marker(marker);
        }
        let c = m.control().clone();
        self.mounted = Some(m);
        c
    }

    fn unmount(&mut self) {
        if let Some(m) = self.mounted.take() {
            m.unmount().expect("unmount");
        }
    }
}

/// Waits up to `d` for the power to go (a trigger); then cuts it anyway.
async fn cut_within(control: &Control, d: Duration, why: &str) -> (CutReport, bool) {
    let c = control.clone();
    let fired = tokio::task::spawn_blocking(move || c.wait_cut(d)).await.unwrap();
    match fired {
        Some(r) => (r, true),
        None => (control.cut(why).expect("cut"), false),
    }
}

pub(crate) async fn run(plan: Plan) -> Outcome {
    println!(
        "power-loss run: seed {} ({} cuts, model {}, sync_writes {}); PIPIT_POWERLOSS_SEED={} repeats the choices",
        plan.seed,
        plan.cuts,
        plan.model.name(),
        plan.sync_writes,
        plan.seed
    );
    let started = Instant::now();
    let mut rng = rand::rngs::StdRng::seed_from_u64(plan.seed);
    let root = tempfile::tempdir().unwrap();
    let config = root.path().join("pipit.toml");
    // Small group commits (many WAL syncs), a slow fan-out in small steps
    // (so cuts land inside it), receipts flushed often; the smallest storage
    // reserve (the backing disk's free space is not what this test is about).
    let settings = format!(
        "[storage]\nmax_batch = 4\nsync_writes = {}\nreserve_mb = 64\n\
         [groups]\nfanout_batch = 2\nfanout_step_delay_ms = 5\nreceipt_flush_ms = 200\n",
        plan.sync_writes
    );
    std::fs::write(&config, settings).unwrap();
    let mnt = root.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let mut fs = Fs { backing: root.path().join("backing"), mnt: mnt.clone(), model: plan.model, mounted: None };
    // The server makes its data directory itself, inside the file system,
    // so that creating it is tested too.
    let data = mnt.join("data");
    let mut control = fs.mount();
    let ledger: Shared = Arc::new(Mutex::new(Ledger::default()));

    // Lifetime 0 begins with the accounts and the group.
    let first = Server::start(&data, &config).expect("the first start");
    let mut devs = Vec::new();
    for _ in 0..11 {
        devs.push(register(first.addr).await.0);
    }
    let (senders_1to1, rest) = devs.split_at(4);
    let (group_sender, receivers) = (rest[0].clone(), rest[1..].to_vec());
    let mut gc = try_login(first.addr, first.key, &group_sender).await.unwrap();
    let members: Vec<u64> = receivers.iter().map(|d| d.account).collect();
    gc.send(&[pb::GroupCreate { req: 1, name: Bytes::from_static(b"club"), members, id: 0 }.into()]).await.unwrap();
    let group = expect(&mut gc, |m| match m {
        Message::GroupInfo(g) if g.req == 1 => Some(g.group),
        Message::Error(e) if e.req == 1 => panic!("group create: {e:?}"),
        _ => None,
    })
    .await;
    drop(gc);
    let first = if plan.sync_writes {
        first
    } else {
        // Without synced writes even the accounts would not survive a
        // cut; a graceful stop (SIGTERM) makes them durable first.
        let status = std::process::Command::new("kill").args(["-TERM", &first.child.id().to_string()]).status();
        assert!(status.is_ok_and(|s| s.success()));
        let mut first = first;
        let _ = first.child.wait();
        drop(first);
        Server::start(&data, &config).expect("the start after the graceful stop")
    };
    let mut senders: Vec<Sender> = senders_1to1
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let to = receivers[i].account;
            Sender::new(d.clone(), &format!("a{i}"), Target::Account(to), vec![(to, (0, d.account))], 4, 2_000)
        })
        .collect();
    let group_to = receivers.iter().map(|r| (r.account, (group, 0))).collect();
    // Fewer group messages: each takes three slowed fan-out steps after
    // "sent", and a backlog that outgrows the lifetimes would make the
    // last drain of a long run wait for minutes.
    senders.push(Sender::new(group_sender, "g", Target::Group(group), group_to, 2, 20));

    let mut reports = Vec::new();
    let mut key_violations = Vec::new();
    // After a key rotation lifetime: the key the server must not come back
    // with (the one the first, completed rotation retired) and the one it
    // must (the second rotation's, if it said it was done before the cut).
    let mut expect_key: Option<(PublicKey, Option<PublicKey>)> = None;
    // Rotations `pipit key rotate` reported done before a cut, and how
    // many of those the next start was found to have kept.
    let (mut rotated, mut rotation_kept) = (0, 0);
    let mut fired = 0;
    let mut failed_starts = 0;
    let mut first = Some(first);
    for lifetime in 0..=plan.cuts {
        let kind = plan.kinds[lifetime % plan.kinds.len()];
        let server = if let Some(s) = first.take() {
            s
        } else {
            control = fs.mount();
            if let Some(t) = kind.at_start(&mut rng).filter(|_| lifetime < plan.cuts) {
                control.arm(t);
            }
            let server = match Server::start(&data, &config) {
                Ok(s) => s,
                Err(e) => {
                    // Only a cut during the start may stop it.
                    let r = control.wait_cut(Duration::ZERO).unwrap_or_else(|| panic!("seed {}: {e}", plan.seed));
                    println!("lifetime {lifetime} ({kind:?}): the power went while the server started\n{r}");
                    reports.push(r);
                    fired += 1;
                    failed_starts += 1;
                    fs.unmount();
                    continue;
                }
            };
            if let Some((old, new)) = expect_key.take() {
                if server.key != old && new.is_none_or(|k| server.key == k) {
                    rotation_kept += 1 + usize::from(new.is_some());
                } else {
                    key_violations.push(format!(
                        "lifetime {lifetime}: came back with key {} (rotated away from {old}, then to {new:?} before the cut)",
                        server.key
                    ));
                }
            }
            server
        };
        let last = lifetime == plan.cuts;
        let stop = CancellationToken::new();
        if last {
            // Everything unconfirmed goes again, then every device drains.
            for s in std::mem::take(&mut senders) {
                let s = s.run(server.addr, server.key, ledger.clone(), lifetime, false, stop.clone());
                senders.push(tokio::time::timeout(Duration::from_secs(120), s).await.expect("the last sends"));
            }
            let unconfirmed: usize = senders.iter().map(Sender::unconfirmed).sum();
            assert_eq!(unconfirmed, 0, "seed {}: the last lifetime could not confirm every message", plan.seed);
            let mut receiving = Vec::new();
            for r in &receivers {
                let rx = receive(server.addr, server.key, r.clone(), ledger.clone(), lifetime, stop.clone(), true);
                receiving.push(tokio::spawn(rx));
            }
            let drain = Duration::from_secs(120 + 2 * plan.cuts as u64);
            for r in receiving {
                let ok = tokio::time::timeout(drain, r).await.expect("the drain ends (a fan-out backlog too long?)");
                assert!(ok.expect("receiver"), "a receiver lost its connection in the last lifetime");
            }
            server.kill();
            fs.unmount();
            break;
        }
        let mut tasks = Vec::new();
        for s in senders.drain(..) {
            tasks.push(tokio::spawn(s.run(server.addr, server.key, ledger.clone(), lifetime, true, stop.clone())));
        }
        let mut receiving = Vec::new();
        for r in &receivers {
            let rx = receive(server.addr, server.key, r.clone(), ledger.clone(), lifetime, stop.clone(), false);
            receiving.push(tokio::spawn(rx));
        }

        let load = Duration::from_millis(plan.load_ms);
        let (report, by_trigger) = match kind {
            CutKind::Timed | CutKind::FanOut => {
                let at = rng.random_range(plan.load_ms / 8..=plan.load_ms);
                tokio::time::sleep(Duration::from_millis(at)).await;
                (control.cut(&format!("{kind:?} at {at} ms")).expect("cut"), false)
            }
            CutKind::KeyRotation => {
                // One rotation that completes, then one the power cuts
                // (or that completes before the trigger's moment).
                tokio::time::sleep(Duration::from_millis(rng.random_range(0..plan.load_ms / 4))).await;
                let dir = data.clone();
                let first = tokio::task::spawn_blocking(move || rotate(&dir)).await.unwrap();
                assert!(first.is_some(), "seed {}: a rotation with the power on failed", plan.seed);
                if let Some(t) = kind.during_load(&mut rng) {
                    control.arm(t);
                }
                let dir = data.clone();
                let second = tokio::task::spawn_blocking(move || rotate(&dir)).await.unwrap();
                let out = cut_within(&control, load / 2, "after the rotations").await;
                rotated += 1 + usize::from(second.is_some());
                expect_key = Some((server.key, second));
                out
            }
            _ => {
                if let Some(t) = kind.during_load(&mut rng) {
                    control.arm(t);
                }
                cut_within(&control, load, &format!("{kind:?}: trigger did not fire, timed")).await
            }
        };
        server.kill();
        stop.cancel();
        for t in tasks {
            senders.push(t.await.expect("sender"));
        }
        for r in receiving {
            let _ = r.await;
        }
        fired += usize::from(by_trigger);
        let stats = control.stats();
        println!(
            "lifetime {lifetime} ({kind:?}{}): {} bytes dropped, {} entries set back; phases so far {:?}\n{}",
            if by_trigger { ", trigger" } else { "" },
            report.bytes_dropped(),
            report.entries.len(),
            stats.phases,
            short(&report)
        );
        reports.push(report);
        fs.unmount();
    }

    let verdict = ledger.lock().unwrap().verify();
    let (relogins, after_relogin) = {
        let l = ledger.lock().unwrap();
        (l.relogins.clone(), l.after_relogin)
    };
    if !relogins.is_empty() {
        println!(
            "the last drain stalled for accounts {relogins:?} with messages missing; after logging in again they \
             got {after_relogin} more (a delivery stall, not a loss)"
        );
    }
    let confirmed: u64 = senders.iter().map(Sender::created).sum();
    let during: Vec<String> = reports.iter().flat_map(|r| r.open_phases.clone()).collect();
    println!(
        "power-loss run: seed {}, {} cuts ({} by trigger, {} during a start; open phases at cuts: {:?}), \
         {} messages sent and confirmed, {} (message, recipient) pairs checked, {} deliveries \
         ({} repeated after a cut), {} lost; key rotations done before a cut {}, kept after it {}; {:.1} s",
        plan.seed,
        reports.len(),
        fired,
        failed_starts,
        during,
        confirmed,
        verdict.checked,
        verdict.deliveries,
        verdict.redelivered_after_cut,
        verdict.lost.len(),
        rotated,
        rotation_kept,
        started.elapsed().as_secs_f64()
    );
    Outcome { cuts: reports.len(), verdict, key_violations, reports }
}

/// A cut report without its operation log (printed whole on failure).
fn short(r: &CutReport) -> String {
    let mut r = r.clone();
    r.recent.clear();
    r.to_string()
}
