//! Text to token ids: the [`TextTokenizer`] trait, the byte tokenizer the pilot uses, and
//! [`HfTokenizer`], a pretrained model's own Hugging Face tokenizer.
//!
//! Bits per character need, for every token, the number of characters that *begin* inside
//! it ([`TextTokenizer::chars_started`]): summed over a text's tokens this is the text's
//! character count, whatever the tokenizer, even when a token ends in the middle of a
//! multi-byte character (byte-level BPE does this to Thai, Khmer, Burmese and Lao text).

use std::collections::HashMap;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;

use crate::checkpoint::CheckpointTokenizer;
use crate::error::CorpusError;

/// Turns text into token ids.
pub trait TextTokenizer {
    /// Token ids of `text`, without special tokens added around it.
    ///
    /// Infallible for the byte tokenizer. A Hugging Face tokenizer can fail (its
    /// pre-tokenizer regex has a backtracking limit); code that can report an error should
    /// call [`TextTokenizer::try_encode`].
    fn encode(&self, text: &str) -> Vec<u32>;

    /// Number of ids the model's embedding must cover.
    fn vocab_size(&self) -> usize;

    /// How many characters begin inside `token`: lets bits-per-character be computed from the
    /// tokens alone, whatever the tokenizer.
    fn chars_started(&self, token: u32) -> u32;

    /// [`TextTokenizer::encode`], reporting a tokenizer failure instead of panicking.
    fn try_encode(&self, text: &str) -> Result<Vec<u32>, CorpusError> {
        Ok(self.encode(text))
    }

    /// Token ids of a whole plain-text document as the model's tokenizer encodes one by
    /// default: with the special tokens its post-processor adds (Llama 3 puts
    /// `<|begin_of_text|>` first, SmolLM2 adds nothing). Training documents are encoded this
    /// way so that they start the way the model saw documents start in pretraining.
    fn try_encode_document(&self, text: &str) -> Result<Vec<u32>, CorpusError> {
        self.try_encode(text)
    }

    /// The end-of-sequence (end-of-turn) token, if the tokenizer has one.
    fn eos_id(&self) -> Option<u32> {
        None
    }
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

/// Whether `byte` begins a UTF-8 character (is not a continuation byte).
fn starts_char(byte: u8) -> bool {
    byte & 0xC0 != 0x80
}

/// The inverse of GPT-2's byte-level alphabet (`bytes_to_unicode`), which byte-level BPE
/// tokenizers (GPT-2, Llama 3, Qwen2, SmolLM2) use to spell every byte as a printable
/// character in their vocabulary: printable Latin-1 bytes stand for themselves, the other 68
/// bytes for U+0100.. in byte order. `tokenizers` keeps its own table private.
fn byte_level_decoding() -> HashMap<char, u8> {
    let mut next_unprintable = 0u32;
    let mut map = HashMap::with_capacity(256);
    for byte in 0..=255u8 {
        let printable = matches!(byte, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        let c = if printable {
            Some(char::from(byte))
        } else {
            next_unprintable += 1;
            char::from_u32(255 + next_unprintable)
        };
        if let Some(c) = c {
            map.insert(c, byte);
        }
    }
    map
}

/// How the tokenizer spells token text in its vocabulary, which decides how
/// [`HfTokenizer`]'s `chars_started` reads a token.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spelling {
    /// Byte-level BPE: every character of a token stands for one byte.
    ByteLevel,
    /// Anything else (SentencePiece-style `▁` for a space with `<0xNN>` byte fallback,
    /// WordPiece, WordLevel): tokens are text, `<0xNN>` is one byte.
    Text,
}

fn decoder_is_byte_level(decoder: &DecoderWrapper) -> bool {
    match decoder {
        DecoderWrapper::ByteLevel(_) => true,
        DecoderWrapper::Sequence(seq) => seq.get_decoders().iter().any(decoder_is_byte_level),
        _ => false,
    }
}

fn pre_tokenizer_is_byte_level(pre: &PreTokenizerWrapper) -> bool {
    match pre {
        PreTokenizerWrapper::ByteLevel(_) => true,
        PreTokenizerWrapper::Sequence(seq) => seq.as_ref().iter().any(pre_tokenizer_is_byte_level),
        _ => false,
    }
}

/// Characters beginning in one vocabulary entry spelled the [`Spelling::Text`] way.
fn text_token_chars(token: &str) -> u32 {
    // Byte fallback: `<0xE0>` is one raw byte.
    if let Some(hex) = token.strip_prefix("<0x").and_then(|t| t.strip_suffix('>'))
        && hex.len() == 2
        && let Ok(byte) = u8::from_str_radix(hex, 16)
    {
        return u32::from(starts_char(byte));
    }
    token.chars().count() as u32
}

/// A pretrained model's Hugging Face tokenizer with its special tokens and chat template.
///
/// Built from the checkpoint's [`CheckpointTokenizer`]. Truncation and padding that a
/// `tokenizer.json` may carry are switched off: documents are cut into training rows by
/// [`pack`](super::packing::pack), never silently by the tokenizer.
#[derive(Debug, Clone)]
pub struct HfTokenizer {
    inner: CheckpointTokenizer,
    /// `chars_started` of every id, computed once from the vocabulary.
    chars_started: Vec<u32>,
    special: Vec<bool>,
    spelling: Spelling,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
}

impl HfTokenizer {
    /// Wraps a checkpoint's tokenizer. Fails if its `bos_token` or `eos_token` is not a
    /// token of its vocabulary.
    pub fn new(mut inner: CheckpointTokenizer) -> Result<Self, CorpusError> {
        inner
            .tokenizer
            .with_truncation(None)
            .map_err(|e| CorpusError::Tokenizer {
                reason: format!("cannot switch truncation off: {e}"),
            })?;
        inner.tokenizer.with_padding(None);

        let tok = &inner.tokenizer;
        let id_of = |field: &str, text: &Option<String>| -> Result<Option<u32>, CorpusError> {
            match text {
                None => Ok(None),
                Some(t) => tok
                    .token_to_id(t)
                    .map(Some)
                    .ok_or_else(|| CorpusError::Tokenizer {
                        reason: format!("{field} `{t}` is not a token of the vocabulary"),
                    }),
            }
        };
        let bos_id = id_of("bos_token", &inner.bos_token)?;
        let eos_id = id_of("eos_token", &inner.eos_token)?;

        let byte_level = tok.get_decoder().is_some_and(decoder_is_byte_level)
            || tok
                .get_pre_tokenizer()
                .is_some_and(pre_tokenizer_is_byte_level);
        let spelling = if byte_level {
            Spelling::ByteLevel
        } else {
            Spelling::Text
        };

        let vocab = tok.get_vocab(true);
        let size = vocab.values().max().map_or(0, |&m| m as usize + 1);
        let added = tok.get_added_tokens_decoder();
        let bytes = byte_level_decoding();
        let mut chars_started = vec![0u32; size];
        let mut special = vec![false; size];
        for (token, &id) in &vocab {
            let i = id as usize;
            chars_started[i] = match added.get(&id) {
                // Special tokens (`<|im_end|>`) are markup, not text.
                Some(a) if a.special => {
                    special[i] = true;
                    0
                }
                // Other added tokens match their content literally, unspelled.
                Some(a) => a.content.chars().count() as u32,
                None => match spelling {
                    Spelling::ByteLevel => {
                        let decoded: Option<Vec<u8>> =
                            token.chars().map(|c| bytes.get(&c).copied()).collect();
                        match decoded {
                            Some(b) => b.iter().filter(|&&b| starts_char(b)).count() as u32,
                            // Not in the byte alphabet: a vocabulary entry no input produces.
                            None => token.chars().count() as u32,
                        }
                    }
                    Spelling::Text => text_token_chars(token),
                },
            };
        }
        Ok(HfTokenizer {
            inner,
            chars_started,
            special,
            spelling,
            bos_id,
            eos_id,
        })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn tokenizer(&self) -> &tokenizers::Tokenizer {
        &self.inner.tokenizer
    }

    /// The checkpoint's tokenizer, special tokens and chat template.
    pub fn checkpoint_tokenizer(&self) -> &CheckpointTokenizer {
        &self.inner
    }

    /// Text of the beginning-of-sequence token, if any.
    pub fn bos_token(&self) -> Option<&str> {
        self.inner.bos_token.as_deref()
    }

    /// Text of the end-of-sequence (end-of-turn) token, if any.
    pub fn eos_token(&self) -> Option<&str> {
        self.inner.eos_token.as_deref()
    }

    /// Id of the beginning-of-sequence token, if any.
    pub fn bos_id(&self) -> Option<u32> {
        self.bos_id
    }

    /// The model's Jinja chat template, if it has one.
    pub fn chat_template(&self) -> Option<&str> {
        self.inner.chat_template.as_deref()
    }

    /// Id of a token given by its text (`"<|im_end|>"`).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.tokenizer.token_to_id(token)
    }

    /// Whether `id` is a special token (markup such as `<|im_start|>`, never text).
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// Whether tokens are spelled in GPT-2's byte-level alphabet.
    pub fn is_byte_level(&self) -> bool {
        self.spelling == Spelling::ByteLevel
    }

    /// Text of `ids`, special tokens included. A token sequence that ends inside a multi-byte
    /// character decodes with U+FFFD in its place, as Hugging Face's `decode` does.
    pub fn decode(&self, ids: &[u32]) -> Result<String, CorpusError> {
        self.inner
            .tokenizer
            .decode(ids, false)
            .map_err(|e| CorpusError::Tokenizer {
                reason: format!("cannot decode {} token(s): {e}", ids.len()),
            })
    }

    fn encode_with(&self, text: &str, add_special_tokens: bool) -> Result<Vec<u32>, CorpusError> {
        self.inner
            .tokenizer
            .encode(text, add_special_tokens)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| CorpusError::Tokenizer {
                reason: format!(
                    "cannot encode a text of {} characters: {e}",
                    text.chars().count()
                ),
            })
    }
}

impl TextTokenizer for HfTokenizer {
    /// # Panics
    /// If the tokenizer fails, which [`TextTokenizer::try_encode`] reports instead.
    fn encode(&self, text: &str) -> Vec<u32> {
        match self.try_encode(text) {
            Ok(ids) => ids,
            Err(e) => panic!("{e}"),
        }
    }

    fn vocab_size(&self) -> usize {
        self.chars_started.len()
    }

    /// For byte-level BPE: the token's bytes (spelled in GPT-2's byte alphabet) that are not
    /// UTF-8 continuation bytes. For other tokenizers: the token's characters, with a
    /// SentencePiece `▁` counting as the space it stands for and a `<0xNN>` byte-fallback
    /// token as one byte (the `▁` such a tokenizer prepends to a text then counts one
    /// character more than the text has). Special tokens start none. A tokenizer whose
    /// normaliser changes the text (lowercasing, stripping accents) counts the normalised
    /// text's characters.
    fn chars_started(&self, token: u32) -> u32 {
        self.chars_started.get(token as usize).copied().unwrap_or(0)
    }

    fn try_encode(&self, text: &str) -> Result<Vec<u32>, CorpusError> {
        self.encode_with(text, false)
    }

    fn try_encode_document(&self, text: &str) -> Result<Vec<u32>, CorpusError> {
        self.encode_with(text, true)
    }

    fn eos_id(&self) -> Option<u32> {
        self.eos_id
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::{Path, PathBuf};

    /// The committed byte-level BPE fixture (scripts/make_tiny_tokenizer.py), with
    /// SmolLM2-Instruct's special tokens and chat template from its tokenizer_config.json.
    pub(crate) fn tiny_bpe() -> HfTokenizer {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-bpe-tokenizer");
        let tokenizer = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap();
        let config: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join("tokenizer_config.json")).unwrap(),
        )
        .unwrap();
        let field = |k: &str| config[k].as_str().map(str::to_string);
        HfTokenizer::new(CheckpointTokenizer {
            tokenizer,
            bos_token: field("bos_token"),
            eos_token: field("eos_token"),
            chat_template: field("chat_template"),
        })
        .unwrap()
    }

    pub(crate) fn udhr(code: &str) -> String {
        let path: PathBuf = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../data/udhr")
            .join(format!("{code}.txt"));
        std::fs::read_to_string(path).unwrap()
    }

    pub(crate) const UDHR: [&str; 9] = ["en", "id", "km", "lo", "ms", "my", "th", "tl", "vi"];

    /// SmolLM2-135M-Instruct's own tokenizer, from the GGUF file scripts/fetch-model.sh puts
    /// in the model cache; `None` (the test prints SKIPPED) when it is absent, unless
    /// `MEKONG_REQUIRE_MODEL=1`.
    pub(crate) fn smollm2(test: &str) -> Option<HfTokenizer> {
        let path = crate::checkpoint::default_model_path();
        if !path.exists() {
            assert!(
                std::env::var("MEKONG_REQUIRE_MODEL").map_or(true, |v| v != "1"),
                "MEKONG_REQUIRE_MODEL=1 but {} is missing: run scripts/fetch-model.sh",
                path.display()
            );
            eprintln!("SKIPPED {test}: {} is missing", path.display());
            return None;
        }
        let ckpt = crate::checkpoint::open(&path).unwrap();
        Some(HfTokenizer::new(ckpt.tokenizer.expect("the GGUF holds a tokenizer")).unwrap())
    }

    /// The real SmolLM2 tokenizer (49,152 entries): `chars_started` sums to the character
    /// count on every UDHR translation, and encoding round-trips.
    #[test]
    fn smollm2_chars_started_sums_to_the_character_count_on_udhr() {
        let Some(tok) = smollm2("smollm2_chars_started_sums_to_the_character_count_on_udhr") else {
            return;
        };
        assert!(tok.is_byte_level());
        assert_eq!(tok.vocab_size(), 49152);
        assert_eq!(tok.eos_token(), Some("<|im_end|>"));
        for code in UDHR {
            let text = udhr(code);
            let ids = tok.try_encode(&text).unwrap();
            let started: u64 = ids.iter().map(|&t| u64::from(tok.chars_started(t))).sum();
            assert_eq!(started, text.chars().count() as u64, "{code}");
            assert_eq!(tok.decode(&ids).unwrap(), text, "{code}");
        }
    }

    #[test]
    fn byte_tokenizer_counts_characters_not_bytes() {
        let tok = ByteTokenizer;
        let ids = tok.encode("aé");
        assert_eq!(ids, vec![0x61, 0xC3, 0xA9]);
        let chars: u32 = ids.iter().map(|&t| tok.chars_started(t)).sum();
        assert_eq!(chars, 2);
    }

    #[test]
    fn byte_level_alphabet_matches_the_tokenizers_crate() {
        let ours: std::collections::HashSet<char> = byte_level_decoding().into_keys().collect();
        let theirs: std::collections::HashSet<char> =
            tokenizers::pre_tokenizers::byte_level::ByteLevel::alphabet()
                .into_iter()
                .collect();
        assert_eq!(ours.len(), 256);
        assert_eq!(ours, theirs);
        // Space is unprintable in GPT-2's scheme: it is spelled `Ġ` (U+0120).
        assert_eq!(byte_level_decoding()[&'\u{120}'], b' ');
    }

    /// On every UDHR translation, summing `chars_started` over the tokens gives exactly the
    /// character count, although many tokens split a Thai, Khmer, Lao or Burmese character.
    #[test]
    fn hf_chars_started_sums_to_the_character_count_on_udhr() {
        let tok = tiny_bpe();
        assert!(tok.is_byte_level());
        let mut split_chars = 0;
        for code in UDHR {
            let text = udhr(code);
            let ids = tok.try_encode(&text).unwrap();
            assert!(ids.len() < text.len(), "{code}: BPE merges bytes");
            let started: u64 = ids.iter().map(|&t| u64::from(tok.chars_started(t))).sum();
            assert_eq!(started, text.chars().count() as u64, "{code}");
            assert_eq!(tok.decode(&ids).unwrap(), text, "{code}: round trip");
            // Tokens that end inside a character (their decoded bytes are not valid UTF-8).
            split_chars += ids
                .iter()
                .filter(|&&t| tok.decode(&[t]).unwrap().contains('\u{FFFD}'))
                .count();
        }
        assert!(split_chars > 100, "the test must exercise split characters");
    }

    #[test]
    fn hf_special_tokens_are_markup() {
        let tok = tiny_bpe();
        let eos = tok.token_id("<|im_end|>").unwrap();
        assert_eq!(tok.eos_id(), Some(eos));
        assert_eq!(TextTokenizer::eos_id(&tok), Some(2));
        assert_eq!(tok.bos_id(), Some(1));
        assert!(tok.is_special(eos) && !tok.is_special(300));
        assert_eq!(tok.chars_started(eos), 0);
        assert_eq!(tok.vocab_size(), 1024);
        // Special tokens in text are recognised; encode adds none of its own.
        let ids = tok.try_encode("<|im_start|>user\nhi<|im_end|>").unwrap();
        assert_eq!(ids.first(), Some(&1));
        assert_eq!(ids.last(), Some(&2));
        assert_eq!(tok.try_encode("").unwrap(), Vec::<u32>::new());
    }

    #[test]
    fn hf_tokenizer_refuses_an_eos_outside_the_vocabulary() {
        let mut inner = tiny_bpe().checkpoint_tokenizer().clone();
        inner.eos_token = Some("</s>".into());
        let err = HfTokenizer::new(inner).unwrap_err();
        assert!(err.to_string().contains("eos_token `</s>`"), "{err}");
    }

    #[test]
    fn text_spelled_tokens_count_characters_and_fallback_bytes() {
        assert_eq!(text_token_chars("▁hello"), 6);
        assert_eq!(text_token_chars("<0xE0>"), 1);
        assert_eq!(text_token_chars("<0xB8>"), 0);
        assert_eq!(text_token_chars("<0x41>"), 1);
    }
}
