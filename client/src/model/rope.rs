//! Rotary position embedding in the Hugging Face Llama convention ("rotate half"): the head
//! dimension is split into two halves that rotate as pairs `(x[i], x[i + d/2])`, with
//! frequency `theta^(-2i/d)`, optionally rescaled (Llama 3's `rope_scaling`). (burn's own
//! `RotaryEncoding` rotates interleaved pairs, which would not match Llama checkpoints; GGUF
//! files, which are stored for interleaved pairs, are permuted back on load.)
//!
//! Packed training rows restart positions at every document, so the tables can also be
//! gathered at explicit per-token positions ([`RotaryEmbedding::at_positions`]).

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor, TensorData};
use fedcore::RopeScaling;

/// `cos` and `sin` for the positions of one forward pass, `[batch or 1, 1, seq, head_dim]`.
#[derive(Debug, Clone)]
pub struct RopeTables {
    cos: Tensor<4>,
    sin: Tensor<4>,
}

impl RopeTables {
    /// Rotates `x` (`[batch, heads, seq, head_dim]`): `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let head_dim = x.dims()[3];
        let half = head_dim / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * self.cos.clone() + rotated * self.sin.clone()
    }
}

/// Precomputed `cos`/`sin` tables, `[max_positions, head_dim]`. Plain tensors, not
/// parameters: they are never trained, saved or exchanged.
#[derive(Module, Debug)]
pub struct RotaryEmbedding {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl RotaryEmbedding {
    pub(crate) fn new(
        head_dim: usize,
        max_positions: usize,
        theta: f32,
        scaling: Option<&RopeScaling>,
        device: &Device,
    ) -> Self {
        let half = head_dim / 2;
        let inv_freq: Vec<f64> = (0..half)
            .map(|i| {
                let f = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                scaling.map_or(f, |s| s.scale(f))
            })
            .collect();
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // HF builds `emb = cat(freqs, freqs)`: both halves share the frequency table.
            for _ in 0..2 {
                for &f in &inv_freq {
                    let angle = pos as f64 * f;
                    cos.push(angle.cos() as f32);
                    sin.push(angle.sin() as f32);
                }
            }
        }
        let shape = [max_positions, head_dim];
        RotaryEmbedding {
            cos: Tensor::from_data(TensorData::new(cos, shape), device),
            sin: Tensor::from_data(TensorData::new(sin, shape), device),
        }
    }

    /// Tables for positions `0..seq` (an unpacked batch), `[1, 1, seq, head_dim]`.
    pub fn first(&self, seq: usize) -> RopeTables {
        RopeTables {
            cos: self.cos.clone().narrow(0, 0, seq).unsqueeze::<4>(),
            sin: self.sin.clone().narrow(0, 0, seq).unsqueeze::<4>(),
        }
    }

    /// Tables gathered at per-token `positions` (`[batch, seq]`, each below the table length),
    /// `[batch, 1, seq, head_dim]`.
    pub fn at_positions(&self, positions: Tensor<2, Int>) -> RopeTables {
        let [batch, seq] = positions.dims();
        let head_dim = self.cos.dims()[1];
        let flat = positions.reshape([batch * seq]);
        let gather = |table: &Tensor<2>| {
            table
                .clone()
                .select(0, flat.clone())
                .reshape([batch, 1, seq, head_dim])
        };
        RopeTables {
            cos: gather(&self.cos),
            sin: gather(&self.sin),
        }
    }

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) by its positions `0..seq`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        self.first(x.dims()[2]).apply(x)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_halves_by_position() {
        let device = Device::flex();
        let rope = RotaryEmbedding::new(4, 8, 10_000.0, None, &device);
        // x = [1, 0, 0, 0] at positions 0..3, one head.
        let x = Tensor::<4>::from_data(
            TensorData::new([[1f32, 0., 0., 0.]; 3].concat(), [1, 1, 3, 4]),
            &device,
        );
        let y = rope.apply(x).into_data().try_into_vec_as::<f32>().unwrap();
        for pos in 0..3 {
            let a = pos as f32; // frequency of pair 0 is theta^0 = 1
            let row = &y[pos * 4..pos * 4 + 4];
            // Pair (x0, x2) rotates: x0' = x0·cos, x2' = x0·sin.
            assert!((row[0] - a.cos()).abs() < 1e-6, "{row:?}");
            assert!(row[1].abs() < 1e-6 && row[3].abs() < 1e-6, "{row:?}");
            assert!((row[2] - a.sin()).abs() < 1e-6, "{row:?}");
        }
    }
}

#[cfg(test)]
mod position_tests {
    use super::*;

    /// Gathering at explicit positions equals the contiguous tables at those positions, and a
    /// restart at 0 rotates like position 0.
    #[test]
    fn explicit_positions_match_contiguous_ones() {
        let device = Device::flex();
        let rope = RotaryEmbedding::new(4, 8, 10_000.0, None, &device);
        let x = Tensor::<4>::from_data(
            TensorData::new(
                (0..16).map(|v| v as f32 * 0.1).collect::<Vec<_>>(),
                [1, 1, 4, 4],
            ),
            &device,
        );
        let contiguous = rope.apply(x.clone()).into_data();
        let positions =
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 2, 3], [1, 4]), &device);
        let gathered = rope.at_positions(positions).apply(x.clone()).into_data();
        assert_eq!(contiguous, gathered);

        let restart =
            Tensor::<2, Int>::from_data(TensorData::new(vec![0i64, 1, 0, 1], [1, 4]), &device);
        let y = rope
            .at_positions(restart)
            .apply(x.clone())
            .into_data()
            .try_into_vec_as::<f32>()
            .unwrap();
        let c = contiguous.try_into_vec_as::<f32>().unwrap();
        // Rows 2 and 3 rotate as positions 0 and 1: position 0 is the identity.
        let x_host = x.into_data().try_into_vec_as::<f32>().unwrap();
        assert_eq!(&y[8..12], &x_host[8..12]);
        assert_ne!(&y[12..16], &c[12..16]);
    }

    /// Llama-3 scaling keeps short wavelengths, divides long ones by `factor`.
    #[test]
    fn llama3_scaling_bands() {
        let s = RopeScaling::Llama3 {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192,
        };
        assert_eq!(s.scale(1.0), 1.0);
        let long = 2.0 * std::f64::consts::PI / 20_000.0;
        assert!((s.scale(long) - long / 8.0).abs() < 1e-18);
        let mid = 2.0 * std::f64::consts::PI / 4096.0;
        let got = s.scale(mid);
        assert!(got < mid && got > mid / 8.0);
    }
}
