//! When a change becomes durable: the crash model.

/// When a directory entry (create, rename, unlink, mkdir, link) survives a
/// power cut. File data is the same in every model: bytes written since a
/// file's last `fsync`/`fdatasync` are lost, as LazyFS drops its page cache
/// (no torn pages: a cut keeps every unsynced write or, here, none).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[non_exhaustive]
pub enum Model {
    /// What POSIX promises and no more: an entry is durable once its
    /// directory is fsynced (`fsync(2)`: "an explicit fsync() on a file
    /// descriptor for the directory is also needed"). A file fsynced but
    /// never named in a synced directory vanishes; a rename not followed by
    /// a directory fsync is undone. The harshest model, and the default:
    /// RocksDB fsyncs its directory after creating a WAL, an SST or a
    /// MANIFEST and after renaming `CURRENT`, so it claims to survive this.
    #[default]
    Strict,
    /// ext4 with `data=ordered` (its default): metadata goes through one
    /// journal, and any `fsync` (of a file or a directory) commits every
    /// entry change made before it, in order. `auto_da_alloc`: renaming a
    /// file over another also makes the renamed file's data durable (ext4
    /// flushes it before the journal commit that carries the rename).
    Ext4Ordered,
    /// LazyFS: entry changes pass straight to the backing file system and
    /// are durable at once; only file data waits for an fsync.
    Passthrough,
}

impl Model {
    /// Every model, for tests that cycle through them.
    pub const ALL: [Model; 3] = [Model::Strict, Model::Ext4Ordered, Model::Passthrough];

    /// A short name.
    pub fn name(self) -> &'static str {
        match self {
            Model::Strict => "strict",
            Model::Ext4Ordered => "ext4-ordered",
            Model::Passthrough => "passthrough",
        }
    }

    /// Parses [`Model::name`].
    pub fn from_name(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == s)
    }
}
