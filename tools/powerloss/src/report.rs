//! What a power cut threw away, in words a failing test can print.

use std::collections::BTreeMap;
use std::fmt;

use crate::tree::{Ino, Tree};
use crate::{Model, Op};

/// One file whose data a cut sets back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileLoss {
    /// Its path below the mount (or `<unlinked N>`).
    pub path: String,
    /// Bytes the application saw.
    pub live_len: u64,
    /// Bytes of its durable image.
    pub durable_len: u64,
    /// Bytes of the durable image that had been overwritten or truncated.
    pub rewritten: u64,
}

/// One directory entry a cut changes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EntryLoss {
    /// The directory below the mount.
    pub dir: String,
    /// The entry's name.
    pub name: String,
    /// What happens to it.
    pub change: EntryChange,
}

/// How a directory entry differs from its durable state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
#[non_exhaustive]
pub enum EntryChange {
    /// Made since the last sync of its directory: it vanishes.
    Vanishes,
    /// Removed since: it comes back.
    ComesBack,
    /// Renamed over since: the old file comes back under this name.
    Replaced,
}

/// What a cut discarded, and what led up to it.
#[derive(Debug, Clone, Default)]
pub struct CutReport {
    /// Why the power went (`control`, or the trigger that fired).
    pub reason: String,
    /// The crash model in force.
    pub model: Model,
    /// Files whose unsynced data was dropped.
    pub files: Vec<FileLoss>,
    /// Directory entries set back.
    pub entries: Vec<EntryLoss>,
    /// The last operations before the cut, oldest first.
    pub recent: Vec<String>,
    /// Operations counted since the mount.
    pub ops: BTreeMap<Op, u64>,
    /// Phases open at the cut (markers whose begin outnumbered their end).
    pub open_phases: Vec<String>,
}

impl CutReport {
    /// What a cut of `tree` now would discard (without the operation log).
    pub(crate) fn of(tree: &Tree, live_len: impl Fn(Ino) -> u64, reason: &str, model: Model) -> Self {
        let mut files: Vec<FileLoss> = tree
            .files()
            .filter_map(|(ino, n)| {
                let live_len = live_len(ino);
                n.file.is_dirty(live_len).then(|| FileLoss {
                    path: tree.display(ino),
                    live_len,
                    durable_len: n.file.durable_len,
                    rewritten: n.file.saved_bytes(),
                })
            })
            .collect();
        files.sort_by(|a, b| a.path.cmp(&b.path));
        let entries = tree
            .entry_changes()
            .into_iter()
            .map(|(dir, name, live, durable)| EntryLoss {
                dir: tree.display(dir),
                name: name.to_string_lossy().into_owned(),
                change: match (live, durable) {
                    (Some(_), None) => EntryChange::Vanishes,
                    (None, _) => EntryChange::ComesBack,
                    (Some(_), Some(_)) => EntryChange::Replaced,
                },
            })
            .collect();
        Self { reason: reason.to_string(), model, files, entries, ..Self::default() }
    }

    /// Bytes of unsynced data dropped (appends and overwrites).
    pub fn bytes_dropped(&self) -> u64 {
        self.files.iter().map(|f| f.live_len.saturating_sub(f.durable_len) + f.rewritten).sum()
    }
}

impl fmt::Display for CutReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "power cut ({}, model {})", self.reason, self.model.name())?;
        if !self.open_phases.is_empty() {
            writeln!(f, "  during: {}", self.open_phases.join(", "))?;
        }
        for l in &self.files {
            writeln!(
                f,
                "  data  {}: {} -> {} bytes{}",
                l.path,
                l.live_len,
                l.durable_len,
                if l.rewritten > 0 { format!(", {} rewritten bytes restored", l.rewritten) } else { String::new() }
            )?;
        }
        for e in &self.entries {
            let what = match e.change {
                EntryChange::Vanishes => "vanishes (not in a synced directory)",
                EntryChange::ComesBack => "comes back (its removal was not synced)",
                EntryChange::Replaced => "old file comes back (the rename over it was not synced)",
            };
            writeln!(f, "  entry {}/{}: {what}", e.dir.trim_end_matches('/'), e.name)?;
        }
        if !self.recent.is_empty() {
            writeln!(f, "  last operations:")?;
            for r in &self.recent {
                writeln!(f, "    {r}")?;
            }
        }
        Ok(())
    }
}
