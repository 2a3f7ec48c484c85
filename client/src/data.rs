//! A lab's local text: tokenised, split into a training part and a held-out part.
//!
//! The split is by paragraph (line), taking the *last* lines as held-out text, so that the
//! held-out text is contiguous prose the model never trains on (a random token split would
//! leak neighbouring context into training).

use std::path::Path;

use unicode_normalization::UnicodeNormalization;

use crate::error::CorpusError;

/// Turns text into token ids. A later release brings Hugging Face tokenizers behind this.
pub trait TextTokenizer {
    /// Token ids of `text`.
    fn encode(&self, text: &str) -> Vec<u32>;

    /// Number of ids the model's embedding must cover.
    fn vocab_size(&self) -> usize;

    /// How many characters begin inside `token`: lets bits-per-character be computed from the
    /// tokens alone, whatever the tokenizer.
    fn chars_started(&self, token: u32) -> u32;
}

/// Byte-level tokenizer: one token per UTF-8 byte, vocabulary of 256.
#[derive(Debug, Clone, Copy, Default)]
pub struct ByteTokenizer;

impl TextTokenizer for ByteTokenizer {
    fn encode(&self, text: &str) -> Vec<u32> {
        text.bytes().map(u32::from).collect()
    }

    fn vocab_size(&self) -> usize {
        256
    }

    /// A byte starts a character unless it is a UTF-8 continuation byte (`0b10xx_xxxx`).
    fn chars_started(&self, token: u32) -> u32 {
        u32::from(token & 0xC0 != 0x80)
    }
}

/// Held-out text and its tokens, kept together so evaluation can report bits per character.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOut {
    pub tokens: Vec<u32>,
    /// `chars_started[i]`: characters beginning in `tokens[i]`.
    pub chars_started: Vec<u32>,
    pub text: String,
}

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
        if !(heldout_fraction.is_finite() && heldout_fraction > 0.0 && heldout_fraction < 1.0) {
            return Err(CorpusError::HeldoutFraction(heldout_fraction));
        }
        let too_short = |reason: String| CorpusError::TooShort {
            language: language.to_string(),
            reason,
        };
        let normalized: String = text.nfc().collect();
        let lines: Vec<&str> = normalized
            .lines()
            .map(str::trim_end)
            .filter(|l| !l.trim().is_empty())
            .collect();
        if lines.len() < 2 {
            return Err(too_short(format!(
                "{} non-empty line(s); at least 2 are needed to hold one out",
                lines.len()
            )));
        }
        let heldout_lines =
            ((heldout_fraction * lines.len() as f64).ceil() as usize).clamp(1, lines.len() - 1);
        let (train_lines, heldout_lines) = lines.split_at(lines.len() - heldout_lines);

        let mut train_text = train_lines.join("\n");
        train_text.push('\n');
        let heldout_text = heldout_lines.join("\n");
        let train = tokenizer.encode(&train_text);
        let heldout_tokens = tokenizer.encode(&heldout_text);
        if train.len() < 2 {
            return Err(too_short(format!(
                "training part has {} token(s), at least 2 are needed",
                train.len()
            )));
        }
        if heldout_tokens.len() < 2 {
            return Err(too_short(format!(
                "held-out part has {} token(s), at least 2 are needed",
                heldout_tokens.len()
            )));
        }
        let chars_started = heldout_tokens
            .iter()
            .map(|&t| tokenizer.chars_started(t))
            .collect();
        Ok(LocalCorpus {
            language: language.to_string(),
            train,
            heldout: HeldOut {
                tokens: heldout_tokens,
                chars_started,
                text: heldout_text,
            },
        })
    }

    /// Reads a UTF-8 text file and splits it as [`LocalCorpus::from_text`] does.
    pub fn from_file(
        path: &Path,
        language: &str,
        heldout_fraction: f64,
        tokenizer: &dyn TextTokenizer,
    ) -> Result<Self, CorpusError> {
        let text = std::fs::read_to_string(path).map_err(|source| CorpusError::Io {
            path: path.display().to_string(),
            source,
        })?;
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

    #[test]
    fn byte_tokenizer_counts_characters_not_bytes() {
        let tok = ByteTokenizer;
        let ids = tok.encode("aé");
        assert_eq!(ids, vec![0x61, 0xC3, 0xA9]);
        let chars: u32 = ids.iter().map(|&t| tok.chars_started(t)).sum();
        assert_eq!(chars, 2);
    }

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
