//! The server's Noise static keys on disk, and the rotation an operator
//! runs (SPEC.md 3.6).
//!
//! `<data_dir>/server.key` holds the current private key (64 hex digits).
//! `<data_dir>/server.key.retired` holds the keys it replaced, one per
//! line: the private key and the Unix time it was retired. Devices that
//! pinned a retired key still log in with IK in one round trip and learn
//! the current key inside that session (`LoginOk.new_server_key`); once
//! they have moved, the operator drops the retired keys. Both files are
//! mode 0600 and replaced atomically (write, fsync, rename).
//!
//! Like `config`, this module imports nothing of the server: the binary's
//! `pipit key` commands use it on a stopped server, and the running server
//! reloads through it.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use pipit_protocol::handshake::ServerKeys;
use pipit_protocol::{PublicKey, StaticKeypair};

/// Most retired keys kept. Each costs a failed Noise attempt for every
/// `IkInit` that uses an unknown key, so a long list slows the stale-key
/// path; rotating more often than devices can follow is a mistake anyway.
pub const MAX_RETIRED: usize = 8;

/// Key files could not be read or written.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KeyFileError {
    /// Reading or writing a key file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A key file does not hold what it should.
    #[error("{path}: line {line}: {what}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        what: &'static str,
    },
    /// Rotation would keep more than [`MAX_RETIRED`] retired keys.
    #[error(
        "{0} retired keys are already kept (the most is {MAX_RETIRED}); drop them first with `pipit key drop-retired`"
    )]
    TooManyRetired(usize),
}

/// A key the server no longer offers but still accepts.
#[derive(Debug, Clone)]
pub struct Retired {
    /// The key pair.
    pub key: StaticKeypair,
    /// When it was retired, seconds since the Unix epoch.
    pub since: u64,
}

/// Everything in a data directory's key files.
#[derive(Debug, Clone)]
pub struct KeyFiles {
    /// The key offered to new devices and in `Retry`.
    pub current: StaticKeypair,
    /// Older keys, oldest first.
    pub retired: Vec<Retired>,
}

impl KeyFiles {
    /// The keys the handshake uses: the current one, then the retired
    /// ones newest first (the most devices still hold the latest).
    pub fn server_keys(&self) -> ServerKeys {
        ServerKeys::new(self.current.clone()).with_retired(self.retired.iter().rev().map(|r| r.key.clone()).collect())
    }
}

/// Path of the current key.
pub fn current_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.key")
}

/// Path of the retired keys.
pub fn retired_path(data_dir: &Path) -> PathBuf {
    data_dir.join("server.key.retired")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> KeyFileError + '_ {
    move |source| KeyFileError::Io { path: path.to_path_buf(), source }
}

/// Loads the keys of `data_dir`, creating the current key (mode 0600) on
/// first start.
pub fn load_or_create(data_dir: &Path) -> Result<KeyFiles, KeyFileError> {
    let path = current_path(data_dir);
    let current = match std::fs::read_to_string(&path) {
        Ok(text) => StaticKeypair::from_hex(&text).map_err(|_| KeyFileError::Corrupt {
            path: path.clone(),
            line: 1,
            what: "not a key (64 hex digits)",
        })?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let kp = StaticKeypair::generate();
            write_private(&path, &format!("{}\n", kp.to_hex()))?;
            tracing::info!(path = %path.display(), "generated a new server key");
            kp
        }
        Err(e) => return Err(io(&path)(e)),
    };
    let retired = load_retired(data_dir)?.into_iter().filter(|r| r.key.public() != current.public()).collect();
    Ok(KeyFiles { current, retired })
}

fn load_retired(data_dir: &Path) -> Result<Vec<Retired>, KeyFileError> {
    let path = retired_path(data_dir);
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(&path)(e)),
    };
    let mut out: Vec<Retired> = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let corrupt = |what| KeyFileError::Corrupt { path: path.clone(), line: i + 1, what };
        let mut words = line.split_whitespace();
        let key = words.next().and_then(|w| StaticKeypair::from_hex(w).ok()).ok_or_else(|| corrupt("not a key"))?;
        let since = match words.next() {
            Some(w) => w.parse().map_err(|_| corrupt("the retirement time is not a number"))?,
            None => 0,
        };
        if !out.iter().any(|r| r.key.public() == key.public()) {
            out.push(Retired { key, since });
        }
    }
    Ok(out)
}

fn write_retired(data_dir: &Path, retired: &[Retired]) -> Result<(), KeyFileError> {
    let path = retired_path(data_dir);
    if retired.is_empty() {
        return match std::fs::remove_file(&path) {
            Ok(()) => sync_dir(data_dir),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io(&path)(e)),
        };
    }
    let mut text = String::from(
        "# Retired pipit server keys: private key, Unix time retired. Devices that pinned\n\
         # one still log in and are told the current key. `pipit key drop-retired` empties this.\n",
    );
    for r in retired {
        text.push_str(&format!("{} {}\n", r.key.to_hex(), r.since));
    }
    write_private(&path, &text)
}

/// Writes `text` to `path` with mode 0600: a temporary file, fsync, rename,
/// fsync of the directory, so a crash leaves the old file or the new one.
fn write_private(path: &Path, text: &str) -> Result<(), KeyFileError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let tmp = path.with_extension("tmp");
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io(&tmp))?;
    f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    sync_dir(path.parent().unwrap_or(Path::new(".")))
}

fn sync_dir(dir: &Path) -> Result<(), KeyFileError> {
    std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))
}

/// Makes a new current key and keeps the old one as retired. Returns the
/// keys now on disk.
///
/// The retired list is written first: a crash between the two writes
/// leaves the old key both current and retired, which loads as before.
pub fn rotate(data_dir: &Path, now: u64) -> Result<KeyFiles, KeyFileError> {
    let mut keys = load_or_create(data_dir)?;
    if keys.retired.len() >= MAX_RETIRED {
        return Err(KeyFileError::TooManyRetired(keys.retired.len()));
    }
    keys.retired.push(Retired { key: keys.current.clone(), since: now });
    write_retired(data_dir, &keys.retired)?;
    keys.current = StaticKeypair::generate();
    write_private(&current_path(data_dir), &format!("{}\n", keys.current.to_hex()))?;
    Ok(keys)
}

/// Forgets every retired key. Returns the public keys dropped.
pub fn drop_retired(data_dir: &Path) -> Result<Vec<PublicKey>, KeyFileError> {
    let dropped = load_retired(data_dir)?.into_iter().map(|r| *r.key.public()).collect();
    write_retired(data_dir, &[])?;
    Ok(dropped)
}

/// The keys a running server uses, replaceable while it runs (the admin
/// socket's `keys reload`). A handshake takes one snapshot and uses it
/// throughout, so a reload never splits one.
#[derive(Debug)]
pub struct KeyRing {
    keys: RwLock<Arc<ServerKeys>>,
}

impl KeyRing {
    /// A ring holding `keys`.
    pub fn new(keys: ServerKeys) -> Self {
        Self { keys: RwLock::new(Arc::new(keys)) }
    }

    /// The keys now in force.
    pub fn get(&self) -> Arc<ServerKeys> {
        self.keys.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Replaces the keys for handshakes that start from now on.
    pub fn set(&self, keys: ServerKeys) {
        *self.keys.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(keys);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_keeps_the_old_key_and_drop_forgets_it() {
        let dir = tempfile::tempdir().unwrap();
        let first = load_or_create(dir.path()).unwrap();
        assert!(first.retired.is_empty());
        let again = load_or_create(dir.path()).unwrap();
        assert_eq!(again.current.public(), first.current.public(), "the key persists");

        let rotated = rotate(dir.path(), 1_800_000_000).unwrap();
        assert_ne!(rotated.current.public(), first.current.public());
        let loaded = load_or_create(dir.path()).unwrap();
        assert_eq!(loaded.current.public(), rotated.current.public());
        assert_eq!(loaded.retired.len(), 1);
        assert_eq!(loaded.retired[0].key.public(), first.current.public());
        assert_eq!(loaded.retired[0].since, 1_800_000_000);
        use std::os::unix::fs::PermissionsExt as _;
        for p in [current_path(dir.path()), retired_path(dir.path())] {
            assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600, "{}", p.display());
        }

        assert_eq!(drop_retired(dir.path()).unwrap(), vec![*first.current.public()]);
        let loaded = load_or_create(dir.path()).unwrap();
        assert!(loaded.retired.is_empty());
        assert_eq!(loaded.current.public(), rotated.current.public());
    }

    #[test]
    fn the_retired_list_is_bounded_and_a_current_key_is_never_also_retired() {
        let dir = tempfile::tempdir().unwrap();
        for i in 0..MAX_RETIRED {
            rotate(dir.path(), i as u64).unwrap();
        }
        assert!(matches!(rotate(dir.path(), 99), Err(KeyFileError::TooManyRetired(n)) if n == MAX_RETIRED));
        // As after a crash between the two writes of a rotation.
        let keys = load_or_create(dir.path()).unwrap();
        let mut retired = keys.retired.clone();
        retired.push(Retired { key: keys.current.clone(), since: 5 });
        write_retired(dir.path(), &retired).unwrap();
        let loaded = load_or_create(dir.path()).unwrap();
        assert_eq!(loaded.retired.len(), MAX_RETIRED);
        assert!(loaded.retired.iter().all(|r| r.key.public() != loaded.current.public()));
    }
}
