//! The distributed discrete Gaussian encoding (Kairouz, Liu, Steinke 2021): how a lab's
//! update becomes the noised integer vector it masks, and how the center turns the
//! unmasked sum back into a mean update.
//!
//! # The masked vector
//!
//! For an upload `Δ` of `L` values, `d = 2^⌈log₂ L⌉`, each lab sends `d + 1` words:
//! 1. `Δ` is scaled to L2 norm at most `c` (`privacy.l2_clip`);
//! 2. padded to `d` and rotated: `y = H·D·Δ/√d` ([`super::rotation`], public signs from the
//!    plan and the round, [`rotation_seed`]);
//! 3. scaled onto the grid, `y/γ`, and rounded stochastically to integers, again until the
//!    rounded vector's norm is within the bound the accountant assumes (conditional
//!    rounding, β = e^{−1/2});
//! 4. each coordinate gets an exact discrete Gaussian draw of variance `v` (on the grid;
//!    `σ = √v·γ` in the update's units, see [`crate::privacy::spec`] for how σ is set);
//! 5. words `0..d` are the integers modulo 2^32; word `d` is 1 (the sum's word `d` counts
//!    the labs, a check that the masks cancelled).
//!
//! The center reads each word of the sum as a signed 32-bit integer, multiplies by γ,
//! rotates back, and divides by the labs summed: the mean of the clipped updates plus noise
//! of standard deviation `√(n·v)·γ/n` per value.
//!
//! # Why the sum does not wrap
//!
//! γ is chosen so that the largest sum the roster can produce stays inside ±2^31 with
//! overwhelming probability: `γ = K·(N·c/√d + √N·σ) / (2^31 − 1 − N)` for a roster of `N`
//! labs and `K = 8` standard deviations. After the rotation every coordinate of a lab's
//! vector is sub-Gaussian with variance at most `c²/d`, so even `N` identical updates
//! exceed `K·N·c/√d` in a coordinate with probability below `2·e^{−K²/2} ≈ 2.5·10⁻¹⁴`; the
//! summed noise exceeds `K·√N·σ` as rarely; rounding adds at most one step per lab. With
//! 32-bit words this still leaves each coordinate tens of thousands of grid steps, so the
//! rounding is negligible beside the noise.
//!
//! The stochastic rounding and the noise are drawn from the caller's seed (derived from the
//! lab's identity secret, the round and the global model, see
//! [`crate::round::rounding_seed`]): a restarted attempt masks exactly the same noised
//! vector, so the center never gets two noise draws of one update to average.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha20Rng;

use super::ddg::DistributedDiscreteGaussian;
use super::discrete::{SamplerError, discrete_gaussian};
use super::rotation::{Rotation, padded_dim};
use super::spec::{PrivacySpec, ROUNDING_BETA, honest_labs};
use crate::error::ConfigError;
use crate::secagg::spec::{DecodeError, DecodedSum, EncodedUpdate};
use crate::update::{UpdateError, check_finite};

/// Standard deviations of headroom between the largest likely sum and the modulus.
const HEADROOM_SIGMAS: f64 = 8.0;
/// Roundings tried before an update is refused (each succeeds with probability ≥ 1 − β).
const MAX_ROUNDINGS: usize = 200;

/// The seed of round `round`'s rotation: SHA-256 of a domain separator, the plan's
/// fingerprint and the round. Public, and the same for every lab and the center; fixed
/// before the round, so no one picks it after seeing an update.
pub fn rotation_seed(plan_fingerprint: &str, round: u64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"mekong/dp/rotation/v1");
    h.update((plan_fingerprint.len() as u64).to_le_bytes());
    h.update(plan_fingerprint.to_ascii_lowercase().as_bytes());
    h.update(round.to_le_bytes());
    h.finalize().into()
}

/// The codec of the distributed discrete Gaussian (see the module docs).
#[derive(Debug, Clone, PartialEq)]
pub struct DdgEncoding {
    len: usize,
    rotation: Rotation,
    /// The grid step.
    gamma: f64,
    /// Each lab's noise variance on the grid (an integer, so the sampler is exact).
    grid_variance: u64,
    l2_clip: f64,
    /// The fewest labs whose noise no coalition can remove, in any sum the protocol allows.
    honest_floor: usize,
    /// Labs that may subtract their own noise (`secure_aggregation.max_colluding`).
    colluders: usize,
}

/// The mechanism of a sum, once the labs summed are known: the labs beyond the colluders
/// contribute the noise no coalition removes ([`honest_labs`]).
#[derive(Debug, Clone, PartialEq)]
pub struct SumAccounting {
    template: DistributedDiscreteGaussian,
    colluders: usize,
}

impl SumAccounting {
    /// The mechanism of a sum of `summed` labs.
    pub fn for_summed(&self, summed: usize) -> DistributedDiscreteGaussian {
        DistributedDiscreteGaussian {
            num_clients: honest_labs(summed, self.colluders),
            ..self.template.clone()
        }
    }
}

/// Why a lab's update could not be encoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DdgError {
    #[error(transparent)]
    Update(#[from] UpdateError),
    #[error(
        "conditional rounding failed {0} times in a row; the update cannot be rounded within the norm bound (this should not happen: report it)"
    )]
    Rounding(usize),
    #[error("drawing the noise failed: {0}")]
    Sampler(#[from] SamplerError),
}

impl DdgEncoding {
    /// The codec for uploads of `len` values under `spec`, whose noise is calibrated so
    /// that `honest_floor` labs' noise reaches `noise_multiplier · l2_clip`, for sums of at
    /// most `max_summands` labs of which `colluders` may subtract their own noise, rotated
    /// with `rotation_seed`.
    pub fn new(
        spec: &PrivacySpec,
        len: usize,
        honest_floor: usize,
        colluders: usize,
        max_summands: usize,
        rotation_seed: [u8; 32],
    ) -> Result<Self, ConfigError> {
        let dim = padded_dim(len);
        let (n, d) = (max_summands.max(1) as f64, dim as f64);
        let sigma = spec.noise_multiplier * spec.l2_clip / (honest_floor.max(1) as f64).sqrt();
        let room = f64::from(i32::MAX) - n;
        let gamma = HEADROOM_SIGMAS * (n * spec.l2_clip / d.sqrt() + n.sqrt() * sigma) / room;
        let grid_stddev = sigma / gamma;
        let grid_variance = (grid_stddev * grid_stddev).round();
        if !(gamma.is_finite()
            && gamma > 0.0
            && grid_variance >= 1.0
            && grid_variance < 2f64.powi(60))
        {
            return Err(ConfigError::field(
                "privacy",
                format!(
                    "no integer grid fits noise σ = {sigma:e} for {max_summands} labs and {dim} values in 32-bit words"
                ),
            ));
        }
        Ok(DdgEncoding {
            len,
            rotation: Rotation::new(dim, rotation_seed),
            gamma,
            grid_variance: grid_variance as u64,
            l2_clip: spec.l2_clip,
            honest_floor: honest_floor.max(1),
            colluders,
        })
    }

    /// Values rotated (the upload padded to a power of two).
    pub fn dim(&self) -> usize {
        self.rotation.dim()
    }

    /// Words per masked vector.
    pub fn vector_len(&self) -> usize {
        self.dim() + 1
    }

    pub fn gamma(&self) -> f64 {
        self.gamma
    }

    /// Each lab's noise standard deviation in the update's units (√v·γ).
    pub fn local_stddev(&self) -> f64 {
        (self.grid_variance as f64).sqrt() * self.gamma
    }

    /// The mechanism the center runs when it unmasks a sum whose noise `honest` labs
    /// contributed beyond any coalition's reach (for the accountant).
    pub fn mechanism(&self, honest: usize) -> DistributedDiscreteGaussian {
        DistributedDiscreteGaussian {
            gamma: self.gamma,
            local_stddev: self.local_stddev(),
            num_clients: honest.max(1),
            l2_sensitivity: self.l2_clip,
            beta: ROUNDING_BETA,
            dim: self.dim() as u64,
        }
    }

    /// How the sums of this encoding are accounted: the mechanism once the labs summed
    /// are known ([`SumAccounting::for_summed`]).
    pub fn accounting(&self) -> SumAccounting {
        SumAccounting {
            template: self.mechanism(1),
            colluders: self.colluders,
        }
    }

    /// The mechanism of the smallest sum the protocol lets the center unmask (the
    /// threshold less the colluders): what a lab's budget is checked against.
    pub fn worst_case(&self) -> DistributedDiscreteGaussian {
        self.mechanism(self.honest_floor)
    }

    /// Encodes `delta` (finite, `len` values) with rounding and noise drawn from `seed`.
    /// `clipped` is 1 when the update was scaled down to the L2 clip, else 0.
    pub fn encode(&self, delta: &[f32], seed: [u8; 32]) -> Result<EncodedUpdate, DdgError> {
        if delta.len() != self.len {
            return Err(UpdateError::Length {
                got: delta.len(),
                expected: self.len,
                layout: "secure-aggregation upload".into(),
            }
            .into());
        }
        check_finite(delta)?;
        let norm = delta
            .iter()
            .map(|&v| f64::from(v) * f64::from(v))
            .sum::<f64>()
            .sqrt();
        let scale = if norm > self.l2_clip {
            self.l2_clip / norm
        } else {
            1.0
        };
        let clipped: Vec<f64> = delta.iter().map(|&v| f64::from(v) * scale).collect();
        let grid: Vec<f64> = self
            .rotation
            .forward(&clipped)
            .into_iter()
            .map(|v| v / self.gamma)
            .collect();
        let mut rng = ChaCha20Rng::from_seed(seed);
        let bound = self.mechanism(1).rounded_l2_bound_on_grid();
        let mut rounded = vec![0i64; grid.len()];
        let mut accepted = false;
        for _ in 0..MAX_ROUNDINGS {
            let mut squared = 0.0;
            for (out, &v) in rounded.iter_mut().zip(&grid) {
                let floor = v.floor();
                let up = rng.random::<f64>() < v - floor;
                *out = floor as i64 + i64::from(up);
                squared += (*out as f64) * (*out as f64);
            }
            if squared.sqrt() <= bound {
                accepted = true;
                break;
            }
        }
        if !accepted {
            return Err(DdgError::Rounding(MAX_ROUNDINGS));
        }
        let mut words = Vec::with_capacity(self.vector_len());
        for v in rounded {
            let noised = v + discrete_gaussian(self.grid_variance, 1, &mut rng)?;
            // Two's complement: the integer modulo 2^32.
            words.push(noised as u32);
        }
        words.push(1);
        Ok(EncodedUpdate {
            words,
            clipped: usize::from(scale < 1.0),
            weight: 1,
            l2_norm: Some(norm),
        })
    }

    /// Decodes the unmasked sum of `summands` encoded updates into their mean.
    pub fn decode_sum(&self, sum: &[u32], summands: usize) -> Result<DecodedSum, DecodeError> {
        if sum.len() != self.vector_len() {
            return Err(DecodeError::Length {
                got: sum.len(),
                expected: self.vector_len(),
            });
        }
        let count = u64::from(sum[self.dim()]);
        if count == 0 {
            return Err(DecodeError::ZeroWeight);
        }
        if count != summands as u64 {
            return Err(DecodeError::Weight {
                got: count,
                summands,
                max: summands as u64,
            });
        }
        let centred: Vec<f64> = sum[..self.dim()]
            .iter()
            .map(|&w| f64::from(w as i32) * self.gamma)
            .collect();
        let n = summands as f64;
        let mean_update = self.rotation.inverse(&centred)[..self.len]
            .iter()
            .map(|v| v / n)
            .collect();
        Ok(DecodedSum {
            mean_update,
            total_weight: count,
            // Each lab's rounding moves a rotated coordinate by less than γ; rotated back,
            // a value by less than √d·γ; the mean of n such errors by as much.
            error_bound: (self.dim() as f64).sqrt() * self.gamma,
            noise_stddev: (n * self.grid_variance as f64).sqrt() * self.gamma / n,
        })
    }
}

impl DistributedDiscreteGaussian {
    /// The norm bound of a rounded update, on the grid (what conditional rounding keeps).
    fn rounded_l2_bound_on_grid(&self) -> f64 {
        super::ddg::rounded_l2_bound(self.l2_sensitivity / self.gamma, self.beta, self.dim)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::privacy::spec::PrivacyMode;
    use rand::Rng;

    fn spec(noise: f64, clip: f64) -> PrivacySpec {
        PrivacySpec {
            mode: PrivacyMode::Distributed,
            noise_multiplier: noise,
            l2_clip: clip,
            delta: 1e-5,
            record: None,
        }
    }

    fn add(sum: &mut [u32], words: &[u32]) {
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(*w);
        }
    }

    #[test]
    fn the_sum_decodes_to_the_mean_of_the_clipped_updates_plus_the_stated_noise() {
        let len = 3000;
        let enc = DdgEncoding::new(&spec(1.0, 0.5), len, 2, 0, 6, rotation_seed("ab", 1)).unwrap();
        assert_eq!(enc.dim(), 4096);
        let mut rng = ChaCha20Rng::seed_from_u64(3);
        let mut sum = vec![0u32; enc.vector_len()];
        let mut truth = vec![0f64; len];
        for lab in 0..5u8 {
            // One update far over the clip, the others under it.
            let size = if lab == 0 { 1.0 } else { 0.005 };
            let delta: Vec<f32> = (0..len).map(|_| rng.random_range(-size..size)).collect();
            let norm = delta
                .iter()
                .map(|v| (*v as f64).powi(2))
                .sum::<f64>()
                .sqrt();
            let scale = (0.5 / norm).min(1.0);
            let e = enc.encode(&delta, [lab; 32]).unwrap();
            assert_eq!(e.clipped, usize::from(lab == 0));
            add(&mut sum, &e.words);
            for (t, d) in truth.iter_mut().zip(&delta) {
                *t += *d as f64 * scale / 5.0;
            }
        }
        let decoded = enc.decode_sum(&sum, 5).unwrap();
        assert_eq!(decoded.total_weight, 5);
        // σ = 1·0.5/√2 per lab; the mean's noise √5·σ/5.
        let expected = (5.0f64).sqrt() * (0.5 / 2f64.sqrt()) / 5.0;
        assert!((decoded.noise_stddev - expected).abs() < 1e-6 * expected);
        let errors: Vec<f64> = decoded
            .mean_update
            .iter()
            .zip(&truth)
            .map(|(m, t)| m - t)
            .collect();
        let mean = errors.iter().sum::<f64>() / len as f64;
        let sd = (errors.iter().map(|e| e * e).sum::<f64>() / len as f64).sqrt();
        assert!(
            mean.abs() < 5.0 * expected / (len as f64).sqrt(),
            "bias {mean}"
        );
        assert!((sd / expected - 1.0).abs() < 0.08, "sd {sd} vs {expected}");
        assert!(decoded.error_bound < 1e-4 * expected);
    }

    #[test]
    fn the_same_seed_gives_the_same_words_and_wrong_counts_are_refused() {
        let enc = DdgEncoding::new(&spec(0.8, 1.0), 10, 3, 0, 4, [1; 32]).unwrap();
        let delta = [0.1f32; 10];
        assert_eq!(
            enc.encode(&delta, [5; 32]).unwrap(),
            enc.encode(&delta, [5; 32]).unwrap()
        );
        assert_ne!(
            enc.encode(&delta, [5; 32]).unwrap().words,
            enc.encode(&delta, [6; 32]).unwrap().words
        );
        assert!(enc.encode(&[0.0; 9], [0; 32]).is_err());
        assert!(enc.encode(&[f32::NAN; 10], [0; 32]).is_err());
        let words = enc.encode(&delta, [5; 32]).unwrap().words;
        assert!(matches!(
            enc.decode_sum(&words, 2),
            Err(DecodeError::Weight { got: 1, .. })
        ));
        assert!(matches!(
            enc.decode_sum(&words[1..], 1),
            Err(DecodeError::Length { .. })
        ));
    }

    #[test]
    fn the_largest_sum_stays_inside_the_modulus() {
        // Six identical updates at the clip, concentrated in one value.
        let enc = DdgEncoding::new(&spec(0.5, 1.0), 64, 2, 0, 6, [2; 32]).unwrap();
        let mut delta = vec![0f32; 64];
        delta[0] = 1.0;
        let mut sum = vec![0u32; enc.vector_len()];
        for lab in 0..6u8 {
            add(&mut sum, &enc.encode(&delta, [lab; 32]).unwrap().words);
        }
        let decoded = enc.decode_sum(&sum, 6).unwrap();
        assert!(
            (decoded.mean_update[0] - 1.0).abs() < 6.0 * decoded.noise_stddev,
            "{} (noise {})",
            decoded.mean_update[0],
            decoded.noise_stddev
        );
    }
}
