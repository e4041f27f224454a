//! A full disk: nothing acknowledged is lost, clients are told to retry
//! later (`UNAVAILABLE` with `retry_after_secs`, never `INTERNAL`), the
//! server refuses new sends before the disk is completely full (a
//! reserve), and it resumes by itself once space comes back, without a
//! restart. Real `ENOSPC`: the data directory is on a small tmpfs mounted
//! for the test (as root, which CI is; the test fails loudly otherwise).

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use pipit::commit::StorageState;
use pipit_client::pipit_protocol::message::pb;
use pipit_client::pipit_protocol::Message;
use pipit_client::Connection;

/// A tmpfs of `mb` MiB, unmounted on drop (also when the test fails).
struct Tmpfs {
    dir: tempfile::TempDir,
}

impl Tmpfs {
    fn mount(mb: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mb}m"), "tmpfs"])
            .arg(dir.path())
            .output()
            .expect("running mount(8)");
        assert!(
            out.status.success(),
            "this test needs to mount a tmpfs (run it as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self { dir }
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Free bytes, as df sees them.
    fn free(&self) -> u64 {
        let out = std::process::Command::new("df").args(["--output=avail", "-B1"]).arg(self.path()).output().unwrap();
        String::from_utf8_lossy(&out.stdout).lines().nth(1).unwrap().trim().parse().unwrap()
    }

    /// Fills the file system with a ballast file until `leave` bytes are
    /// free (0: until writes fail with ENOSPC). Measures once: a `df` per
    /// chunk would fork the test process hundreds of times, and a fork
    /// holds a copy of every open file, the server's data-directory lock
    /// included, until it execs.
    fn fill(&self, leave: u64) -> PathBuf {
        use std::io::Write as _;
        let free = self.free();
        let path = self.path().join(format!("ballast-{free}"));
        let mut f = std::fs::File::create(&path).unwrap();
        let chunk = vec![0xA5u8; 1 << 20];
        let mut left = free.saturating_sub(leave);
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            match f.write_all(&chunk[..n]) {
                Ok(()) => left -= n as u64,
                Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
                Err(e) => panic!("{e}"),
            }
        }
        if leave == 0 {
            // What the server wrote meanwhile: take the rest too.
            while f.write_all(&chunk[..4096]).is_ok() {}
        }
        path
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazily, so a server thread that still holds a file cannot keep
        // the mount (and this machine's memory) after the test.
        let _ = std::process::Command::new("umount").arg("-l").arg(self.dir.path()).status();
    }
}

fn storage(s: &TestServer) -> StorageState {
    s.running.as_ref().unwrap().services().writer.storage()
}

async fn wait_for(s: &TestServer, want: StorageState, within: Duration) {
    let deadline = Instant::now() + within;
    while storage(s) != want {
        assert!(Instant::now() < deadline, "storage stayed {:?}, wanted {want:?}", storage(s));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Sends `id` and returns the answer: `Sent`, or the error for it.
async fn send(c: &mut Connection, id: u64, to: u64) -> Result<pb::Sent, pb::Error> {
    c.send(&[text(id, to, &format!("m{id}"))]).await.unwrap();
    expect(c, |m| match m {
        Message::Sent(s) if s.id == id => Some(Ok(s)),
        Message::Error(e) if e.id == id => Some(Err(e)),
        _ => None,
    })
    .await
}

fn assert_retry_later(e: &pb::Error) {
    assert_eq!(e.code, pb::ErrorCode::Unavailable as i32, "{e:?}");
    assert!(e.retry_after_secs >= 1, "{e:?}");
}

async fn admin_stats(s: &TestServer) -> String {
    let dir = s.cfg.data_dir.clone();
    tokio::task::spawn_blocking(move || pipit::admin::request(&dir, "stats").unwrap()).await.unwrap()
}

#[tokio::test]
async fn a_full_disk_loses_nothing_answers_retry_later_and_recovers_without_a_restart() {
    let fs = Tmpfs::mount(256);
    let s = TestServer::start(|c| {
        c.data_dir = fs.path().join("data");
        // No reserve: let the database itself meet the full disk.
        c.storage.reserve_mb = 0;
        c.storage.full_wait_secs = 120;
    });
    let (a, mut ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    drop(cb);
    let (_, mut cc) = register(s.addr).await;

    // Another program fills the disk. RocksDB writes into the space it
    // set aside for its log until that runs out too.
    let ballast = fs.fill(0);
    let big = vec![0x5Au8; 60_000];
    // Every send gets exactly one answer: Sent, or "retry later".
    let (mut id, mut answered, mut sent) = (0u64, 0u64, 0u64);
    let answer = |m: Message, answered: &mut u64, sent: &mut u64| match m {
        Message::Sent(_) => {
            *sent += 1;
            *answered += 1;
        }
        // Refused once the server knows: retry later, never INTERNAL.
        Message::Error(e) => {
            assert_retry_later(&e);
            *answered += 1;
        }
        _ => {}
    };
    'fill: loop {
        assert!(id < 4_000, "the disk never filled up");
        let batch: Vec<Message> = (id + 1..=id + 32)
            .map(|i| pb::Send { id: i, to: b.account, payload: big.clone().into(), ..Default::default() }.into())
            .collect();
        id += 32;
        ca.send(&batch).await.unwrap();
        while answered < id {
            match ca.recv_timeout(Duration::from_secs(3)).await {
                Ok(m) => answer(m, &mut answered, &mut sent),
                Err(pipit_client::ClientError::Timeout) => break 'fill,
                Err(e) => panic!("{e}"),
            }
        }
    }
    // A commit is waiting for room: the server says so.
    wait_for(&s, StorageState::Full, T).await;
    let stats = admin_stats(&s).await;
    assert!(stats.contains("storage full"), "{stats}");
    // New work is refused with "retry later", at once (a's connection
    // reads nothing more while its sends wait: TCP holds the rest).
    assert_retry_later(&send(&mut cc, 1, b.account).await.unwrap_err());
    let err = Connection::connect(
        s.addr,
        &pipit_client::pipit_protocol::StaticKeypair::generate(),
        pipit_client::register("", "phone"),
        &s.opts(),
    )
    .await
    .unwrap_err();
    assert!(matches!(err, pipit_client::ClientError::Refused(pb::ErrorCode::Unavailable)), "{err}");

    // Space comes back: the server resumes by itself, without a restart,
    // and the sends that waited are answered.
    std::fs::remove_file(&ballast).unwrap();
    let deadline = Instant::now() + Duration::from_secs(90);
    while answered < id {
        assert!(Instant::now() < deadline, "no recovery: storage {:?}", storage(&s));
        if let Ok(m) = ca.recv_timeout(Duration::from_millis(200)).await {
            answer(m, &mut answered, &mut sent);
        }
    }
    wait_for(&s, StorageState::Ok, T).await;
    assert!(admin_stats(&s).await.contains("storage ok"));
    assert!(send(&mut cc, 1, b.account).await.is_ok(), "a refused send goes through when retried");
    sent += 1;
    // Everything answered "sent" arrives once, in order.
    let mut cb = login(&s, &b).await;
    let mut last_seq = std::collections::HashMap::new();
    for _ in 0..sent {
        let d = expect_deliver(&mut cb).await;
        let last = last_seq.insert(d.from, d.seq).unwrap_or(0);
        assert!(d.seq > last, "out of order from {}: {} after {last}", d.from, d.seq);
        ack(&mut cb, d.inbox).await;
    }
    quiet(&mut cb, Duration::from_millis(300)).await;
    let _ = a;
}

#[tokio::test]
async fn new_sends_stop_at_the_reserve_so_a_restart_always_has_room() {
    let fs = Tmpfs::mount(256);
    let mut s = TestServer::start(|c| {
        c.data_dir = fs.path().join("data");
        c.storage.reserve_mb = 64;
    });
    let (a, mut ca) = register(s.addr).await;
    let (b, cb) = register(s.addr).await;
    drop(cb);
    // Less than the reserve left, but not nothing.
    let ballast = fs.fill(32 << 20);
    wait_for(&s, StorageState::Low, T).await;
    let before = fs.free();
    for id in 1..=20 {
        assert_retry_later(&send(&mut ca, id, b.account).await.unwrap_err());
    }
    assert!(fs.free() + (1 << 20) >= before, "refused sends took space: {} -> {}", before, fs.free());
    // A restart finds the room it needs, and still refuses.
    drop(ca);
    s.restart_same();
    let mut ca = login(&s, &a).await;
    // Closing the database gave back the space RocksDB had set aside for
    // its log; take it again.
    let ballast2 = fs.fill(32 << 20);
    wait_for(&s, StorageState::Low, T).await;
    assert_retry_later(&send(&mut ca, 21, b.account).await.unwrap_err());
    // Room again: sends are taken without a restart.
    std::fs::remove_file(&ballast).unwrap();
    std::fs::remove_file(&ballast2).unwrap();
    wait_for(&s, StorageState::Ok, T).await;
    send(&mut ca, 21, b.account).await.unwrap();
}
