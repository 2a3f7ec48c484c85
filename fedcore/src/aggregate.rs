//! FFA-LoRA with sample-weighted FedAvg.
//!
//! FFA-LoRA (Sun et al., ICLR 2024) freezes every A at a value all participants derive from a
//! shared seed and trains only B. The update `ΔW = (α/r)·B·A` is then linear in B, so the
//! weighted mean of the Bs gives exactly the weighted mean of the participants' updates —
//! unlike averaging A and B separately. Updates are folded into a running sum as they arrive:
//! memory is O(vector), never O(participants × vector).

use thiserror::Error;

use crate::adapter::LoraAdapter;
use crate::manifest::LayoutManifest;

/// Largest sample weight a participant may report: keeps `n · b` exact in f64
/// (24-bit mantissa of f32 + 29 bits ≤ 53).
pub const MAX_SAMPLE_WEIGHT: u64 = 1 << 29;

/// Why a contribution could not be folded or a mean not formed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum AggregateError {
    #[error("update has {got} values, the accumulator holds {expected}")]
    Length { got: usize, expected: usize },
    #[error("sample weight {0} is out of range (1..={MAX_SAMPLE_WEIGHT})")]
    Weight(u64),
    #[error("no updates were aggregated")]
    Empty,
}

/// Running `Σ n_i · x_i` and `Σ n_i`, in f64.
#[derive(Debug, Clone)]
pub struct WeightedSum {
    sum: Vec<f64>,
    total_weight: u64,
    count: usize,
}

impl WeightedSum {
    /// An empty accumulator for vectors of `len` values.
    pub fn new(len: usize) -> Self {
        WeightedSum {
            sum: vec![0.0; len],
            total_weight: 0,
            count: 0,
        }
    }

    /// Folds one participant's vector with its sample weight.
    pub fn add(&mut self, weight: u64, vector: &[f32]) -> Result<(), AggregateError> {
        if vector.len() != self.sum.len() {
            return Err(AggregateError::Length {
                got: vector.len(),
                expected: self.sum.len(),
            });
        }
        if weight == 0 || weight > MAX_SAMPLE_WEIGHT {
            return Err(AggregateError::Weight(weight));
        }
        let w = weight as f64;
        for (s, v) in self.sum.iter_mut().zip(vector) {
            *s += w * *v as f64;
        }
        self.total_weight += weight;
        self.count += 1;
        Ok(())
    }

    /// Number of vectors folded so far.
    pub fn count(&self) -> usize {
        self.count
    }

    /// `Σ n_i` so far.
    pub fn total_weight(&self) -> u64 {
        self.total_weight
    }

    /// `Σ n_i · x_i / Σ n_i` in f64, for callers that do more algebra before rounding
    /// (the aggregation strategies of [`crate::strategy`]).
    pub fn mean_f64(&self) -> Result<Vec<f64>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let total = self.total_weight as f64;
        Ok(self.sum.iter().map(|s| s / total).collect())
    }

    /// `Σ n_i · x_i / Σ n_i`, rounded once to f32.
    pub fn mean(&self) -> Result<Vec<f32>, AggregateError> {
        if self.count == 0 {
            return Err(AggregateError::Empty);
        }
        let total = self.total_weight as f64;
        Ok(self.sum.iter().map(|s| (s / total) as f32).collect())
    }
}

/// The next global adapter under FFA-LoRA: A unchanged, B replaced by the weighted mean of
/// the uploaded Bs (laid out by `upload_manifest`, the B-only manifest).
pub fn ffa_fedavg(
    global: &LoraAdapter,
    upload_manifest: &LayoutManifest,
    sum: &WeightedSum,
) -> Result<LoraAdapter, AggregateError> {
    let mean = sum.mean()?;
    let mut next = global.clone();
    next.unflatten(upload_manifest, &mean)
        .map_err(|_| AggregateError::Length {
            got: mean.len(),
            expected: upload_manifest.len(),
        })?;
    Ok(next)
}

/// The next global adapter under FFA-LoRA from a mean update: A unchanged,
/// `B ← B_global + mean_update` (laid out by `upload_manifest`), rounded once to f32.
pub fn ffa_apply_mean_update(
    global: &LoraAdapter,
    upload_manifest: &LayoutManifest,
    mean_update: &[f64],
) -> Result<LoraAdapter, AggregateError> {
    let length = AggregateError::Length {
        got: mean_update.len(),
        expected: upload_manifest.len(),
    };
    let current = global
        .flatten(upload_manifest)
        .map_err(|_| length.clone())?;
    if current.len() != mean_update.len() {
        return Err(length);
    }
    let next_b: Vec<f32> = current
        .iter()
        .zip(mean_update)
        .map(|(b, d)| (*b as f64 + d) as f32)
        .collect();
    let mut next = global.clone();
    next.unflatten(upload_manifest, &next_b)
        .map_err(|_| length)?;
    Ok(next)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{AdapterConfig, Matrix, ModuleShape, TargetModule};
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn global(rank: usize) -> LoraAdapter {
        let config = AdapterConfig {
            rank,
            alpha: 16.0,
            target_modules: vec![TargetModule::Q, TargetModule::Up],
            base_model: "t".into(),
            dropout: 0.0,
        };
        let shapes = vec![
            ModuleShape {
                name: "model.layers.0.self_attn.q_proj".into(),
                out_features: 24,
                in_features: 16,
            },
            ModuleShape {
                name: "model.layers.0.mlp.up_proj".into(),
                out_features: 40,
                in_features: 16,
            },
        ];
        LoraAdapter::init_ffa(config, &shapes, 99)
    }

    fn random_vec(rng: &mut ChaCha8Rng, len: usize, scale: f32) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-scale..scale)).collect()
    }

    #[test]
    fn mean_is_the_sample_weighted_mean() {
        let mut s = WeightedSum::new(3);
        s.add(1, &[1.0, 2.0, 3.0]).unwrap();
        s.add(3, &[5.0, 6.0, 7.0]).unwrap();
        assert_eq!(s.mean().unwrap(), vec![4.0, 5.0, 6.0]);
        assert_eq!(s.total_weight(), 4);
        assert_eq!(s.count(), 2);
    }

    #[test]
    fn bad_contributions_are_refused_and_leave_the_sum_intact() {
        let mut s = WeightedSum::new(2);
        s.add(2, &[1.0, 1.0]).unwrap();
        assert_eq!(
            s.add(1, &[1.0]),
            Err(AggregateError::Length {
                got: 1,
                expected: 2
            })
        );
        assert_eq!(s.add(0, &[1.0, 1.0]), Err(AggregateError::Weight(0)));
        assert_eq!(s.mean().unwrap(), vec![1.0, 1.0]);
        assert_eq!(WeightedSum::new(2).mean(), Err(AggregateError::Empty));
    }

    /// FFA exactness: base + (α/r)·B̄·A equals Σ p_i (base + (α/r)·B_i·A).
    #[test]
    fn ffa_global_update_equals_weighted_mean_of_updates() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for rank in [1, 4, 8] {
            let g = global(rank);
            let manifest = g.b_manifest();
            let weights = [120u64, 7, 3000, 55];
            let mut sum = WeightedSum::new(manifest.len());
            let mut locals = Vec::new();
            for w in weights {
                let b = random_vec(&mut rng, manifest.len(), 0.5);
                sum.add(w, &b).unwrap();
                let mut local = g.clone();
                local.unflatten(&manifest, &b).unwrap();
                locals.push((w, local));
            }
            let next = ffa_fedavg(&g, &manifest, &sum).unwrap();
            let total: u64 = weights.iter().sum();
            let scaling = g.config().scaling();
            for (name, m) in next.modules() {
                let rows = m.b.rows();
                let cols = m.a.cols();
                let base = Matrix::new(rows, cols, random_vec(&mut rng, rows * cols, 1.0)).unwrap();
                let global_w = add(&base, &m.delta(scaling).unwrap());
                let mut expected = vec![0.0f64; rows * cols];
                for (w, local) in &locals {
                    let lw = add(&base, &local.module(name).unwrap().delta(scaling).unwrap());
                    for (e, v) in expected.iter_mut().zip(lw.data()) {
                        *e += (*w as f64 / total as f64) * *v as f64;
                    }
                }
                let max_diff = global_w
                    .data()
                    .iter()
                    .zip(&expected)
                    .map(|(g, e)| (*g as f64 - e).abs())
                    .fold(0.0, f64::max);
                assert!(
                    max_diff < 1e-6,
                    "rank {rank} {name}: max |diff| = {max_diff}"
                );
                // A is untouched.
                assert_eq!(m.a, g.module(name).unwrap().a);
            }
        }
    }

    fn add(x: &Matrix, y: &Matrix) -> Matrix {
        let data = x.data().iter().zip(y.data()).map(|(a, b)| a + b).collect();
        Matrix::new(x.rows(), x.cols(), data).unwrap()
    }
}
