//! Rotary position embedding in the Hugging Face Llama convention ("rotate half"): the head
//! dimension is split into two halves that rotate as pairs `(x[i], x[i + d/2])`, with
//! frequency `theta^(-2i/d)`. (burn's own `RotaryEncoding` rotates interleaved pairs, which
//! would not match Llama checkpoints.)

use burn::module::Module;
use burn::tensor::{Device, Tensor, TensorData};

/// Precomputed `cos`/`sin` tables, `[max_positions, head_dim]`. Plain tensors, not
/// parameters: they are never trained, saved or exchanged.
#[derive(Module, Debug)]
pub struct RotaryEmbedding {
    cos: Tensor<2>,
    sin: Tensor<2>,
}

impl RotaryEmbedding {
    pub(crate) fn new(head_dim: usize, max_positions: usize, theta: f32, device: &Device) -> Self {
        let half = head_dim / 2;
        let mut cos = Vec::with_capacity(max_positions * head_dim);
        let mut sin = Vec::with_capacity(max_positions * head_dim);
        for pos in 0..max_positions {
            // HF builds `emb = cat(freqs, freqs)`: both halves share the frequency table.
            for _ in 0..2 {
                for i in 0..half {
                    let inv_freq = (theta as f64).powf(-(2.0 * i as f64) / head_dim as f64);
                    let angle = pos as f64 * inv_freq;
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

    /// Rotates `x` (`[batch, heads, seq, head_dim]`) by its positions `0..seq`:
    /// `x·cos + rotate_half(x)·sin`.
    pub fn apply(&self, x: Tensor<4>) -> Tensor<4> {
        let [_, _, seq, head_dim] = x.dims();
        let half = head_dim / 2;
        let cos = self.cos.clone().narrow(0, 0, seq).unsqueeze::<4>();
        let sin = self.sin.clone().narrow(0, 0, seq).unsqueeze::<4>();
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
        x * cos + rotated * sin
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotates_halves_by_position() {
        let device = Device::flex();
        let rope = RotaryEmbedding::new(4, 8, 10_000.0, &device);
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
