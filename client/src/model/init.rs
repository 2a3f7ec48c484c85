//! Deterministic base-weight initialisation from `ModelSpec::init_seed`.
//!
//! Every participant must start from the same base model, and the flex and wgpu backends must
//! start from bit-identical weights, so weights are drawn on the host with our own seeded RNG
//! and uploaded as `TensorData` rather than with burn's (backend-specific) random
//! initialisers.
//!
//! Each tensor draws from its own ChaCha8 stream, selected by a hash of its Hugging Face name:
//! adding or resizing one tensor never shifts the values of another. Values are uniform (not
//! normal) because uniform sampling is pure arithmetic and so bit-identical on every platform,
//! while Box–Muller would depend on the platform's `ln`/`cos`.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Source of the base weights for one model.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WeightInit {
    seed: u64,
}

impl WeightInit {
    pub(crate) fn new(seed: u64) -> Self {
        WeightInit { seed }
    }

    /// `rows × cols` row-major values, uniform with mean 0 and standard deviation `std`.
    pub(crate) fn uniform(&self, name: &str, rows: usize, cols: usize, std: f32) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
        rng.set_stream(fnv1a(name));
        let bound = std * 3f32.sqrt();
        (0..rows * cols)
            .map(|_| rng.random_range(-bound..bound))
            .collect()
    }
}

/// 64-bit FNV-1a: a stable, dependency-free hash of a tensor name.
fn fnv1a(name: &str) -> u64 {
    name.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// Transposes a row-major `rows × cols` matrix into row-major `cols × rows`.
pub(crate) fn transpose(data: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let mut out = vec![0.0; data.len()];
    for r in 0..rows {
        for c in 0..cols {
            out[c * rows + r] = data[r * cols + c];
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_and_name_same_values_different_name_different_values() {
        let init = WeightInit::new(17);
        let a = init.uniform("model.layers.0.self_attn.q_proj.weight", 4, 8, 0.1);
        assert_eq!(
            a,
            init.uniform("model.layers.0.self_attn.q_proj.weight", 4, 8, 0.1)
        );
        assert_ne!(
            a,
            init.uniform("model.layers.0.self_attn.k_proj.weight", 4, 8, 0.1)
        );
        assert_ne!(
            a,
            WeightInit::new(18).uniform("model.layers.0.self_attn.q_proj.weight", 4, 8, 0.1)
        );
    }

    #[test]
    fn scale_is_the_requested_std() {
        let v = WeightInit::new(1).uniform("w", 100, 100, 0.5);
        let mean = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        let var = v.iter().map(|&x| (x as f64 - mean).powi(2)).sum::<f64>() / v.len() as f64;
        assert!(mean.abs() < 0.02, "mean {mean}");
        assert!((var.sqrt() - 0.5).abs() < 0.02, "std {}", var.sqrt());
    }

    #[test]
    fn transpose_swaps_axes() {
        assert_eq!(
            transpose(&[1., 2., 3., 4., 5., 6.], 2, 3),
            vec![1., 4., 2., 5., 3., 6.]
        );
    }
}
