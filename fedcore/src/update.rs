//! The one seam where a participant's update is encoded for the wire and checked before it
//! may touch the aggregate.
//!
//! In this release updates travel as plaintext little-endian f32 vectors laid out by the
//! round's upload manifest. Secure aggregation replaces [`UpdatePayload::Plaintext`] with
//! masked vectors; nothing else in the pipeline reads update bytes.

use thiserror::Error;

use crate::manifest::LayoutManifest;

/// How the values of an update travel.
#[derive(Debug, Clone, PartialEq)]
pub enum UpdatePayload {
    /// Little-endian f32 values in upload-manifest order.
    Plaintext(Vec<u8>),
}

/// One participant's submission for one round, as the coordinator receives it.
#[derive(Debug, Clone, PartialEq)]
pub struct SubmittedUpdate {
    /// Round the update was trained in.
    pub round: u64,
    /// Hex hash of the layout the participant flattened its upload with.
    pub layout_hash: String,
    /// Content hash of the global adapter the participant trained from.
    pub base_adapter_hash: String,
    /// Sample weight n_i (training tokens).
    pub num_samples: u64,
    pub payload: UpdatePayload,
}

/// Why an update's values are unusable; each names the offending value.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum UpdateError {
    #[error("update payload has {0} bytes, not a whole number of f32 values")]
    ByteLength(usize),
    #[error("update has {got} values, the round's layout {layout} expects {expected}")]
    Length {
        got: usize,
        expected: usize,
        layout: String,
    },
    #[error("update value {index} ({tensor}[{row}, {col}]) is {kind}; updates must be finite")]
    NonFinite {
        index: usize,
        tensor: String,
        row: usize,
        col: usize,
        kind: &'static str,
    },
    #[error("update value {index} is {kind}; updates must be finite")]
    NonFiniteAt { index: usize, kind: &'static str },
}

/// Names a non-finite value.
fn non_finite_kind(v: f32) -> &'static str {
    if v.is_nan() {
        "NaN"
    } else if v > 0.0 {
        "+infinity"
    } else {
        "-infinity"
    }
}

/// Refuses the first non-finite value of an unlaid-out vector.
pub fn check_finite(values: &[f32]) -> Result<(), UpdateError> {
    match values.iter().position(|v| !v.is_finite()) {
        Some(index) => Err(UpdateError::NonFiniteAt {
            index,
            kind: non_finite_kind(values[index]),
        }),
        None => Ok(()),
    }
}

/// Encodes f32 values as little-endian bytes (the wire form of vectors and adapters).
pub fn encode_f32_le(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Decodes little-endian f32 bytes.
pub fn decode_f32_le(bytes: &[u8]) -> Result<Vec<f32>, UpdateError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(UpdateError::ByteLength(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Decodes a plaintext update and checks it against the round's upload layout: the right
/// number of values, every one finite.
pub fn decode_plaintext(bytes: &[u8], layout: &LayoutManifest) -> Result<Vec<f32>, UpdateError> {
    let values = decode_f32_le(bytes)?;
    check_values(&values, layout)?;
    Ok(values)
}

/// Checks length and finiteness of a vector laid out by `layout`.
pub fn check_values(values: &[f32], layout: &LayoutManifest) -> Result<(), UpdateError> {
    if values.len() != layout.len() {
        return Err(UpdateError::Length {
            got: values.len(),
            expected: layout.len(),
            layout: layout.short_hash(),
        });
    }
    if let Some(index) = values.iter().position(|v| !v.is_finite()) {
        let slot = layout
            .slots()
            .iter()
            .rfind(|s| s.offset <= index)
            .expect("a non-empty layout covers every index");
        let within = index - slot.offset;
        let v = values[index];
        return Err(UpdateError::NonFinite {
            index,
            tensor: slot.name.clone(),
            row: within / slot.shape[1],
            col: within % slot.shape[1],
            kind: non_finite_kind(v),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::TensorSlot;

    fn layout() -> LayoutManifest {
        LayoutManifest::new(vec![
            TensorSlot::new("m0.lora_B".into(), [2, 2]),
            TensorSlot::new("m1.lora_B".into(), [3, 2]),
        ])
    }

    #[test]
    fn plaintext_round_trips() {
        let v: Vec<f32> = (0..10).map(|i| i as f32 - 4.5).collect();
        assert_eq!(decode_plaintext(&encode_f32_le(&v), &layout()).unwrap(), v);
    }

    #[test]
    fn wrong_length_names_both_lengths() {
        let err = decode_plaintext(&encode_f32_le(&[0.0; 9]), &layout()).unwrap_err();
        assert!(matches!(
            err,
            UpdateError::Length {
                got: 9,
                expected: 10,
                ..
            }
        ));
        assert!(err.to_string().contains("9 values"));
        let err = decode_plaintext(&[0u8; 7], &layout()).unwrap_err();
        assert_eq!(err, UpdateError::ByteLength(7));
    }

    #[test]
    fn nan_and_inf_are_located() {
        let mut v = vec![0.0f32; 10];
        v[7] = f32::NAN;
        let err = decode_plaintext(&encode_f32_le(&v), &layout()).unwrap_err();
        assert_eq!(
            err.to_string(),
            "update value 7 (m1.lora_B[1, 1]) is NaN; updates must be finite"
        );
        v[7] = 0.0;
        v[0] = f32::NEG_INFINITY;
        let err = decode_plaintext(&encode_f32_le(&v), &layout()).unwrap_err();
        assert!(err.to_string().contains("m0.lora_B[0, 0]) is -infinity"));
    }
}
