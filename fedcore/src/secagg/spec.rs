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
use crate::privacy::distributed::{DdgEncoding, DdgError};
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
    /// Shares needed to unmask, and fewest survivors of every stage. Default: the smallest
    /// threshold that is safe against `max_colluding` labs ([`Self::collusion_bound`]); an
    /// explicit value must be at least that and at most a neighbourhood's size.
    pub threshold: Option<usize>,
    /// How many member labs may collude with a cheating aggregator without it learning any
    /// single honest lab's update (default 1: a center working with one member lab is the
    /// realistic threat in a regional federation; 0 protects only against a center acting
    /// alone). The threshold follows from it: `t > (k + c) / 2` for a neighbourhood of `k`
    /// labs and `c` colluders, so that two disjoint groups of honest labs can never each
    /// be shown a different survivor list and both reach `t` signatures (Bonawitz et al.
    /// 2017, active security). Each lab checks the bound itself.
    pub max_colluding: usize,
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
            max_colluding: 1,
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

    /// The threshold for a roster of `members` labs: by default the smallest one safe
    /// against `max_colluding` colluders ([`Self::collusion_bound`]).
    pub fn threshold_for(&self, members: usize) -> usize {
        self.threshold
            .unwrap_or_else(|| self.collusion_bound(members))
    }

    /// The smallest safe threshold against `max_colluding` colluding labs: the least `t`
    /// with `2t > k + c'`, where `k` is a neighbourhood's size and `c' = min(c, k − 1)`
    /// the colluders that can sit in one lab's neighbourhood besides the lab itself.
    ///
    /// Why: in the consistency check every honest lab signs one survivor list per
    /// attempt, and reveals shares only for a list carrying `t` valid signatures. A
    /// center that shows one group a list where the target survived (to get shares of its
    /// self mask) and another a list where it dropped (to get shares of its mask key) needs
    /// `t` signatures on each; the colluders sign both, so it needs `2(t − c')` honest
    /// signers of `k − c'`, which `2t > k + c'` rules out. On the sparse graph this is the
    /// worst case of Bell et al. 2020 (every colluder in the target's neighbourhood), not
    /// their probabilistic bound: larger thresholds, but nothing left to chance.
    pub fn collusion_bound(&self, members: usize) -> usize {
        let k = self.neighbourhood_size(members);
        let c = self.max_colluding.min(k.saturating_sub(1));
        (k + c) / 2 + 1
    }

    /// How many labs of one neighbourhood may drop out of a secure round (in any stage)
    /// while it still unmasks: the neighbourhood's size minus the threshold.
    pub fn dropout_tolerance(&self, members: usize) -> usize {
        self.neighbourhood_size(members)
            .saturating_sub(self.threshold_for(members))
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
            Graph::new(Neighbourhood::Harary { degree }, &[0; 32], &roster).map_err(|e| {
                ConfigError::field("secure_aggregation.neighbourhood_degree", e.to_string())
            })?;
            if degree < 2 {
                return Err(ConfigError::field(
                    "secure_aggregation.neighbourhood_degree",
                    format!("{degree} is too small; a neighbourhood needs at least 2 neighbours"),
                ));
            }
        }
        let what = if size == members {
            format!("the {members} labs")
        } else {
            format!("a neighbourhood of {size} labs")
        };
        let bound = self.collusion_bound(members);
        if bound > size {
            return Err(ConfigError::field(
                "secure_aggregation.max_colluding",
                format!(
                    "{} colluding labs cannot be tolerated by {what}: the threshold would have to be {bound}, more than the {size} labs there are; lower max_colluding or add labs",
                    self.max_colluding
                ),
            ));
        }
        let t = self.threshold_for(members);
        if t < bound || t > size {
            return Err(ConfigError::field(
                "secure_aggregation.threshold",
                format!(
                    "{t} must be between {bound} and {size} for {what}: below {bound}, a cheating aggregator with {} colluding lab(s) could show two groups different survivor lists and unmask one lab's update (t > (labs + colluders) / 2)",
                    self.max_colluding
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
    /// `members` labs, masked vectors of `vector_len` words (the encoding's
    /// [`UpdateEncoding::vector_len`]), and a participant's own floor
    /// `min_peers`. Both sides derive it the same way; the participant from the plan it
    /// pinned, so a server cannot lower the threshold. The neighbourhood graph's seed comes
    /// from the plan's fingerprint and the round alone ([`graph_seed`]), never from the
    /// session or the attempt, which the server picks.
    #[allow(clippy::too_many_arguments)]
    pub fn round_config(
        &self,
        plan_fingerprint: &str,
        members: usize,
        session: [u8; 32],
        round: u64,
        attempt: u32,
        global_hash: &str,
        vector_len: usize,
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
            graph_seed: graph_seed(plan_fingerprint, round),
            vector_len,
            model_hash: model_hash_bytes(global_hash),
            groups: None,
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

/// Round numbers stay below 2^48, so that `round · 2^16 + attempt` never wraps.
pub const MAX_ROUND: u64 = (1 << 48) - 1;

/// The seed of round `round`'s neighbourhood graph: SHA-256 of a domain separator, the
/// plan's fingerprint (hex, as labs pin it) and the round (u64 little-endian).
///
/// Why these inputs: both are fixed before the round and neither is the server's free
/// choice. The plan is pinned by every lab; the round must strictly increase at each lab
/// and stay within the plan's rounds. The session and the attempt number, which the server
/// picks, are left out, so restarting attempts or sessions cannot "grind" a graph in which
/// its colluders surround a target: every attempt of a round has the same graph.
pub fn graph_seed(plan_fingerprint: &str, round: u64) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(b"mekong/secagg/v2/graph-seed");
    h.update((plan_fingerprint.len() as u64).to_le_bytes());
    h.update(plan_fingerprint.to_ascii_lowercase().as_bytes());
    h.update(round.to_le_bytes());
    h.finalize().into()
}

/// The protocol's round number for attempt `attempt` of federation round `round`:
/// `round · 2^16 + attempt`, so no two attempts ever share derived keys or signatures.
/// Callers keep `round <= MAX_ROUND` and `attempt < MAX_ATTEMPTS` (labs refuse anything
/// else, see [`check_round_numbers`]); debug builds assert it.
pub fn context_round(round: u64, attempt: u32) -> u64 {
    debug_assert!(round <= MAX_ROUND && attempt < MAX_ATTEMPTS);
    (round << 16) | u64::from(attempt % MAX_ATTEMPTS)
}

/// Why a round or attempt number sent by the server is refused.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum RoundNumberError {
    #[error("round {round} is outside the plan's rounds 1..={rounds}")]
    Round { round: u64, rounds: u64 },
    #[error("attempt {attempt} of round {round} is not below the limit of {MAX_ATTEMPTS} attempts")]
    Attempt { round: u64, attempt: u32 },
}

/// Checks that a round and attempt number can be signed without aliasing another pair:
/// the round within the plan's `rounds` (1-based, and never above [`MAX_ROUND`]), the
/// attempt below [`MAX_ATTEMPTS`].
pub fn check_round_numbers(round: u64, attempt: u32, rounds: u64) -> Result<(), RoundNumberError> {
    if round == 0 || round > rounds.min(MAX_ROUND) {
        return Err(RoundNumberError::Round { round, rounds });
    }
    if attempt >= MAX_ATTEMPTS {
        return Err(RoundNumberError::Attempt { round, attempt });
    }
    Ok(())
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
#[derive(Debug, Clone, PartialEq)]
pub struct EncodedUpdate {
    pub words: Vec<u32>,
    /// Values clipped to `[-clip, clip]`; worth a warning when not zero.
    pub clipped: usize,
    /// The capped sample weight carried in the last word.
    pub weight: u64,
    /// Under `[privacy]`: the update's L2 norm before it was scaled to the clip (whether
    /// the clip suits the model and data).
    pub l2_norm: Option<f64>,
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
    /// Standard deviation of the differential-privacy noise in each value of
    /// `mean_update` (0 without `[plan.privacy]`).
    pub noise_stddev: f64,
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
            l2_norm: None,
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
            noise_stddev: 0.0,
        })
    }
}

/// How an update becomes the words it masks: fixed-point and sample-weighted, or with
/// distributed differential-privacy noise (`[plan.privacy]`, unweighted: a lab's sample
/// count would be data the noise does not cover).
#[derive(Debug, Clone, PartialEq)]
pub enum UpdateEncoding {
    Weighted(WeightedEncoding),
    Private(Box<DdgEncoding>),
}

impl UpdateEncoding {
    /// Words per masked vector.
    pub fn vector_len(&self) -> usize {
        match self {
            UpdateEncoding::Weighted(e) => e.vector_len(),
            UpdateEncoding::Private(e) => e.vector_len(),
        }
    }

    /// Encodes an update `delta` trained on `num_samples` samples, with rounding (and
    /// noise) drawn from `seed`.
    pub fn encode(
        &self,
        delta: &[f32],
        num_samples: u64,
        seed: [u8; 32],
    ) -> Result<EncodedUpdate, DdgError> {
        match self {
            UpdateEncoding::Weighted(e) => Ok(e.encode(delta, num_samples, seed)?),
            UpdateEncoding::Private(e) => e.encode(delta, seed),
        }
    }

    /// Decodes the unmasked sum of `summands` encoded updates.
    pub fn decode_sum(&self, sum: &[u32], summands: usize) -> Result<DecodedSum, DecodeError> {
        match self {
            UpdateEncoding::Weighted(e) => e.decode_sum(sum, summands),
            UpdateEncoding::Private(e) => e.decode_sum(sum, summands),
        }
    }

    /// The differentially private codec, when the plan has one.
    pub fn private(&self) -> Option<&DdgEncoding> {
        match self {
            UpdateEncoding::Weighted(_) => None,
            UpdateEncoding::Private(e) => Some(e),
        }
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
        // One colluder (the default): 2t > 6 + 1.
        assert_eq!(spec.threshold_for(6), 4);
        assert_eq!(spec.threshold_for(5), 4);
        assert_eq!(spec.threshold_for(3), 3);
        assert_eq!(spec.dropout_tolerance(6), 2);
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
        // Neighbourhoods of 7, one colluder: 2t > 8.
        assert_eq!(spec.threshold_for(40), 5);
        assert_eq!(spec.neighbourhood(40), Neighbourhood::Harary { degree: 6 });
        // A degree covering everyone is the complete graph.
        assert_eq!(spec.neighbourhood(7), Neighbourhood::Complete);
        assert_eq!(spec.threshold_for(7), 5);
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
    fn thresholds_follow_the_colluders_tolerated() {
        for n in 3..40usize {
            for c in 0..n {
                let spec = SecureAggregationSpec {
                    max_colluding: c,
                    ..Default::default()
                };
                let t = spec.collusion_bound(n);
                let c_eff = c.min(n - 1);
                // The bound: 2t > n + c, and the least such t.
                assert!(
                    2 * t > n + c_eff && 2 * (t - 1) <= n + c_eff,
                    "n {n} c {c} t {t}"
                );
                match spec.validate(n) {
                    Ok(()) => assert!(t <= n),
                    Err(e) => {
                        assert!(t > n, "n {n} c {c}: {e}");
                        assert!(e.to_string().contains("max_colluding"), "{e}");
                    }
                }
            }
        }
        // No colluders: a strict majority, as before.
        let alone = SecureAggregationSpec {
            max_colluding: 0,
            ..Default::default()
        };
        assert_eq!(alone.threshold_for(5), 3);
        // An explicit threshold below the bound is refused, naming the reason.
        let low = SecureAggregationSpec {
            threshold: Some(3),
            ..Default::default()
        };
        let err = low.validate(5).unwrap_err().to_string();
        assert!(
            err.contains("between 4 and 5") && err.contains("colluding"),
            "{err}"
        );
    }

    #[test]
    fn the_graph_seed_ignores_what_the_server_picks() {
        let a = graph_seed("ab", 3);
        assert_eq!(a, graph_seed("AB", 3));
        assert_ne!(a, graph_seed("ab", 4));
        assert_ne!(a, graph_seed("ac", 3));
        let spec = SecureAggregationSpec::default();
        let c1 = spec.round_config("ab", 5, [1; 32], 3, 0, "00", 11, 3);
        let c2 = spec.round_config("ab", 5, [9; 32], 3, 700, "00", 11, 3);
        assert_eq!(c1.graph_seed, c2.graph_seed);
        assert_ne!(c1.context, c2.context);
    }

    #[test]
    fn round_and_attempt_numbers_are_bounded() {
        check_round_numbers(1, 0, 5).unwrap();
        check_round_numbers(5, MAX_ATTEMPTS - 1, 5).unwrap();
        assert!(check_round_numbers(0, 0, 5).is_err());
        assert!(check_round_numbers(6, 0, 5).is_err());
        assert!(check_round_numbers(1, MAX_ATTEMPTS, 5).is_err());
        assert!(check_round_numbers(MAX_ROUND + 1, 0, u64::MAX).is_err());
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
