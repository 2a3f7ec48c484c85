//! The tokenizer a GGUF file carries in its metadata, rebuilt as a `tokenizers::Tokenizer`.
//!
//! A GGUF has no `tokenizer.json`; llama.cpp stores the vocabulary (`tokenizer.ggml.tokens`),
//! token kinds (`token_type`), merges or scores, the special token ids, and the name of the
//! pre-tokenizer (`tokenizer.ggml.pre`) whose regular expressions llama.cpp hard-codes. Two
//! kinds are rebuilt:
//!
//! - `gpt2`: byte-level BPE. The split expressions are llama.cpp's for the named pre-tokenizer
//!   (`llama-vocab.cpp`), applied one after another as llama.cpp does, then the byte-to-unicode
//!   mapping; decoding maps the bytes back, so `decode(encode(text)) == text` for any text.
//! - `llama`: SentencePiece BPE with byte fallback. Merges come from the file or, as in
//!   transformers' conversion, from the scores; `▁` marks spaces, with one prepended.
//!
//! Control tokens (`<|im_start|>`) become special added tokens and user-defined ones plain
//! added tokens, so they are matched whole, as transformers and llama.cpp do. Where llama.cpp
//! and transformers' GGUF conversion differ, llama.cpp is followed, since GGUF files are
//! written for it: transformers ignores `tokenizer.ggml.pre = "smollm"` (digits split one by
//! one), and drops characters a SentencePiece vocabulary cannot spell where we emit `<unk>`.

use std::collections::HashMap;
use std::path::Path;

use tokenizers::decoders::DecoderWrapper;
use tokenizers::decoders::byte_fallback::ByteFallback;
use tokenizers::decoders::fuse::Fuse;
use tokenizers::decoders::sequence::Sequence as DecoderSequence;
use tokenizers::decoders::strip::Strip;
use tokenizers::models::bpe::BPE;
use tokenizers::normalizers::Replace;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::metaspace::{Metaspace, PrependScheme};
use tokenizers::pre_tokenizers::sequence::Sequence as PreSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::template::TemplateProcessing;
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

use super::reader::{Array, GgufFile, Value};
use crate::checkpoint::CheckpointTokenizer;
use crate::error::CheckpointError;

/// llama.cpp's token kinds (`llama_token_type`).
const TOKEN_CONTROL: i64 = 3;
const TOKEN_USER_DEFINED: i64 = 4;

/// GPT-2's split (llama.cpp drops the final `|\s+`, which only re-matches what it leaves).
const GPT2: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)";
/// Llama 3's split, as in its tokenizer.json.
const LLAMA3: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";
/// Qwen2's split, as in its tokenizer.json.
const QWEN2: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// A byte-level pre-tokenizer: llama.cpp's split expressions and its defaults for one family of
/// `tokenizer.ggml.pre` names.
struct PreTokenizerSpec {
    splits: &'static [&'static str],
    /// llama.cpp's `ignore_merges`: a piece that is itself a token is not merged further.
    ignore_merges: bool,
    /// llama.cpp's default for adding BOS (the file's `add_bos_token` overrides it).
    add_bos: bool,
}

/// The pre-tokenizer llama.cpp uses for `pre` (`llama_vocab::impl::load`).
fn byte_level_pre(pre: &str) -> Option<PreTokenizerSpec> {
    let spec = |splits: &'static [&'static str], ignore_merges, add_bos| PreTokenizerSpec {
        splits,
        ignore_merges,
        add_bos,
    };
    Some(match pre {
        "llama3" | "llama-v3" | "llama-bpe" | "falcon3" | "falcon-h1" | "pixtral" | "midm-2.0"
        | "lfm2" | "jina-v5-nano" => spec(&[LLAMA3], true, true),
        "dbrx" | "smaug-bpe" => spec(&[LLAMA3], false, false),
        "qwen2" | "deepseek-r1-qwen" | "kormo" | "f2llmv2" | "megrez" | "stablelm2" | "hunyuan"
        | "solar-open" => spec(&[QWEN2], false, false),
        // Digits one by one, then GPT-2's split.
        "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone" | "minerva-7b"
        | "mellum2" => spec(&[r"\p{N}", GPT2], false, false),
        "gpt-2" | "phi-2" | "jina-es" | "jina-de" | "gigachat" | "jina-v2-es" | "jina-v2-de"
        | "a.x-4.0" | "mellum" | "modern-bert" | "mpt" | "olmo" | "jais" | "exaone4"
        | "trillion" | "granite-docling" => spec(&[GPT2], false, false),
        // llama.cpp's fallback for files without a pre-tokenizer name (it warns that quality
        // degrades); kept so that such files still load the same way.
        "default" => spec(
            &[r"[\p{P}\$\+<=>\^~\|]+", GPT2, r"\p{N}+", r"[0-9][0-9][0-9]"],
            false,
            false,
        ),
        _ => return None,
    })
}

/// Names of the supported `tokenizer.ggml.pre` values, for the error message.
const SUPPORTED_PRE: &str = "llama3, llama-bpe, qwen2, smollm, starcoder, gpt-2, default and \
                             their llama.cpp aliases";

/// Builds the file's tokenizer, or `None` when the file has no `tokenizer.ggml.model`.
pub fn tokenizer_from_metadata(
    file: &GgufFile,
) -> Result<Option<CheckpointTokenizer>, CheckpointError> {
    let Some(model) = file.get("tokenizer.ggml.model") else {
        return Ok(None);
    };
    let meta = Meta { file };
    let model = model
        .as_str()
        .ok_or_else(|| meta.err("tokenizer.ggml.model", "expected a string".into()))?;
    let tokens = meta.strings("tokenizer.ggml.tokens")?;
    if tokens.is_empty() {
        return Err(meta.err("tokenizer.ggml.tokens", "is empty".into()));
    }
    let types = match file.get("tokenizer.ggml.token_type") {
        None => vec![1; tokens.len()],
        Some(v) => v
            .as_array()
            .and_then(Array::to_i64s)
            .filter(|t| t.len() == tokens.len())
            .ok_or_else(|| {
                meta.err(
                    "tokenizer.ggml.token_type",
                    format!("expected {} integers, one per token", tokens.len()),
                )
            })?,
    };
    let token_id = |key: &str| -> Result<Option<u32>, CheckpointError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .filter(|&id| (id as usize) < tokens.len())
                .map(|id| Some(id as u32))
                .ok_or_else(|| {
                    meta.err(
                        key,
                        format!("{v:?} is not a token id below {}", tokens.len()),
                    )
                }),
        }
    };
    let bos = token_id("tokenizer.ggml.bos_token_id")?;
    let eos = token_id("tokenizer.ggml.eos_token_id")?;
    let unk = token_id("tokenizer.ggml.unknown_token_id")?;
    let flag = |key: &str| -> Result<Option<bool>, CheckpointError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| meta.err(key, format!("expected a bool, found {}", v.type_name()))),
        }
    };
    let add_bos_key = flag("tokenizer.ggml.add_bos_token")?;
    let add_eos = flag("tokenizer.ggml.add_eos_token")?.unwrap_or(false);

    let (mut tokenizer, add_bos) = match model {
        "gpt2" => {
            let pre = match file.get("tokenizer.ggml.pre") {
                None => "default",
                Some(v) => v
                    .as_str()
                    .ok_or_else(|| meta.err("tokenizer.ggml.pre", "expected a string".into()))?,
            };
            let spec = byte_level_pre(pre).ok_or_else(|| {
                meta.err(
                    "tokenizer.ggml.pre",
                    format!("pre-tokenizer `{pre}` is not supported (supported: {SUPPORTED_PRE})"),
                )
            })?;
            let merges = meta.strings("tokenizer.ggml.merges")?;
            let tokenizer = byte_level_bpe(&meta, tokens, &types, merges, &spec)?;
            (tokenizer, add_bos_key.unwrap_or(spec.add_bos))
        }
        "llama" => {
            let add_prefix = flag("tokenizer.ggml.add_space_prefix")?.unwrap_or(true);
            let tokenizer = sentencepiece_bpe(&meta, tokens, &types, unk, add_prefix)?;
            (tokenizer, add_bos_key.unwrap_or(true))
        }
        other => {
            return Err(meta.err(
                "tokenizer.ggml.model",
                format!("`{other}` is not supported (supported: gpt2, llama)"),
            ));
        }
    };

    let text = |id: Option<u32>| id.map(|id| tokens[id as usize].clone());
    let mut single = Vec::new();
    let mut special = Vec::new();
    if add_bos {
        let id = bos.ok_or_else(|| {
            meta.err(
                "tokenizer.ggml.bos_token_id",
                "missing, but the tokenizer adds a BOS token".into(),
            )
        })?;
        single.push(tokens[id as usize].clone());
        special.push((tokens[id as usize].clone(), id));
    }
    single.push("$A".to_string());
    if add_eos {
        let id = eos.ok_or_else(|| {
            meta.err(
                "tokenizer.ggml.eos_token_id",
                "missing, but the tokenizer adds an EOS token".into(),
            )
        })?;
        single.push(tokens[id as usize].clone());
        special.push((tokens[id as usize].clone(), id));
    }
    if !special.is_empty() {
        let template_err = |e: String| meta.err("tokenizer.ggml.add_bos_token", e);
        let mut builder = TemplateProcessing::builder();
        builder.try_single(single.join(" ")).map_err(template_err)?;
        builder.special_tokens(special);
        let processor = builder.build().map_err(|e| template_err(e.to_string()))?;
        tokenizer.with_post_processor(Some(processor));
    }

    let chat_template = file
        .get("tokenizer.chat_template")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Some(CheckpointTokenizer {
        tokenizer,
        bos_token: text(bos),
        eos_token: text(eos),
        chat_template,
    }))
}

/// Typed access to tokenizer keys, with errors that name the file and the key.
struct Meta<'a> {
    file: &'a GgufFile,
}

impl Meta<'_> {
    fn path(&self) -> &Path {
        self.file.path()
    }

    fn err(&self, key: &str, reason: String) -> CheckpointError {
        CheckpointError::Tokenizer {
            path: self.path().display().to_string(),
            reason: format!("`{key}`: {reason}"),
        }
    }

    fn strings(&self, key: &str) -> Result<&[String], CheckpointError> {
        match self.file.get(key) {
            None => Err(self.err(key, "missing".into())),
            Some(Value::Array(Array::Str(v))) => Ok(v),
            Some(v) => Err(self.err(
                key,
                format!(
                    "expected an array of strings, found {}",
                    match v {
                        Value::Array(a) => format!("an array of {}", a.element_type_name()),
                        other => other.type_name().to_string(),
                    }
                ),
            )),
        }
    }

    fn tokenizer_err(&self, what: &str, e: impl std::fmt::Display) -> CheckpointError {
        CheckpointError::Tokenizer {
            path: self.path().display().to_string(),
            reason: format!("{what}: {e}"),
        }
    }
}

/// GPT-2's byte-to-unicode table: printable bytes stand for themselves, the others are moved
/// to U+0100 and up, so every byte string is spelled in printable characters.
fn bytes_to_unicode() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for b in 0..=255u8 {
        let printable = matches!(b, b'!'..=b'~' | 0xA1..=0xAC | 0xAE..=0xFF);
        table[b as usize] = if printable {
            char::from(b)
        } else {
            let c = char::from_u32(next).unwrap_or('\u{FFFD}');
            next += 1;
            c
        };
    }
    table
}

/// Adds control tokens as special tokens and user-defined ones as plain added tokens, so that
/// both are matched whole in the text.
fn add_marked_tokens(
    meta: &Meta<'_>,
    tokenizer: &mut Tokenizer,
    tokens: &[String],
    types: &[i64],
    keep_control: impl Fn(&str) -> bool,
    extra_special: Option<u32>,
) -> Result<(), CheckpointError> {
    let mut special: Vec<AddedToken> = Vec::new();
    let mut plain: Vec<AddedToken> = Vec::new();
    for (i, (token, &kind)) in tokens.iter().zip(types).enumerate() {
        if kind == TOKEN_CONTROL && keep_control(token) || extra_special == Some(i as u32) {
            special.push(AddedToken::from(token.clone(), true).normalized(false));
        } else if kind == TOKEN_USER_DEFINED {
            plain.push(AddedToken::from(token.clone(), false).normalized(false));
        }
    }
    let add_err = |e| meta.tokenizer_err("cannot add the control and user-defined tokens", e);
    tokenizer.add_special_tokens(special).map_err(add_err)?;
    tokenizer.add_tokens(plain).map_err(add_err)?;
    Ok(())
}

fn byte_level_bpe(
    meta: &Meta<'_>,
    tokens: &[String],
    types: &[i64],
    merges: &[String],
    spec: &PreTokenizerSpec,
) -> Result<Tokenizer, CheckpointError> {
    let table = bytes_to_unicode();
    let alphabet: std::collections::HashSet<char> = table.iter().copied().collect();
    let spelled = |t: &str| t.chars().all(|c| alphabet.contains(&c));
    // Tokens outside the byte alphabet (rare mislabelled entries) are re-spelled from their
    // UTF-8 bytes, as transformers does, so that the BPE model can reach them.
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let key = if spelled(t) {
                t.clone()
            } else {
                t.bytes().map(|b| table[b as usize]).collect()
            };
            (key, i as u32)
        })
        .collect();
    let merges = merges
        .iter()
        .enumerate()
        .map(|(i, m)| {
            m.split_once(' ')
                .filter(|(_, r)| !r.contains(' '))
                .map(|(l, r)| (l.to_string(), r.to_string()))
                .ok_or_else(|| {
                    meta.err(
                        "tokenizer.ggml.merges",
                        format!("entry {i} `{m}` is not two tokens separated by one space"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let bpe = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .ignore_merges(spec.ignore_merges)
        .build()
        .map_err(|e| meta.tokenizer_err("cannot build the BPE model", e))?;
    let mut tokenizer = Tokenizer::new(bpe);

    let mut pre = Vec::with_capacity(spec.splits.len() + 1);
    for pattern in spec.splits {
        let split = Split::new(
            SplitPattern::Regex((*pattern).to_string()),
            SplitDelimiterBehavior::Isolated,
            false,
        )
        .map_err(|e| meta.tokenizer_err("cannot compile a split expression", e))?;
        pre.push(PreTokenizerWrapper::Split(split));
    }
    pre.push(PreTokenizerWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    )));
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Sequence(PreSequence::new(pre))));
    tokenizer.with_decoder(Some(DecoderWrapper::ByteLevel(ByteLevel::new(
        false, true, false,
    ))));
    add_marked_tokens(meta, &mut tokenizer, tokens, types, spelled, None)?;
    Ok(tokenizer)
}

/// SentencePiece BPE merges recovered from the scores, as transformers' `generate_merges`
/// does: every split of every token into two tokens, best merged score first, then the longer
/// left piece, then the longer right piece, then vocabulary order.
fn merges_from_scores(tokens: &[String], scores: &[f32]) -> Vec<(String, String)> {
    let index: HashMap<&str, usize> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.as_str(), i))
        .collect();
    struct Candidate<'a> {
        left: &'a str,
        right: &'a str,
        score: f32,
        left_chars: usize,
        right_chars: usize,
    }
    let mut all: Vec<Candidate<'_>> = Vec::new();
    // Python's dict keeps the last index of a duplicated token, in first-insertion order.
    let mut seen = std::collections::HashSet::new();
    for token in tokens {
        if !seen.insert(token.as_str()) {
            continue;
        }
        // Python compares -0.0 equal to 0.0; NaN scores (never seen) sort last.
        let score = scores[index[token.as_str()]];
        let score = if score.is_nan() {
            f32::NEG_INFINITY
        } else {
            score + 0.0
        };
        let mut local: Vec<(usize, usize, Candidate<'_>)> = Vec::new();
        for (split, _) in token.char_indices().skip(1) {
            let (left, right) = token.split_at(split);
            if let (Some(&l), Some(&r)) = (index.get(left), index.get(right)) {
                local.push((
                    l,
                    r,
                    Candidate {
                        left,
                        right,
                        score,
                        left_chars: left.chars().count(),
                        right_chars: right.chars().count(),
                    },
                ));
            }
        }
        local.sort_by_key(|&(l, r, _)| (l, r));
        all.extend(local.into_iter().map(|(_, _, c)| c));
    }
    // Stable sort, descending on (score, left length, right length).
    all.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.left_chars.cmp(&a.left_chars))
            .then(b.right_chars.cmp(&a.right_chars))
    });
    all.into_iter()
        .map(|c| (c.left.to_string(), c.right.to_string()))
        .collect()
}

fn sentencepiece_bpe(
    meta: &Meta<'_>,
    tokens: &[String],
    types: &[i64],
    unk: Option<u32>,
    add_prefix: bool,
) -> Result<Tokenizer, CheckpointError> {
    let merges = match meta.file.get("tokenizer.ggml.merges") {
        Some(_) => meta
            .strings("tokenizer.ggml.merges")?
            .iter()
            .map(|m| {
                m.split_once(' ')
                    .map(|(l, r)| (l.to_string(), r.to_string()))
                    .ok_or_else(|| {
                        meta.err("tokenizer.ggml.merges", format!("entry `{m}` has no space"))
                    })
            })
            .collect::<Result<Vec<_>, _>>()?,
        None => {
            let scores = meta
                .file
                .get("tokenizer.ggml.scores")
                .and_then(Value::as_array)
                .and_then(Array::to_f32s)
                .filter(|s| s.len() == tokens.len())
                .ok_or_else(|| {
                    meta.err(
                        "tokenizer.ggml.scores",
                        format!(
                            "expected {} floats (the file has no merges to use instead)",
                            tokens.len()
                        ),
                    )
                })?;
            merges_from_scores(tokens, &scores)
        }
    };
    let vocab: tokenizers::models::bpe::Vocab = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i as u32))
        .collect();
    let mut builder = BPE::builder()
        .vocab_and_merges(vocab, merges)
        .byte_fallback(true)
        .fuse_unk(true);
    if let Some(id) = unk {
        builder = builder.unk_token(tokens[id as usize].clone());
    }
    let bpe = builder
        .build()
        .map_err(|e| meta.tokenizer_err("cannot build the BPE model", e))?;
    let mut tokenizer = Tokenizer::new(bpe);
    let scheme = if add_prefix {
        PrependScheme::First
    } else {
        PrependScheme::Never
    };
    tokenizer.with_pre_tokenizer(Some(PreTokenizerWrapper::Metaspace(Metaspace::new(
        '▁', scheme, false,
    ))));
    let replace =
        Replace::new("▁", " ").map_err(|e| meta.tokenizer_err("cannot build the decoder", e))?;
    let mut decoders = vec![
        DecoderWrapper::Replace(replace),
        DecoderWrapper::ByteFallback(ByteFallback::new()),
        DecoderWrapper::Fuse(Fuse::new()),
    ];
    if add_prefix {
        decoders.push(DecoderWrapper::Strip(Strip::new(' ', 1, 0)));
    }
    tokenizer.with_decoder(Some(DecoderWrapper::Sequence(DecoderSequence::new(
        decoders,
    ))));
    add_marked_tokens(meta, &mut tokenizer, tokens, types, |_| true, unk)?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_gpt2s() {
        let t = bytes_to_unicode();
        assert_eq!(t[b' ' as usize], 'Ġ');
        assert_eq!(t[b'\n' as usize], 'Ċ');
        assert_eq!(t[b'A' as usize], 'A');
        assert_eq!(t[0xAD], 'Ń');
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
    }

    #[test]
    fn merges_from_scores_order() {
        let tokens: Vec<String> = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let scores = [0.0, -10.0, -10.0, -10.0, -1.0, -2.0, -3.0];
        let merges = merges_from_scores(&tokens, &scores);
        let pairs: Vec<(&str, &str)> = merges
            .iter()
            .map(|(l, r)| (l.as_str(), r.as_str()))
            .collect();
        // Best score first; for "abc" the longer left piece ("ab" + "c") first.
        assert_eq!(
            pairs,
            vec![("a", "b"), ("b", "c"), ("ab", "c"), ("a", "bc")]
        );
    }
}
