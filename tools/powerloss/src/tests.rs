//! The model on its own: write, fsync, cut, and what survives, with no
//! FUSE (the backing directory is a temporary directory).

use std::ffi::OsStr;
use std::path::PathBuf;

use crate::{EntryChange, Errno, Model, Op, PowerFs, Trigger};

const ROOT: u64 = 1;
const O_RDWR: i32 = 2;

struct T {
    dir: tempfile::TempDir,
    fs: PowerFs,
    model: Model,
}

impl T {
    fn new(model: Model) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let fs = PowerFs::open(dir.path(), model).unwrap();
        Self { dir, fs, model }
    }

    /// The parent's inode and the last component.
    fn parent<'a>(&self, path: &'a str) -> (u64, &'a OsStr) {
        let mut parts: Vec<&str> = path.split('/').filter(|p| !p.is_empty()).collect();
        let name = parts.pop().unwrap();
        let mut at = ROOT;
        for p in parts {
            at = self.fs.lookup(at, OsStr::new(p)).unwrap().ino;
        }
        (at, OsStr::new(name))
    }

    fn ino(&self, path: &str) -> u64 {
        if path == "/" {
            return ROOT;
        }
        let (p, n) = self.parent(path);
        self.fs.lookup(p, n).unwrap().ino
    }

    fn create(&mut self, path: &str) -> u64 {
        let (p, n) = self.parent(path);
        self.fs.create(p, n, 0o644, O_RDWR).unwrap().1
    }

    fn open(&mut self, path: &str) -> u64 {
        let ino = self.ino(path);
        self.fs.open_file(ino, O_RDWR).unwrap()
    }

    fn write(&mut self, fh: u64, at: u64, data: &[u8]) {
        assert_eq!(self.fs.write(fh, at, data).unwrap() as usize, data.len());
    }

    fn fsync(&mut self, path: &str) {
        let ino = self.ino(path);
        self.fs.fsync(ino).unwrap();
    }

    fn fsyncdir(&mut self, path: &str) {
        let ino = self.ino(path);
        self.fs.fsyncdir(ino).unwrap();
    }

    fn mkdir(&mut self, path: &str) {
        let (p, n) = self.parent(path);
        self.fs.mkdir(p, n, 0o755).unwrap();
    }

    fn rename(&mut self, from: &str, to: &str) {
        let (p, n) = self.parent(from);
        let (np, nn) = self.parent(to);
        let (n, nn) = (n.to_os_string(), nn.to_os_string());
        self.fs.rename(p, &n, np, &nn, 0).unwrap();
    }

    fn unlink(&mut self, path: &str) {
        let (p, n) = self.parent(path);
        let n = n.to_os_string();
        self.fs.unlink(p, &n).unwrap();
    }

    fn backing(&self, path: &str) -> PathBuf {
        self.dir.path().join("tree").join(path.trim_start_matches('/'))
    }

    /// What the live view holds (read through the backing directory).
    fn read(&self, path: &str) -> Option<Vec<u8>> {
        std::fs::read(self.backing(path)).ok()
    }

    /// Cuts the power and mounts again: returns the report.
    fn cut(&mut self) -> crate::CutReport {
        let r = self.fs.cut("test").unwrap();
        assert_eq!(self.fs.write(1, 0, b"x"), Err(Errno::IO), "nothing works after a cut");
        self.fs = PowerFs::open(self.dir.path(), self.model).unwrap();
        r
    }

    fn names(&self, path: &str) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.backing(path))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        v.sort();
        v
    }
}

#[test]
fn unsynced_data_is_lost_and_synced_data_survives() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/wal");
    t.fsyncdir("/");
    t.write(fh, 0, b"first ");
    t.fsync("/wal");
    t.write(fh, 6, b"second");
    assert_eq!(t.read("/wal").unwrap(), b"first second", "reads see the live bytes");
    let r = t.cut();
    assert_eq!(r.files.len(), 1);
    assert_eq!((r.files[0].live_len, r.files[0].durable_len), (12, 6));
    assert_eq!(r.bytes_dropped(), 6);
    assert_eq!(t.read("/wal").unwrap(), b"first ");
    // Mounting again changes nothing: the backing directory is durable.
    let r = t.cut();
    assert!(r.files.is_empty() && r.entries.is_empty(), "{r}");
    assert_eq!(t.read("/wal").unwrap(), b"first ");
}

#[test]
fn overwrites_and_truncates_are_undone_to_the_synced_bytes() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/f");
    t.write(fh, 0, b"0123456789");
    t.fsync("/f");
    t.fsyncdir("/");
    t.write(fh, 2, b"ab");
    let ino = t.ino("/f");
    t.fs.truncate(ino, None, 4).unwrap();
    t.write(fh, 8, b"zz");
    assert_eq!(t.read("/f").unwrap(), b"01ab\0\0\0\0zz");
    let r = t.cut();
    assert_eq!(r.files[0].rewritten, 8, "2..10 was saved once");
    assert_eq!(t.read("/f").unwrap(), b"0123456789");
}

#[test]
fn a_file_fsynced_in_an_unsynced_directory_vanishes_under_the_strict_model_only() {
    for model in Model::ALL {
        let mut t = T::new(model);
        let fh = t.create("/000004.log");
        t.write(fh, 0, b"record");
        t.fsync("/000004.log");
        let r = t.cut();
        let survived = t.read("/000004.log");
        match model {
            Model::Strict => {
                assert_eq!(survived, None, "{model:?}");
                assert_eq!(r.entries[0].change, EntryChange::Vanishes);
            }
            // ext4 commits the create with the fsync; LazyFS never delays it.
            _ => assert_eq!(survived.as_deref(), Some(&b"record"[..]), "{model:?}"),
        }
    }
}

#[test]
fn an_unsynced_file_in_a_synced_directory_survives_empty() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/LOG");
    t.fsyncdir("/");
    t.write(fh, 0, b"lines");
    t.cut();
    assert_eq!(t.read("/LOG").unwrap(), b"");
}

/// RocksDB's `SetCurrentFile`: write a temporary file, fsync it, rename it
/// over `CURRENT`, fsync the directory.
#[test]
fn current_replaced_by_rename_is_old_or_new_never_empty() {
    for model in Model::ALL {
        for sync_dir in [false, true] {
            let mut t = T::new(model);
            let fh = t.create("/CURRENT");
            t.write(fh, 0, b"MANIFEST-000001\n");
            t.fsync("/CURRENT");
            t.fsyncdir("/");
            let fh = t.create("/000002.dbtmp");
            t.write(fh, 0, b"MANIFEST-000005\n");
            t.fsync("/000002.dbtmp");
            t.rename("/000002.dbtmp", "/CURRENT");
            if sync_dir {
                t.fsyncdir("/");
            }
            t.cut();
            let now = t.read("/CURRENT").unwrap();
            // Without the directory fsync the rename is lost in both
            // journalled models (ext4's fsync of the temporary file came
            // before it); the temporary file survives where its create
            // was committed by that fsync.
            let new = model == Model::Passthrough || sync_dir;
            let want: &[u8] = if new { b"MANIFEST-000005\n" } else { b"MANIFEST-000001\n" };
            assert_eq!(now, want, "{model:?} sync_dir={sync_dir}");
            let names = if model == Model::Ext4Ordered && !sync_dir {
                vec!["000002.dbtmp", "CURRENT"]
            } else {
                vec!["CURRENT"]
            };
            assert_eq!(t.names("/"), names, "{model:?} sync_dir={sync_dir}");
        }
    }
}

#[test]
fn ext4_flushes_a_file_renamed_over_another_without_fsync() {
    let mut t = T::new(Model::Ext4Ordered);
    let fh = t.create("/server.key");
    t.write(fh, 0, b"old");
    t.fsync("/server.key");
    let fh = t.create("/server.tmp");
    t.write(fh, 0, b"new");
    t.rename("/server.tmp", "/server.key");
    // Another file's fsync commits the journal, rename included.
    let other = t.create("/other");
    t.fs.fsync(t.ino("/other")).unwrap();
    let _ = other;
    t.cut();
    assert_eq!(t.read("/server.key").unwrap(), b"new");
}

#[test]
fn an_unsynced_unlink_brings_the_file_back_with_its_synced_bytes() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/000007.sst");
    t.write(fh, 0, b"table");
    t.fsync("/000007.sst");
    t.fsyncdir("/");
    t.write(fh, 5, b" more");
    t.unlink("/000007.sst");
    assert_eq!(t.read("/000007.sst"), None);
    // The handle still works after the unlink, as on a real file system.
    assert_eq!(t.fs.read(fh, 0, 100).unwrap(), b"table more");
    let r = t.cut();
    assert_eq!(r.entries[0].change, EntryChange::ComesBack);
    assert_eq!(t.read("/000007.sst").unwrap(), b"table");

    t.unlink("/000007.sst");
    t.fsyncdir("/");
    t.cut();
    assert_eq!(t.read("/000007.sst"), None);
    assert!(t.names("/").is_empty());
    assert!(std::fs::read_dir(t.dir.path().join("orphans")).unwrap().next().is_none());
}

#[test]
fn a_directory_is_durable_only_once_its_parent_is_synced() {
    let mut t = T::new(Model::Strict);
    t.mkdir("/db");
    let fh = t.create("/db/MANIFEST-000001");
    t.write(fh, 0, b"edits");
    t.fsync("/db/MANIFEST-000001");
    t.fsyncdir("/db");
    t.cut();
    assert!(t.names("/").is_empty(), "the mkdir was never synced");

    t.mkdir("/db");
    let fh = t.create("/db/MANIFEST-000001");
    t.write(fh, 0, b"edits");
    t.fsync("/db/MANIFEST-000001");
    t.fsyncdir("/db");
    // Removed again, but only the root is synced: db's durable entries
    // still name the manifest, so it must come back with db.
    t.unlink("/db/MANIFEST-000001");
    t.fsyncdir("/");
    t.cut();
    assert_eq!(t.read("/db/MANIFEST-000001").unwrap(), b"edits");
}

#[test]
fn a_rename_over_a_synced_file_is_undone_unless_synced() {
    let mut t = T::new(Model::Strict);
    let a = t.create("/a");
    t.write(a, 0, b"A");
    t.fsync("/a");
    let b = t.create("/b");
    t.write(b, 0, b"B");
    t.fsync("/b");
    t.fsyncdir("/");
    t.rename("/a", "/b");
    let r = t.cut();
    let mut changes: Vec<_> = r.entries.iter().map(|e| (e.name.as_str(), e.change)).collect();
    changes.sort();
    assert_eq!(changes, vec![("a", EntryChange::ComesBack), ("b", EntryChange::Replaced)]);
    assert_eq!((t.read("/a").unwrap(), t.read("/b").unwrap()), (b"A".to_vec(), b"B".to_vec()));
}

#[test]
fn hard_links_come_back_as_one_file() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/x");
    t.write(fh, 0, b"data");
    t.fsync("/x");
    let ino = t.ino("/x");
    t.fs.link(ino, ROOT, OsStr::new("y")).unwrap();
    t.fsyncdir("/");
    t.unlink("/x");
    t.cut();
    use std::os::unix::fs::MetadataExt as _;
    let (x, y) = (std::fs::metadata(t.backing("/x")).unwrap(), std::fs::metadata(t.backing("/y")).unwrap());
    assert_eq!((x.ino(), x.nlink()), (y.ino(), 2));
}

#[test]
fn a_trigger_before_fsync_loses_the_write_and_fails_the_fsync() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/000010.log");
    t.fsyncdir("/");
    t.write(fh, 0, b"batch 1");
    t.fsync("/000010.log");
    t.fs.arm(Trigger::before(Op::Fsync, ".log"));
    t.write(fh, 7, b" batch 2");
    let ino = t.ino("/000010.log");
    assert_eq!(t.fs.fsync(ino), Err(Errno::IO));
    assert!(!t.fs.powered());
    let r = t.fs.last_cut().unwrap().clone();
    assert!(r.reason.starts_with("before fsync 000010.log"), "{}", r.reason);
    assert_eq!(r.recent.last().unwrap(), "fsync /000010.log");
    t.fs = PowerFs::open(t.dir.path(), t.model).unwrap();
    assert_eq!(t.read("/000010.log").unwrap(), b"batch 1");
}

#[test]
fn a_trigger_after_fsync_keeps_what_it_synced() {
    let mut t = T::new(Model::Strict);
    let fh = t.create("/000010.log");
    t.fsyncdir("/");
    t.fs.arm(Trigger::after(Op::Fsync, ".log").skip(1));
    t.write(fh, 0, b"a");
    t.fsync("/000010.log");
    t.write(fh, 1, b"b");
    t.fsync("/000010.log");
    assert!(!t.fs.powered());
    t.fs = PowerFs::open(t.dir.path(), t.model).unwrap();
    assert_eq!(t.read("/000010.log").unwrap(), b"ab");
    let _ = t.open("/000010.log");
}

#[test]
fn passthrough_keeps_every_entry_change_at_once() {
    let mut t = T::new(Model::Passthrough);
    let fh = t.create("/a");
    t.write(fh, 0, b"lost");
    t.mkdir("/d");
    t.rename("/a", "/d/b");
    t.cut();
    assert_eq!(t.read("/d/b").unwrap(), b"", "the name survives, the unsynced data does not");
}
