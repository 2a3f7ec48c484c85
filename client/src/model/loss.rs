//! Next-token negative log-likelihood, shared by training (mean) and evaluation (sum).
//!
//! The logits of a whole batch are `batch × seq × vocab` floats: 192 MiB for 4 × 256 tokens
//! of SmolLM2's 49,152-token vocabulary, 1 GiB for 4 × 512 of Llama 3's 128k. wgpu refuses
//! a storage buffer above the device's binding limit (128 MiB by default; Mesa's lavapipe
//! enforces it), so [`chunked_token_nll`] projects and scores the sequence a slice of
//! positions at a time, none of whose logits exceed [`LOGITS_CHUNK_BYTES`].

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

use super::LoraLlama;

/// The largest logits tensor one slice may produce.
pub(crate) const LOGITS_CHUNK_BYTES: usize = 64 << 20;

/// Positions per slice so that `batch × positions × vocab` f32 logits fit
/// [`LOGITS_CHUNK_BYTES`] (at least one position).
fn positions_per_chunk(batch: usize, vocab: usize) -> usize {
    (LOGITS_CHUNK_BYTES / (batch * vocab * 4).max(1)).max(1)
}

/// Per-token NLL `[batch, seq]` of `model`'s head over hidden states `[batch, seq, hidden]`,
/// computed a slice of positions at a time (see the module docs). Equal to
/// `token_nll(model.head(hidden), targets)`.
pub(crate) fn chunked_token_nll(
    model: &LoraLlama,
    hidden: Tensor<3>,
    targets: Tensor<2, Int>,
) -> Tensor<2> {
    let batch = hidden.dims()[0];
    let step = positions_per_chunk(batch, model.model_spec().vocab_size);
    sliced_token_nll(model, hidden, targets, step)
}

/// [`chunked_token_nll`] with `step` positions per slice.
fn sliced_token_nll(
    model: &LoraLlama,
    hidden: Tensor<3>,
    targets: Tensor<2, Int>,
    step: usize,
) -> Tensor<2> {
    let [batch, seq, width] = hidden.dims();
    if step >= seq {
        return token_nll(model.head(hidden), targets);
    }
    let parts: Vec<Tensor<2>> = (0..seq)
        .step_by(step)
        .map(|start| {
            let end = (start + step).min(seq);
            let h = hidden.clone().slice([0..batch, start..end, 0..width]);
            let t = targets.clone().slice([0..batch, start..end]);
            token_nll(model.head(h), t)
        })
        .collect();
    Tensor::cat(parts, 1)
}

/// Per-token NLL in nats: logits `[batch, seq, vocab]`, targets `[batch, seq]` →
/// `-log softmax(logits)[target]`, `[batch, seq]`.
pub(crate) fn token_nll(logits: Tensor<3>, targets: Tensor<2, Int>) -> Tensor<2> {
    let log_probs = log_softmax(logits, 2);
    log_probs
        .gather(2, targets.unsqueeze_dim::<3>(2))
        .squeeze_dim::<2>(2)
        .neg()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::RowBatch;
    use burn::tensor::Device;
    use fedcore::{LoraSpec, ModelSpec};

    /// Slicing the positions changes nothing: the chunked NLL equals the whole-batch one
    /// when the batch is forced into many slices.
    #[test]
    fn chunked_nll_equals_the_whole_batch_nll() {
        let device = Device::flex();
        let spec = ModelSpec::tiny();
        let model = LoraLlama::new(&spec, &LoraSpec::default(), &device).unwrap();
        let tokens: Vec<u32> = (0..200).map(|i| (i * 7 % spec.vocab_size) as u32).collect();
        let batch = RowBatch::windows(&tokens, &[0, 40, 90], 33).to_device(&device);
        let whole = token_nll(model.forward(batch.inputs.clone()), batch.targets.clone());
        let hidden = model.hidden(batch.inputs);
        for step in [1, 3, 32, 33] {
            let sliced = sliced_token_nll(&model, hidden.clone(), batch.targets.clone(), step);
            whole
                .clone()
                .into_data()
                .assert_approx_eq::<f32>(&sliced.into_data(), Default::default());
        }
    }

    #[test]
    fn slices_stay_under_the_byte_budget() {
        // SmolLM2: 4 × 256 positions × 49,152 logits would be 192 MiB in one tensor.
        let step = positions_per_chunk(4, 49_152);
        assert!(4 * step * 49_152 * 4 <= LOGITS_CHUNK_BYTES);
        assert!(4 * (step + 1) * 49_152 * 4 > LOGITS_CHUNK_BYTES);
        assert_eq!(positions_per_chunk(1, usize::MAX / 8), 1);
    }
}
