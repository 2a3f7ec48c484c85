//! The privacy a lab's data has spent: the composition of every noised sum its update
//! entered. Labs keep their entries in their reveal record (written before the shares that
//! let the center unmask a sum leave the lab), the center in its round records; both
//! compute ε the same way, here.
//!
//! Why per entry and not per plan: a sum's mechanism depends on the round's upload size
//! (RoLoRA alternates factors) and on how many labs were actually summed, so each entry
//! carries its own parameters and ε is recomputed from all of them (RDP adds at each order).

use super::ddg::{DistributedDiscreteGaussian, orders};
use super::rdp::{AccountantError, RdpAccountant, epsilon};

/// ε at `delta` after every mechanism in `spent`, composed (0 when empty).
pub fn epsilon_spent(
    spent: &[DistributedDiscreteGaussian],
    delta: f64,
) -> Result<f64, AccountantError> {
    if spent.is_empty() {
        return Ok(0.0);
    }
    let orders = orders();
    let mut total = vec![0.0; orders.len()];
    for mechanism in spent {
        for (t, r) in total.iter_mut().zip(mechanism.rdp(1.0, 1, &orders)?) {
            *t += r;
        }
    }
    let orders: Vec<f64> = orders.iter().map(|&a| a as f64).collect();
    Ok(epsilon(&orders, &total, delta)?.0)
}

/// Record-level ε at `delta` of `steps` DP-SGD steps, each a Poisson sample at rate `q`
/// with noise multiplier `noise_multiplier` (the subsampled Gaussian, composed).
pub fn record_epsilon(
    q: f64,
    noise_multiplier: f64,
    steps: u64,
    delta: f64,
) -> Result<f64, AccountantError> {
    if steps == 0 {
        return Ok(0.0);
    }
    let mut accountant = RdpAccountant::default();
    accountant.subsampled_gaussian(q, noise_multiplier, steps)?;
    Ok(accountant.epsilon(delta)?.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mechanism(num_clients: usize) -> DistributedDiscreteGaussian {
        DistributedDiscreteGaussian {
            gamma: 1e-9,
            local_stddev: 0.7,
            num_clients,
            l2_sensitivity: 1.0,
            beta: super::super::spec::ROUNDING_BETA,
            dim: 1 << 12,
        }
    }

    #[test]
    fn identical_rounds_compose_like_the_accountant_and_nothing_spends_nothing() {
        let m = mechanism(2);
        let three = epsilon_spent(&[m.clone(), m.clone(), m.clone()], 1e-5).unwrap();
        let (reference, _) = m.epsilon(1.0, 3, 1e-5).unwrap();
        assert!(
            (three - reference).abs() < 1e-9 * reference,
            "{three} vs {reference}"
        );
        assert_eq!(epsilon_spent(&[], 1e-5).unwrap(), 0.0);
        // More rounds, more ε; more labs in a sum, less.
        let two = epsilon_spent(&[m.clone(), m.clone()], 1e-5).unwrap();
        assert!(two < three);
        let wide = epsilon_spent(&[m.clone(), m, mechanism(8)], 1e-5).unwrap();
        assert!(wide < three);
    }
}
