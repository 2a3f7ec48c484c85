//! Plain-text files: strict UTF-8, Unicode NFC, and the split of a text's trailing lines into
//! held-out text.
//!
//! NFC matters for these languages: Vietnamese and Burmese text is often stored decomposed
//! (a base letter plus combining marks), and the same word in two normal forms would be two
//! different token sequences to the model and two different character counts to
//! bits-per-character.

use std::path::Path;

use unicode_normalization::UnicodeNormalization;

use crate::error::CorpusError;

/// `text` in Unicode Normalization Form C.
pub fn nfc(text: &str) -> String {
    text.nfc().collect()
}

/// Decodes `bytes` as UTF-8. Invalid input is an error naming `path`, the byte offset of the
/// first invalid byte and its 1-based line; a leading byte-order mark is dropped.
pub fn decode_utf8(path: &str, bytes: Vec<u8>) -> Result<String, CorpusError> {
    match String::from_utf8(bytes) {
        Ok(mut text) => {
            if text.starts_with('\u{FEFF}') {
                text.drain(..'\u{FEFF}'.len_utf8());
            }
            Ok(text)
        }
        Err(e) => {
            let offset = e.utf8_error().valid_up_to();
            let line = 1 + e.as_bytes()[..offset]
                .iter()
                .filter(|&&b| b == b'\n')
                .count();
            Err(CorpusError::InvalidUtf8 {
                path: path.to_string(),
                offset,
                line,
            })
        }
    }
}

/// Reads a UTF-8 text file and normalises it to NFC.
pub fn read_text(path: &Path) -> Result<String, CorpusError> {
    let bytes = std::fs::read(path).map_err(|source| CorpusError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(nfc(&decode_utf8(&path.display().to_string(), bytes)?))
}

/// The non-blank lines of `text`, trailing whitespace removed: the units a plain text is
/// split into for holding out.
pub fn paragraph_lines(text: &str) -> Vec<&str> {
    text.lines()
        .map(str::trim_end)
        .filter(|l| !l.trim().is_empty())
        .collect()
}

/// How many of `units` to hold out: `ceil(fraction × units)`, at least one, and at least one
/// left for training. `units` must be at least 2.
pub fn heldout_count(units: usize, fraction: f64) -> usize {
    ((fraction * units as f64).ceil() as usize).clamp(1, units.saturating_sub(1).max(1))
}

/// Checks that a held-out fraction is strictly between 0 and 1.
pub fn check_heldout_fraction(fraction: f64) -> Result<(), CorpusError> {
    if fraction.is_finite() && fraction > 0.0 && fraction < 1.0 {
        Ok(())
    } else {
        Err(CorpusError::HeldoutFraction(fraction))
    }
}

/// A plain text split into a training part and a held-out part by trailing lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineSplit {
    /// The training lines joined with `\n`, with a final `\n`: the line breaks are part of
    /// what the model learns.
    pub train: String,
    /// The held-out lines joined with `\n`.
    pub heldout: String,
}

/// Holds out the last [`heldout_count`] of `lines` (at least two lines are needed), so that
/// the held-out text is contiguous prose the model never trains on; a random token split
/// would leak neighbouring context into training.
pub fn split_trailing_lines(lines: &[&str], fraction: f64) -> Option<LineSplit> {
    if lines.len() < 2 {
        return None;
    }
    let k = heldout_count(lines.len(), fraction);
    let (train, heldout) = lines.split_at(lines.len() - k);
    let mut train = train.join("\n");
    train.push('\n');
    Some(LineSplit {
        train,
        heldout: heldout.join("\n"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nfc_composes_decomposed_vietnamese() {
        // "Việt" decomposed: e + combining circumflex + combining dot below.
        let nfd = "Vie\u{302}\u{323}t";
        assert_eq!(nfc(nfd), "Vi\u{1EC7}t");
        assert_eq!(nfc(nfd).chars().count(), 4);
    }

    #[test]
    fn read_text_normalises_and_drops_a_bom() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("vi.txt");
        std::fs::write(&path, "\u{FEFF}Vie\u{302}\u{323}t Nam\n").unwrap();
        assert_eq!(read_text(&path).unwrap(), "Vi\u{1EC7}t Nam\n");
    }

    #[test]
    fn invalid_utf8_names_file_offset_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("km.txt");
        std::fs::write(&path, b"ok\nstill ok\nbad \xE1\x9E here\n").unwrap();
        let err = read_text(&path).unwrap_err();
        assert!(
            matches!(
                err,
                CorpusError::InvalidUtf8 {
                    offset: 16,
                    line: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        let msg = err.to_string();
        assert!(
            msg.contains("km.txt") && msg.contains("byte offset 16") && msg.contains("line 3"),
            "{msg}"
        );
    }

    #[test]
    fn trailing_lines_are_held_out() {
        let lines = paragraph_lines("a\n\nb  \nc\nd\n");
        assert_eq!(lines, ["a", "b", "c", "d"]);
        let s = split_trailing_lines(&lines, 0.25).unwrap();
        assert_eq!(s.train, "a\nb\nc\n");
        assert_eq!(s.heldout, "d");
        let s = split_trailing_lines(&lines, 0.99).unwrap();
        assert_eq!((s.train.as_str(), s.heldout.as_str()), ("a\n", "b\nc\nd"));
        assert!(split_trailing_lines(&["only"], 0.5).is_none());
    }
}
