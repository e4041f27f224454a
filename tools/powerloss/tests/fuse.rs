//! The file system mounted for real: ordinary `std::fs` calls through the
//! kernel's FUSE, a cut, a remount, and what the disk then holds. Needs
//! /dev/fuse and the right to mount (root, or fusermount3); without them
//! the test fails and says so.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::time::Duration;

use pipit_powerloss::{mount, Model, Mounted, Op, Trigger};

fn mount_at(root: &Path) -> Mounted {
    let mnt = root.join("mnt");
    std::fs::create_dir_all(&mnt).unwrap();
    mount(&root.join("backing"), &mnt, Model::Strict).unwrap_or_else(|e| panic!("{e}"))
}

fn sync_dir(p: &Path) {
    std::fs::File::open(p).unwrap().sync_all().unwrap();
}

#[test]
fn synced_files_survive_a_cut_and_unsynced_ones_do_not() {
    let root = tempfile::tempdir().unwrap();
    let m = mount_at(root.path());
    let mnt = m.mountpoint().to_path_buf();

    let mut wal = std::fs::File::create(mnt.join("000003.log")).unwrap();
    wal.write_all(b"batch 1;").unwrap();
    wal.sync_data().unwrap();
    sync_dir(&mnt);
    wal.write_all(b"batch 2;").unwrap();

    std::fs::create_dir(mnt.join("sub")).unwrap();
    std::fs::write(mnt.join("sub/never-synced"), b"x").unwrap();
    let mut f = std::fs::File::create(mnt.join("tmp")).unwrap();
    f.write_all(b"MANIFEST-000009\n").unwrap();
    f.sync_all().unwrap();
    std::fs::rename(mnt.join("tmp"), mnt.join("CURRENT")).unwrap();
    sync_dir(&mnt);

    // What RocksDB and the server rely on besides data: a socket bound in
    // the data directory (the admin socket) and advisory locks.
    let sock = mnt.join("admin.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let mut client = std::os::unix::net::UnixStream::connect(&sock).unwrap();
    client.write_all(b"ping").unwrap();
    let mut got = [0u8; 4];
    listener.accept().unwrap().0.read_exact(&mut got).unwrap();
    assert_eq!(&got, b"ping");
    let lock = std::fs::File::create(mnt.join("LOCK")).unwrap();
    lock.try_lock().unwrap();
    assert!(std::fs::File::open(mnt.join("LOCK")).unwrap().try_lock().is_err());
    // A process that exits with a file open on a mount it serves itself
    // deadlocks in close(2): keep nothing open past the unmount.
    drop((lock, client, listener, f));

    assert_eq!(std::fs::read(mnt.join("000003.log")).unwrap(), b"batch 1;batch 2;");
    let report = m.control().cut("test").unwrap();
    println!("{report}");
    assert_eq!(report.bytes_dropped(), 8 + 1);
    let e = wal.write_all(b"after").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(5), "EIO after the cut: {e}");
    drop(wal);
    m.unmount().unwrap();

    let m = mount_at(root.path());
    let mnt = m.mountpoint().to_path_buf();
    assert_eq!(std::fs::read(mnt.join("000003.log")).unwrap(), b"batch 1;");
    assert_eq!(std::fs::read(mnt.join("CURRENT")).unwrap(), b"MANIFEST-000009\n");
    // The root's second sync made `sub` durable; `sub` itself never was.
    assert_eq!(std::fs::read_dir(mnt.join("sub")).unwrap().count(), 0);
    assert!(!mnt.join("tmp").exists());
    let mut names: Vec<String> =
        std::fs::read_dir(&mnt).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    names.sort();
    // The socket and the lock file were never made durable by a directory sync.
    assert_eq!(names, ["000003.log", "CURRENT", "sub"]);
    m.unmount().unwrap();
}

#[test]
fn a_trigger_cuts_inside_an_fsync_and_wakes_the_waiting_test() {
    let root = tempfile::tempdir().unwrap();
    let m = mount_at(root.path());
    let mnt = m.mountpoint().to_path_buf();
    let mut f = std::fs::File::create(mnt.join("000001.log")).unwrap();
    sync_dir(&mnt);
    m.control().arm(Trigger::before(Op::Fsync, ".log").skip(2));
    let writer = std::thread::spawn(move || {
        let mut synced = 0;
        for i in 0..10 {
            f.write_all(format!("record {i};").as_bytes()).unwrap();
            if f.sync_data().is_err() {
                break;
            }
            synced += 1;
        }
        synced
    });
    let report = m.control().wait_cut(Duration::from_secs(10)).expect("the trigger fires");
    assert_eq!(writer.join().unwrap(), 2, "the third fsync failed");
    assert!(report.reason.contains("before fsync 000001.log"), "{report}");
    m.unmount().unwrap();
    let m = mount_at(root.path());
    assert_eq!(std::fs::read(m.mountpoint().join("000001.log")).unwrap(), b"record 0;record 1;");
}
