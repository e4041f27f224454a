//! A power-loss file system for tests: LazyFS's idea, in Rust over FUSE.
//!
//! [`mount`] puts a FUSE file system over a backing directory. Reads and
//! writes pass straight through to it; beside them the file system keeps,
//! for every file, its durable image (what its last `fsync`/`fdatasync`
//! saw) and, for every directory, its durable entries (what its last
//! `fsync` saw, or what the [`Model`] says). [`Control::cut`] (or an armed
//! [`Trigger`]) is the power cut: atomically with respect to every
//! operation, each file goes back to its durable image and each directory
//! to its durable entries, and every later operation fails with `EIO`. The
//! test then kills the process that used it, unmounts, and mounts again on
//! the same backing directory, which now holds exactly what a machine
//! would find on its disk after losing power.
//!
//! What it does not do: torn writes (a cut keeps no part of an unsynced
//! write, where a real disk may keep some pages), reordering of unsynced
//! writes within a file, and metadata other than names and lengths
//! (permissions and times survive as they are). Symlinks cannot be made.
//!
//! The model, without FUSE, is [`PowerFs`]: its unit tests need neither
//! FUSE nor root.

mod control;
mod file;
mod fs;
mod fuse;
mod handles;
mod model;
mod report;
mod tree;
mod trigger;

pub use control::{mount, Control, MountError, Mounted};
pub use fs::{Attr, Errno, PowerFs, Result};
pub use handles::DirEntry;
pub use model::Model;
pub use report::{CutReport, EntryChange, EntryLoss, FileLoss};
pub use tree::Kind;
pub use trigger::{Marker, Op, Stats, Trigger, When};

#[cfg(test)]
mod tests;
