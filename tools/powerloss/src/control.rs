//! The test's hand on the power switch, and the mount.

use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::fs::PowerFs;
use crate::{CutReport, Marker, Model, Stats, Trigger};

struct Shared {
    fs: Mutex<PowerFs>,
    /// Signalled when the power goes (by a trigger or a [`Control::cut`]).
    off: Condvar,
}

/// Cuts the power, arms triggers and reads counters of a mounted (or
/// merely opened) [`PowerFs`]. Cheap to clone; every clone drives the same
/// file system. Every operation of the file system holds the same lock, so
/// a cut falls between two operations, never inside one.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    /// Wraps a file system.
    pub fn new(fs: PowerFs) -> Self {
        Self(Arc::new(Shared { fs: Mutex::new(fs), off: Condvar::new() }))
    }

    fn lock(&self) -> MutexGuard<'_, PowerFs> {
        self.0.fs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `f` on the file system, then wakes [`Control::wait_cut`] if the
    /// power went meanwhile.
    pub fn with<R>(&self, f: impl FnOnce(&mut PowerFs) -> R) -> R {
        let mut fs = self.lock();
        let was = fs.powered();
        let r = f(&mut fs);
        if was && !fs.powered() {
            self.0.off.notify_all();
        }
        r
    }

    /// Cuts the power now.
    pub fn cut(&self, reason: &str) -> io::Result<CutReport> {
        self.with(|fs| fs.cut(reason))
    }

    /// Arms a trigger.
    pub fn arm(&self, t: Trigger) {
        self.with(|fs| fs.arm(t));
    }

    /// Whether a trigger is armed and has not fired.
    pub fn armed(&self) -> bool {
        self.with(|fs| fs.armed())
    }

    /// Watches for a phase.
    pub fn add_marker(&self, m: Marker) {
        self.with(|fs| fs.add_marker(m));
    }

    /// False once the power is off.
    pub fn powered(&self) -> bool {
        self.with(|fs| fs.powered())
    }

    /// Counters so far.
    pub fn stats(&self) -> Stats {
        self.with(|fs| fs.stats())
    }

    /// What a cut now would discard.
    pub fn pending(&self) -> CutReport {
        self.with(|fs| fs.pending("not cut"))
    }

    /// Waits up to `timeout` for the power to go; returns the cut's report.
    pub fn wait_cut(&self, timeout: Duration) -> Option<CutReport> {
        let deadline = Instant::now() + timeout;
        let mut fs = self.lock();
        while fs.powered() {
            let left = deadline.checked_duration_since(Instant::now())?;
            fs = self.0.off.wait_timeout(fs, left).unwrap_or_else(|e| e.into_inner()).0;
        }
        fs.last_cut().cloned()
    }
}

/// Why the file system could not be mounted.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MountError {
    /// The backing directory could not be opened.
    #[error("backing directory {path}: {source}")]
    Backing {
        /// The directory.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// FUSE is not available here.
    #[error(
        "FUSE is unavailable: cannot open /dev/fuse ({0}); the power-loss tests need it \
         (Debian: `apt-get install fuse3`, which `tools/dev deps` does; load the `fuse` module; \
         in a container, pass --device /dev/fuse and CAP_SYS_ADMIN)"
    )]
    NoFuse(io::Error),
    /// The kernel refused the mount.
    #[error(
        "mounting FUSE on {path} failed: {source} (as root the mount needs CAP_SYS_ADMIN; \
         otherwise fusermount3 from Debian's fuse3)"
    )]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// Why.
        source: io::Error,
    },
}

/// A mounted power-loss file system. Dropping it unmounts.
pub struct Mounted {
    control: Control,
    session: Option<fuser::BackgroundSession>,
    mountpoint: PathBuf,
}

impl Mounted {
    /// The power switch.
    pub fn control(&self) -> &Control {
        &self.control
    }

    /// Where it is mounted.
    pub fn mountpoint(&self) -> &Path {
        &self.mountpoint
    }

    /// Unmounts and waits for the FUSE thread. Processes using the mount
    /// must be gone (after a cut: killed); references the kernel drops a
    /// moment later (a closed socket bound in the mount) are waited for,
    /// then the mount is detached.
    pub fn unmount(mut self) -> io::Result<()> {
        self.detach()
    }

    fn detach(&mut self) -> io::Result<()> {
        let Some(session) = self.session.take() else { return Ok(()) };
        let mut tries = 0;
        loop {
            match rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::empty()) {
                Ok(()) => break,
                Err(rustix::io::Errno::BUSY) if tries < 40 => {
                    tries += 1;
                    std::thread::sleep(std::time::Duration::from_millis(25));
                }
                Err(rustix::io::Errno::BUSY) => {
                    // Something still holds a file open here. Fail its
                    // requests (so nothing can hang on this file system),
                    // detach, and leave the FUSE thread to end when the
                    // last reference goes.
                    let aborted = abort_connection(&self.mountpoint);
                    rustix::mount::unmount(&self.mountpoint, rustix::mount::UnmountFlags::DETACH)?;
                    if aborted {
                        break;
                    }
                    drop(session);
                    return Err(io::Error::new(
                        io::ErrorKind::ResourceBusy,
                        format!("{} was still in use: detached", self.mountpoint.display()),
                    ));
                }
                // Not root: fusermount3 does it when the session goes.
                Err(rustix::io::Errno::PERM) => return session.umount_and_join(),
                Err(e) => return Err(e.into()),
            }
        }
        session.join()
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = self.detach();
    }
}

/// Aborts the FUSE connection behind `mountpoint` through fusectl (mounted
/// here if it is not yet); false if that is not possible.
fn abort_connection(mountpoint: &Path) -> bool {
    let conns = Path::new("/sys/fs/fuse/connections");
    let Ok(st) = rustix::fs::stat(mountpoint) else { return false };
    let abort = conns.join(rustix::fs::minor(st.st_dev).to_string()).join("abort");
    if !abort.exists() {
        let _ = rustix::mount::mount("fusectl", conns, "fusectl", rustix::mount::MountFlags::empty(), None);
    }
    std::fs::write(abort, b"1").is_ok()
}

/// Mounts a power-loss file system over `backing` (whose `tree/` holds the
/// files) at `mountpoint`.
pub fn mount(backing: &Path, mountpoint: &Path, model: Model) -> Result<Mounted, MountError> {
    std::fs::OpenOptions::new().read(true).write(true).open("/dev/fuse").map_err(MountError::NoFuse)?;
    let fs =
        PowerFs::open(backing, model).map_err(|source| MountError::Backing { path: backing.to_path_buf(), source })?;
    let control = Control::new(fs);
    let mut config = fuser::Config::default();
    config.mount_options =
        vec![fuser::MountOption::FSName("pipit-powerloss".into()), fuser::MountOption::Subtype("powerloss".into())];
    // One thread: operations reach the file system in the order the kernel
    // sent them, and each holds the lock anyway.
    config.n_threads = Some(1);
    let session = fuser::spawn_mount(crate::fuse::FuseFs::new(control.clone()), mountpoint, &config)
        .map_err(|source| MountError::Mount { path: mountpoint.to_path_buf(), source })?;
    Ok(Mounted { control, session: Some(session), mountpoint: mountpoint.to_path_buf() })
}
