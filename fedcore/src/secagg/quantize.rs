//! Fixed-point quantisation of float updates into Z_{2^32} for secure summation.
//!
//! Each value is clipped to `[-clip, clip]`, shifted and scaled onto the integer grid
//! `0..=2^bits - 1`, and rounded stochastically (up with probability equal to the fractional
//! part), so the quantised value is an unbiased estimate of the clipped one. Sums are taken
//! modulo 2^32; a configuration is refused when the sum of `n` vectors could wrap, that is
//! unless `n · (2^bits - 1) ≤ 2^32 - 1`. With `clip = 8, bits = 22` (Flower's defaults) at most
//! 1024 vectors can be summed.
//!
//! Error bound: every rounding moves a value by less than one grid step `2·clip/(2^bits-1)`,
//! so the dequantised sum of `n` in-range vectors is within `n · step` of the true sum in
//! every coordinate, and equal to it in expectation.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;
use thiserror::Error;

/// Why a quantiser cannot be used.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum QuantError {
    #[error("clip must be a positive finite number, got {0}")]
    Clip(f32),
    #[error("bits must be between 1 and 31, got {0}")]
    Bits(u32),
    #[error(
        "summing {summands} vectors quantised to {bits} bits could wrap modulo 2^32; at most {max} fit (lower bits or split the cohort)"
    )]
    WouldWrap { summands: u64, bits: u32, max: u64 },
}

/// A vector on the integer grid, and how many of its values were clipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quantized {
    pub words: Vec<u32>,
    pub clipped: usize,
}

/// Clip-scale-round quantiser (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Quantizer {
    clip: f32,
    bits: u32,
}

impl Quantizer {
    /// A quantiser for values in `[-clip, clip]` onto `2^bits` levels.
    pub fn new(clip: f32, bits: u32) -> Result<Self, QuantError> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(QuantError::Clip(clip));
        }
        if !(1..=31).contains(&bits) {
            return Err(QuantError::Bits(bits));
        }
        Ok(Quantizer { clip, bits })
    }

    /// Highest grid value, `2^bits - 1`.
    fn top(&self) -> u64 {
        (1u64 << self.bits) - 1
    }

    /// Grid steps per unit value.
    fn scale(&self) -> f64 {
        self.top() as f64 / (2.0 * self.clip as f64)
    }

    /// Width of one grid step in value units.
    pub fn step(&self) -> f64 {
        1.0 / self.scale()
    }

    /// Most vectors whose sum cannot wrap modulo 2^32.
    pub fn max_summands(&self) -> u64 {
        u64::from(u32::MAX) / self.top()
    }

    /// Refuses a cohort whose sum could wrap.
    pub fn check_summands(&self, summands: u64) -> Result<(), QuantError> {
        let max = self.max_summands();
        if summands > max {
            return Err(QuantError::WouldWrap {
                summands,
                bits: self.bits,
                max,
            });
        }
        Ok(())
    }

    /// Largest per-coordinate error of the dequantised sum of `summands` in-range vectors.
    pub fn error_bound(&self, summands: u64) -> f64 {
        summands as f64 * self.step()
    }

    /// Quantises `values` with stochastic rounding drawn from `seed`. Non-finite values are
    /// the caller's to refuse beforehand; here NaN maps to the midpoint (zero) and ±inf clip.
    pub fn quantize(&self, values: &[f32], seed: [u8; 32]) -> Quantized {
        let mut rng = ChaCha20Rng::from_seed(seed);
        let scale = self.scale();
        let clip = self.clip as f64;
        let mut clipped = 0;
        let words = values
            .iter()
            .map(|&v| {
                let v = if v.is_nan() { 0.0 } else { v as f64 };
                let c = v.clamp(-clip, clip);
                if c != v {
                    clipped += 1;
                }
                let grid = (c + clip) * scale;
                let floor = grid.floor();
                let up = rng.random::<f64>() < grid - floor;
                (floor as u64 + u64::from(up)).min(self.top()) as u32
            })
            .collect();
        Quantized { words, clipped }
    }

    /// Turns the modulo-2^32 sum of `summands` quantised vectors back into the sum of values.
    pub fn dequantize_sum(&self, sum: &[u32], summands: u64) -> Vec<f64> {
        let scale = self.scale();
        let offset = summands as f64 * self.clip as f64;
        sum.iter().map(|&s| s as f64 / scale - offset).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{ChaCha20Rng, QuantError, Quantizer, SeedableRng};
    use proptest::prelude::*;
    use rand::Rng;

    #[test]
    fn flower_defaults_allow_1024_summands() {
        let q = Quantizer::new(8.0, 22).unwrap();
        assert_eq!(q.max_summands(), 1024);
        q.check_summands(1024).unwrap();
        assert_eq!(
            q.check_summands(1025),
            Err(QuantError::WouldWrap {
                summands: 1025,
                bits: 22,
                max: 1024
            })
        );
        assert!(Quantizer::new(0.0, 8).is_err());
        assert!(Quantizer::new(1.0, 32).is_err());
    }

    #[test]
    fn rounding_is_unbiased() {
        let q = Quantizer::new(1.0, 4).unwrap();
        let value = 0.3f32; // between grid points
        let trials = 20_000;
        let mut total = 0.0;
        for t in 0..trials {
            let mut seed = [0u8; 32];
            seed[..8].copy_from_slice(&(t as u64).to_le_bytes());
            let w = q.quantize(&[value], seed).words;
            total += q.dequantize_sum(&w, 1)[0];
        }
        let mean = total / trials as f64;
        // Standard error ≈ step/2/√trials ≈ 0.0005; allow 5σ.
        assert!((mean - value as f64).abs() < 0.003, "mean {mean}");
    }

    #[test]
    fn out_of_range_values_are_clipped_and_counted() {
        let q = Quantizer::new(1.0, 10).unwrap();
        let out = q.quantize(&[5.0, -5.0, 0.5, f32::INFINITY], [3; 32]);
        assert_eq!(out.clipped, 3);
        assert_eq!(out.words[0], 1023);
        assert_eq!(out.words[1], 0);
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// The modular sum of n quantised vectors dequantises to the true sum within n·step.
        #[test]
        fn modular_sum_is_within_the_bound(
            n in 1usize..40,
            len in 1usize..64,
            bits in 8u32..24,
            seed in any::<u64>(),
        ) {
            let q = Quantizer::new(2.0, bits).unwrap();
            prop_assume!(q.check_summands(n as u64).is_ok());
            let mut rng = ChaCha20Rng::seed_from_u64(seed);
            let mut sum = vec![0u32; len];
            let mut truth = vec![0f64; len];
            for i in 0..n {
                let v: Vec<f32> = (0..len).map(|_| rng.random_range(-2.0f32..2.0)).collect();
                let mut s = [0u8; 32];
                s[..8].copy_from_slice(&(i as u64).to_le_bytes());
                s[8..16].copy_from_slice(&seed.to_le_bytes());
                for (acc, w) in sum.iter_mut().zip(q.quantize(&v, s).words) {
                    *acc = acc.wrapping_add(w);
                }
                for (t, x) in truth.iter_mut().zip(&v) {
                    *t += *x as f64;
                }
            }
            let bound = q.error_bound(n as u64) + 1e-9;
            for (d, t) in q.dequantize_sum(&sum, n as u64).iter().zip(&truth) {
                prop_assert!((d - t).abs() <= bound, "{} vs {} (bound {})", d, t, bound);
            }
        }
    }
}
