//! The plan's secure-aggregation section, and how a participant's update becomes the vector
//! it masks.
//!
//! # The masked vector
//!
//! For an upload of `L` values (the B matrices under FFA-LoRA) a participant with sample
//! count `n` and update `Δ = B_local − B_global` sends `L + 1` words:
//! - words `0..L`: `quantise(w · Δ)` with `w = min(n, weight_cap) / weight_cap`, clipped to
//!   `[-clip, clip]` and stochastically rounded onto `2^bits` levels
//!   ([`crate::secagg::quantize`]);
//! - word `L`: `min(n, weight_cap)` as a plain integer.
//!
//! The server unmasks only the sum. Word `L` of the sum is `Σ ñ_i` exactly, so the next
//! global B is `B_global + weight_cap · dequantise(Σ_i words_i[0..L]) / Σ ñ_i`: the
//! sample-weighted mean of the updates, within the quantisation bound. Capping `n` bounds
//! any one lab's influence and keeps `Σ ñ_i` from wrapping.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::secagg::crypto::SessionContext;
use crate::secagg::graph::Graph;
use crate::secagg::protocol::{Neighbourhood, RoundConfig};
use crate::secagg::quantize::Quantizer;
use crate::update::{UpdateError, check_finite};

/// How updates are combined. Secure aggregation is the default; turning it off is an explicit
/// choice the aggregator logs loudly.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SecureAggregationSpec {
    /// Mask every update so the aggregator learns only the sum (default `true`). With
    /// `false` updates travel in plaintext and the aggregator sees each one.
    pub enabled: bool,
    /// Shares needed to unmask, and fewest survivors of every stage. Default: a strict
    /// majority of the roster. Must be a strict majority (see `fedcore::secagg::protocol`).
    pub threshold: Option<usize>,
    /// Updates are clipped to `[-clip, clip]` per value before quantisation.
    pub clip: f32,
    /// Quantisation levels are `2^bits`; `roster × (2^bits − 1)` must stay below `2^32`.
    pub bits: u32,
    /// Sample counts above this are capped: a lab's weight is `min(n, weight_cap)`.
    pub weight_cap: u64,
    /// How long each protocol stage after training waits before the silent are dropped.
    pub stage_timeout_ms: u64,
    /// SecAgg+ (Bell et al. 2020): each lab shares keys and masks with only this many
    /// neighbours of a pseudo-random regular graph drawn per round, instead of with every
    /// other lab. For hundreds of labs; unset (the default) means the complete graph.
    pub neighbourhood_degree: Option<usize>,
}

impl Default for SecureAggregationSpec {
    fn default() -> Self {
        SecureAggregationSpec {
            enabled: true,
            threshold: None,
            clip: 1.0,
            bits: 24,
            weight_cap: 1 << 20,
            stage_timeout_ms: 60_000,
            neighbourhood_degree: None,
        }
    }
}

impl SecureAggregationSpec {
    /// The graph for a roster of `members` labs.
    pub fn neighbourhood(&self, members: usize) -> Neighbourhood {
        match self.neighbourhood_degree {
            Some(degree) if degree + 1 < members => Neighbourhood::Harary { degree },
            _ => Neighbourhood::Complete,
        }
    }

    /// Labs in one neighbourhood (a lab and its neighbours).
    fn neighbourhood_size(&self, members: usize) -> usize {
        match self.neighbourhood(members) {
            Neighbourhood::Harary { degree } => degree + 1,
            Neighbourhood::Complete => members,
        }
    }

    /// The threshold for a roster of `members` labs: by default a strict majority of a
    /// neighbourhood.
    pub fn threshold_for(&self, members: usize) -> usize {
        self.threshold
            .unwrap_or(self.neighbourhood_size(members) / 2 + 1)
    }

    /// Checks the section against the roster size; errors name the field.
    pub fn validate(&self, members: usize) -> Result<(), ConfigError> {
        if !self.enabled {
            return Ok(());
        }
        if members < crate::secagg::protocol::MIN_PEERS_FLOOR {
            return Err(ConfigError::field(
                "roster",
                format!(
                    "secure aggregation needs at least 3 labs with identity keys, the roster lists {members}; add [[plan.roster]] entries (keys from `fedclient keygen`) or set secure_aggregation.enabled = false"
                ),
            ));
        }
        let size = self.neighbourhood_size(members);
        if let Neighbourhood::Harary { degree } = self.neighbourhood(members) {
            let roster: Vec<u32> = (1..=members as u32).collect();
            let probe = SessionContext {
                session: [0; 32],
                round: 0,
            };
            Graph::new(Neighbourhood::Harary { degree }, &probe, &roster).map_err(|e| {
                ConfigError::field("secure_aggregation.neighbourhood_degree", e.to_string())
            })?;
            if degree < 2 {
                return Err(ConfigError::field(
                    "secure_aggregation.neighbourhood_degree",
                    format!("{degree} is too small; a neighbourhood needs at least 2 neighbours"),
                ));
            }
        }
        let t = self.threshold_for(members);
        if 2 * t <= size || t > size {
            let what = if size == members {
                format!("the {members} labs")
            } else {
                format!("a neighbourhood of {size} labs")
            };
            return Err(ConfigError::field(
                "secure_aggregation.threshold",
                format!(
                    "{t} must be a strict majority of {what} (between {} and {size})",
                    size / 2 + 1
                ),
            ));
        }
        let q = Quantizer::new(self.clip, self.bits).map_err(|e| {
            let field = if matches!(e, crate::secagg::quantize::QuantError::Clip(_)) {
                "secure_aggregation.clip"
            } else {
                "secure_aggregation.bits"
            };
            ConfigError::field(field, e.to_string())
        })?;
        q.check_summands(members as u64)
            .map_err(|e| ConfigError::field("secure_aggregation.bits", e.to_string()))?;
        if self.weight_cap == 0
            || (members as u64).saturating_mul(self.weight_cap) > u32::MAX as u64
        {
            return Err(ConfigError::field(
                "secure_aggregation.weight_cap",
                format!(
                    "{} must be at least 1 and {members} × weight_cap must not exceed 2^32 − 1",
                    self.weight_cap
                ),
            ));
        }
        if self.stage_timeout_ms == 0 {
            return Err(ConfigError::field(
                "secure_aggregation.stage_timeout_ms",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// The protocol parameters of attempt `attempt` of round `round`, for a roster of
    /// `members` labs, uploads of `upload_len` values, and a participant's own floor
    /// `min_peers`. Both sides derive it the same way; the participant from the plan it
    /// pinned, so a server cannot lower the threshold.
    #[allow(clippy::too_many_arguments)]
    pub fn round_config(
        &self,
        members: usize,
        session: [u8; 32],
        round: u64,
        attempt: u32,
        global_hash: &str,
        upload_len: usize,
        min_peers: usize,
    ) -> RoundConfig {
        RoundConfig {
            context: SessionContext {
                session,
                round: context_round(round, attempt),
            },
            threshold: self.threshold_for(members),
            min_peers,
            neighbourhood: self.neighbourhood(members),
            vector_len: upload_len + 1,
            model_hash: model_hash_bytes(global_hash),
        }
    }

    /// The update codec for uploads of `len` values. Call on a validated spec.
    pub fn encoding(&self, len: usize) -> Result<WeightedEncoding, ConfigError> {
        let quantizer = Quantizer::new(self.clip, self.bits)
            .map_err(|e| ConfigError::field("secure_aggregation", e.to_string()))?;
        Ok(WeightedEncoding {
            quantizer,
            weight_cap: self.weight_cap,
            len,
        })
    }
}

/// Attempts per round are numbered below 2^16.
pub const MAX_ATTEMPTS: u32 = 1 << 16;

/// The protocol's round number for attempt `attempt` of federation round `round`:
/// `round · 2^16 + attempt`, so no two attempts ever share derived keys or signatures.
pub fn context_round(round: u64, attempt: u32) -> u64 {
    (round << 16) | u64::from(attempt % MAX_ATTEMPTS)
}

/// The 32 bytes of a global adapter's hex content hash, as signed in the consistency check.
pub fn model_hash_bytes(global_hash: &str) -> [u8; 32] {
    match hex::decode(global_hash)
        .ok()
        .and_then(|b| b.try_into().ok())
    {
        Some(bytes) => bytes,
        None => {
            use sha2::{Digest, Sha256};
            Sha256::digest(global_hash.as_bytes()).into()
        }
    }
}

/// A participant's update as the words it masks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodedUpdate {
    pub words: Vec<u32>,
    /// Values clipped to `[-clip, clip]`; worth a warning when not zero.
    pub clipped: usize,
    /// The capped sample weight carried in the last word.
    pub weight: u64,
}

/// The sum of the survivors' updates, decoded.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedSum {
    /// The sample-weighted mean update, `Σ ñ_i Δ_i / Σ ñ_i`, within [`Self::error_bound`].
    pub mean_update: Vec<f64>,
    /// `Σ ñ_i`, exact.
    pub total_weight: u64,
    /// Largest per-value error of `mean_update` due to quantisation.
    pub error_bound: f64,
}

/// Why a secure sum could not be decoded.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum DecodeError {
    #[error("the unmasked sum has {got} words, expected {expected}")]
    Length { got: usize, expected: usize },
    #[error("the unmasked sum carries a total sample weight of 0: the masks did not cancel")]
    ZeroWeight,
    #[error(
        "the unmasked total sample weight {got} exceeds what {summands} labs can send ({max}): the masks did not cancel"
    )]
    Weight { got: u64, summands: usize, max: u64 },
}

/// The codec between float updates and masked words (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightedEncoding {
    quantizer: Quantizer,
    weight_cap: u64,
    len: usize,
}

impl WeightedEncoding {
    /// Words per masked vector: the update and the weight.
    pub fn vector_len(&self) -> usize {
        self.len + 1
    }

    /// Encodes an update `delta` (finite, `len` values) trained on `num_samples` samples,
    /// with stochastic rounding drawn from `seed`.
    pub fn encode(
        &self,
        delta: &[f32],
        num_samples: u64,
        seed: [u8; 32],
    ) -> Result<EncodedUpdate, UpdateError> {
        if delta.len() != self.len {
            return Err(UpdateError::Length {
                got: delta.len(),
                expected: self.len,
                layout: "secure-aggregation upload".into(),
            });
        }
        check_finite(delta)?;
        let weight = num_samples.clamp(1, self.weight_cap);
        let w = weight as f64 / self.weight_cap as f64;
        let scaled: Vec<f32> = delta.iter().map(|d| (*d as f64 * w) as f32).collect();
        let q = self.quantizer.quantize(&scaled, seed);
        let mut words = q.words;
        words.push(weight as u32);
        Ok(EncodedUpdate {
            words,
            clipped: q.clipped,
            weight,
        })
    }

    /// Decodes the unmasked sum of `summands` encoded updates.
    pub fn decode_sum(&self, sum: &[u32], summands: usize) -> Result<DecodedSum, DecodeError> {
        if sum.len() != self.vector_len() {
            return Err(DecodeError::Length {
                got: sum.len(),
                expected: self.vector_len(),
            });
        }
        let total_weight = u64::from(sum[self.len]);
        let max = summands as u64 * self.weight_cap;
        if total_weight == 0 {
            return Err(DecodeError::ZeroWeight);
        }
        if total_weight > max {
            return Err(DecodeError::Weight {
                got: total_weight,
                summands,
                max,
            });
        }
        let factor = self.weight_cap as f64 / total_weight as f64;
        let mean_update = self
            .quantizer
            .dequantize_sum(&sum[..self.len], summands as u64)
            .into_iter()
            .map(|v| v * factor)
            .collect();
        Ok(DecodedSum {
            mean_update,
            total_weight,
            error_bound: self.quantizer.error_bound(summands as u64) * factor,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn default_spec_needs_a_roster_and_a_majority() {
        let spec = SecureAggregationSpec::default();
        assert!(spec.validate(2).unwrap_err().to_string().contains("roster"));
        spec.validate(3).unwrap();
        assert_eq!(spec.threshold_for(6), 4);
        let half = SecureAggregationSpec {
            threshold: Some(3),
            ..spec.clone()
        };
        let err = half.validate(6).unwrap_err().to_string();
        assert!(err.contains("secure_aggregation.threshold"), "{err}");
        let wide = SecureAggregationSpec {
            bits: 31,
            ..spec.clone()
        };
        let err = wide.validate(6).unwrap_err().to_string();
        assert!(
            err.contains("secure_aggregation.bits") && err.contains("wrap"),
            "{err}"
        );
        let heavy = SecureAggregationSpec {
            weight_cap: u32::MAX as u64,
            ..spec
        };
        assert!(
            heavy
                .validate(6)
                .unwrap_err()
                .to_string()
                .contains("weight_cap")
        );
        let off = SecureAggregationSpec {
            enabled: false,
            ..Default::default()
        };
        off.validate(0).unwrap();
    }

    #[test]
    fn sparse_neighbourhoods_are_checked_at_configuration() {
        let spec = SecureAggregationSpec {
            neighbourhood_degree: Some(6),
            ..Default::default()
        };
        spec.validate(40).unwrap();
        assert_eq!(spec.threshold_for(40), 4);
        assert_eq!(spec.neighbourhood(40), Neighbourhood::Harary { degree: 6 });
        // A degree covering everyone is the complete graph.
        assert_eq!(spec.neighbourhood(7), Neighbourhood::Complete);
        assert_eq!(spec.threshold_for(7), 4);
        let odd = SecureAggregationSpec {
            neighbourhood_degree: Some(5),
            ..Default::default()
        };
        let err = odd.validate(41).unwrap_err().to_string();
        assert!(err.contains("neighbourhood_degree"), "{err}");
        let loose = SecureAggregationSpec {
            threshold: Some(3),
            ..spec
        };
        let err = loose.validate(40).unwrap_err().to_string();
        assert!(err.contains("a neighbourhood of 7 labs"), "{err}");
    }

    #[test]
    fn decoded_sum_is_the_weighted_mean_within_the_bound() {
        let spec = SecureAggregationSpec::default();
        let enc = spec.encoding(200).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let weights = [1_000u64, 50_000, 3 << 20, 7];
        let mut sum = vec![0u32; enc.vector_len()];
        let mut num = vec![0f64; 200];
        let mut den = 0f64;
        for (i, &n) in weights.iter().enumerate() {
            let delta: Vec<f32> = (0..200).map(|_| rng.random_range(-0.5f32..0.5)).collect();
            let e = enc.encode(&delta, n, [i as u8; 32]).unwrap();
            assert_eq!(e.clipped, 0);
            let capped = n.min(spec.weight_cap) as f64;
            for (a, d) in num.iter_mut().zip(&delta) {
                *a += capped * *d as f64;
            }
            den += capped;
            for (s, w) in sum.iter_mut().zip(&e.words) {
                *s = s.wrapping_add(*w);
            }
        }
        let d = enc.decode_sum(&sum, weights.len()).unwrap();
        assert_eq!(d.total_weight as f64, den);
        assert!(d.error_bound < 1e-4, "{}", d.error_bound);
        for (m, n) in d.mean_update.iter().zip(&num) {
            assert!((m - n / den).abs() <= d.error_bound, "{m} vs {}", n / den);
        }
    }

    #[test]
    fn bad_updates_and_garbled_sums_are_refused() {
        let enc = SecureAggregationSpec::default().encoding(3).unwrap();
        assert!(enc.encode(&[0.0; 2], 1, [0; 32]).is_err());
        let err = enc.encode(&[0.0, f32::NAN, 0.0], 1, [0; 32]).unwrap_err();
        assert!(err.to_string().contains("NaN"), "{err}");
        assert_eq!(enc.decode_sum(&[0; 4], 2), Err(DecodeError::ZeroWeight));
        assert!(matches!(
            enc.decode_sum(&[0, 0, 0, u32::MAX], 2),
            Err(DecodeError::Weight { .. })
        ));
    }
}
