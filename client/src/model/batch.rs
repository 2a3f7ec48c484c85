//! Turning windows of a token stream into the model's input and target tensors.
//!
//! One window of `len + 1` tokens gives `len` inputs and the `len` tokens that follow each of
//! them. All windows of a batch are copied into one host buffer and uploaded once.

use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::error::ModelError;

/// Inputs and targets, both `[starts.len(), len]`, for windows `tokens[s .. s + len + 1]`.
pub(crate) fn windows(
    tokens: &[u32],
    starts: &[usize],
    len: usize,
    device: &Device,
) -> (Tensor<2, Int>, Tensor<2, Int>) {
    let mut inputs = Vec::with_capacity(starts.len() * len);
    let mut targets = Vec::with_capacity(starts.len() * len);
    for &s in starts {
        inputs.extend(tokens[s..s + len].iter().map(|&t| i64::from(t)));
        targets.extend(tokens[s + 1..s + len + 1].iter().map(|&t| i64::from(t)));
    }
    let shape = [starts.len(), len];
    (
        Tensor::from_data(TensorData::new(inputs, shape), device),
        Tensor::from_data(TensorData::new(targets, shape), device),
    )
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
    fn targets_are_inputs_shifted_by_one() {
        let device = Device::flex();
        let tokens: Vec<u32> = (10..30).collect();
        let (x, y) = windows(&tokens, &[0, 5], 3, &device);
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
