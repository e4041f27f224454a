//! Open files and directories: the application's file handles, each
//! holding the backing file it reads and writes through (so a file keeps
//! working after its name is gone, as on any file system).

use std::collections::{HashMap, HashSet};
use std::ffi::OsString;
use std::io;
use std::os::unix::fs::FileExt as _;

use crate::fs::{Errno, Result};
use crate::tree::{Ino, Kind};

/// One directory entry as `readdir` lists it.
#[derive(Debug, Clone)]
pub struct DirEntry {
    /// Its inode.
    pub ino: u64,
    /// What it is.
    pub kind: Kind,
    /// Its name.
    pub name: OsString,
}

enum Handle {
    File {
        ino: Ino,
        file: std::fs::File,
    },
    /// A listing taken at `opendir`.
    Dir {
        entries: Vec<DirEntry>,
    },
}

#[derive(Default)]
pub(crate) struct Handles {
    map: HashMap<u64, Handle>,
    next: u64,
}

impl Handles {
    fn add(&mut self, h: Handle) -> u64 {
        self.next += 1;
        self.map.insert(self.next, h);
        self.next
    }

    pub(crate) fn add_file(&mut self, ino: Ino, file: std::fs::File) -> u64 {
        self.add(Handle::File { ino, file })
    }

    pub(crate) fn add_dir(&mut self, entries: Vec<DirEntry>) -> u64 {
        self.add(Handle::Dir { entries })
    }

    /// Closes a handle; false if there was none.
    pub(crate) fn remove(&mut self, fh: u64) -> bool {
        self.map.remove(&fh).is_some()
    }

    /// Closes every handle (the power is gone).
    pub(crate) fn clear(&mut self) {
        self.map.clear();
    }

    pub(crate) fn file(&self, fh: u64) -> Result<(Ino, &std::fs::File)> {
        match self.map.get(&fh) {
            Some(Handle::File { ino, file }) => Ok((*ino, file)),
            _ => Err(Errno::BADF),
        }
    }

    /// Some open file of inode `ino` (for one whose names are all gone).
    pub(crate) fn file_of(&self, ino: Ino) -> Option<&std::fs::File> {
        self.map.values().find_map(|h| match h {
            Handle::File { ino: i, file } if *i == ino => Some(file),
            _ => None,
        })
    }

    pub(crate) fn listing(&self, fh: u64, offset: usize) -> Result<&[DirEntry]> {
        match self.map.get(&fh) {
            Some(Handle::Dir { entries }) => Ok(entries.get(offset..).unwrap_or(&[])),
            _ => Err(Errno::BADF),
        }
    }

    /// Inodes with an open file handle.
    pub(crate) fn open_inodes(&self) -> HashSet<Ino> {
        self.map
            .values()
            .filter_map(|h| match h {
                Handle::File { ino, .. } => Some(*ino),
                Handle::Dir { .. } => None,
            })
            .collect()
    }
}

/// Backing files are always opened for reading and writing: the kernel
/// has already checked the application's access mode, and a write must be
/// able to read the bytes it is about to overwrite.
pub(crate) fn backing_options() -> std::fs::OpenOptions {
    let mut o = std::fs::OpenOptions::new();
    o.read(true).write(true);
    o
}

/// Up to `n` bytes at `at` (fewer at the end of the file).
pub(crate) fn read_at(f: &std::fs::File, at: u64, n: usize) -> io::Result<Vec<u8>> {
    let mut buf = vec![0; n];
    let mut got = 0;
    while got < n {
        match f.read_at(&mut buf[got..], at + got as u64) {
            Ok(0) => break,
            Ok(k) => got += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    buf.truncate(got);
    Ok(buf)
}
