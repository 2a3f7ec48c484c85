//! Evaluation text: a language's held-out text with the characters each token starts, and
//! the inputs of the bits-per-character probe.

use super::tokenizer::{HfTokenizer, TextTokenizer};
use crate::error::CorpusError;

/// Held-out text and its tokens, kept together so evaluation can report bits per character.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldOut {
    pub tokens: Vec<u32>,
    /// `chars_started[i]`: characters beginning in `tokens[i]`.
    pub chars_started: Vec<u32>,
    pub text: String,
}

impl HeldOut {
    /// Tokenizes `text` (without special tokens) and records the characters each token
    /// starts. Works with any [`TextTokenizer`], the model's own included.
    pub fn from_text(text: &str, tokenizer: &dyn TextTokenizer) -> Result<Self, CorpusError> {
        let tokens = tokenizer.try_encode(text)?;
        let chars_started = tokens.iter().map(|&t| tokenizer.chars_started(t)).collect();
        Ok(HeldOut {
            tokens,
            chars_started,
            text: text.to_string(),
        })
    }
}

/// Characters the probe reads from the start of an evaluation file.
pub const BPC_PROBE_CHARS: usize = 3000;
/// Tokens the probe keeps.
pub const BPC_PROBE_TOKENS: usize = 256;

/// Inputs of the issue's bits-per-character protocol for one file: "tokenize the first 3000
/// characters of the file with the model's tokenizer (no special tokens), keep the first 256
/// tokens, … divide NLL × 255 by the number of characters in the decoded 256 tokens and by
/// ln 2".
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BpcProbe {
    /// The kept tokens; the model scores its predictions of `tokens[1..]`.
    pub tokens: Vec<u32>,
    /// Characters in the decoded kept tokens. A last token that ends inside a character
    /// decodes (as in Hugging Face) to U+FFFD, which counts as one.
    pub decoded_chars: usize,
}

impl BpcProbe {
    /// Bits per character from the mean next-token NLL (nats) over the `tokens.len() − 1`
    /// predictions: `mean_nll × (tokens − 1) / decoded_chars / ln 2`.
    pub fn bits_per_char(&self, mean_nll: f64) -> f64 {
        mean_nll * self.tokens.len().saturating_sub(1) as f64
            / self.decoded_chars as f64
            / std::f64::consts::LN_2
    }
}

/// Takes the first `chars` characters of `text` (as given: the protocol reads the file, so
/// no normalisation here), tokenizes them without special tokens and keeps the first
/// `tokens`. Fails if they give fewer than `tokens` tokens: a shorter probe would not be
/// comparable with the others.
pub fn bpc_probe(
    text: &str,
    tok: &HfTokenizer,
    chars: usize,
    tokens: usize,
) -> Result<BpcProbe, CorpusError> {
    let end = text
        .char_indices()
        .nth(chars)
        .map_or(text.len(), |(i, _)| i);
    let mut ids = tok.try_encode(&text[..end])?;
    if ids.len() < tokens {
        return Err(CorpusError::Tokenizer {
            reason: format!(
                "the first {chars} characters give {} tokens, the probe needs {tokens}",
                ids.len()
            ),
        });
    }
    ids.truncate(tokens);
    let decoded_chars = tok.decode(&ids)?.chars().count();
    Ok(BpcProbe {
        tokens: ids,
        decoded_chars,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::tokenizer::tests::{UDHR, tiny_bpe, udhr};

    #[test]
    fn heldout_from_text_counts_characters_with_the_hf_tokenizer() {
        let tok = tiny_bpe();
        let text = udhr("th");
        let h = HeldOut::from_text(&text, &tok).unwrap();
        assert_eq!(h.tokens.len(), h.chars_started.len());
        assert_eq!(
            h.chars_started.iter().map(|&c| c as usize).sum::<usize>(),
            text.chars().count()
        );
    }

    #[test]
    fn bpc_probe_follows_the_protocol() {
        let tok = tiny_bpe();
        for code in UDHR {
            let text = udhr(code);
            let probe = bpc_probe(&text, &tok, BPC_PROBE_CHARS, BPC_PROBE_TOKENS).unwrap();
            assert_eq!(probe.tokens.len(), 256, "{code}");
            let head: String = text.chars().take(3000).collect();
            let all = tok.try_encode(&head).unwrap();
            assert_eq!(probe.tokens, all[..256], "{code}");
            assert_eq!(
                probe.decoded_chars,
                tok.decode(&all[..256]).unwrap().chars().count()
            );
            // Within a character of what the tokens start.
            let started: usize = probe
                .tokens
                .iter()
                .map(|&t| tok.chars_started(t) as usize)
                .sum();
            assert!(probe.decoded_chars.abs_diff(started) <= 1, "{code}");
        }
        let p = BpcProbe {
            tokens: vec![0; 256],
            decoded_chars: 510,
        };
        assert!((p.bits_per_char(2.0 * std::f64::consts::LN_2) - 1.0).abs() < 1e-12);
    }

    #[test]
    fn bpc_probe_refuses_short_text() {
        let err = bpc_probe("short", &tiny_bpe(), 3000, 256).unwrap_err();
        assert!(err.to_string().contains("probe needs 256"), "{err}");
    }
}
