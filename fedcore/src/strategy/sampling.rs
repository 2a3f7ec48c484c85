//! Participant sampling per round: which of the eligible labs a round asks to train.
//!
//! Cross-silo federations often ask everyone; cross-device style runs (FlowerTune: 10–20% of
//! clients a round) sample. The sample is a pure function of `(seed, round, eligible)`, so
//! the aggregator can recompute and audit it, and a restarted aggregator draws the same
//! cohort. Sample weighting needs nothing extra: each participant's weight `n_i` travels
//! inside its masked vector, and the server divides the two sums (`Σ n_i x_i / Σ n_i` over the
//! sampled survivors), the usual FedAvg estimator under uniform sampling without
//! replacement.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::ConfigError;

/// `[strategy.sampling]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SamplingSpec {
    /// Fraction of the eligible participants asked per round, in (0, 1] (default 1: all).
    pub fraction: f64,
    /// Fewest participants sampled per round when that many are eligible (default 1).
    pub min_participants: usize,
    /// Seed of the draw (default 0).
    pub seed: u64,
}

impl Default for SamplingSpec {
    fn default() -> Self {
        SamplingSpec {
            fraction: 1.0,
            min_participants: 1,
            seed: 0,
        }
    }
}

impl SamplingSpec {
    /// Checks the numbers; errors name `strategy.sampling.<field>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !(self.fraction.is_finite() && self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(ConfigError::field(
                "strategy.sampling.fraction",
                format!("must be in (0, 1], got {}", self.fraction),
            ));
        }
        if self.min_participants == 0 {
            return Err(ConfigError::field(
                "strategy.sampling.min_participants",
                "must be at least 1",
            ));
        }
        Ok(())
    }

    /// How many of `eligible` participants a round samples: `⌈fraction · n⌉`, at least
    /// `min_participants`, at most `n`.
    pub fn cohort_size(&self, eligible: usize) -> usize {
        let by_fraction = (self.fraction * eligible as f64).ceil() as usize;
        by_fraction.max(self.min_participants).min(eligible)
    }

    /// This round's cohort of the distinct `eligible` names: see [`sample_participants`].
    pub fn sample(&self, round: u64, eligible: &[String]) -> Vec<String> {
        let distinct: std::collections::BTreeSet<&String> = eligible.iter().collect();
        sample_participants(self.seed, round, eligible, self.cohort_size(distinct.len()))
    }
}

/// `count` distinct participants drawn uniformly from `eligible`, as a pure function of
/// `(seed, round, the set of eligible names)`: the input order and duplicates do not matter,
/// and the result is sorted. A partial Fisher–Yates shuffle over the sorted names, driven by
/// ChaCha8 seeded with SHA-256 over a domain tag, the seed and the round.
pub fn sample_participants(
    seed: u64,
    round: u64,
    eligible: &[String],
    count: usize,
) -> Vec<String> {
    let mut names: Vec<String> = eligible.to_vec();
    names.sort();
    names.dedup();
    let count = count.min(names.len());
    let mut h = Sha256::new();
    h.update(b"mekong/sampling/v1");
    h.update(seed.to_le_bytes());
    h.update(round.to_le_bytes());
    let mut rng = ChaCha8Rng::from_seed(h.finalize().into());
    for i in 0..count {
        let j = rng.random_range(i..names.len());
        names.swap(i, j);
    }
    names.truncate(count);
    names.sort();
    names
}
