//! The accountant of the distributed Skellam mechanism (Agarwal, Kairouz, Liu 2021, "The
//! Skellam Mechanism for Differentially Private Federated Learning"): each lab adds the
//! difference of two Poisson draws of mean μ/2 per value on the integer grid (scale s), and
//! a sum of Skellams is a Skellam, so no τ term arises. RDP at integer order α:
//! α·Δ₂²/(2μ) + min(((2α − 1)·s·Δ₂² + 6·Δ₁)/(4·s³·μ²), 3·Δ₁/(2·s·μ)), with μ the central
//! variance (in the update's units), Δ₁, Δ₂ the sensitivities after rounding onto the grid,
//! client sampling by Zhu and Wang's Theorem 5. Checked against the authors' implementation
//! (`skellam_epsilon`) in `fedcore/tests/dp_ddg.rs`.

use super::ddg::{compose_sampled, orders, rounded_l1_bound, rounded_l2_bound};
use super::rdp::{AccountantError, epsilon};

/// The parameters of one distributed Skellam aggregation.
#[derive(Debug, Clone, PartialEq)]
pub struct DistributedSkellam {
    /// The grid scale s: values are multiplied by s before rounding to integers.
    pub scale: f64,
    /// Each lab's noise standard deviation, in the update's units.
    pub local_stddev: f64,
    /// Labs whose noise is in the sum.
    pub num_clients: usize,
    /// The L2 clip of one lab's update.
    pub l2_sensitivity: f64,
    /// The conditional-rounding parameter β in [0, 1).
    pub beta: f64,
    /// Values per update.
    pub dim: u64,
}

impl DistributedSkellam {
    /// (Δ₁, Δ₂) after rounding, in the update's units.
    pub fn sensitivities(&self) -> (f64, f64) {
        let s = self.scale;
        let l2 = rounded_l2_bound(self.l2_sensitivity * s, self.beta, self.dim) / s;
        let l1 = rounded_l1_bound(l2 * s, self.dim) / s;
        (l1, l2)
    }

    fn rdp_once(&self, alpha: u64, l1: f64, l2: f64) -> f64 {
        let (a, s) = (alpha as f64, self.scale);
        let mu = self.local_stddev * self.local_stddev * self.num_clients as f64;
        a / (2.0 * mu) * l2 * l2
            + (((2.0 * a - 1.0) * s * l2 * l2 + 6.0 * l1) / (4.0 * s.powi(3) * mu * mu))
                .min(3.0 * l1 / (2.0 * s * mu))
    }

    /// RDP at each of `orders` of `steps` aggregations over labs sampled at rate `q`.
    pub fn rdp(&self, q: f64, steps: u64, orders: &[u64]) -> Result<Vec<f64>, AccountantError> {
        let (l1, l2) = self.sensitivities();
        compose_sampled(q, steps, orders, &|a| self.rdp_once(a, l1, l2))
    }

    /// (ε, the order that gives it) at `delta`.
    pub fn epsilon(&self, q: f64, steps: u64, delta: f64) -> Result<(f64, f64), AccountantError> {
        let orders = orders();
        let rdp = self.rdp(q, steps, &orders)?;
        let orders: Vec<f64> = orders.iter().map(|&a| a as f64).collect();
        epsilon(&orders, &rdp, delta)
    }
}
