//! A lab's text as one token stream for the byte-level pilot: tokenised, split into a
//! training part and a held-out part.
//!
//! The split is by paragraph (line), taking the *last* lines as held-out text, so that the
//! held-out text is contiguous prose the model never trains on (a random token split would
//! leak neighbouring context into training). [`LocalDataset`](super::LocalDataset) is the
//! same for a lab's files of documents and records, with examples and loss masks.

use std::path::Path;

use super::heldout::HeldOut;
use super::text::{check_heldout_fraction, nfc, paragraph_lines, read_text, split_trailing_lines};
use super::tokenizer::TextTokenizer;
use crate::error::CorpusError;

/// One participant's corpus in one language.
#[derive(Debug, Clone, PartialEq)]
pub struct LocalCorpus {
    pub language: String,
    pub train: Vec<u32>,
    pub heldout: HeldOut,
}

impl LocalCorpus {
    /// NFC-normalises `text`, splits it into non-empty lines and holds out the last
    /// `ceil(heldout_fraction × lines)` of them (at least one, and at least one line is left
    /// for training). Lines are re-joined with `\n`, which is part of what the model learns.
    pub fn from_text(
        language: &str,
        text: &str,
        heldout_fraction: f64,
        tokenizer: &dyn TextTokenizer,
    ) -> Result<Self, CorpusError> {
        check_heldout_fraction(heldout_fraction)?;
        let too_short = |reason: String| CorpusError::TooShort {
            language: language.to_string(),
            reason,
        };
        let normalized = nfc(text);
        let lines = paragraph_lines(&normalized);
        let Some(split) = split_trailing_lines(&lines, heldout_fraction) else {
            return Err(too_short(format!(
                "{} non-empty line(s); at least 2 are needed to hold one out",
                lines.len()
            )));
        };
        let train = tokenizer.try_encode(&split.train)?;
        let heldout = HeldOut::from_text(&split.heldout, tokenizer)?;
        if train.len() < 2 {
            return Err(too_short(format!(
                "training part has {} token(s), at least 2 are needed",
                train.len()
            )));
        }
        if heldout.tokens.len() < 2 {
            return Err(too_short(format!(
                "held-out part has {} token(s), at least 2 are needed",
                heldout.tokens.len()
            )));
        }
        Ok(LocalCorpus {
            language: language.to_string(),
            train,
            heldout,
        })
    }

    /// Reads a UTF-8 text file (invalid UTF-8 is an error naming the byte offset) and splits
    /// it as [`LocalCorpus::from_text`] does.
    pub fn from_file(
        path: &Path,
        language: &str,
        heldout_fraction: f64,
        tokenizer: &dyn TextTokenizer,
    ) -> Result<Self, CorpusError> {
        let text = read_text(path)?;
        Self::from_text(language, &text, heldout_fraction, tokenizer)
    }

    /// Number of training tokens: the sample weight `n_i` this participant reports.
    pub fn train_samples(&self) -> usize {
        self.train.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::ByteTokenizer;

    #[test]
    fn last_lines_are_held_out_after_nfc() {
        // "e" + combining acute (NFD) must become the single NFC code point U+00E9.
        let text = "one\n\ntwo\nthree\nfoure\u{301}\n";
        let c = LocalCorpus::from_text("xx", text, 0.25, &ByteTokenizer).unwrap();
        assert_eq!(c.heldout.text, "four\u{e9}");
        assert_eq!(c.train, ByteTokenizer.encode("one\ntwo\nthree\n"));
        assert_eq!(c.train_samples(), c.train.len());
        assert_eq!(c.heldout.chars_started.iter().sum::<u32>(), 5);

        let c = LocalCorpus::from_text("xx", text, 0.5, &ByteTokenizer).unwrap();
        assert_eq!(c.heldout.text, "three\nfour\u{e9}");
    }

    #[test]
    fn at_least_one_line_each_side() {
        let c = LocalCorpus::from_text("xx", "aa\nbb\ncc", 0.99, &ByteTokenizer).unwrap();
        assert_eq!(c.train, ByteTokenizer.encode("aa\n"));
        assert_eq!(c.heldout.text, "bb\ncc");
        let c = LocalCorpus::from_text("xx", "aa\nbb\ncc", 0.01, &ByteTokenizer).unwrap();
        assert_eq!(c.heldout.text, "cc");
    }

    #[test]
    fn short_or_bad_input_is_refused_with_a_reason() {
        let err = LocalCorpus::from_text("km", "only one line", 0.1, &ByteTokenizer).unwrap_err();
        assert!(
            err.to_string().contains("km") && err.to_string().contains("line"),
            "{err}"
        );
        let err = LocalCorpus::from_text("km", "a\nb", 1.0, &ByteTokenizer).unwrap_err();
        assert!(err.to_string().contains("fraction"), "{err}");
        let err = LocalCorpus::from_text("km", "abc\nd", 0.5, &ByteTokenizer).unwrap_err();
        assert!(err.to_string().contains("held-out"), "{err}");
    }

    #[test]
    fn missing_file_error_names_the_path() {
        let err = LocalCorpus::from_file(
            Path::new("/nonexistent/mekong.txt"),
            "lo",
            0.1,
            &ByteTokenizer,
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/mekong.txt"), "{err}");
    }
}
