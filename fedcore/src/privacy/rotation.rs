//! The randomised Hadamard rotation applied to a lab's update before it is rounded onto
//! the integer grid (Kairouz, Liu, Steinke 2021, §4; Suresh et al. 2017).
//!
//! Why rotate: an update's energy is often in a few coordinates; after x ↦ H·D·x/√d (D a
//! random ±1 diagonal, H the d×d Walsh–Hadamard matrix) every coordinate is sub-Gaussian
//! with variance ‖x‖²/d, so the sum over the labs stays far inside the modulus with
//! overwhelming probability, and rounding error spreads evenly. The rotation is
//! orthonormal, so it keeps L2 norms (the sensitivity the accountant uses) and is its own
//! kind of inverse: x = D·H·y/√d.
//!
//! The signs come from a public seed that every lab and the center derive the same way
//! (the plan's fingerprint and the round, [`crate::privacy::distributed::rotation_seed`]):
//! the center must undo the rotation on the sum, and the rotation is not a secret.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

/// A randomised Hadamard rotation of vectors padded to `dim`, a power of two.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rotation {
    /// D's diagonal: `true` for −1.
    flips: Vec<bool>,
}

/// The rotated dimension of a vector of `len` values: the next power of two (at least 1).
pub fn padded_dim(len: usize) -> usize {
    len.max(1).next_power_of_two()
}

impl Rotation {
    /// The rotation of dimension `dim` (a power of two) with signs drawn from `seed`.
    pub fn new(dim: usize, seed: [u8; 32]) -> Self {
        assert!(
            dim.is_power_of_two(),
            "the rotation's dimension is a power of two"
        );
        let mut rng = ChaCha20Rng::from_seed(seed);
        Rotation {
            flips: (0..dim).map(|_| rng.random::<bool>()).collect(),
        }
    }

    pub fn dim(&self) -> usize {
        self.flips.len()
    }

    /// H·D·x/√d of `x` padded with zeros to the rotation's dimension (`x` not longer).
    pub fn forward(&self, x: &[f64]) -> Vec<f64> {
        assert!(x.len() <= self.dim(), "the vector fits the rotation");
        let mut y = vec![0.0; self.dim()];
        for ((out, &v), &flip) in y.iter_mut().zip(x).zip(&self.flips) {
            *out = if flip { -v } else { v };
        }
        walsh_hadamard(&mut y);
        let scale = 1.0 / (self.dim() as f64).sqrt();
        y.iter_mut().for_each(|v| *v *= scale);
        y
    }

    /// D·H·y/√d: the inverse of [`Self::forward`] (all `dim` values; the caller drops the
    /// padding).
    pub fn inverse(&self, y: &[f64]) -> Vec<f64> {
        assert_eq!(
            y.len(),
            self.dim(),
            "the vector has the rotation's dimension"
        );
        let mut x = y.to_vec();
        walsh_hadamard(&mut x);
        let scale = 1.0 / (self.dim() as f64).sqrt();
        for (v, &flip) in x.iter_mut().zip(&self.flips) {
            *v *= if flip { -scale } else { scale };
        }
        x
    }
}

/// The unnormalised fast Walsh–Hadamard transform, in place (length a power of two):
/// d·log₂d additions.
fn walsh_hadamard(a: &mut [f64]) {
    let n = a.len();
    let mut h = 1;
    while h < n {
        for block in a.chunks_exact_mut(2 * h) {
            let (lo, hi) = block.split_at_mut(h);
            for (x, y) in lo.iter_mut().zip(hi.iter_mut()) {
                let (u, v) = (*x, *y);
                *x = u + v;
                *y = u - v;
            }
        }
        h *= 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_transform_is_the_hadamard_matrix() {
        // H₄ applied to the unit vectors gives its columns.
        let h4 = [
            [1.0, 1.0, 1.0, 1.0],
            [1.0, -1.0, 1.0, -1.0],
            [1.0, 1.0, -1.0, -1.0],
            [1.0, -1.0, -1.0, 1.0],
        ];
        for (j, column) in h4.iter().enumerate() {
            let mut e = [0.0; 4];
            e[j] = 1.0;
            walsh_hadamard(&mut e);
            assert_eq!(&e, column);
        }
        assert_eq!(padded_dim(0), 1);
        assert_eq!(padded_dim(5), 8);
        assert_eq!(padded_dim(8), 8);
    }

    #[test]
    fn rotation_spreads_a_spike_evenly() {
        let r = Rotation::new(1024, [7; 32]);
        let mut x = vec![0.0; 1000];
        x[3] = 5.0;
        let y = r.forward(&x);
        let flat = 5.0 / 32.0;
        assert!(y.iter().all(|v| (v.abs() - flat).abs() < 1e-12));
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// Orthonormal: norms are kept and the inverse recovers the padded input.
        #[test]
        fn rotation_keeps_norms_and_inverts(
            values in proptest::collection::vec(-10.0f64..10.0, 1..300),
            seed in any::<[u8; 32]>(),
        ) {
            let r = Rotation::new(padded_dim(values.len()), seed);
            let y = r.forward(&values);
            let norm = |v: &[f64]| v.iter().map(|x| x * x).sum::<f64>().sqrt();
            prop_assert!((norm(&y) - norm(&values)).abs() <= 1e-9 * (1.0 + norm(&values)));
            let back = r.inverse(&y);
            for (i, v) in back.iter().enumerate() {
                let expected = values.get(i).copied().unwrap_or(0.0);
                prop_assert!((v - expected).abs() < 1e-9, "{} vs {}", v, expected);
            }
        }
    }
}
