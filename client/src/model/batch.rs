//! Turning windows of a token stream into the model's input and target tensors.
//!
//! One window of `len + 1` tokens gives `len` inputs and the `len` tokens that follow each of
//! them. All windows of a batch are copied into one host buffer and uploaded once.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::ModelError;
use crate::model::LoraLlama;
use crate::model::loss::chunked_token_nll;

/// A batch of training rows on the host, each field row-major `[rows, seq]`.
///
/// `weights[i]` says how much predicting `targets[i]` counts in the loss (0 for prompt
/// tokens, padding and targets across a document boundary). `packed` rows hold several
/// documents: `positions` restart and `segments` number the documents, and the model keeps
/// attention within each; unpacked rows are one stretch of text at positions `0..seq`.
#[derive(Debug, Clone, PartialEq)]
pub struct RowBatch {
    pub rows: usize,
    pub seq: usize,
    pub inputs: Vec<u32>,
    pub targets: Vec<u32>,
    pub weights: Vec<f32>,
    pub positions: Vec<u32>,
    pub segments: Vec<u32>,
    pub packed: bool,
}

impl RowBatch {
    /// Appends `other`'s rows (same `seq` and packing) after this batch's.
    pub fn append(&mut self, other: &RowBatch) {
        debug_assert_eq!((self.seq, self.packed), (other.seq, other.packed));
        self.rows += other.rows;
        self.inputs.extend_from_slice(&other.inputs);
        self.targets.extend_from_slice(&other.targets);
        self.weights.extend_from_slice(&other.weights);
        self.positions.extend_from_slice(&other.positions);
        self.segments.extend_from_slice(&other.segments);
    }

    /// Unpacked windows `tokens[s .. s + len + 1]`, every target counted.
    pub fn windows(tokens: &[u32], starts: &[usize], len: usize) -> Self {
        Self::windows_after(None, tokens, starts, len)
    }

    /// Unpacked windows of `len` predictions. Without a `prefix`, as [`Self::windows`]. With
    /// one (the `<bos>` a model such as Gemma expects at the start of every sequence), each
    /// row reads `prefix, tokens[s .. s + len − 1]` and predicts `tokens[s .. s + len]`: the
    /// window spans `len` tokens of the stream, and its first token is predicted from the
    /// prefix alone.
    pub fn windows_after(
        prefix: Option<u32>,
        tokens: &[u32],
        starts: &[usize],
        len: usize,
    ) -> Self {
        let mut inputs = Vec::with_capacity(starts.len() * len);
        let mut targets = Vec::with_capacity(starts.len() * len);
        for &s in starts {
            match prefix {
                None => {
                    inputs.extend_from_slice(&tokens[s..s + len]);
                    targets.extend_from_slice(&tokens[s + 1..s + len + 1]);
                }
                Some(p) => {
                    inputs.push(p);
                    inputs.extend_from_slice(&tokens[s..s + len - 1]);
                    targets.extend_from_slice(&tokens[s..s + len]);
                }
            }
        }
        let n = inputs.len();
        RowBatch {
            rows: starts.len(),
            seq: len,
            inputs,
            targets,
            weights: vec![1.0; n],
            positions: (0..starts.len()).flat_map(|_| 0..len as u32).collect(),
            segments: vec![0; n],
            packed: false,
        }
    }

    /// Sum of the target weights: the number of predictions the loss averages over.
    pub fn trained_targets(&self) -> f64 {
        self.weights.iter().map(|&w| f64::from(w)).sum()
    }

    /// Checks that every field has `rows × seq` entries and every id is in the vocabulary.
    pub(crate) fn check(&self, vocab_size: usize, max_positions: usize) -> Result<(), ModelError> {
        let n = self.rows * self.seq;
        for (field, len) in [
            ("inputs", self.inputs.len()),
            ("targets", self.targets.len()),
            ("weights", self.weights.len()),
            ("positions", self.positions.len()),
            ("segments", self.segments.len()),
        ] {
            if len != n {
                return Err(ModelError::BatchShape {
                    field,
                    len,
                    rows: self.rows,
                    seq: self.seq,
                });
            }
        }
        check_vocab(&self.inputs, vocab_size)?;
        check_vocab(&self.targets, vocab_size)?;
        if let Some(&p) = self
            .positions
            .iter()
            .find(|&&p| p as usize >= max_positions)
        {
            return Err(ModelError::PositionOutOfRange {
                position: p,
                max_positions,
            });
        }
        Ok(())
    }

    /// Uploads the batch: `(inputs, targets, weights, positions, segments)`.
    pub(crate) fn to_device(&self, device: &Device) -> BatchTensors {
        let shape = [self.rows, self.seq];
        let ints = |v: &[u32]| -> Tensor<2, Int> {
            let data: Vec<i64> = v.iter().map(|&t| i64::from(t)).collect();
            Tensor::from_data(TensorData::new(data, shape), device)
        };
        BatchTensors {
            inputs: ints(&self.inputs),
            targets: ints(&self.targets),
            weights: Tensor::from_data(TensorData::new(self.weights.clone(), shape), device),
            positions: self.packed.then(|| ints(&self.positions)),
            segments: self.packed.then(|| ints(&self.segments)),
        }
    }
}

/// A [`RowBatch`] on the device; positions and segments only for packed rows.
pub(crate) struct BatchTensors {
    pub inputs: Tensor<2, Int>,
    pub targets: Tensor<2, Int>,
    pub weights: Tensor<2>,
    pub positions: Option<Tensor<2, Int>>,
    pub segments: Option<Tensor<2, Int>>,
}

impl BatchTensors {
    /// Runs `model` on the batch (packed rows through the segment-masked forward, others
    /// through the plain causal one) and scores it: `(per-token NLL, weights)`, both
    /// `[rows, seq]`. The logits are never materialised for the whole batch at once (see
    /// [`crate::model::loss`]).
    pub(crate) fn nll(self, model: &LoraLlama) -> (Tensor<2>, Tensor<2>) {
        let hidden = match (self.positions, self.segments) {
            (Some(positions), Some(segments)) => {
                model.hidden_packed(self.inputs, positions, segments)
            }
            _ => model.hidden(self.inputs),
        };
        (chunked_token_nll(model, hidden, self.targets), self.weights)
    }
}

/// Refuses token ids the embedding cannot look up (out-of-range ids would index past the
/// embedding table on the device).
pub(crate) fn check_vocab(tokens: &[u32], vocab_size: usize) -> Result<(), ModelError> {
    match tokens.iter().find(|&&t| t as usize >= vocab_size) {
        Some(&token) => Err(ModelError::TokenOutOfRange { token, vocab_size }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_prefix_starts_every_window_and_its_first_token_is_a_target() {
        let tokens: Vec<u32> = (10..30).collect();
        let b = RowBatch::windows_after(Some(2), &tokens, &[0, 5], 3);
        assert_eq!(b.inputs, vec![2, 10, 11, 2, 15, 16]);
        assert_eq!(b.targets, vec![10, 11, 12, 15, 16, 17]);
        assert_eq!(b.positions, vec![0, 1, 2, 0, 1, 2]);
        assert_eq!(
            RowBatch::windows_after(None, &tokens, &[0], 3),
            RowBatch::windows(&tokens, &[0], 3)
        );
    }

    #[test]
    fn targets_are_inputs_shifted_by_one() {
        let device = Device::flex();
        let tokens: Vec<u32> = (10..30).collect();
        let t = RowBatch::windows(&tokens, &[0, 5], 3).to_device(&device);
        let (x, y) = (t.inputs, t.targets);
        assert_eq!(
            x.into_data().try_into_vec_as::<i64>().unwrap(),
            vec![10, 11, 12, 15, 16, 17]
        );
        assert_eq!(
            y.into_data().try_into_vec_as::<i64>().unwrap(),
            vec![11, 12, 13, 16, 17, 18]
        );
    }

    #[test]
    fn out_of_vocabulary_ids_are_named() {
        assert!(check_vocab(&[1, 2, 255], 256).is_ok());
        let err = check_vocab(&[1, 300], 256).unwrap_err();
        assert!(err.to_string().contains("300"), "{err}");
    }
}
