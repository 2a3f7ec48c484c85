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

    /// A language's text split among several labs, as in a country where a ministry, a
    /// university and a hospital each hold part of it: the held-out lines are those of
    /// [`LocalCorpus::from_text`] (the same for every shard, so all the language's labs are
    /// judged on one text), and the training lines are cut into contiguous blocks, one per
    /// entry of `shares`, with sizes (in characters) in proportion to it. Contiguous blocks
    /// of a document are different topics, so the shards are non-IID. Every shard must have
    /// at least one line and two tokens; the error names the shard otherwise.
    pub fn shards(
        language: &str,
        text: &str,
        heldout_fraction: f64,
        shares: &[u32],
        tokenizer: &dyn TextTokenizer,
    ) -> Result<Vec<Self>, CorpusError> {
        let whole = Self::from_text(language, text, heldout_fraction, tokenizer)?;
        let too_short = |reason: String| CorpusError::TooShort {
            language: language.to_string(),
            reason,
        };
        if shares.is_empty() || shares.contains(&0) {
            return Err(too_short(format!(
                "shard shares {shares:?}: give at least one, each at least 1"
            )));
        }
        let normalized = nfc(text);
        let lines = paragraph_lines(&normalized);
        let split = split_trailing_lines(&lines, heldout_fraction)
            .expect("from_text accepted the same lines");
        let train_lines: Vec<&str> = split.train.lines().collect();
        if train_lines.len() < shares.len() {
            return Err(too_short(format!(
                "{} training line(s) cannot make {} shards",
                train_lines.len(),
                shares.len()
            )));
        }
        let total_chars: usize = train_lines.iter().map(|l| l.chars().count() + 1).sum();
        let total_share: u64 = shares.iter().map(|s| u64::from(*s)).sum();
        let mut out = Vec::with_capacity(shares.len());
        let mut start = 0;
        let mut share_so_far = 0u64;
        for (k, share) in shares.iter().enumerate() {
            share_so_far += u64::from(*share);
            let target = (total_chars as u64 * share_so_far / total_share) as usize;
            let lines_left = shares.len() - k - 1;
            let mut end = start + 1;
            let mut chars: usize = train_lines[..end]
                .iter()
                .map(|l| l.chars().count() + 1)
                .sum();
            while end < train_lines.len() - lines_left && chars < target {
                chars += train_lines[end].chars().count() + 1;
                end += 1;
            }
            if k + 1 == shares.len() {
                end = train_lines.len();
            }
            let mut block = train_lines[start..end].join("\n");
            block.push('\n');
            let train = tokenizer.try_encode(&block)?;
            if train.len() < 2 {
                return Err(too_short(format!(
                    "shard {} of {} has {} training token(s), at least 2 are needed",
                    k + 1,
                    shares.len(),
                    train.len()
                )));
            }
            out.push(LocalCorpus {
                language: language.to_string(),
                train,
                heldout: whole.heldout.clone(),
            });
            start = end;
        }
        Ok(out)
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
    fn shards_are_disjoint_contiguous_and_share_the_heldout_text() {
        let text: String = (0..40).map(|i| format!("line {i:02}\n")).collect();
        let whole = LocalCorpus::from_text("xx", &text, 0.1, &ByteTokenizer).unwrap();
        let shards = LocalCorpus::shards("xx", &text, 0.1, &[3, 2, 1], &ByteTokenizer).unwrap();
        assert_eq!(shards.len(), 3);
        // Together they are exactly the training text, in order, nothing dropped or repeated.
        let joined: Vec<u32> = shards.iter().flat_map(|s| s.train.clone()).collect();
        assert_eq!(joined, whole.train);
        // Sizes follow the shares (36 training lines of 8 bytes: 18, 12, 6 lines).
        let sizes: Vec<usize> = shards.iter().map(|s| s.train.len() / 8).collect();
        assert_eq!(sizes, vec![18, 12, 6]);
        assert!(shards.iter().all(|s| s.heldout == whole.heldout));

        let err = LocalCorpus::shards("xx", "aa\nbb\ncc\ndd\n", 0.3, &[1, 1, 1], &ByteTokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("cannot make 3 shards"), "{err}");
        let err = LocalCorpus::shards("xx", &text, 0.1, &[1, 0], &ByteTokenizer)
            .unwrap_err()
            .to_string();
        assert!(err.contains("shares"), "{err}");
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
