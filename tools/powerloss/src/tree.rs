//! The namespace: every inode, its live names and the names its directory
//! last made durable, and the backing files behind them.
//!
//! The backing directory `tree/` always holds the live state, so reads and
//! writes pass straight through. Each directory keeps two maps, the live
//! entries and the durable ones (as of its last fsync, or whatever the
//! [`Model`](crate::Model) says); each file keeps its durable image as an
//! undo record ([`FileState`]). A file that loses its last live name but is
//! still named by some directory's durable map moves to `orphans/` rather
//! than being deleted: a cut may bring its name back. [`Tree::revert`] puts
//! `tree/` into the durable state.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::ffi::{OsStr, OsString};
use std::io;
use std::path::{Path, PathBuf};

use crate::file::FileState;

/// Our inode numbers (never reused within a mount, so a number the kernel
/// still holds can never name another file).
pub(crate) type Ino = u64;

/// The root directory's inode (FUSE's fixed root).
pub(crate) const ROOT: Ino = 1;

/// What an inode is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A regular file: its data is modelled.
    File,
    /// A directory: its entries are modelled.
    Dir,
    /// A Unix socket, FIFO or symlink: only its name is modelled.
    Other,
}

/// A directory's entries, live and durable.
#[derive(Debug, Default, Clone)]
pub(crate) struct Dir {
    pub(crate) live: BTreeMap<OsString, Ino>,
    pub(crate) durable: BTreeMap<OsString, Ino>,
}

#[derive(Debug)]
pub(crate) struct Node {
    pub(crate) kind: Kind,
    /// Live names: (parent, name). A directory has at most one.
    pub(crate) links: Vec<(Ino, OsString)>,
    /// The backing object sits at `orphans/<ino>` (no live name, but a
    /// durable one).
    orphaned: bool,
    pub(crate) file: FileState,
    pub(crate) dir: Dir,
}

impl Node {
    fn new(kind: Kind, file: FileState) -> Self {
        Self { kind, links: Vec::new(), orphaned: false, file, dir: Dir::default() }
    }
}

pub(crate) struct Tree {
    root: PathBuf,
    orphans: PathBuf,
    stage: PathBuf,
    nodes: HashMap<Ino, Node>,
    next: Ino,
}

fn enoent() -> io::Error {
    io::Error::from_raw_os_error(rustix::io::Errno::NOENT.raw_os_error())
}

impl Tree {
    /// Opens `backing`: its `tree/` (created if missing) is the file
    /// system's content, all of it durable.
    pub(crate) fn open(backing: &Path) -> io::Result<Self> {
        let root = backing.join("tree");
        let orphans = backing.join("orphans");
        let stage = backing.join("stage");
        std::fs::create_dir_all(&root)?;
        for d in [&orphans, &stage] {
            if d.exists() {
                std::fs::remove_dir_all(d)?;
            }
        }
        std::fs::create_dir(&orphans)?;
        let mut t = Self { root, orphans, stage, nodes: HashMap::new(), next: ROOT + 1 };
        t.nodes.insert(ROOT, Node::new(Kind::Dir, FileState::default()));
        let mut seen = HashMap::new();
        t.scan(ROOT, &t.root.clone(), &mut seen)?;
        Ok(t)
    }

    fn scan(&mut self, dir: Ino, path: &Path, seen: &mut HashMap<(u64, u64), Ino>) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt as _;
        for e in std::fs::read_dir(path)? {
            let e = e?;
            let meta = std::fs::symlink_metadata(e.path())?;
            let key = (meta.dev(), meta.ino());
            let ino = match seen.get(&key) {
                Some(&ino) if !meta.is_dir() => ino,
                _ => {
                    let kind = kind_of(&meta);
                    let ino = self.alloc(kind, FileState::durable(if kind == Kind::File { meta.len() } else { 0 }));
                    seen.insert(key, ino);
                    if kind == Kind::Dir {
                        self.scan(ino, &e.path(), seen)?;
                    }
                    ino
                }
            };
            self.link(dir, e.file_name(), ino);
        }
        let d = &mut self.node_mut(dir).dir;
        d.durable = d.live.clone();
        Ok(())
    }

    pub(crate) fn alloc(&mut self, kind: Kind, file: FileState) -> Ino {
        let ino = self.next;
        self.next += 1;
        self.nodes.insert(ino, Node::new(kind, file));
        ino
    }

    pub(crate) fn node(&self, ino: Ino) -> Option<&Node> {
        self.nodes.get(&ino)
    }

    pub(crate) fn node_mut(&mut self, ino: Ino) -> &mut Node {
        self.nodes.get_mut(&ino).expect("a known inode")
    }

    /// The live directory `ino`, or `ENOTDIR`/`ENOENT`.
    pub(crate) fn dir(&self, ino: Ino) -> Result<&Dir, rustix::io::Errno> {
        match self.nodes.get(&ino) {
            Some(n) if n.kind == Kind::Dir => Ok(&n.dir),
            Some(_) => Err(rustix::io::Errno::NOTDIR),
            None => Err(rustix::io::Errno::NOENT),
        }
    }

    pub(crate) fn lookup(&self, parent: Ino, name: &OsStr) -> Option<Ino> {
        self.nodes.get(&parent)?.dir.live.get(name).copied()
    }

    /// Adds a live name (the backing object is already there).
    pub(crate) fn link(&mut self, parent: Ino, name: OsString, ino: Ino) {
        self.node_mut(parent).dir.live.insert(name.clone(), ino);
        self.node_mut(ino).links.push((parent, name));
    }

    fn forget_link(&mut self, parent: Ino, name: &OsStr) {
        if let Some(ino) = self.node_mut(parent).dir.live.remove(name) {
            self.node_mut(ino).links.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    /// Where an inode's backing object is now, if it has one.
    pub(crate) fn path(&self, ino: Ino) -> Option<PathBuf> {
        if ino == ROOT {
            return Some(self.root.clone());
        }
        let n = self.nodes.get(&ino)?;
        match n.links.first() {
            Some((parent, name)) => Some(self.path(*parent)?.join(name)),
            None if n.orphaned => Some(self.orphans.join(ino.to_string())),
            None => None,
        }
    }

    /// A name for reports: the path below the mount, or `<orphan N>`.
    pub(crate) fn display(&self, ino: Ino) -> String {
        match self.path(ino) {
            Some(p) => match p.strip_prefix(&self.root) {
                Ok(rel) => format!("/{}", rel.display()),
                Err(_) => format!("<unlinked {ino}>"),
            },
            None => format!("<unlinked {ino}>"),
        }
    }

    /// The last component of an inode's name, for triggers and markers.
    pub(crate) fn file_name(&self, ino: Ino) -> String {
        match self.nodes.get(&ino).and_then(|n| n.links.first()) {
            Some((_, name)) => name.to_string_lossy().into_owned(),
            None => String::new(),
        }
    }

    /// How many durable directory entries name each inode (whether or not
    /// the directory holding them is itself durable yet: a later fsync of
    /// its parent may make it so).
    fn durable_refs(&self) -> HashMap<Ino, usize> {
        let mut refs = HashMap::new();
        for n in self.nodes.values() {
            for &ino in n.dir.durable.values() {
                *refs.entry(ino).or_insert(0) += 1;
            }
        }
        refs
    }

    /// Removes the live name `parent/name` and what stands behind it on
    /// the backing side: the backing object is deleted, unless a durable
    /// entry still names the inode and this was its last live name, in
    /// which case it moves to `orphans/`.
    pub(crate) fn remove_name(&mut self, parent: Ino, name: &OsStr) -> io::Result<()> {
        let ino = self.lookup(parent, name).ok_or_else(enoent)?;
        let path = self.path(parent).ok_or_else(enoent)?.join(name);
        let n = self.node(ino).expect("a linked inode");
        let last = n.links.len() == 1;
        let kind = n.kind;
        if last && self.durable_refs().contains_key(&ino) {
            std::fs::rename(&path, self.orphans.join(ino.to_string()))?;
            self.node_mut(ino).orphaned = true;
        } else if kind == Kind::Dir {
            std::fs::remove_dir(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
        self.forget_link(parent, name);
        Ok(())
    }

    /// Renames `parent/name` to `newparent/newname`; a target there is
    /// removed first (see [`Tree::remove_name`]). Kinds are checked by the
    /// caller.
    pub(crate) fn rename(&mut self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr) -> io::Result<()> {
        let ino = self.lookup(parent, name).ok_or_else(enoent)?;
        let from = self.path(parent).ok_or_else(enoent)?.join(name);
        let to = self.path(newparent).ok_or_else(enoent)?.join(newname);
        if self.lookup(newparent, newname).is_some() {
            self.remove_name(newparent, newname)?;
        }
        std::fs::rename(&from, &to)?;
        self.forget_link(parent, name);
        self.link(newparent, newname.to_os_string(), ino);
        Ok(())
    }

    /// Makes directory `ino`'s live entries durable.
    pub(crate) fn commit(&mut self, ino: Ino) {
        let d = &mut self.node_mut(ino).dir;
        d.durable = d.live.clone();
    }

    /// Makes every directory's live entries durable.
    pub(crate) fn commit_all(&mut self) {
        for n in self.nodes.values_mut() {
            if n.kind == Kind::Dir {
                n.dir.durable = n.dir.live.clone();
            }
        }
    }

    /// Drops inodes nothing can reach any more (no live name, no durable
    /// entry, not open), deleting their orphaned backing objects.
    pub(crate) fn collect(&mut self, open: &HashSet<Ino>) -> io::Result<()> {
        loop {
            let refs = self.durable_refs();
            let dead: Vec<Ino> = self
                .nodes
                .iter()
                .filter(|(ino, n)| **ino != ROOT && n.links.is_empty() && !refs.contains_key(ino))
                .map(|(ino, _)| *ino)
                .collect();
            let mut changed = false;
            for ino in dead {
                let n = self.nodes.get(&ino).expect("listed");
                if n.orphaned {
                    let p = self.orphans.join(ino.to_string());
                    if n.kind == Kind::Dir {
                        std::fs::remove_dir(&p)?;
                    } else {
                        std::fs::remove_file(&p)?;
                    }
                    self.node_mut(ino).orphaned = false;
                }
                if !open.contains(&ino) {
                    self.nodes.remove(&ino);
                    changed = true;
                }
            }
            if !changed {
                return Ok(());
            }
        }
    }

    /// The durable tree from the root, parents before children: each
    /// entry's path below the root, inode and kind.
    pub(crate) fn durable_walk(&self) -> Vec<(PathBuf, Ino, Kind)> {
        let mut out = Vec::new();
        let mut stack = vec![(PathBuf::new(), ROOT)];
        while let Some((at, dir)) = stack.pop() {
            for (name, &ino) in &self.nodes[&dir].dir.durable {
                let Some(n) = self.nodes.get(&ino) else { continue };
                let p = at.join(name);
                out.push((p.clone(), ino, n.kind));
                if n.kind == Kind::Dir {
                    stack.push((p, ino));
                }
            }
        }
        out
    }

    /// Live names that differ from the durable ones: (directory, name,
    /// live inode, durable inode).
    pub(crate) fn entry_changes(&self) -> Vec<(Ino, OsString, Option<Ino>, Option<Ino>)> {
        let mut out = Vec::new();
        let mut dirs: Vec<_> = self.nodes.iter().filter(|(_, n)| n.kind == Kind::Dir).collect();
        dirs.sort_by_key(|(ino, _)| **ino);
        for (&ino, n) in dirs {
            if !n.links.is_empty() || ino == ROOT {
                for (name, &l) in &n.dir.live {
                    if n.dir.durable.get(name) != Some(&l) {
                        out.push((ino, name.clone(), Some(l), n.dir.durable.get(name).copied()));
                    }
                }
                for (name, &d) in &n.dir.durable {
                    if !n.dir.live.contains_key(name) {
                        out.push((ino, name.clone(), None, Some(d)));
                    }
                }
            }
        }
        out
    }

    /// Inodes of regular files, for reports.
    pub(crate) fn files(&self) -> impl Iterator<Item = (Ino, &Node)> {
        self.nodes.iter().filter(|(_, n)| n.kind == Kind::File).map(|(i, n)| (*i, n))
    }

    /// Puts `tree/` into the durable state: every file at its durable
    /// image under its durable names, every name not made durable gone.
    /// Open files must be closed first. The model is then stale: reopen.
    pub(crate) fn revert(&mut self) -> io::Result<()> {
        let walk = self.durable_walk();
        std::fs::create_dir(&self.stage)?;
        let mut staged = HashSet::new();
        for (_, ino, kind) in &walk {
            if *kind == Kind::Dir || !staged.insert(*ino) {
                continue;
            }
            let from = self.path(*ino).ok_or_else(|| {
                io::Error::other(format!("inode {ino} is durable but has no backing file: a model bug"))
            })?;
            let to = self.stage.join(ino.to_string());
            std::fs::rename(&from, &to)?;
            if *kind == Kind::File {
                let f = std::fs::OpenOptions::new().write(true).open(&to)?;
                self.nodes[ino].file.revert(&f)?;
            }
        }
        std::fs::remove_dir_all(&self.root)?;
        std::fs::create_dir(&self.root)?;
        std::fs::remove_dir_all(&self.orphans)?;
        std::fs::create_dir(&self.orphans)?;
        let mut placed: HashMap<Ino, PathBuf> = HashMap::new();
        for (rel, ino, kind) in &walk {
            let to = self.root.join(rel);
            if *kind == Kind::Dir {
                std::fs::create_dir(&to)?;
            } else if let Some(first) = placed.get(ino) {
                std::fs::hard_link(first, &to)?;
            } else {
                std::fs::rename(self.stage.join(ino.to_string()), &to)?;
                placed.insert(*ino, to);
            }
        }
        std::fs::remove_dir(&self.stage)
    }
}

pub(crate) fn kind_of(meta: &std::fs::Metadata) -> Kind {
    if meta.is_dir() {
        Kind::Dir
    } else if meta.is_file() {
        Kind::File
    } else {
        Kind::Other
    }
}
