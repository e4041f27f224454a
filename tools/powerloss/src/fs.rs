//! The file system's operations, without FUSE: what each one does to the
//! backing directory and to the durable state, and the power cut.
//!
//! Operations name inodes, as FUSE does. Errors are errnos because that is
//! all FUSE can carry back to the application. After a cut every operation
//! fails with `EIO` until the file system is opened again on the same
//! backing directory (which then holds exactly the durable state).

use std::ffi::OsStr;
use std::io;
use std::os::unix::fs::{DirBuilderExt as _, FileExt as _, OpenOptionsExt as _};
use std::path::Path;

pub use rustix::io::Errno;

use crate::file::FileState;
use crate::handles::{backing_options, read_at, DirEntry, Handles};
use crate::report::CutReport;
use crate::tree::{kind_of, Ino, Kind, Tree, ROOT};
use crate::trigger::{Gate, MarkerState, Stats, Switch};
use crate::{Marker, Model, Op, Trigger};

/// Result of an operation: an errno on failure.
pub type Result<T> = std::result::Result<T, Errno>;

fn errno(e: io::Error) -> Errno {
    Errno::from_io_error(&e).unwrap_or(Errno::IO)
}

/// An inode's attributes: its number and the backing object's metadata.
#[derive(Debug, Clone)]
pub struct Attr {
    /// The inode number the application sees.
    pub ino: u64,
    /// The backing object's metadata (size, mode, times).
    pub meta: std::fs::Metadata,
}

/// The power-loss file system over a backing directory.
pub struct PowerFs {
    tree: Tree,
    model: Model,
    handles: Handles,
    powered: bool,
    switch: Switch,
    last_cut: Option<CutReport>,
}

impl PowerFs {
    /// Opens the backing directory: `backing/tree` holds the files (all of
    /// them durable now); `backing/orphans` and `backing/stage` are the file
    /// system's own.
    pub fn open(backing: &Path, model: Model) -> io::Result<Self> {
        let tree = Tree::open(backing)?;
        Ok(Self { tree, model, handles: Handles::default(), powered: true, switch: Switch::default(), last_cut: None })
    }

    /// The crash model.
    pub fn model(&self) -> Model {
        self.model
    }

    /// False once the power has been cut.
    pub fn powered(&self) -> bool {
        self.powered
    }

    /// Arms a trigger (replacing any other).
    pub fn arm(&mut self, t: Trigger) {
        self.switch.arm(t);
    }

    /// Whether a trigger is armed and has not fired.
    pub fn armed(&self) -> bool {
        self.switch.armed()
    }

    /// Watches for a phase (see [`Marker`]).
    pub fn add_marker(&mut self, m: Marker) {
        self.switch.markers.push(MarkerState::new(m));
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.switch.stats()
    }

    /// Passes `op` through the switch: `Err(EIO)` if the power is (now)
    /// off, `Ok(Some(reason))` if it goes once this operation is done.
    fn gate(&mut self, op: Op, names: &[&str], what: impl FnOnce(&Tree) -> String) -> Result<Option<String>> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let what = what(&self.tree);
        match self.switch.gate(op, names, what) {
            Gate::Go => Ok(None),
            Gate::CutAfter(reason) => Ok(Some(reason)),
            Gate::CutBefore(reason) => {
                self.cut(&reason).map_err(errno)?;
                Err(Errno::IO)
            }
        }
    }

    /// Cuts the power if [`Self::gate`] said so, once the operation is done.
    fn finish<T>(&mut self, cut: Option<String>, r: Result<T>) -> Result<T> {
        if let Some(reason) = cut {
            self.cut(&reason).map_err(errno)?;
        }
        r
    }

    /// Makes entry changes durable as the model says, after `op` changed
    /// the entries of `dirs`.
    fn entries_changed(&mut self, dirs: &[Ino]) {
        if self.model == Model::Passthrough {
            for &d in dirs {
                self.tree.commit(d);
            }
        }
    }

    fn collect(&mut self) -> Result<()> {
        let open = self.handles.open_inodes();
        self.tree.collect(&open).map_err(errno)
    }

    fn attr(&self, ino: Ino) -> Result<Attr> {
        let meta = match self.tree.path(ino) {
            Some(p) => std::fs::symlink_metadata(p),
            None => self.handles.file_of(ino).ok_or(Errno::NOENT)?.metadata(),
        };
        Ok(Attr { ino, meta: meta.map_err(errno)? })
    }

    /// A new name must not exist yet, in a directory that does.
    fn free_name(&self, parent: Ino, name: &OsStr) -> Result<()> {
        if self.tree.dir(parent)?.live.contains_key(name) {
            return Err(Errno::EXIST);
        }
        Ok(())
    }

    fn child_path(&self, parent: Ino, name: &OsStr) -> Result<std::path::PathBuf> {
        Ok(self.tree.path(parent).ok_or(Errno::NOENT)?.join(name))
    }

    /// Looks a name up.
    pub fn lookup(&self, parent: Ino, name: &OsStr) -> Result<Attr> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let ino = self.tree.dir(parent)?.live.get(name).copied().ok_or(Errno::NOENT)?;
        self.attr(ino)
    }

    /// An inode's attributes.
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        if !self.powered {
            return Err(Errno::IO);
        }
        self.attr(ino)
    }

    /// Creates and opens a file (`open(O_CREAT)`); returns it and a handle.
    pub fn create(&mut self, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> Result<(Attr, u64)> {
        let cut = self.gate(Op::Create, &[&name.to_string_lossy()], |t| {
            format!("create {}/{}", t.display(parent).trim_end_matches('/'), name.to_string_lossy())
        })?;
        let r = self.create_inner(parent, name, mode, flags);
        self.finish(cut, r)
    }

    fn create_inner(&mut self, parent: Ino, name: &OsStr, mode: u32, flags: i32) -> Result<(Attr, u64)> {
        self.free_name(parent, name)?;
        let path = self.child_path(parent, name)?;
        let _ = flags; // the kernel enforces the access mode; see `backing_options`
        let file = backing_options().create_new(true).mode(mode & 0o7777).open(&path).map_err(errno)?;
        let ino = self.tree.alloc(Kind::File, FileState::default());
        self.tree.link(parent, name.to_os_string(), ino);
        self.entries_changed(&[parent]);
        let fh = self.handles.add_file(ino, file);
        Ok((self.attr(ino)?, fh))
    }

    /// Makes a socket, FIFO or empty file (`mknod`).
    pub fn mknod(&mut self, parent: Ino, name: &OsStr, mode: u32, rdev: u32) -> Result<Attr> {
        let cut = self.gate(Op::Create, &[&name.to_string_lossy()], |t| {
            format!("mknod {}/{}", t.display(parent).trim_end_matches('/'), name.to_string_lossy())
        })?;
        let r = (|| {
            self.free_name(parent, name)?;
            let path = self.child_path(parent, name)?;
            let ty = rustix::fs::FileType::from_raw_mode(mode);
            let perm = rustix::fs::Mode::from_raw_mode(mode & 0o7777);
            rustix::fs::mknodat(rustix::fs::CWD, &path, ty, perm, u64::from(rdev))?;
            let meta = std::fs::symlink_metadata(&path).map_err(errno)?;
            let ino = self.tree.alloc(kind_of(&meta), FileState::default());
            self.tree.link(parent, name.to_os_string(), ino);
            self.entries_changed(&[parent]);
            self.attr(ino)
        })();
        self.finish(cut, r)
    }

    /// Makes a directory.
    pub fn mkdir(&mut self, parent: Ino, name: &OsStr, mode: u32) -> Result<Attr> {
        let cut = self.gate(Op::Mkdir, &[&name.to_string_lossy()], |t| {
            format!("mkdir {}/{}", t.display(parent).trim_end_matches('/'), name.to_string_lossy())
        })?;
        let r = (|| {
            self.free_name(parent, name)?;
            let path = self.child_path(parent, name)?;
            std::fs::DirBuilder::new().mode(mode & 0o7777).create(&path).map_err(errno)?;
            let ino = self.tree.alloc(Kind::Dir, FileState::default());
            self.tree.link(parent, name.to_os_string(), ino);
            self.entries_changed(&[parent]);
            self.attr(ino)
        })();
        self.finish(cut, r)
    }

    /// Opens a file; returns a handle.
    pub fn open_file(&mut self, ino: Ino, flags: i32) -> Result<u64> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let path = self.tree.path(ino).ok_or(Errno::NOENT)?;
        if self.tree.node(ino).map(|n| n.kind) != Some(Kind::File) {
            return Err(Errno::INVAL);
        }
        let file = backing_options().open(&path).map_err(errno)?;
        let fh = self.handles.add_file(ino, file);
        if flags & rustix::fs::OFlags::TRUNC.bits() as i32 != 0 {
            self.truncate(ino, Some(fh), 0)?;
        }
        Ok(fh)
    }

    /// Opens a directory for listing: the listing is taken now.
    pub fn opendir(&mut self, ino: Ino) -> Result<u64> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let d = self.tree.dir(ino)?;
        let parent = self.tree.node(ino).and_then(|n| n.links.first()).map(|(p, _)| *p).unwrap_or(ROOT);
        let mut entries = vec![
            DirEntry { ino, kind: Kind::Dir, name: ".".into() },
            DirEntry { ino: parent, kind: Kind::Dir, name: "..".into() },
        ];
        for (name, &child) in &d.live {
            let kind = self.tree.node(child).map(|n| n.kind).unwrap_or(Kind::Other);
            entries.push(DirEntry { ino: child, kind, name: name.clone() });
        }
        Ok(self.handles.add_dir(entries))
    }

    /// The listing of an open directory from `offset` on.
    pub fn readdir(&self, fh: u64, offset: usize) -> Result<&[DirEntry]> {
        self.handles.listing(fh, offset)
    }

    /// Closes a handle (file or directory).
    pub fn release(&mut self, fh: u64) -> Result<()> {
        if self.handles.remove(fh) && self.powered {
            self.collect()?;
        }
        Ok(())
    }

    /// Reads from an open file.
    pub fn read(&self, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let (_, f) = self.handles.file(fh)?;
        read_at(f, offset, size as usize).map_err(errno)
    }

    /// Writes to an open file; the durable bytes it overwrites are saved first.
    pub fn write(&mut self, fh: u64, offset: u64, data: &[u8]) -> Result<u32> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let (ino, _) = self.handles.file(fh)?;
        let name = self.tree.file_name(ino);
        let cut = self.gate(Op::Write, &[&name], |t| format!("write {} {}+{}", t.display(ino), offset, data.len()))?;
        self.switch.observe(&name, data);
        let r = (|| {
            let (_, f) = self.handles.file(fh)?;
            let f = f.try_clone().map_err(errno)?;
            let end = offset + data.len() as u64;
            self.tree.node_mut(ino).file.before_change(offset, end, |o, n| read_at(&f, o, n)).map_err(errno)?;
            f.write_all_at(data, offset).map_err(errno)?;
            Ok(data.len() as u32)
        })();
        self.finish(cut, r)
    }

    /// Sets a file's length (`truncate`, or `ftruncate` through `fh`).
    pub fn truncate(&mut self, ino: Ino, fh: Option<u64>, len: u64) -> Result<()> {
        let cut =
            self.gate(Op::Truncate, &[&self.tree.file_name(ino)], |t| format!("truncate {} to {len}", t.display(ino)))?;
        let r = (|| {
            if self.tree.node(ino).map(|n| n.kind) != Some(Kind::File) {
                return Err(Errno::INVAL);
            }
            let f = match fh {
                Some(fh) => self.handles.file(fh)?.1.try_clone().map_err(errno)?,
                None => backing_options().open(self.tree.path(ino).ok_or(Errno::NOENT)?).map_err(errno)?,
            };
            self.tree.node_mut(ino).file.before_change(len, u64::MAX, |o, n| read_at(&f, o, n)).map_err(errno)?;
            f.set_len(len).map_err(errno)
        })();
        self.finish(cut, r)
    }

    /// `fallocate`: reserving space (`FALLOC_FL_KEEP_SIZE`) changes no
    /// byte; growing the file is a pending length change like a write.
    pub fn fallocate(&mut self, fh: u64, offset: u64, len: u64, mode: i32) -> Result<()> {
        if !self.powered {
            return Err(Errno::IO);
        }
        let flags = rustix::fs::FallocateFlags::from_bits(mode as u32).ok_or(Errno::OPNOTSUPP)?;
        if !(flags.is_empty() || flags == rustix::fs::FallocateFlags::KEEP_SIZE) {
            return Err(Errno::OPNOTSUPP);
        }
        let (ino, _) = self.handles.file(fh)?;
        let cut = self.gate(Op::Truncate, &[&self.tree.file_name(ino)], |t| {
            format!("fallocate {} {offset}+{len}", t.display(ino))
        })?;
        let r = (|| {
            let (_, f) = self.handles.file(fh)?;
            rustix::fs::fallocate(f, flags, offset, len)
        })();
        self.finish(cut, r)
    }

    /// `fsync`/`fdatasync` of a file: its live bytes become its durable
    /// image (under [`Model::Ext4Ordered`], every entry change too).
    pub fn fsync(&mut self, ino: Ino) -> Result<()> {
        let cut = self.gate(Op::Fsync, &[&self.tree.file_name(ino)], |t| format!("fsync {}", t.display(ino)))?;
        let r = (|| {
            let len = self.attr(ino)?.meta.len();
            if self.tree.node(ino).map(|n| n.kind) == Some(Kind::File) {
                self.tree.node_mut(ino).file.sync(len);
            }
            if self.model == Model::Ext4Ordered {
                self.tree.commit_all();
            }
            self.collect()
        })();
        self.finish(cut, r)
    }

    /// `fsync` of a directory: its live entries become durable (under
    /// [`Model::Ext4Ordered`], every directory's).
    pub fn fsyncdir(&mut self, ino: Ino) -> Result<()> {
        let cut = self.gate(Op::FsyncDir, &[&self.tree.file_name(ino)], |t| format!("fsyncdir {}", t.display(ino)))?;
        let r = (|| {
            self.tree.dir(ino)?;
            match self.model {
                Model::Strict => self.tree.commit(ino),
                Model::Ext4Ordered => self.tree.commit_all(),
                Model::Passthrough => {}
            }
            self.collect()
        })();
        self.finish(cut, r)
    }

    /// Removes a file's name.
    pub fn unlink(&mut self, parent: Ino, name: &OsStr) -> Result<()> {
        let cut = self.gate(Op::Unlink, &[&name.to_string_lossy()], |t| {
            format!("unlink {}/{}", t.display(parent).trim_end_matches('/'), name.to_string_lossy())
        })?;
        let r = (|| {
            let ino = self.tree.dir(parent)?.live.get(name).copied().ok_or(Errno::NOENT)?;
            if self.tree.node(ino).map(|n| n.kind) == Some(Kind::Dir) {
                return Err(Errno::ISDIR);
            }
            self.tree.remove_name(parent, name).map_err(errno)?;
            self.entries_changed(&[parent]);
            self.collect()
        })();
        self.finish(cut, r)
    }

    /// Removes an empty directory.
    pub fn rmdir(&mut self, parent: Ino, name: &OsStr) -> Result<()> {
        let cut = self.gate(Op::Rmdir, &[&name.to_string_lossy()], |t| {
            format!("rmdir {}/{}", t.display(parent).trim_end_matches('/'), name.to_string_lossy())
        })?;
        let r = (|| {
            let ino = self.tree.dir(parent)?.live.get(name).copied().ok_or(Errno::NOENT)?;
            if !self.tree.dir(ino)?.live.is_empty() {
                return Err(Errno::NOTEMPTY);
            }
            self.tree.remove_name(parent, name).map_err(errno)?;
            self.entries_changed(&[parent]);
            self.collect()
        })();
        self.finish(cut, r)
    }

    /// Renames (`RENAME_NOREPLACE` honoured; `RENAME_EXCHANGE` refused).
    pub fn rename(&mut self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, flags: u32) -> Result<()> {
        let (from, to) = (name.to_string_lossy(), newname.to_string_lossy());
        let cut = self.gate(Op::Rename, &[&from, &to], |t| {
            format!(
                "rename {}/{from} -> {}/{to}",
                t.display(parent).trim_end_matches('/'),
                t.display(newparent).trim_end_matches('/')
            )
        })?;
        let r = self.rename_inner(parent, name, newparent, newname, flags);
        self.finish(cut, r)
    }

    fn rename_inner(&mut self, parent: Ino, name: &OsStr, newparent: Ino, newname: &OsStr, flags: u32) -> Result<()> {
        let noreplace = rustix::fs::RenameFlags::NOREPLACE.bits();
        if flags & !noreplace != 0 {
            return Err(Errno::INVAL);
        }
        let ino = self.tree.dir(parent)?.live.get(name).copied().ok_or(Errno::NOENT)?;
        let kind = self.tree.node(ino).map(|n| n.kind).ok_or(Errno::NOENT)?;
        let target = self.tree.dir(newparent)?.live.get(newname).copied();
        if let Some(t) = target {
            if flags & noreplace != 0 {
                return Err(Errno::EXIST);
            }
            if t == ino {
                return Ok(());
            }
            match (kind, self.tree.node(t).map(|n| n.kind)) {
                (Kind::Dir, Some(Kind::Dir)) if !self.tree.dir(t)?.live.is_empty() => return Err(Errno::NOTEMPTY),
                (Kind::Dir, Some(Kind::Dir)) => {}
                (Kind::Dir, _) => return Err(Errno::NOTDIR),
                (_, Some(Kind::Dir)) => return Err(Errno::ISDIR),
                _ => {}
            }
        }
        if kind == Kind::Dir && self.is_within(newparent, ino) {
            return Err(Errno::INVAL);
        }
        self.tree.rename(parent, name, newparent, newname).map_err(errno)?;
        if target.is_some() && kind == Kind::File && self.model == Model::Ext4Ordered {
            // auto_da_alloc: replacing a file by rename flushes the new one.
            let len = self.attr(ino)?.meta.len();
            self.tree.node_mut(ino).file.sync(len);
        }
        self.entries_changed(&[parent, newparent]);
        self.collect()
    }

    /// Whether `ino` is `dir` or below it (a directory cannot move into itself).
    fn is_within(&self, mut ino: Ino, dir: Ino) -> bool {
        loop {
            if ino == dir {
                return true;
            }
            match self.tree.node(ino).and_then(|n| n.links.first()) {
                Some((p, _)) => ino = *p,
                None => return false,
            }
        }
    }

    /// Adds a hard link.
    pub fn link(&mut self, ino: Ino, newparent: Ino, newname: &OsStr) -> Result<Attr> {
        let cut = self.gate(Op::Link, &[&self.tree.file_name(ino), &newname.to_string_lossy()], |t| {
            format!(
                "link {} -> {}/{}",
                t.display(ino),
                t.display(newparent).trim_end_matches('/'),
                newname.to_string_lossy()
            )
        })?;
        let r = (|| {
            if self.tree.node(ino).map(|n| n.kind) == Some(Kind::Dir) {
                return Err(Errno::PERM);
            }
            self.free_name(newparent, newname)?;
            let from = self.tree.path(ino).ok_or(Errno::NOENT)?;
            std::fs::hard_link(from, self.child_path(newparent, newname)?).map_err(errno)?;
            self.tree.link(newparent, newname.to_os_string(), ino);
            self.entries_changed(&[newparent]);
            self.attr(ino)
        })();
        self.finish(cut, r)
    }

    /// Changes permissions (not modelled: they survive a cut as they are).
    pub fn chmod(&mut self, ino: Ino, mode: u32) -> Result<()> {
        if !self.powered {
            return Err(Errno::IO);
        }
        use std::os::unix::fs::PermissionsExt as _;
        let path = self.tree.path(ino).ok_or(Errno::NOENT)?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & 0o7777)).map_err(errno)
    }

    /// Free space, as the backing file system has it.
    pub fn statfs(&self) -> Result<rustix::fs::StatVfs> {
        rustix::fs::statvfs(self.tree.path(ROOT).expect("the root"))
    }

    /// What a cut now would discard.
    pub fn pending(&self, reason: &str) -> CutReport {
        let live_len = |ino| self.attr(ino).map(|a| a.meta.len()).unwrap_or(0);
        let mut r = CutReport::of(&self.tree, live_len, reason, self.model);
        r.recent = self.switch.recent.iter().cloned().collect();
        r.ops = self.switch.ops.clone();
        r.open_phases = self.switch.open_phases();
        r
    }

    /// Cuts the power: every handle is closed, the backing directory is put
    /// into the durable state, and every later operation fails with `EIO`.
    /// Returns what was discarded (also when the power was already off: an
    /// empty report).
    pub fn cut(&mut self, reason: &str) -> io::Result<CutReport> {
        if !self.powered {
            return Ok(CutReport { reason: "already off".into(), model: self.model, ..CutReport::default() });
        }
        let report = self.pending(reason);
        self.powered = false;
        self.handles.clear();
        self.tree.revert()?;
        self.last_cut = Some(report.clone());
        Ok(report)
    }

    /// The report of the cut, once there was one.
    pub fn last_cut(&self) -> Option<&CutReport> {
        self.last_cut.as_ref()
    }
}
