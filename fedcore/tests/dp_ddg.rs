//! The distributed discrete Gaussian's accountant (issue #20) against its authors' reference
//! implementation. fixtures/dp_ddg.json holds what `ddgauss_epsilon` of google-research/
//! federated's `distributed_dp/accounting_utils.py` (commit 5e27a86, run locally; ε converted
//! from its RDP with Opacus's `get_privacy_spent`, the conversion its `tensorflow_privacy`
//! call performs) gives on five settings: a federated EMNIST-like run, the pilot's nine
//! labs, client sampling at 0.1, unconditional rounding, and a coarse grid where τ matters;
//! fixtures/dp_skellam.json what `skellam_epsilon` of the same file gives on four.

use fedcore::privacy::ddg::{DistributedDiscreteGaussian, orders};
use fedcore::privacy::skellam::DistributedSkellam;
use serde_json::Value;

fn relative(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-12)
}

#[test]
fn epsilon_rdp_and_tau_match_the_reference_implementation() {
    let reference: Value = serde_json::from_str(include_str!("fixtures/dp_ddg.json")).unwrap();
    let ours: Vec<f64> = orders().iter().map(|&a| a as f64).collect();
    let theirs: Vec<f64> = reference["orders"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect();
    assert_eq!(ours, theirs);
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let mechanism = DistributedDiscreteGaussian {
            gamma: f("gamma"),
            local_stddev: f("local_stddev"),
            num_clients: case["num_clients"].as_u64().unwrap() as usize,
            l2_sensitivity: f("l2_sensitivity"),
            beta: f("beta"),
            dim: case["dim"].as_u64().unwrap(),
        };
        let (q, steps, delta) = (f("q"), case["steps"].as_u64().unwrap(), f("delta"));
        let tau = mechanism.tau();
        assert!(
            (tau - f("tau")).abs() <= 1e-9 * f("tau").max(1e-300),
            "{name}: τ {tau} vs {}",
            f("tau")
        );
        let (l1, l2) = mechanism.scales();
        assert!(relative(l1, f("l1_scale")) < 1e-9, "{name}: Δ₁ {l1}");
        assert!(relative(l2, f("l2_scale")) < 1e-9, "{name}: Δ₂ {l2}");
        let rdp = mechanism.rdp(q, steps, &orders()).unwrap();
        for ((a, got), want) in ours.iter().zip(&rdp).zip(case["rdp"].as_array().unwrap()) {
            let want = want.as_f64().unwrap();
            assert!(
                relative(*got, want) < 1e-6,
                "{name}: RDP at order {a}: {got} vs {want}"
            );
        }
        let (eps, order) = mechanism.epsilon(q, steps, delta).unwrap();
        println!(
            "{name}: ε {eps:.4} at order {order} (reference {:.4} at {})",
            f("epsilon"),
            f("order")
        );
        assert!(
            relative(eps, f("epsilon")) < 0.01,
            "{name}: ε {eps} vs {}",
            f("epsilon")
        );
        assert_eq!(order, f("order"), "{name}");
    }
}

#[test]
fn skellam_epsilon_and_rdp_match_the_reference_implementation() {
    let reference: Value = serde_json::from_str(include_str!("fixtures/dp_skellam.json")).unwrap();
    for case in reference["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let f = |k: &str| case[k].as_f64().unwrap();
        let mechanism = DistributedSkellam {
            scale: f("scale"),
            local_stddev: f("local_stddev"),
            num_clients: case["num_clients"].as_u64().unwrap() as usize,
            l2_sensitivity: f("l2_sensitivity"),
            beta: f("beta"),
            dim: case["dim"].as_u64().unwrap(),
        };
        let (q, steps, delta) = (f("q"), case["steps"].as_u64().unwrap(), f("delta"));
        let rdp = mechanism.rdp(q, steps, &orders()).unwrap();
        for ((a, got), want) in orders()
            .iter()
            .zip(&rdp)
            .zip(case["rdp"].as_array().unwrap())
        {
            let want = want.as_f64().unwrap();
            assert!(
                relative(*got, want) < 1e-6,
                "{name}: RDP at order {a}: {got} vs {want}"
            );
        }
        let (eps, order) = mechanism.epsilon(q, steps, delta).unwrap();
        println!(
            "skellam {name}: ε {eps:.4} at order {order} (reference {:.4})",
            f("epsilon")
        );
        assert!(
            relative(eps, f("epsilon")) < 0.01,
            "{name}: ε {eps} vs {}",
            f("epsilon")
        );
        assert_eq!(order, f("order"), "{name}");
    }
}
