//! One regular file's durable image, kept as an undo record against the
//! live bytes in the backing file.
//!
//! The backing file always holds what the application sees (writes pass
//! straight through). What a power cut must bring back is the image as of
//! the last `fsync`/`fdatasync`: its length, and the original bytes of
//! every range below that length overwritten or truncated since. Appends,
//! which are nearly all a database writes, need nothing saved; an `fsync`
//! forgets the record, so it costs nothing either.

use std::collections::BTreeMap;
use std::io;

/// What a cut restores for one file.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub(crate) struct FileState {
    /// Length of the durable image.
    pub(crate) durable_len: u64,
    /// Original bytes of durable ranges changed since the last sync, keyed
    /// by offset; ranges never overlap, and together with the live bytes
    /// below `durable_len` they make the durable image. Invariant: when the
    /// live file is shorter than `durable_len`, the bytes beyond its end are
    /// all here (a truncate saved them).
    undo: BTreeMap<u64, Vec<u8>>,
}

impl FileState {
    /// A file whose current bytes (`len` of them) are all durable.
    pub(crate) fn durable(len: u64) -> Self {
        Self { durable_len: len, undo: BTreeMap::new() }
    }

    /// Bytes of the durable image held in memory (only overwrites cost).
    pub(crate) fn saved_bytes(&self) -> u64 {
        self.undo.values().map(|v| v.len() as u64).sum()
    }

    /// The parts of `[start, end)` below `durable_len` not saved yet, so a
    /// change to them must save their current bytes first.
    fn unsaved(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        let end = end.min(self.durable_len);
        let mut gaps = Vec::new();
        let mut at = start;
        if at >= end {
            return gaps;
        }
        // The saved range that may cover `start` begins at or before it.
        let first = self.undo.range(..=at).next_back().map(|(&k, _)| k).unwrap_or(at);
        for (&k, v) in self.undo.range(first..end) {
            let k_end = k + v.len() as u64;
            if k_end <= at {
                continue;
            }
            if k > at {
                gaps.push((at, k));
            }
            at = at.max(k_end);
            if at >= end {
                return gaps;
            }
        }
        if at < end {
            gaps.push((at, end));
        }
        gaps
    }

    /// Saves what a change of `[start, end)` would destroy, reading the
    /// current bytes with `read(offset, len)`. Call before writing or
    /// truncating the backing file.
    pub(crate) fn before_change(
        &mut self,
        start: u64,
        end: u64,
        mut read: impl FnMut(u64, usize) -> io::Result<Vec<u8>>,
    ) -> io::Result<()> {
        for (s, e) in self.unsaved(start, end) {
            let bytes = read(s, (e - s) as usize)?;
            if bytes.len() as u64 != e - s {
                return Err(io::Error::other(format!(
                    "durable bytes {s}..{e} are missing from the backing file (read {})",
                    bytes.len()
                )));
            }
            self.undo.insert(s, bytes);
        }
        Ok(())
    }

    /// The live bytes became durable (`fsync`/`fdatasync`).
    pub(crate) fn sync(&mut self, live_len: u64) {
        self.durable_len = live_len;
        self.undo.clear();
    }

    /// Whether anything differs from the durable image, given the live length.
    pub(crate) fn is_dirty(&self, live_len: u64) -> bool {
        live_len != self.durable_len || !self.undo.is_empty()
    }

    /// Turns the backing file back into the durable image: its length,
    /// then the saved ranges.
    pub(crate) fn revert(&self, file: &std::fs::File) -> io::Result<()> {
        use std::os::unix::fs::FileExt as _;
        file.set_len(self.durable_len)?;
        for (&at, bytes) in &self.undo {
            file.write_all_at(bytes, at)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A live file in memory driven the way the backing file is.
    struct Live {
        bytes: Vec<u8>,
        state: FileState,
    }

    impl Live {
        fn new(bytes: &[u8]) -> Self {
            Self { bytes: bytes.to_vec(), state: FileState::durable(bytes.len() as u64) }
        }

        fn write(&mut self, at: u64, data: &[u8]) {
            let bytes = self.bytes.clone();
            self.state
                .before_change(at, at + data.len() as u64, |o, n| {
                    Ok(bytes[o as usize..(o as usize + n).min(bytes.len())].to_vec())
                })
                .unwrap();
            let end = at as usize + data.len();
            if self.bytes.len() < end {
                self.bytes.resize(end, 0);
            }
            self.bytes[at as usize..end].copy_from_slice(data);
        }

        fn truncate(&mut self, len: u64) {
            let bytes = self.bytes.clone();
            self.state
                .before_change(len, u64::MAX, |o, n| Ok(bytes[o as usize..(o as usize + n).min(bytes.len())].to_vec()))
                .unwrap();
            self.bytes.resize(len as usize, 0);
        }

        fn durable_image(&self) -> Vec<u8> {
            let mut img = self.bytes.clone();
            img.resize(self.state.durable_len as usize, 0);
            for (&at, b) in &self.state.undo {
                img[at as usize..at as usize + b.len()].copy_from_slice(b);
            }
            img
        }
    }

    #[test]
    fn appends_save_nothing_and_vanish_at_a_cut() {
        let mut f = Live::new(b"hello");
        f.write(5, b" world");
        assert_eq!(f.state.saved_bytes(), 0);
        assert!(f.state.is_dirty(11));
        assert_eq!(f.durable_image(), b"hello");
        f.state.sync(11);
        assert_eq!(f.durable_image(), b"hello world");
        assert!(!f.state.is_dirty(11));
    }

    #[test]
    fn overwrites_keep_the_first_original_bytes() {
        let mut f = Live::new(b"abcdefgh");
        f.write(2, b"XY");
        f.write(1, b"1234"); // overlaps the saved range on both sides
        f.write(3, b"Z");
        assert_eq!(f.bytes, b"a12Z4fgh");
        assert_eq!(f.state.saved_bytes(), 4, "bcde saved once");
        assert_eq!(f.durable_image(), b"abcdefgh");
    }

    #[test]
    fn a_write_across_the_durable_end_saves_only_what_was_durable() {
        let mut f = Live::new(b"abcd");
        f.write(2, b"XYZW");
        assert_eq!(f.state.saved_bytes(), 2);
        assert_eq!(f.durable_image(), b"abcd");
    }

    #[test]
    fn truncate_then_regrow_restores_the_durable_tail() {
        let mut f = Live::new(b"abcdefgh");
        f.truncate(3);
        f.write(3, b"123456789");
        assert_eq!(f.durable_image(), b"abcdefgh");
        f.state.sync(f.bytes.len() as u64);
        f.truncate(0);
        assert_eq!(f.durable_image(), b"abc123456789");
    }

    #[test]
    fn unsaved_gaps_skip_saved_ranges() {
        let mut s = FileState::durable(100);
        s.undo.insert(10, vec![0; 10]);
        s.undo.insert(30, vec![0; 5]);
        assert_eq!(s.unsaved(0, 100), vec![(0, 10), (20, 30), (35, 100)]);
        assert_eq!(s.unsaved(12, 18), vec![]);
        assert_eq!(s.unsaved(15, 32), vec![(20, 30)]);
        assert_eq!(s.unsaved(90, 200), vec![(90, 100)]);
        assert_eq!(s.unsaved(100, 200), vec![]);
    }
}
