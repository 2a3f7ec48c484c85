//! Held-out evaluation: mean next-token loss, perplexity and bits per character.
//!
//! The held-out tokens are cut into non-overlapping windows of `seq_len + 1` tokens that
//! overlap by one (the last token of a window is the first input of the next), so every token
//! after the first is predicted exactly once. A model that expects every sequence to begin
//! with `<bos>` (Gemma; [`LoraLlama::window_prefix`]) reads each window of `seq_len` tokens
//! after it instead, so every token, the first included, is predicted once, from `<bos>` and
//! its own window. Full windows are batched; a shorter tail window, if any, runs on its own.
//! One scalar is read back per batch.
//!
//! Bits per character divide the total NLL (in bits) by the number of characters that begin
//! in the predicted tokens (`HeldOut::chars_started`, which the tokenizer supplies: for bytes,
//! the non-continuation UTF-8 bytes), so it compares across tokenizers and scripts.

use burn::module::Module;
use burn::tensor::Device;
use fedcore::ConfigError;

use crate::data::HeldOut;
use crate::error::ModelError;
use crate::model::LoraLlama;
use crate::model::RowBatch;
use crate::model::batch::check_vocab;
use crate::train::source::TrainRow;

/// Windows per forward pass.
const EVAL_BATCH: usize = 16;

/// Held-out scores.
#[derive(Debug, Clone, PartialEq)]
pub struct EvalStats {
    /// Mean next-token NLL in nats.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Total NLL in bits per character covered by the predicted tokens (NaN when the
    /// predicted tokens start no character).
    pub bits_per_char: f64,
    /// Number of predicted tokens.
    pub tokens: usize,
}

/// Scores `model` on the held-out text with windows of at most `seq_len` predictions.
pub fn evaluate(
    model: &LoraLlama,
    heldout: &HeldOut,
    seq_len: usize,
    device: &Device,
) -> Result<EvalStats, ModelError> {
    let tokens = &heldout.tokens;
    let max_len = model.model_spec().max_position_embeddings;
    if seq_len == 0 || seq_len > max_len {
        return Err(ConfigError::field(
            "seq_len",
            format!("evaluation window must be between 1 and max_position_embeddings = {max_len}, got {seq_len}"),
        )
        .into());
    }
    if tokens.len() < 2 {
        return Err(ModelError::TooFewTokens {
            what: "held-out text",
            tokens: tokens.len(),
            needed: 2,
        });
    }
    check_vocab(tokens, model.model_spec().vocab_size)?;
    if model.device() != *device {
        return Err(ModelError::DeviceMismatch {
            model: format!("{:?}", model.device()),
            requested: format!("{device:?}"),
        });
    }
    // A validation snapshot never records an autodiff graph, even if handed a training model.
    let model = model.valid();
    let device = device.clone().without_autodiff();

    let prefix = model.window_prefix();
    // Without a prefix the first token is context only.
    let first = usize::from(prefix.is_none());
    let predicted = tokens.len() - first;
    let len = seq_len.min(predicted);
    let full = predicted / len;
    let starts: Vec<usize> = (0..full).map(|w| w * len).collect();
    let mut total_nll = 0f64;
    for chunk in starts.chunks(EVAL_BATCH) {
        total_nll += batch_nll(&model, prefix, tokens, chunk, len, &device)?;
    }
    let tail = predicted - full * len;
    if tail > 0 {
        total_nll += batch_nll(&model, prefix, tokens, &[full * len], tail, &device)?;
    }

    let chars: u64 = heldout.chars_started[first..]
        .iter()
        .map(|&c| u64::from(c))
        .sum();
    let loss = total_nll / predicted as f64;
    Ok(EvalStats {
        loss,
        perplexity: loss.exp(),
        bits_per_char: if chars == 0 {
            f64::NAN
        } else {
            total_nll / std::f64::consts::LN_2 / chars as f64
        },
        tokens: predicted,
    })
}

/// The total next-token NLL (nats) of each of `sequences` (token ids, all the same length,
/// at least two tokens; every token after the first predicted, the first too after the
/// model's `<bos>` prefix): how surprised the model is by each whole sequence. What a
/// memorisation test ranks a planted sequence by, against candidates like it.
pub fn sequence_nll(
    model: &LoraLlama,
    sequences: &[Vec<u32>],
    device: &Device,
) -> Result<Vec<f64>, ModelError> {
    let Some(first) = sequences.first() else {
        return Ok(Vec::new());
    };
    let len = first.len();
    if len < 2 || sequences.iter().any(|s| s.len() != len) {
        return Err(ConfigError::field(
            "sequences",
            format!("must all have the same length of at least 2 tokens (the first has {len})"),
        )
        .into());
    }
    if model.device() != *device {
        return Err(ModelError::DeviceMismatch {
            model: format!("{:?}", model.device()),
            requested: format!("{device:?}"),
        });
    }
    let spec = model.model_spec();
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let prefix = model.window_prefix();
    let predicted = if prefix.is_some() { len } else { len - 1 };
    let mut out = Vec::with_capacity(sequences.len());
    for chunk in sequences.chunks(EVAL_BATCH) {
        let tokens: Vec<u32> = chunk.iter().flatten().copied().collect();
        let starts: Vec<usize> = (0..chunk.len()).map(|i| i * len).collect();
        let batch = RowBatch::windows_after(prefix, &tokens, &starts, predicted);
        batch.check(spec.vocab_size, spec.max_position_embeddings)?;
        let (nll, weights) = batch.to_device(&device).nll(&model);
        let rows: Vec<f32> = (nll * weights)
            .sum_dim(1)
            .into_data()
            .try_to_vec::<f32>()
            .map_err(|e| ModelError::backend("reading sequence losses", e))?;
        out.extend(rows.into_iter().map(f64::from));
    }
    Ok(out)
}

/// Held-out scores of training-style rows: the loss only where the rows' weights say (a chat
/// model's replies, not the prompts), as training takes it.
#[derive(Debug, Clone, PartialEq)]
pub struct RowEvalStats {
    /// Weighted mean next-token NLL in nats over the trained targets.
    pub loss: f64,
    /// `exp(loss)`.
    pub perplexity: f64,
    /// Sum of the target weights (the number of scored predictions for 0/1 weights).
    pub targets: f64,
}

/// Scores `model` on packed rows (e.g. held-out prompt/response or chat examples, packed like
/// the training data), [`EVAL_BATCH`] rows per forward pass.
pub fn evaluate_rows(
    model: &LoraLlama,
    rows: &[TrainRow],
    device: &Device,
) -> Result<RowEvalStats, ModelError> {
    let spec = model.model_spec();
    if model.device() != *device {
        return Err(ModelError::DeviceMismatch {
            model: format!("{:?}", model.device()),
            requested: format!("{device:?}"),
        });
    }
    let model = model.valid();
    let device = device.clone().without_autodiff();
    let mut total_nll = 0f64;
    let mut targets = 0f64;
    for chunk in rows.chunks(EVAL_BATCH) {
        let refs: Vec<&TrainRow> = chunk.iter().collect();
        let batch = TrainRow::batch(&refs);
        batch.check(spec.vocab_size, spec.max_position_embeddings)?;
        targets += batch.trained_targets();
        let (nll, weights) = batch.to_device(&device).nll(&model);
        let sum: f32 = (nll * weights)
            .sum()
            .try_into_scalar()
            .map_err(|e| ModelError::backend("reading the evaluation loss", e))?;
        total_nll += f64::from(sum);
    }
    if targets <= 0.0 {
        return Err(ModelError::TooFewTokens {
            what: "held-out examples (trained targets)",
            tokens: 0,
            needed: 1,
        });
    }
    let loss = total_nll / targets;
    Ok(RowEvalStats {
        loss,
        perplexity: loss.exp(),
        targets,
    })
}

/// Summed NLL of the windows starting at `starts`, each predicting `len` tokens.
fn batch_nll(
    model: &LoraLlama,
    prefix: Option<u32>,
    tokens: &[u32],
    starts: &[usize],
    len: usize,
    device: &Device,
) -> Result<f64, ModelError> {
    let (nll, _) = RowBatch::windows_after(prefix, tokens, starts, len)
        .to_device(device)
        .nll(model);
    let sum: f32 = nll
        .sum()
        .try_into_scalar()
        .map_err(|e| ModelError::backend("reading the evaluation loss", e))?;
    Ok(f64::from(sum))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ByteTokenizer, LocalCorpus, TextTokenizer};
    use fedcore::{LoraSpec, ModelSpec};

    fn heldout(text: &str) -> HeldOut {
        LocalCorpus::from_text("xx", &format!("train line\n{text}"), 0.01, &ByteTokenizer)
            .unwrap()
            .heldout
    }

    /// Each sequence's total NLL is what evaluating it alone gives (mean × predictions),
    /// whatever the batch it is scored in; unequal lengths are refused.
    #[test]
    fn sequence_nll_is_each_sequences_total_loss() {
        let device = Device::flex();
        let model = LoraLlama::new(&ModelSpec::tiny(), &LoraSpec::default(), &device).unwrap();
        let texts = [
            "The code is 123456.",
            "The code is 654321.",
            "The code is 000000.",
        ];
        let sequences: Vec<Vec<u32>> = texts.iter().map(|t| ByteTokenizer.encode(t)).collect();
        let scores = sequence_nll(&model, &sequences, &device).unwrap();
        assert_eq!(scores.len(), 3);
        for (text, score) in texts.iter().zip(&scores) {
            let h = heldout(text);
            let alone = evaluate(&model, &h, 64, &device).unwrap();
            let total = alone.loss * alone.tokens as f64;
            assert!(
                (score - total).abs() < 1e-3 * total,
                "{text}: {score} vs {total}"
            );
        }
        let one = sequence_nll(&model, &sequences[1..2], &device).unwrap();
        assert!((one[0] - scores[1]).abs() < 1e-4 * scores[1]);
        let uneven = vec![sequences[0].clone(), vec![1, 2]];
        assert!(sequence_nll(&model, &uneven, &device).is_err());
    }

    #[test]
    fn every_token_after_the_first_is_scored_once_whatever_the_window() {
        let device = Device::flex();
        let model = LoraLlama::new(&ModelSpec::tiny(), &LoraSpec::default(), &device).unwrap();
        let h = heldout("Tous les êtres humains naissent libres et égaux en dignité et en droits.");
        let n = h.tokens.len();
        let a = evaluate(&model, &h, 7, &device).unwrap(); // many windows + a tail
        let b = evaluate(&model, &h, 256, &device).unwrap(); // one window
        assert_eq!(a.tokens, n - 1);
        assert_eq!(b.tokens, n - 1);
        // A random model is near-uniform over 256 bytes.
        assert!((a.loss - 256f64.ln()).abs() < 1.5, "{a:?}");
        assert!((a.perplexity - a.loss.exp()).abs() < 1e-9);
        // Characters, not bytes: 'ê', 'é' are two bytes each.
        let chars = h.text.chars().count() - 1;
        assert!(h.text.starts_with('T'));
        let expected_bpc = a.loss * (n - 1) as f64 / std::f64::consts::LN_2 / chars as f64;
        assert!((a.bits_per_char - expected_bpc).abs() < 1e-9, "{a:?}");
        assert!(chars < n - 1);
        // Contexts differ between the two windowings, so only roughly equal.
        assert!((a.loss - b.loss).abs() < 0.5, "{a:?} vs {b:?}");
    }

    /// With a window prefix (Gemma's `<bos>`) every token, the first included, is predicted
    /// once, each window reading the prefix first: the total equals a hand-made sum over the
    /// windows, and bits per character count every character.
    #[test]
    fn with_a_prefix_every_token_is_scored_once_after_it() {
        let device = Device::flex();
        let model = LoraLlama::new(&ModelSpec::tiny(), &LoraSpec::default(), &device)
            .unwrap()
            .with_window_prefix(Some(b'#' as u32));
        let h = heldout("Everyone has the right to life, liberty and security of person.");
        let n = h.tokens.len();
        let got = evaluate(&model, &h, 16, &device).unwrap();
        assert_eq!(got.tokens, n);
        let by_hand: f64 = (0..n)
            .step_by(16)
            .map(|s| {
                let len = 16.min(n - s);
                batch_nll(&model, Some(b'#' as u32), &h.tokens, &[s], len, &device).unwrap()
            })
            .sum();
        assert!(
            (got.loss * n as f64 - by_hand).abs() < 1e-3,
            "{got:?} vs {by_hand}"
        );
        let chars = h.text.chars().count();
        let bpc = by_hand / std::f64::consts::LN_2 / chars as f64;
        assert!((got.bits_per_char - bpc).abs() < 1e-6, "{got:?}");
        // The prefix is really read: without it the scores differ.
        let plain = LoraLlama::new(&ModelSpec::tiny(), &LoraSpec::default(), &device).unwrap();
        let without = evaluate(&plain, &h, 16, &device).unwrap();
        assert_eq!(without.tokens, n - 1);
        assert!((without.loss - got.loss).abs() > 1e-6);
    }

    #[test]
    fn refuses_bad_windows_and_tiny_texts() {
        let device = Device::flex();
        let model = LoraLlama::new(&ModelSpec::tiny(), &LoraSpec::default(), &device).unwrap();
        let h = heldout("abc");
        assert!(
            evaluate(&model, &h, 0, &device)
                .unwrap_err()
                .to_string()
                .contains("seq_len")
        );
        assert!(evaluate(&model, &h, 257, &device).is_err());
        let one = HeldOut {
            tokens: ByteTokenizer.encode("a"),
            chars_started: vec![1],
            text: "a".into(),
        };
        let err = evaluate(&model, &one, 8, &device).unwrap_err();
        assert!(
            err.to_string().contains("held-out text has 1 tokens"),
            "{err}"
        );
    }
}
