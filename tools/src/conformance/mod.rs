//! `pipit-conformance`: checks a server against the MUSTs of
//! `protocol/SPEC.md`, one at a time, over real TCP, in the manner of
//! h2spec. Each check prints one line: its result, the SPEC section it
//! tests and what it tests.
//!
//! It needs only the server's address and public key, and registers its
//! own accounts (pass invite codes for a server that requires them). It
//! uses the protocol crate's state machines, never the client library or
//! the server, so a third party can point it at their own server.

mod checks;
mod wire;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use pipit_protocol::handshake::Hello;
use pipit_protocol::message::pb;
use pipit_protocol::{PublicKey, StaticKeypair};

use wire::{Refusal, Wire};

/// The server under test and what the checker may assume of it.
#[derive(Debug, Clone)]
pub struct Target {
    /// Its address.
    pub addr: SocketAddr,
    /// Its current public key.
    pub key: PublicKey,
    /// A retired key it still accepts (SPEC.md 3.6), to check rotation.
    pub retired: Option<PublicKey>,
    /// The handshake timeout it promises (the reference server: 10 s).
    pub handshake_timeout: Duration,
    /// Longest the checker waits for an idle session to be closed (twice
    /// the keepalive interval the server grants); skipped when longer.
    pub max_idle_wait: Duration,
    /// Invite codes, one per account the checker registers, for servers
    /// whose registration needs them.
    pub invites: Vec<String>,
}

/// How one check ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// The server did what SPEC.md says.
    Pass,
    /// It did not; why.
    Fail(String),
    /// The check could not run here; why.
    Skip(String),
}

/// One check's result.
#[derive(Debug, Clone)]
pub struct Report {
    /// The SPEC.md section, like `3.5`.
    pub section: &'static str,
    /// A short stable name.
    pub id: &'static str,
    /// What it checks, in a sentence.
    pub title: &'static str,
    /// How it went.
    pub verdict: Verdict,
    /// How long it took.
    pub took: Duration,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (word, why) = match &self.verdict {
            Verdict::Pass => ("PASS", None),
            Verdict::Fail(w) => ("FAIL", Some(w)),
            Verdict::Skip(w) => ("SKIP", Some(w)),
        };
        write!(f, "{word}  §{:<5} {:<34} {}", self.section, self.id, self.title)?;
        if let Some(w) = why {
            write!(f, "\n      -> {w}")?;
        }
        Ok(())
    }
}

/// What a check returns: `Ok(None)` passed, `Ok(Some(why))` skipped.
type Outcome = Result<Option<String>, String>;

/// The checks' shared state.
pub(crate) struct Ctx {
    pub(crate) target: Target,
    invites: Mutex<Vec<String>>,
}

/// A device the checker registered.
#[derive(Clone)]
pub(crate) struct Device {
    pub(crate) key: StaticKeypair,
    pub(crate) account: u64,
    pub(crate) device: u32,
}

impl Ctx {
    /// Closing "at once" must happen well before the handshake timeout
    /// would close the connection anyway.
    pub(crate) fn prompt(&self) -> Duration {
        (self.target.handshake_timeout / 2).min(Duration::from_secs(2))
    }

    fn invite(&self) -> String {
        self.invites.lock().unwrap_or_else(|e| e.into_inner()).pop().unwrap_or_default()
    }

    /// A new account over IK, with `keepalive_secs` proposed.
    pub(crate) async fn register_with(&self, keepalive_secs: u32) -> Result<(Device, Wire), String> {
        let key = StaticKeypair::generate();
        let hello = Hello::Register(pb::Register {
            invite: wire::text(&self.invite()),
            device_name: "conformance".into(),
            keepalive_secs,
            user_agent: concat!("pipit-conformance/", env!("CARGO_PKG_VERSION")).into(),
        });
        let (w, _) = Wire::ik(self.target.addr, &key, &self.target.key, hello, false)
            .await
            .map_err(|e| format!("registering an account: {e} (registration closed? pass --invite codes)"))?;
        if w.login.account == 0 {
            return Err("registration answered account 0".into());
        }
        Ok((Device { key, account: w.login.account, device: w.login.device }, w))
    }

    /// A new account.
    pub(crate) async fn register(&self) -> Result<(Device, Wire), String> {
        self.register_with(0).await
    }

    /// Logs `d` in over IK.
    pub(crate) async fn login(&self, d: &Device) -> Result<Wire, String> {
        self.login_acked(d, 0).await
    }

    /// Logs `d` in over IK, acknowledging its inbox through `acked`.
    pub(crate) async fn login_acked(&self, d: &Device, acked: u64) -> Result<Wire, String> {
        let hello = login_hello(d.account, d.device, acked);
        Wire::ik(self.target.addr, &d.key, &self.target.key, hello, false)
            .await
            .map(|(w, _)| w)
            .map_err(|e: Refusal| format!("logging in account {}: {e}", d.account))
    }
}

pub(crate) fn login_hello(account: u64, device: u32, acked_through: u64) -> Hello {
    Hello::Login(pb::Login { account, device, acked_through, keepalive_secs: 0, user_agent: String::new() })
}

/// Every check's section, id and title, in run order.
pub fn list() -> Vec<(&'static str, &'static str, &'static str)> {
    checks::all().into_iter().map(|c| (c.section, c.id, c.title)).collect()
}

/// Runs the checks whose id contains `filter` (all when empty), calling
/// `each` as each one finishes.
pub async fn run(target: Target, filter: &str, mut each: impl FnMut(&Report)) -> Vec<Report> {
    let per_check = target.handshake_timeout * 2 + target.max_idle_wait + Duration::from_secs(60);
    let invites = Mutex::new(target.invites.iter().rev().cloned().collect());
    let cx = Ctx { target, invites };
    let mut out = Vec::new();
    for c in checks::all().into_iter().filter(|c| c.id.contains(filter)) {
        let started = Instant::now();
        let verdict = match tokio::time::timeout(per_check, (c.run)(&cx)).await {
            Err(_) => Verdict::Fail(format!("did not finish within {per_check:?}")),
            Ok(Ok(None)) => Verdict::Pass,
            Ok(Ok(Some(why))) => Verdict::Skip(why),
            Ok(Err(why)) => Verdict::Fail(why),
        };
        let r = Report { section: c.section, id: c.id, title: c.title, verdict, took: started.elapsed() };
        each(&r);
        out.push(r);
    }
    out
}
