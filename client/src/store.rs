//! What a client must remember across app restarts, behind a trait the app
//! can implement over its own storage. Two implementations ship: in memory
//! (tests, ephemeral clients) and a directory of files.

use std::collections::BTreeMap;
use std::io::Write as _;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pipit_protocol::message::pb;
use pipit_protocol::{PublicKey, StaticKeypair};
use prost::Message as _;

/// The store failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StoreError {
    /// File system error.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A stored file does not parse.
    #[error("{0}: corrupt")]
    Corrupt(PathBuf),
    /// An end-to-end record does not open with this device's pickle key,
    /// or does not parse.
    #[error("end-to-end record {0}: wrong pickle key or corrupt")]
    Record(String),
    /// This store keeps no end-to-end state: implement the `e2e_*`
    /// methods of [`Store`], or turn encryption off.
    #[error("this store keeps no end-to-end state (implement Store::e2e_get and the others, or turn encryption off)")]
    Unsupported,
}

/// The client's identity and progress.
#[derive(Debug, Clone)]
pub struct State {
    /// The device's Noise static key: its identity.
    pub identity: StaticKeypair,
    /// Account id; 0 until registered.
    pub account: u64,
    /// Device number.
    pub device: u32,
    /// The pinned server key; `None` until first contact.
    pub server_key: Option<PublicKey>,
    /// In a cluster: the node that owns this account, learned from a
    /// `Redirect`, connected to directly from then on (no extra round
    /// trip). `None`: the configured server.
    pub home: Option<Home>,
    /// The next client message id.
    pub next_id: u64,
    /// Every inbox id up to this one was processed (and acked).
    pub acked_through: u64,
}

impl State {
    /// A fresh identity, not yet registered.
    pub fn new(identity: StaticKeypair) -> Self {
        Self { identity, account: 0, device: 0, server_key: None, home: None, next_id: 1, acked_through: 0 }
    }
}

/// The node of a cluster that owns the account.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Home {
    /// Its `host:port`.
    pub server: String,
    /// Its static key (pinned for IK).
    pub server_key: PublicKey,
}

/// Durable client storage. Called only from the client's own task, one call
/// at a time. A `put_outbox` that returns `Ok` must survive an app crash:
/// the send is then guaranteed to be retried until the server has it.
pub trait Store: Send + 'static {
    /// The saved state, if any.
    fn load_state(&mut self) -> Result<Option<State>, StoreError>;
    /// Saves the state.
    fn save_state(&mut self, state: &State) -> Result<(), StoreError>;
    /// Every unsent message, in client id order.
    fn load_outbox(&mut self) -> Result<Vec<pb::Send>, StoreError>;
    /// Adds a message to the outbox.
    fn put_outbox(&mut self, send: &pb::Send) -> Result<(), StoreError>;
    /// Removes a message the server has made durable.
    fn remove_outbox(&mut self, id: u64) -> Result<(), StoreError>;

    /// An end-to-end record (the Olm account, a session, a peer's
    /// identities, a message waiting for keys), by name. Names are short
    /// ASCII: letters, digits and dots. Values are already encrypted with
    /// the pickle key; the store keeps them as they are. A `put` that
    /// returns `Ok` must survive an app crash, like the outbox.
    ///
    /// The defaults keep nothing and say so, which makes
    /// [`crate::Client::start`] refuse to encrypt; both shipped stores
    /// implement them.
    fn e2e_get(&mut self, _name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Err(StoreError::Unsupported)
    }
    /// Stores an end-to-end record, replacing any under the same name.
    fn e2e_put(&mut self, _name: &str, _value: &[u8]) -> Result<(), StoreError> {
        Err(StoreError::Unsupported)
    }
    /// Deletes an end-to-end record (absent is fine).
    fn e2e_delete(&mut self, _name: &str) -> Result<(), StoreError> {
        Err(StoreError::Unsupported)
    }
    /// The names of the end-to-end records that start with `prefix`, in
    /// name order.
    fn e2e_names(&mut self, _prefix: &str) -> Result<Vec<String>, StoreError> {
        Err(StoreError::Unsupported)
    }
}

/// A store in memory: survives reconnects, not restarts.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Option<State>,
    outbox: BTreeMap<u64, pb::Send>,
    e2e: BTreeMap<String, Vec<u8>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }
}

impl Store for MemoryStore {
    fn load_state(&mut self) -> Result<Option<State>, StoreError> {
        Ok(self.state.clone())
    }
    fn save_state(&mut self, state: &State) -> Result<(), StoreError> {
        self.state = Some(state.clone());
        Ok(())
    }
    fn load_outbox(&mut self) -> Result<Vec<pb::Send>, StoreError> {
        Ok(self.outbox.values().cloned().collect())
    }
    fn put_outbox(&mut self, send: &pb::Send) -> Result<(), StoreError> {
        self.outbox.insert(send.id, send.clone());
        Ok(())
    }
    fn remove_outbox(&mut self, id: u64) -> Result<(), StoreError> {
        self.outbox.remove(&id);
        Ok(())
    }
    fn e2e_get(&mut self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.e2e.get(name).cloned())
    }
    fn e2e_put(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        self.e2e.insert(name.to_string(), value.to_vec());
        Ok(())
    }
    fn e2e_delete(&mut self, name: &str) -> Result<(), StoreError> {
        self.e2e.remove(name);
        Ok(())
    }
    fn e2e_names(&mut self, prefix: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .e2e
            .range(prefix.to_string()..)
            .map(|(k, _)| k)
            .take_while(|k| k.starts_with(prefix))
            .cloned()
            .collect())
    }
}

/// A store in a directory: `state` (key = value lines), one file per
/// outbox entry under `outbox/` and one per end-to-end record under
/// `e2e/`. Every write goes to a temporary file that
/// is synced and renamed over the old one, so a crash leaves either the old
/// or the new version, never a torn one.
#[derive(Debug)]
pub struct FileStore {
    dir: PathBuf,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io { path: path.to_path_buf(), source }
}

fn write_atomic(path: &Path, data: &[u8]) -> Result<(), StoreError> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(data).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))?;
    if let Some(parent) = path.parent() {
        // Make the rename itself durable.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    Ok(())
}

impl FileStore {
    /// A store in `dir`, created if missing (mode 0700: it holds the
    /// device's private key).
    pub fn open(dir: impl Into<PathBuf>) -> Result<Self, StoreError> {
        let dir = dir.into();
        let outbox = dir.join("outbox");
        std::fs::create_dir_all(&outbox).map_err(io(&outbox))?;
        let e2e = dir.join("e2e");
        std::fs::create_dir_all(&e2e).map_err(io(&e2e))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).map_err(io(&dir))?;
        }
        Ok(Self { dir })
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn entry_path(&self, id: u64) -> PathBuf {
        self.dir.join("outbox").join(format!("{id:020}"))
    }

    fn record_path(&self, name: &str) -> Result<PathBuf, StoreError> {
        // Names come from the library, but a path must never escape.
        if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.') || name.starts_with('.') {
            return Err(StoreError::Record(name.to_string()));
        }
        Ok(self.dir.join("e2e").join(name))
    }
}

impl Store for FileStore {
    fn load_state(&mut self) -> Result<Option<State>, StoreError> {
        let path = self.state_path();
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io(&path)(e)),
        };
        let corrupt = || StoreError::Corrupt(path.clone());
        let mut fields = std::collections::HashMap::new();
        for line in text.lines() {
            let (k, v) = line.split_once('=').ok_or_else(corrupt)?;
            fields.insert(k.trim(), v.trim());
        }
        let get = |k: &str| fields.get(k).copied().ok_or_else(corrupt);
        Ok(Some(State {
            identity: StaticKeypair::from_hex(get("identity")?).map_err(|_| corrupt())?,
            account: get("account")?.parse().map_err(|_| corrupt())?,
            device: get("device")?.parse().map_err(|_| corrupt())?,
            server_key: match get("server_key")? {
                "" => None,
                k => Some(k.parse().map_err(|_| corrupt())?),
            },
            // Absent in files written before clusters: no home.
            home: match fields.get("home").copied().unwrap_or("") {
                "" => None,
                h => {
                    let (server, key) = h.rsplit_once(' ').ok_or_else(corrupt)?;
                    Some(Home { server: server.to_string(), server_key: key.parse().map_err(|_| corrupt())? })
                }
            },
            next_id: get("next_id")?.parse().map_err(|_| corrupt())?,
            acked_through: get("acked_through")?.parse().map_err(|_| corrupt())?,
        }))
    }

    fn save_state(&mut self, s: &State) -> Result<(), StoreError> {
        let text = format!(
            "identity = {}\naccount = {}\ndevice = {}\nserver_key = {}\nhome = {}\nnext_id = {}\nacked_through = {}\n",
            s.identity.to_hex(),
            s.account,
            s.device,
            s.server_key.map(|k| k.to_string()).unwrap_or_default(),
            s.home.as_ref().map(|h| format!("{} {}", h.server, h.server_key)).unwrap_or_default(),
            s.next_id,
            s.acked_through
        );
        write_atomic(&self.state_path(), text.as_bytes())
    }

    fn load_outbox(&mut self) -> Result<Vec<pb::Send>, StoreError> {
        let dir = self.dir.join("outbox");
        let mut names: Vec<PathBuf> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_none())
            .collect();
        names.sort();
        names
            .into_iter()
            .map(|p| {
                let data = std::fs::read(&p).map_err(io(&p))?;
                pb::Send::decode(Bytes::from(data)).map_err(|_| StoreError::Corrupt(p))
            })
            .collect()
    }

    fn put_outbox(&mut self, send: &pb::Send) -> Result<(), StoreError> {
        write_atomic(&self.entry_path(send.id), &send.encode_to_vec())
    }

    fn remove_outbox(&mut self, id: u64) -> Result<(), StoreError> {
        remove(&self.entry_path(id))
    }

    fn e2e_get(&mut self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let p = self.record_path(name)?;
        match std::fs::read(&p) {
            Ok(v) => Ok(Some(v)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&p)(e)),
        }
    }

    fn e2e_put(&mut self, name: &str, value: &[u8]) -> Result<(), StoreError> {
        write_atomic(&self.record_path(name)?, value)
    }

    fn e2e_delete(&mut self, name: &str) -> Result<(), StoreError> {
        remove(&self.record_path(name)?)
    }

    fn e2e_names(&mut self, prefix: &str) -> Result<Vec<String>, StoreError> {
        let dir = self.dir.join("e2e");
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .map_err(io(&dir))?
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n.starts_with(prefix) && !n.ends_with(".tmp"))
            .collect();
        names.sort();
        Ok(names)
    }
}

fn remove(p: &Path) -> Result<(), StoreError> {
    match std::fs::remove_file(p) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io(p)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_store_round_trips_state_and_outbox() {
        let dir = std::env::temp_dir().join(format!("pipit-store-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let mut s = FileStore::open(&dir).unwrap();
        assert!(s.load_state().unwrap().is_none());
        let mut st = State::new(StaticKeypair::generate());
        st.account = 7;
        st.server_key = Some(*StaticKeypair::generate().public());
        st.next_id = 42;
        s.save_state(&st).unwrap();
        for id in [3, 1, 2] {
            s.put_outbox(&pb::Send { id, to: 9, payload: Bytes::from_static(b"x"), ..Default::default() }).unwrap();
        }
        s.remove_outbox(2).unwrap();
        let mut again = FileStore::open(&dir).unwrap();
        let loaded = again.load_state().unwrap().unwrap();
        assert_eq!((loaded.account, loaded.next_id, loaded.server_key), (7, 42, st.server_key));
        assert_eq!(loaded.home, None);
        let home = Home { server: "[::1]:5222".into(), server_key: *StaticKeypair::generate().public() };
        st.home = Some(home.clone());
        s.save_state(&st).unwrap();
        assert_eq!(FileStore::open(&dir).unwrap().load_state().unwrap().unwrap().home, Some(home));
        assert_eq!(loaded.identity.public(), st.identity.public());
        let ids: Vec<u64> = again.load_outbox().unwrap().iter().map(|m| m.id).collect();
        assert_eq!(ids, vec![1, 3]);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
