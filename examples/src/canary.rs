//! A memorisation test (Carlini et al. 2019, "The Secret Sharer"): a canary sentence with a
//! random secret is planted, repeated, in one lab's training text; after the federation its
//! **exposure** under a model is how far the planted secret ranks above random secrets of
//! the same form, in bits: `log₂(candidates + 1) − log₂(rank)`, where rank 1 is the least
//! surprising sequence. About 1 bit means chance (the model knows nothing of the secret);
//! the maximum, `log₂(candidates + 1)`, means the model ranks the planted secret first.
//!
//! What it measures in a federation: whether the models others receive (the global adapter,
//! another lab's model) leak one lab's rare sequence, with and without differential privacy.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use fedclient::data::{LocalCorpus, TextTokenizer};
use fedclient::eval::sequence_nll;
use fedclient::model::LoraLlama;

/// Digits in a secret.
const SECRET_DIGITS: usize = 6;

/// The canary: which lab holds it, how often, and the secret.
#[derive(Debug, Clone, PartialEq)]
pub struct Canary {
    /// The lab whose training text holds the canary.
    pub lab: String,
    pub repeats: usize,
    /// The secret (six digits, drawn from the seed).
    pub secret: String,
    seed: u64,
}

/// Where a sequence ranks among candidates of its form.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Exposure {
    /// 1 for the least surprising of all.
    pub rank: usize,
    /// Random secrets the canary was ranked against.
    pub candidates: usize,
    /// `log₂(candidates + 1) − log₂(rank)`.
    pub bits: f64,
}

impl Canary {
    /// A canary for `lab`, repeated `repeats` times, its secret drawn from `seed`.
    pub fn new(lab: &str, repeats: usize, seed: u64) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Canary {
            lab: lab.to_string(),
            repeats,
            secret: digits(&mut rng),
            seed,
        }
    }

    /// The sentence with `secret` in it.
    pub fn sentence(secret: &str) -> String {
        format!("The access code of the registry is {secret}.")
    }

    /// Appends the canary sentence `repeats` times to `corpus`'s training tokens (never to
    /// its held-out text), one line each.
    pub fn plant(&self, corpus: &mut LocalCorpus, tokenizer: &dyn TextTokenizer) {
        let line = format!("{}\n", Self::sentence(&self.secret));
        let tokens = tokenizer.encode(&line);
        for _ in 0..self.repeats {
            corpus.train.extend_from_slice(&tokens);
        }
    }

    /// `n` random secrets other than the canary's (drawn from the seed, so every model is
    /// ranked against the same ones).
    pub fn candidates(&self, n: usize) -> Vec<String> {
        let mut rng = ChaCha8Rng::seed_from_u64(self.seed ^ 0x5eed_cafe);
        let mut out = Vec::with_capacity(n);
        while out.len() < n {
            let s = digits(&mut rng);
            if s != self.secret && !out.contains(&s) {
                out.push(s);
            }
        }
        out
    }

    /// The canary's exposure under `model` against `n` random candidates.
    pub fn exposure(
        &self,
        model: &LoraLlama,
        tokenizer: &dyn TextTokenizer,
        n: usize,
        device: &burn::prelude::Device,
    ) -> anyhow::Result<Exposure> {
        let mut sequences = vec![tokenizer.encode(&Self::sentence(&self.secret))];
        sequences.extend(
            self.candidates(n)
                .iter()
                .map(|s| tokenizer.encode(&Self::sentence(s))),
        );
        // Secrets of one form can tokenize to different lengths (a subword tokenizer):
        // rank only against candidates as long as the canary.
        let len = sequences[0].len();
        sequences.retain(|s| s.len() == len);
        let scores = sequence_nll(model, &sequences, device)?;
        Ok(rank(&scores))
    }
}

/// The exposure of `scores[0]` among all of `scores` (lower is less surprising).
pub fn rank(scores: &[f64]) -> Exposure {
    let canary = scores[0];
    let rank = 1 + scores[1..].iter().filter(|&&s| s < canary).count();
    let candidates = scores.len() - 1;
    Exposure {
        rank,
        candidates,
        bits: ((candidates + 1) as f64).log2() - (rank as f64).log2(),
    }
}

fn digits<R: Rng>(rng: &mut R) -> String {
    (0..SECRET_DIGITS)
        .map(|_| char::from(b'0' + rng.random_range(0..10u8)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposure_is_rank_in_bits() {
        let first = rank(&[1.0, 2.0, 3.0, 4.0]);
        assert_eq!((first.rank, first.candidates), (1, 3));
        assert!((first.bits - 2.0).abs() < 1e-12);
        let last = rank(&[5.0, 2.0, 3.0, 4.0]);
        assert_eq!(last.rank, 4);
        assert!(last.bits.abs() < 1e-12);
    }

    #[test]
    fn candidates_are_distinct_and_exclude_the_secret() {
        let c = Canary::new("lab-lo", 10, 7);
        assert_eq!(c.secret.len(), 6);
        let cands = c.candidates(500);
        assert_eq!(cands.len(), 500);
        assert!(!cands.contains(&c.secret));
        let mut sorted = cands.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), 500);
        assert_eq!(cands, c.candidates(500), "the same candidates every time");
    }
}
