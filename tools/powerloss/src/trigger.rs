//! Cutting power at a chosen operation, and phases an application's own
//! log reveals.
//!
//! A test that cuts at a random instant mostly hits the idle gaps between
//! operations. A [`Trigger`] cuts exactly at the n-th matching operation
//! (before it, so it never happens, or right after it), the way LazyFS's
//! `crash::timing=...::op=...` command does. A [`Marker`] watches the text
//! an application writes to one of its files (RocksDB's `LOG` says
//! `"event": "compaction_started"` and `"compaction_finished"`), so a
//! trigger can wait for a write that happens *during* such a phase.

use std::collections::{BTreeMap, VecDeque};

/// A file system operation, as the trigger and the counters see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[non_exhaustive]
pub enum Op {
    /// A new file (`open(O_CREAT)`, `mknod`).
    Create,
    /// Bytes written to a file.
    Write,
    /// A file's length changed (`truncate`, `fallocate` that grows it).
    Truncate,
    /// `fsync` or `fdatasync` of a file.
    Fsync,
    /// `fsync` of a directory.
    FsyncDir,
    /// A rename.
    Rename,
    /// A name removed (`unlink`).
    Unlink,
    /// A directory made.
    Mkdir,
    /// A directory removed.
    Rmdir,
    /// A hard link made.
    Link,
}

impl Op {
    /// Every operation, for reports.
    pub const ALL: [Op; 10] = [
        Op::Create,
        Op::Write,
        Op::Truncate,
        Op::Fsync,
        Op::FsyncDir,
        Op::Rename,
        Op::Unlink,
        Op::Mkdir,
        Op::Rmdir,
        Op::Link,
    ];

    /// A short lowercase name.
    pub fn name(self) -> &'static str {
        match self {
            Op::Create => "create",
            Op::Write => "write",
            Op::Truncate => "truncate",
            Op::Fsync => "fsync",
            Op::FsyncDir => "fsyncdir",
            Op::Rename => "rename",
            Op::Unlink => "unlink",
            Op::Mkdir => "mkdir",
            Op::Rmdir => "rmdir",
            Op::Link => "link",
        }
    }
}

/// Whether the cut comes before the matching operation or after it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum When {
    /// The operation never happens; it fails with `EIO`.
    Before,
    /// The operation happens (an `fsync` made things durable), then the power goes.
    After,
}

/// Cut the power at an operation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trigger {
    /// The operation.
    pub op: Op,
    /// The file's name contains this (`""`: any file); for a rename, the
    /// old or the new name.
    pub name: String,
    /// Let this many matching operations pass first.
    pub skip: u64,
    /// Before or after the operation.
    pub when: When,
    /// Only while this marker's phase is open (see [`Marker`]).
    pub during: Option<String>,
}

impl Trigger {
    /// Cut before the first `op` on a file whose name contains `name`.
    pub fn before(op: Op, name: &str) -> Self {
        Self { op, name: name.to_string(), skip: 0, when: When::Before, during: None }
    }

    /// Cut right after the first `op` on a file whose name contains `name`.
    pub fn after(op: Op, name: &str) -> Self {
        Self { when: When::After, ..Self::before(op, name) }
    }

    /// Let `n` matches pass first.
    pub fn skip(mut self, n: u64) -> Self {
        self.skip = n;
        self
    }

    /// Only while `marker`'s phase is open.
    pub fn during(mut self, marker: &str) -> Self {
        self.during = Some(marker.to_string());
        self
    }

    pub(crate) fn matches(&self, op: Op, names: &[&str]) -> bool {
        op == self.op && names.iter().any(|n| n.contains(self.name.as_str()))
    }
}

/// A phase an application announces in a file it writes: open from each
/// `begin` until the matching `end`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Marker {
    /// The name triggers and reports use.
    pub name: String,
    /// Files whose name ends with this are watched.
    pub file_suffix: String,
    /// Text that opens the phase.
    pub begin: String,
    /// Text that closes it.
    pub end: String,
}

/// A marker and what it has seen.
#[derive(Debug, Clone)]
pub(crate) struct MarkerState {
    pub(crate) marker: Marker,
    pub(crate) begun: u64,
    pub(crate) ended: u64,
    /// The last bytes written (shorter than either text), so a text that a
    /// buffered logger splits across two writes is still found.
    tail: Vec<u8>,
}

impl MarkerState {
    pub(crate) fn new(marker: Marker) -> Self {
        Self { marker, begun: 0, ended: 0, tail: Vec::new() }
    }

    /// Counts the phase boundaries in bytes written to `name`.
    pub(crate) fn observe(&mut self, name: &str, data: &[u8]) {
        if !name.ends_with(self.marker.file_suffix.as_str()) {
            return;
        }
        let mut window = std::mem::take(&mut self.tail);
        window.extend_from_slice(data);
        self.begun += count(&window, self.marker.begin.as_bytes());
        self.ended += count(&window, self.marker.end.as_bytes());
        let keep = self.marker.begin.len().max(self.marker.end.len()).saturating_sub(1);
        self.tail = window[window.len().saturating_sub(keep)..].to_vec();
    }

    pub(crate) fn open(&self) -> bool {
        self.begun > self.ended
    }
}

/// What [`Switch::gate`] decided about one operation.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Gate {
    /// Go ahead.
    Go,
    /// Cut the power instead of doing it (the reason).
    CutBefore(String),
    /// Do it, then cut the power (the reason).
    CutAfter(String),
}

/// Counters for a run's report.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Operations by kind.
    pub ops: BTreeMap<Op, u64>,
    /// Each marker's phases begun and ended.
    pub phases: BTreeMap<String, (u64, u64)>,
}

/// Operations kept for the report of a cut.
const RECENT: usize = 24;

/// The armed trigger, the markers, and the counters every operation passes.
#[derive(Debug, Default)]
pub(crate) struct Switch {
    trigger: Option<Trigger>,
    /// Matches of the armed trigger let through so far.
    passed: u64,
    pub(crate) markers: Vec<MarkerState>,
    pub(crate) ops: BTreeMap<Op, u64>,
    pub(crate) recent: VecDeque<String>,
}

impl Switch {
    pub(crate) fn arm(&mut self, t: Trigger) {
        self.trigger = Some(t);
        self.passed = 0;
    }

    pub(crate) fn armed(&self) -> bool {
        self.trigger.is_some()
    }

    /// Counts `op` on `names`, remembers `what` for the report, and fires
    /// the armed trigger if this is its operation.
    pub(crate) fn gate(&mut self, op: Op, names: &[&str], what: String) -> Gate {
        *self.ops.entry(op).or_insert(0) += 1;
        if self.recent.len() == RECENT {
            self.recent.pop_front();
        }
        self.recent.push_back(what);
        let Some(t) = &self.trigger else { return Gate::Go };
        if !t.matches(op, names) {
            return Gate::Go;
        }
        if let Some(phase) = &t.during {
            if !self.markers.iter().any(|m| &m.marker.name == phase && m.open()) {
                return Gate::Go;
            }
        }
        if self.passed < t.skip {
            self.passed += 1;
            return Gate::Go;
        }
        let t = self.trigger.take().expect("armed");
        let reason = format!(
            "{} {} {} (match {}){}",
            if t.when == When::Before { "before" } else { "after" },
            op.name(),
            names.join(" -> "),
            t.skip + 1,
            t.during.map(|d| format!(" during {d}")).unwrap_or_default()
        );
        match t.when {
            When::Before => Gate::CutBefore(reason),
            When::After => Gate::CutAfter(reason),
        }
    }

    pub(crate) fn stats(&self) -> Stats {
        Stats {
            ops: self.ops.clone(),
            phases: self.markers.iter().map(|m| (m.marker.name.clone(), (m.begun, m.ended))).collect(),
        }
    }

    /// Feeds written bytes to the markers.
    pub(crate) fn observe(&mut self, name: &str, data: &[u8]) {
        for m in &mut self.markers {
            m.observe(name, data);
        }
    }

    /// The phases open now.
    pub(crate) fn open_phases(&self) -> Vec<String> {
        self.markers.iter().filter(|m| m.open()).map(|m| m.marker.name.clone()).collect()
    }
}

fn count(hay: &[u8], needle: &[u8]) -> u64 {
    if needle.is_empty() || hay.len() < needle.len() {
        return 0;
    }
    hay.windows(needle.len()).filter(|w| *w == needle).count() as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trigger_matches_its_op_and_either_name() {
        let t = Trigger::before(Op::Rename, "CURRENT");
        assert!(t.matches(Op::Rename, &["000001.dbtmp", "CURRENT"]));
        assert!(!t.matches(Op::Rename, &["a", "b"]));
        assert!(!t.matches(Op::Write, &["CURRENT"]));
        assert!(Trigger::after(Op::Fsync, "").matches(Op::Fsync, &["anything"]));
    }

    #[test]
    fn a_trigger_skips_then_fires_once_and_only_during_its_phase() {
        let mut s = Switch::default();
        s.markers.push(MarkerState::new(Marker {
            name: "flush".into(),
            file_suffix: "LOG".into(),
            begin: "flush_started".into(),
            end: "flush_finished".into(),
        }));
        s.arm(Trigger::after(Op::Write, ".sst").skip(1).during("flush"));
        assert_eq!(s.gate(Op::Write, &["000009.sst"], String::new()), Gate::Go, "no flush yet");
        s.observe("LOG", b"flush_started");
        assert_eq!(s.gate(Op::Write, &["000009.sst"], String::new()), Gate::Go, "skipped");
        assert_eq!(s.gate(Op::Write, &["000009.log"], String::new()), Gate::Go, "other file");
        assert!(
            matches!(s.gate(Op::Write, &["000009.sst"], String::new()), Gate::CutAfter(r) if r.contains("during flush"))
        );
        assert!(!s.armed());
        assert_eq!(s.ops[&Op::Write], 4);
        assert_eq!(s.open_phases(), vec!["flush".to_string()]);
    }

    #[test]
    fn a_marker_opens_and_closes_on_its_text_in_its_file() {
        let mut m = MarkerState::new(Marker {
            name: "compaction".into(),
            file_suffix: "LOG".into(),
            begin: "compaction_started".into(),
            end: "compaction_finished".into(),
        });
        m.observe("LOG", b"{\"event\": \"compaction_started\"}\n");
        assert!(m.open());
        m.observe("000004.log", b"compaction_finished");
        assert!(m.open(), "another file does not count");
        m.observe("LOG", b"{\"event\": \"compaction_fin");
        assert!(m.open());
        m.observe("LOG", b"ished\"}\n");
        assert!(!m.open(), "a text split over two writes counts once");
        assert_eq!((m.begun, m.ended), (1, 1));
    }
}
