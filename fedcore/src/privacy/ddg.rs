//! The accountant of the distributed discrete Gaussian (Kairouz, Liu, Steinke 2021, "The
//! Distributed Discrete Gaussian Mechanism for Federated Learning with Secure Aggregation"):
//! each of n labs clips its update to L2 norm c, scales it by 1/γ onto the integer grid
//! (rotated and stochastically rounded), adds discrete Gaussian noise of standard deviation
//! σ/γ, and only the sum is unmasked. The sum of n discrete Gaussians is not exactly one, so
//! the RDP gains a term in τ (Theorem 1); rounding inflates the sensitivity (Theorem 1 of the
//! companion analysis); client sampling at rate q amplifies (Zhu and Wang 2019, Theorem 5).
//!
//! The formulas, at integer orders α (Proposition 14):
//! ε(α) = min(α·Δ₂²/2 + τ·d, α·(Δ₂² + 2·Δ₁·τ + τ²·d)/2, α·(Δ₂ + √d·τ)²/2), with
//! Δ₂ = c̃/(√n·σ), Δ₁ = c̃₁/(√n·σ) the scaled sensitivities after rounding and
//! τ = 10·Σ_{k=1}^{n−1} exp(−2π²(σ/γ)²·k/(k+1)).
//! Checked against the authors' reference implementation (google-research/federated,
//! `distributed_dp/accounting_utils.py`, `ddgauss_epsilon`) in
//! `fedcore/tests/dp_ddg.rs`.

use super::rdp::{AccountantError, epsilon};

/// Orders at which the distributed discrete Gaussian is accounted (the reference's): 2 to
/// 128, and 256.
pub fn orders() -> Vec<u64> {
    (2..=128).chain([256]).collect()
}

/// The parameters of one distributed discrete Gaussian aggregation.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DistributedDiscreteGaussian {
    /// The grid step γ: values are scaled by 1/γ before rounding to integers.
    pub gamma: f64,
    /// Each lab's noise standard deviation, in the update's own units (σ; σ/γ on the grid).
    pub local_stddev: f64,
    /// Labs whose noise is in the sum (the survivors actually summed).
    pub num_clients: usize,
    /// The L2 clip of one lab's update (c).
    pub l2_sensitivity: f64,
    /// The conditional-rounding parameter β in [0, 1) (0: unconditional rounding).
    pub beta: f64,
    /// Values per update (after padding for the rotation).
    pub dim: u64,
}

/// The L2 norm bound after stochastic rounding to the integer grid (`l2` already scaled).
pub fn rounded_l2_bound(l2: f64, beta: f64, dim: u64) -> f64 {
    let d = dim as f64;
    let bound_1 = l2 + d.sqrt();
    if beta == 0.0 {
        return bound_1;
    }
    let squared = l2 * l2 + 0.25 * d + (2.0 * (1.0 / beta).ln()).sqrt() * (l2 + 0.5 * d.sqrt());
    bound_1.min(squared.sqrt())
}

/// The L1 bound of a rounded integer vector of L2 norm `l2`: L1 ≤ √d·L2, and L1 ≤ L2² on
/// the integer grid.
pub fn rounded_l1_bound(l2: f64, dim: u64) -> f64 {
    l2 * (dim as f64).sqrt().min(l2)
}

impl DistributedDiscreteGaussian {
    /// τ, the price of summing n discrete Gaussians instead of drawing one.
    pub fn tau(&self) -> f64 {
        let scaled = self.local_stddev / self.gamma;
        let factor = 2.0 * (std::f64::consts::PI * scaled).powi(2);
        10.0 * (1..self.num_clients)
            .map(|k| {
                let k = k as f64;
                (-factor * k / (k + 1.0)).exp()
            })
            .sum::<f64>()
    }

    /// (Δ₁, Δ₂): the L1 and L2 sensitivities after rounding, over the sum's noise standard
    /// deviation √n·σ.
    pub fn scales(&self) -> (f64, f64) {
        let scale = 1.0 / self.gamma;
        let l2 = rounded_l2_bound(self.l2_sensitivity * scale, self.beta, self.dim) / scale;
        let l1 = rounded_l1_bound(l2 * scale, self.dim) / scale;
        let noise = (self.num_clients as f64).sqrt() * self.local_stddev;
        (l1 / noise, l2 / noise)
    }

    /// RDP of one aggregation at order α (Proposition 14), without sampling.
    fn rdp_once(&self, alpha: u64, l1: f64, l2: f64, tau: f64) -> f64 {
        let (a, d) = (alpha as f64, self.dim as f64);
        let t1 = a / 2.0 * l2 * l2 + tau * d;
        let t2 = a / 2.0 * (l2 * l2 + 2.0 * l1 * tau + tau * tau * d);
        let t3 = a / 2.0 * (l2 + d.sqrt() * tau).powi(2);
        t1.min(t2).min(t3)
    }

    /// RDP at each of `orders` of `steps` aggregations, each over labs sampled at rate `q`.
    pub fn rdp(&self, q: f64, steps: u64, orders: &[u64]) -> Result<Vec<f64>, AccountantError> {
        let (l1, l2) = self.scales();
        let tau = self.tau();
        compose_sampled(q, steps, orders, &|a| self.rdp_once(a, l1, l2, tau))
    }

    /// (ε, the order that gives it) at `delta` for `steps` aggregations at sampling rate `q`.
    pub fn epsilon(&self, q: f64, steps: u64, delta: f64) -> Result<(f64, f64), AccountantError> {
        let orders = orders();
        let rdp = self.rdp(q, steps, &orders)?;
        let orders: Vec<f64> = orders.iter().map(|&a| a as f64).collect();
        epsilon(&orders, &rdp, delta)
    }
}

/// RDP at each of `orders` of `steps` runs of a mechanism with RDP `once`, each over labs
/// sampled at rate `q` (the better of the sampled bound and the unsampled RDP), for the
/// distributed mechanisms at integer orders ≥ 2.
pub(super) fn compose_sampled(
    q: f64,
    steps: u64,
    orders: &[u64],
    once: &dyn Fn(u64) -> f64,
) -> Result<Vec<f64>, AccountantError> {
    if !(q > 0.0 && q <= 1.0) {
        return Err(AccountantError::SamplingRate(q));
    }
    orders
        .iter()
        .map(|&alpha| {
            if alpha < 2 {
                return Err(AccountantError::Order(alpha as f64));
            }
            let one = if q == 1.0 {
                once(alpha)
            } else {
                subsampled_upper(alpha, q, once).min(once(alpha))
            };
            Ok(one * steps as f64)
        })
        .collect()
}

/// RDP of a mechanism with RDP `eps` under sampling at rate q < 1, at integer order α
/// (Zhu and Wang 2019, Theorem 5, the upper bound):
/// (1/(α−1))·log((1−q)^{α−1}(αq − q + 1) + C(α,2)q²(1−q)^{α−2}e^{ε(2)}
///   + 3·Σ_{l=3}^{α} C(α,l)(1−q)^{α−l}q^l e^{(l−1)ε(l)}).
fn subsampled_upper(alpha: u64, q: f64, eps: &dyn Fn(u64) -> f64) -> f64 {
    let a = alpha as f64;
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let log_binom =
        |l: f64| libm::lgamma(a + 1.0) - libm::lgamma(l + 1.0) - libm::lgamma(a - l + 1.0);
    let mut total = (a - 1.0) * log_1mq + (a * q - q + 1.0).ln();
    total = log_add(
        total,
        log_binom(2.0) + 2.0 * log_q + (a - 2.0) * log_1mq + eps(2),
    );
    for l in 3..=alpha {
        let lf = l as f64;
        let term =
            3f64.ln() + (lf - 1.0) * eps(l) + log_binom(lf) + (a - lf) * log_1mq + lf * log_q;
        total = log_add(total, term);
    }
    total / (a - 1.0)
}

fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn more_labs_or_more_noise_cost_less_privacy() {
        let base = DistributedDiscreteGaussian {
            gamma: 1e-3,
            local_stddev: 0.5,
            num_clients: 10,
            l2_sensitivity: 1.0,
            beta: (-0.5f64).exp(),
            dim: 1 << 14,
        };
        let (eps, _) = base.epsilon(1.0, 10, 1e-5).unwrap();
        let more_labs = DistributedDiscreteGaussian {
            num_clients: 20,
            ..base.clone()
        };
        let more_noise = DistributedDiscreteGaussian {
            local_stddev: 1.0,
            ..base.clone()
        };
        assert!(more_labs.epsilon(1.0, 10, 1e-5).unwrap().0 < eps);
        assert!(more_noise.epsilon(1.0, 10, 1e-5).unwrap().0 < eps);
        // A fine grid makes τ vanish: the sum is then as good as one discrete Gaussian.
        assert!(base.tau() < 1e-300);
        let coarse = DistributedDiscreteGaussian { gamma: 1.0, ..base };
        assert!(coarse.tau() > 1e-3);
    }
}
