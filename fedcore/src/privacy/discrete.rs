//! Exact samplers of the discrete Laplace and discrete Gaussian distributions (Canonne,
//! Kamath, Steinke 2020, "The Discrete Gaussian for Differential Privacy", Algorithms 1-3):
//! the noise each lab adds to its integer update before masking, so that the center only
//! ever unmasks a noised sum (issue #20, distributed DP).
//!
//! Why exact: noise drawn through floating point (a rounded continuous Gaussian) has gaps and
//! biases an observer can exploit (Mironov 2012), and it cannot enter Z_{2^32} without
//! rounding anyway. These samplers use only integer arithmetic and fair uniform integers:
//! every Bernoulli(p) draws a uniform integer below p's denominator, and exp(−γ) is sampled
//! without ever computing it. The variance σ² is a rational `num / den`. Arithmetic is in
//! u128 and checked: a variance or draw that would overflow is refused, not wrapped.
//!
//! The randomness is the caller's (the OS in production, a seeded generator in tests).

use rand::Rng;
use thiserror::Error;

/// A sampler input that cannot be used, or a draw past u128 arithmetic.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum SamplerError {
    #[error("the variance {num}/{den} must be positive with a nonzero denominator")]
    Variance { num: u64, den: u64 },
    #[error("the discrete Laplace scale must be at least 1")]
    Scale,
    #[error("a draw needed more than 128-bit arithmetic (variance {num}/{den})")]
    Overflow { num: u64, den: u64 },
}

/// Bernoulli(n / d), for 0 ≤ n ≤ d, d > 0.
fn bernoulli<R: Rng + ?Sized>(n: u128, d: u128, rng: &mut R) -> bool {
    rng.random_range(0..d) < n
}

/// Bernoulli(exp(−n/d)) for 0 ≤ n/d ≤ 1 (CKS Algorithm 1, first case): draw
/// A_k ~ Bernoulli(γ/k) for k = 1, 2, … until one is 0; the result is whether that k is odd.
fn bernoulli_exp_neg_at_most_one<R: Rng + ?Sized>(n: u128, d: u128, rng: &mut R) -> Option<bool> {
    let mut k: u128 = 1;
    loop {
        if !bernoulli(n, d.checked_mul(k)?, rng) {
            return Some(k % 2 == 1);
        }
        k += 1;
    }
}

/// Bernoulli(exp(−n/d)) for any n/d ≥ 0 (CKS Algorithm 1): exp(−γ) = exp(−1)^⌊γ⌋ ·
/// exp(−(γ − ⌊γ⌋)), each factor drawn on its own, stopping at the first failure.
fn bernoulli_exp_neg<R: Rng + ?Sized>(mut n: u128, d: u128, rng: &mut R) -> Option<bool> {
    while n > d {
        if !bernoulli_exp_neg_at_most_one(1, 1, rng)? {
            return Some(false);
        }
        n -= d;
    }
    bernoulli_exp_neg_at_most_one(n, d, rng)
}

/// One draw of the discrete Laplace distribution with scale `t` ≥ 1: P(x) ∝ exp(−|x|/t)
/// (CKS Algorithm 2).
pub fn discrete_laplace<R: Rng + ?Sized>(t: u64, rng: &mut R) -> Result<i64, SamplerError> {
    if t == 0 {
        return Err(SamplerError::Scale);
    }
    let overflow = SamplerError::Overflow { num: t, den: 1 };
    laplace(u128::from(t), rng).ok_or(overflow)
}

fn laplace<R: Rng + ?Sized>(t: u128, rng: &mut R) -> Option<i64> {
    loop {
        let u = rng.random_range(0..t);
        if !bernoulli_exp_neg(u, t, rng)? {
            continue;
        }
        // V ~ Geometric(1 − e^{−1}): count successes of Bernoulli(e^{−1}).
        let mut v: u128 = 0;
        while bernoulli_exp_neg_at_most_one(1, 1, rng)? {
            v += 1;
        }
        let x = u.checked_add(t.checked_mul(v)?)?;
        let negative = rng.random::<bool>();
        if negative && x == 0 {
            continue;
        }
        let x = i64::try_from(x).ok()?;
        return Some(if negative { -x } else { x });
    }
}

/// ⌊√(num/den)⌋, exactly.
fn floor_sqrt_ratio(num: u128, den: u128) -> u128 {
    // The largest m with m²·den ≤ num, by bisection on m ∈ [0, √num + 1].
    let (mut lo, mut hi) = (0u128, (num as f64).sqrt() as u128 + 2);
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        match mid.checked_mul(mid).and_then(|m| m.checked_mul(den)) {
            Some(v) if v <= num => lo = mid,
            _ => hi = mid - 1,
        }
    }
    lo
}

/// One draw of the discrete Gaussian with variance parameter σ² = `num / den`:
/// P(x) ∝ exp(−x²/(2σ²)) over the integers (CKS Algorithm 3: a discrete Laplace proposal
/// with t = ⌊σ⌋ + 1, accepted with probability exp(−(|y| − σ²/t)²/(2σ²))).
pub fn discrete_gaussian<R: Rng + ?Sized>(
    num: u64,
    den: u64,
    rng: &mut R,
) -> Result<i64, SamplerError> {
    if num == 0 || den == 0 {
        return Err(SamplerError::Variance { num, den });
    }
    let overflow = SamplerError::Overflow { num, den };
    let (p, q) = (u128::from(num), u128::from(den));
    let t = floor_sqrt_ratio(p, q) + 1;
    loop {
        let y = laplace(t, rng).ok_or(overflow.clone())?;
        // γ = (|y| − σ²/t)² / (2σ²) = (|y|·q·t − p)² / (2·p·q·t²).
        let yqt = u128::from(y.unsigned_abs())
            .checked_mul(q)
            .and_then(|v| v.checked_mul(t))
            .ok_or(overflow.clone())?;
        let diff = yqt.abs_diff(p);
        let gamma_num = diff.checked_mul(diff).ok_or(overflow.clone())?;
        let gamma_den = p
            .checked_mul(q)
            .and_then(|v| v.checked_mul(t))
            .and_then(|v| v.checked_mul(t))
            .and_then(|v| v.checked_mul(2))
            .ok_or(overflow.clone())?;
        if bernoulli_exp_neg(gamma_num, gamma_den, rng).ok_or(overflow.clone())? {
            return Ok(y);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha20Rng;

    /// The probability mass of the discrete Gaussian with variance parameter `var` at each
    /// of −`span`..=`span`, normalised over a range wide enough to hold all of it.
    fn gaussian_pmf(var: f64, span: i64) -> Vec<f64> {
        let wide = span + 40 * (var.sqrt() as i64 + 1);
        let weight = |x: i64| (-((x * x) as f64) / (2.0 * var)).exp();
        let total: f64 = (-wide..=wide).map(weight).sum();
        (-span..=span).map(|x| weight(x) / total).collect()
    }

    /// Pearson's χ² of `samples` against `pmf` over −span..=span, the tails pooled in one
    /// bin; returns (statistic, degrees of freedom).
    fn chi_square(samples: &[i64], pmf: &[f64], span: i64) -> (f64, usize) {
        let n = samples.len() as f64;
        let mut counts = vec![0f64; pmf.len() + 1];
        for &s in samples {
            let bin = if s.abs() <= span {
                (s + span) as usize
            } else {
                pmf.len()
            };
            counts[bin] += 1.0;
        }
        let tail = 1.0 - pmf.iter().sum::<f64>();
        let expected: Vec<f64> = pmf.iter().copied().chain([tail]).map(|p| p * n).collect();
        let mut stat = 0.0;
        let mut bins = 0;
        for (o, e) in counts.iter().zip(&expected) {
            if *e >= 5.0 {
                stat += (o - e) * (o - e) / e;
                bins += 1;
            }
        }
        (stat, bins - 1)
    }

    /// χ² critical values at p = 0.001 for the degrees of freedom these tests reach.
    fn critical_0_001(df: usize) -> f64 {
        // Wilson–Hilferty: df·(1 − 2/(9df) + z·√(2/(9df)))³ with z = 3.090.
        let d = df as f64;
        d * (1.0 - 2.0 / (9.0 * d) + 3.090 * (2.0 / (9.0 * d)).sqrt()).powi(3)
    }

    #[test]
    fn discrete_gaussians_have_the_right_distribution_moments_and_tails() {
        let mut rng = ChaCha20Rng::seed_from_u64(2026);
        // σ² = 4, 5/2, 1/4 (σ below one: t = 1), 900.
        for (num, den) in [(4u64, 1u64), (5, 2), (1, 4), (900, 1)] {
            let var = num as f64 / den as f64;
            let n = 200_000;
            let samples: Vec<i64> = (0..n)
                .map(|_| discrete_gaussian(num, den, &mut rng).unwrap())
                .collect();
            let span = (4.0 * var.sqrt()).ceil() as i64;
            let pmf = gaussian_pmf(var, span.max(1));
            // Moments against the distribution's own (its variance is just below σ² for
            // small σ).
            let wide = gaussian_pmf(var, 60 * (var.sqrt() as i64 + 1));
            let w = (wide.len() / 2) as i64;
            let true_var: f64 = wide
                .iter()
                .enumerate()
                .map(|(i, p)| ((i as i64 - w) as f64).powi(2) * p)
                .sum();
            let mean = samples.iter().sum::<i64>() as f64 / n as f64;
            let second = samples.iter().map(|&s| (s * s) as f64).sum::<f64>() / n as f64;
            let se_mean = (true_var / n as f64).sqrt();
            assert!(mean.abs() < 5.0 * se_mean, "σ² {var}: mean {mean}");
            assert!(
                (second - true_var).abs() < 0.03 * true_var + 1e-3,
                "σ² {var}: second moment {second} vs {true_var}"
            );
            let (stat, df) = chi_square(&samples, &pmf, span.max(1));
            assert!(
                stat < critical_0_001(df),
                "σ² {var}: χ² {stat} with {df} degrees of freedom"
            );
        }
    }

    #[test]
    fn discrete_laplace_has_the_right_distribution() {
        let mut rng = ChaCha20Rng::seed_from_u64(7);
        let t = 3u64;
        let n = 200_000;
        let samples: Vec<i64> = (0..n)
            .map(|_| discrete_laplace(t, &mut rng).unwrap())
            .collect();
        let span = 15;
        let weight = |x: i64| (-(x.abs() as f64) / t as f64).exp();
        let total: f64 = (-400..=400).map(weight).sum();
        let pmf: Vec<f64> = (-span..=span).map(|x| weight(x) / total).collect();
        let (stat, df) = chi_square(&samples, &pmf, span);
        assert!(
            stat < critical_0_001(df),
            "χ² {stat} with {df} degrees of freedom"
        );
    }

    #[test]
    fn exact_square_roots_and_refusals() {
        assert_eq!(floor_sqrt_ratio(4, 1), 2);
        assert_eq!(floor_sqrt_ratio(5, 2), 1);
        assert_eq!(floor_sqrt_ratio(1, 4), 0);
        assert_eq!(floor_sqrt_ratio(899, 1), 29);
        assert_eq!(floor_sqrt_ratio(900, 1), 30);
        let mut rng = ChaCha20Rng::seed_from_u64(1);
        assert_eq!(
            discrete_gaussian(0, 1, &mut rng),
            Err(SamplerError::Variance { num: 0, den: 1 })
        );
        assert_eq!(discrete_laplace(0, &mut rng), Err(SamplerError::Scale));
    }
}
