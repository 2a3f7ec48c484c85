//! The undo log of one masked-input stream. Chunks are folded into the running sum as they
//! arrive, so memory stays O(vector) however many participants stream at once; if the
//! stream breaks before its last chunk, its words must come back out of the sum. They are
//! appended here (an unlinked temporary file, gone when dropped) and read back to retract.
//! Masked words alone are indistinguishable from random, so nothing private touches disk.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Words per block when reading a spool back.
const READ_BLOCK_WORDS: usize = 64 * 1024;

/// An append-only file of u32 words.
pub(crate) struct Spool {
    file: BufWriter<File>,
    words: usize,
}

impl Spool {
    /// A new spool in `dir` (created if missing).
    pub fn new(dir: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        Ok(Spool {
            file: BufWriter::new(tempfile::tempfile_in(dir)?),
            words: 0,
        })
    }

    /// Appends words that were just folded into the sum.
    pub fn append(&mut self, words: &[u32]) -> std::io::Result<()> {
        for w in words {
            self.file.write_all(&w.to_le_bytes())?;
        }
        self.words += words.len();
        Ok(())
    }

    /// Words appended so far.
    pub fn len(&self) -> usize {
        self.words
    }

    /// Reads everything back in blocks, calling `f(offset, words)` for each.
    pub fn replay(self, mut f: impl FnMut(usize, &[u32])) -> std::io::Result<()> {
        let mut file = self.file.into_inner().map_err(|e| e.into_error())?;
        file.seek(SeekFrom::Start(0))?;
        let mut reader = BufReader::new(file);
        let mut offset = 0;
        let mut bytes = vec![0u8; READ_BLOCK_WORDS * 4];
        let mut words = Vec::with_capacity(READ_BLOCK_WORDS);
        while offset < self.words {
            let n = (self.words - offset).min(READ_BLOCK_WORDS);
            reader.read_exact(&mut bytes[..n * 4])?;
            words.clear();
            words.extend(
                bytes[..n * 4]
                    .chunks_exact(4)
                    .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
            );
            f(offset, &words);
            offset += n;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replays_what_was_appended_in_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let mut spool = Spool::new(&dir.path().join("spool")).unwrap();
        let words: Vec<u32> = (0..150_000u32)
            .map(|i| i.wrapping_mul(2_654_435_761))
            .collect();
        for c in words.chunks(7_000) {
            spool.append(c).unwrap();
        }
        assert_eq!(spool.len(), words.len());
        let mut back = Vec::new();
        let mut offsets = Vec::new();
        spool
            .replay(|offset, w| {
                offsets.push(offset);
                back.extend_from_slice(w);
            })
            .unwrap();
        assert_eq!(back, words);
        assert_eq!(offsets, vec![0, 65_536, 131_072]);
    }
}
