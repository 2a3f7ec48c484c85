//! The RDP accountant against Opacus and Google's dp_accounting (issue #20): reference values
//! from `scripts/dp_reference.py` (committed in fixtures/dp_accountant.json, with the
//! library versions that made them), for standard DP-SGD settings.

use fedcore::privacy::rdp::{RdpAccountant, default_orders, subsampled_gaussian};
use serde_json::Value;

fn reference() -> Value {
    serde_json::from_str(include_str!("fixtures/dp_accountant.json")).unwrap()
}

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn the_orders_are_opacus_defaults() {
    let orders: Vec<f64> = reference()["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(orders.len(), default_orders().len());
    for (a, b) in orders.iter().zip(default_orders()) {
        assert!((a - b).abs() < 1e-12, "{a} vs {b}");
    }
}

/// Per order, the composed RDP equals Opacus's within 1e-6 (relative), and ε at δ is within
/// 1% of both libraries wherever they agree with each other. Where they do not (σ = 0.6:
/// dp_accounting's fractional-order series stops early and answers an upper bound, 3% above
/// the exact value at order 1.8, and drops orders 1.1–1.5), this accountant and Opacus agree
/// with the exact RDP, which the next test checks by numerical integration.
#[test]
fn epsilon_and_rdp_match_opacus_and_dp_accounting() {
    let reference = reference();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let q = case["q"].as_f64().unwrap();
        let sigma = case["noise_multiplier"].as_f64().unwrap();
        let steps = case["steps"].as_u64().unwrap();
        let delta = case["delta"].as_f64().unwrap();
        let mut accountant = RdpAccountant::default();
        accountant.subsampled_gaussian(q, sigma, steps).unwrap();
        let (eps, order) = accountant.epsilon(delta).unwrap();
        let opacus = case["opacus_epsilon"].as_f64().unwrap();
        let google = case["dp_accounting_epsilon"].as_f64().unwrap();
        println!(
            "{name}: epsilon {eps:.4} at order {order} (Opacus {opacus:.4}, dp_accounting {google:.4})"
        );
        assert!(
            relative(eps, opacus) < 0.01,
            "{name}: {eps} vs Opacus {opacus}"
        );
        if relative(opacus, google) < 1e-6 {
            assert!(
                relative(eps, google) < 0.01,
                "{name}: {eps} vs dp_accounting {google}"
            );
        } else {
            assert!(
                eps < google,
                "{name}: dp_accounting's bound is the looser one"
            );
        }
        let expected: Vec<f64> = case["rdp"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_f64().unwrap())
            .collect();
        for ((a, got), want) in accountant
            .orders()
            .iter()
            .zip(accountant.rdp())
            .zip(&expected)
        {
            assert!(
                relative(*got, *want) < 1e-6,
                "{name}: RDP at order {a}: {got} vs Opacus {want}"
            );
        }
    }
}

/// One step's RDP equals the Rényi divergence computed by numerical integration (50-digit
/// mpmath quadrature in the reference script) within 1e-6, at integer and fractional orders.
#[test]
fn one_step_rdp_is_the_exact_renyi_divergence() {
    let reference = reference();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let q = case["q"].as_f64().unwrap();
        let sigma = case["noise_multiplier"].as_f64().unwrap();
        for (order, exact) in case["exact_one_step_rdp"].as_object().unwrap() {
            let alpha: f64 = order.parse().unwrap();
            let exact = exact.as_f64().unwrap();
            let got = subsampled_gaussian(q, sigma, &[alpha]).unwrap()[0];
            assert!(
                relative(got, exact) < 1e-6,
                "{name}: order {alpha}: {got} vs exact {exact}"
            );
        }
    }
}

#[test]
fn one_step_rdp_grows_with_q_and_falls_with_sigma() {
    let orders = [2.0, 4.5, 16.0];
    let base = subsampled_gaussian(0.01, 1.0, &orders).unwrap();
    let more_q = subsampled_gaussian(0.02, 1.0, &orders).unwrap();
    let more_sigma = subsampled_gaussian(0.01, 2.0, &orders).unwrap();
    for k in 0..orders.len() {
        assert!(more_q[k] > base[k] && more_sigma[k] < base[k]);
    }
}
