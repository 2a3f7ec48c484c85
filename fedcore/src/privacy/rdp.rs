//! Rényi differential privacy (RDP) of the subsampled Gaussian mechanism, its composition
//! over steps and rounds, and the conversion to (ε, δ) (issue #20, the accountant).
//!
//! No vetted Rust accountant exists, so this ports the published formulas, in the form
//! Opacus (`opacus/accountants/analysis/rdp.py`) and Google's `dp_accounting`
//! (`rdp/rdp_privacy_accountant.py`) implement them, and is checked against both on
//! standard settings (`scripts/dp_reference.py` generated the committed reference values,
//! `fedcore/tests/dp_accountant.rs` compares):
//!
//! - Poisson-subsampled Gaussian with sampling rate q and noise multiplier σ (noise standard
//!   deviation σ·C for clip C) at order α (Mironov, Talwar, Zhang 2019): for integer α,
//!   A_α = Σ_{k=0}^{α} C(α,k)(1−q)^{α−k} q^k exp((k²−k)/(2σ²)); for fractional α the
//!   two-sided series with erfc terms; RDP(α) = log A_α / (α−1). With q = 1 it is the plain
//!   Gaussian, α/(2σ²).
//! - Composition: RDP adds over mechanisms at each order.
//! - Conversion (Balle et al. 2020 / Canonne, Kamath, Steinke 2020, as both libraries use):
//!   ε = min over α of RDP(α) + log(1 − 1/α) − log(δ·α)/(α − 1).
//!
//! Everything is in natural logarithms and f64; terms are summed in the log domain so large
//! orders and small σ neither overflow nor lose the small terms.

use thiserror::Error;

/// A bad accountant input, named.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum AccountantError {
    #[error("sampling rate q must be in [0, 1], got {0}")]
    SamplingRate(f64),
    #[error("noise multiplier must be positive and finite, got {0}")]
    NoiseMultiplier(f64),
    #[error("delta must be in (0, 1), got {0}")]
    Delta(f64),
    #[error("RDP orders must be finite and above 1, got {0}")]
    Order(f64),
}

/// Opacus's default orders: 1.1, 1.2, …, 10.9, then 12, 13, …, 63.
pub fn default_orders() -> Vec<f64> {
    (1..100)
        .map(|x| 1.0 + f64::from(x) / 10.0)
        .chain((12..64).map(f64::from))
        .collect()
}

/// RDP of one step of the Poisson-subsampled Gaussian at each of `orders`.
pub fn subsampled_gaussian(
    q: f64,
    noise_multiplier: f64,
    orders: &[f64],
) -> Result<Vec<f64>, AccountantError> {
    if !(0.0..=1.0).contains(&q) {
        return Err(AccountantError::SamplingRate(q));
    }
    if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
        return Err(AccountantError::NoiseMultiplier(noise_multiplier));
    }
    orders
        .iter()
        .map(|&alpha| {
            if !(alpha.is_finite() && alpha > 1.0) {
                return Err(AccountantError::Order(alpha));
            }
            Ok(rdp_one(q, noise_multiplier, alpha))
        })
        .collect()
}

fn rdp_one(q: f64, sigma: f64, alpha: f64) -> f64 {
    if q == 0.0 {
        return 0.0;
    }
    if q == 1.0 {
        return alpha / (2.0 * sigma * sigma);
    }
    let log_a = if alpha.fract() == 0.0 {
        log_a_int(q, sigma, alpha as u64)
    } else {
        log_a_frac(q, sigma, alpha)
    };
    log_a / (alpha - 1.0)
}

/// log(e^a + e^b), exact at −∞.
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// log(e^a − e^b) for a ≥ b (−∞ when equal).
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if a <= b {
        return f64::NEG_INFINITY;
    }
    // log(e^a − e^b) = a + log(1 − e^{b−a})
    a + (-(b - a).exp()).ln_1p()
}

/// log C(n, k) through log-gamma.
fn log_binom(n: f64, k: f64) -> f64 {
    ln_gamma(n + 1.0) - ln_gamma(k + 1.0) - ln_gamma(n - k + 1.0)
}

fn ln_gamma(x: f64) -> f64 {
    libm::lgamma(x)
}

/// log A_α for integer α.
fn log_a_int(q: f64, sigma: f64, alpha: u64) -> f64 {
    let (log_q, log_1mq) = (q.ln(), (-q).ln_1p());
    let a = alpha as f64;
    (0..=alpha)
        .map(|k| {
            let k = k as f64;
            log_binom(a, k) + k * log_q + (a - k) * log_1mq + (k * k - k) / (2.0 * sigma * sigma)
        })
        .fold(f64::NEG_INFINITY, log_add)
}

/// log(erfc(x)), accurate where erfc underflows.
fn log_erfc(x: f64) -> f64 {
    let e = libm::erfc(x);
    if e > 0.0 {
        return e.ln();
    }
    // Asymptotic expansion for large x (erfc(x) ≈ e^{−x²}/(x√π)·(1 − 1/(2x²) + …)).
    let r = 1.0 / (x * x);
    -std::f64::consts::PI.ln() / 2.0 - x.ln() - x * x
        + (1.0 - 0.5 * r + 0.75 * r * r - 15.0 / 8.0 * r * r * r + 105.0 / 16.0 * r.powi(4)).ln()
}

/// log A_α for fractional α: the two-sided series, summed until its terms fall below e^−30
/// (as Opacus and dp_accounting do).
fn log_a_frac(q: f64, sigma: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = sigma * sigma * (1.0 / q - 1.0).ln() + 0.5;
    let sqrt2_sigma = std::f64::consts::SQRT_2 * sigma;
    let mut i = 0.0f64;
    loop {
        let coef_positive = binom_sign_positive(alpha, i);
        let log_coef = log_abs_binom(alpha, i);
        let j = alpha - i;
        let log_t0 = log_coef + i * q.ln() + j * (-q).ln_1p();
        let log_t1 = log_coef + j * q.ln() + i * (-q).ln_1p();
        let log_e0 = 0.5f64.ln() + log_erfc((i - z0) / sqrt2_sigma);
        let log_e1 = 0.5f64.ln() + log_erfc((z0 - j) / sqrt2_sigma);
        let log_s0 = log_t0 + (i * i - i) / (2.0 * sigma * sigma) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * sigma * sigma) + log_e1;
        if coef_positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        i += 1.0;
        if log_s0.max(log_s1) < -30.0 || i > 100_000.0 {
            break;
        }
    }
    log_add(log_a0, log_a1)
}

/// The sign of C(α, i) = α(α−1)…(α−i+1)/i! for real α > 0 and integer i ≥ 0: positive
/// while every factor is, then alternating with each negative factor.
fn binom_sign_positive(alpha: f64, i: f64) -> bool {
    let negative_factors = (0..i as u64).filter(|&m| alpha - (m as f64) < 0.0).count();
    negative_factors.is_multiple_of(2)
}

/// log |C(α, i)| for real α and integer i, through |Γ|.
fn log_abs_binom(alpha: f64, i: f64) -> f64 {
    // C(α, i) = Γ(α+1) / (Γ(i+1) Γ(α−i+1)); Γ is negative on some negative intervals, so
    // take the log of its absolute value (lgamma_r gives log|Γ|).
    let (lg_a, _) = libm::lgamma_r(alpha + 1.0);
    let (lg_i, _) = libm::lgamma_r(i + 1.0);
    let (lg_ai, _) = libm::lgamma_r(alpha - i + 1.0);
    lg_a - lg_i - lg_ai
}

/// (ε, the order that gives it) for RDP values `rdp` at `orders` and failure probability
/// `delta`, by the conversion both reference libraries use.
pub fn epsilon(orders: &[f64], rdp: &[f64], delta: f64) -> Result<(f64, f64), AccountantError> {
    if !(delta > 0.0 && delta < 1.0) {
        return Err(AccountantError::Delta(delta));
    }
    let mut best = (f64::INFINITY, f64::NAN);
    for (&alpha, &r) in orders.iter().zip(rdp) {
        if !(alpha.is_finite() && alpha > 1.0) {
            return Err(AccountantError::Order(alpha));
        }
        let eps = if delta * delta + (-r).exp_m1() > 0.0 {
            // δ ≥ sqrt(1 − e^{−KL}): ε = 0 already.
            0.0
        } else {
            r + (-1.0 / alpha).ln_1p() - (delta * alpha).ln() / (alpha - 1.0)
        };
        if eps < best.0 {
            best = (eps, alpha);
        }
    }
    Ok((best.0.max(0.0), best.1))
}

/// RDP at a fixed set of orders, composed over every mechanism it is told of.
#[derive(Debug, Clone, PartialEq)]
pub struct RdpAccountant {
    orders: Vec<f64>,
    rdp: Vec<f64>,
}

impl Default for RdpAccountant {
    fn default() -> Self {
        RdpAccountant::new(default_orders())
    }
}

impl RdpAccountant {
    pub fn new(orders: Vec<f64>) -> Self {
        let rdp = vec![0.0; orders.len()];
        RdpAccountant { orders, rdp }
    }

    /// Composes `steps` steps of the Poisson-subsampled Gaussian (rate `q`, noise
    /// multiplier `noise_multiplier`).
    pub fn subsampled_gaussian(
        &mut self,
        q: f64,
        noise_multiplier: f64,
        steps: u64,
    ) -> Result<(), AccountantError> {
        let one = subsampled_gaussian(q, noise_multiplier, &self.orders)?;
        for (total, step) in self.rdp.iter_mut().zip(one) {
            *total += step * steps as f64;
        }
        Ok(())
    }

    /// ε at `delta` for everything composed so far, and the order that gives it.
    pub fn epsilon(&self, delta: f64) -> Result<(f64, f64), AccountantError> {
        epsilon(&self.orders, &self.rdp, delta)
    }

    /// The composed RDP at each order.
    pub fn rdp(&self) -> &[f64] {
        &self.rdp
    }

    pub fn orders(&self) -> &[f64] {
        &self.orders
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_full_batch_gaussian_is_alpha_over_two_sigma_squared() {
        let rdp = subsampled_gaussian(1.0, 2.0, &[2.0, 8.5, 32.0]).unwrap();
        assert_eq!(rdp, [2.0 / 8.0, 8.5 / 8.0, 32.0 / 8.0]);
        assert_eq!(subsampled_gaussian(0.0, 1.0, &[2.0]).unwrap(), [0.0]);
    }

    #[test]
    fn integer_and_fractional_orders_agree_where_they_meet() {
        // The fractional series at α = 3 ± 1e-7 must be continuous with the binomial sum.
        for (q, sigma) in [(0.01, 1.1), (0.1, 0.8), (0.5, 2.0)] {
            let at = |a: f64| rdp_one(q, sigma, a);
            let int = at(3.0);
            let (below, above) = (at(3.0 - 1e-7), at(3.0 + 1e-7));
            assert!(
                (below - int).abs() < 1e-5 * int.max(1e-9)
                    && (above - int).abs() < 1e-5 * int.max(1e-9),
                "q {q} σ {sigma}: {below} {int} {above}"
            );
        }
    }

    #[test]
    fn binomial_signs_alternate_past_alpha() {
        // C(2.5, i): 1, 2.5, 1.875, 0.3125, −0.0390625, 0.0117…, …
        let signs: Vec<bool> = (0..7)
            .map(|i| binom_sign_positive(2.5, f64::from(i)))
            .collect();
        assert_eq!(signs, [true, true, true, true, false, true, false]);
        assert!((log_abs_binom(2.5, 4.0) - 0.0390625f64.ln()).abs() < 1e-12);
    }

    #[test]
    fn bad_inputs_are_named() {
        assert_eq!(
            subsampled_gaussian(1.5, 1.0, &[2.0]),
            Err(AccountantError::SamplingRate(1.5))
        );
        assert_eq!(
            subsampled_gaussian(0.1, 0.0, &[2.0]),
            Err(AccountantError::NoiseMultiplier(0.0))
        );
        assert_eq!(
            subsampled_gaussian(0.1, 1.0, &[1.0]),
            Err(AccountantError::Order(1.0))
        );
        assert_eq!(
            epsilon(&[2.0], &[1.0], 0.0),
            Err(AccountantError::Delta(0.0))
        );
    }
}
