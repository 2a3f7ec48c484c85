//! An adapter of more than 100M parameters (rank 64 on every projection of a 21-layer,
//! 4096-wide Llama) through a whole securely aggregated round over gRPC: the global adapter
//! goes out by reference in 256 KiB checksummed chunks, the 57M-word masked updates come
//! back in 1 MiB chunks, and no message comes near gRPC's size limit. The aggregate is the
//! weighted mean of the three labs' updates within the quantisation bound.

use std::sync::Arc;

use fedcore::{ModelSpec, TargetModule};
use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
use mekong_e2e::{aggregator_config, secure_test_plan, test_identity};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_100m_parameter_adapter_goes_through_a_secure_round_in_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let names = ["lab-a", "lab-b", "lab-c"];
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().copied().zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 1_800_000, 600_000);
    plan.model = ModelSpec {
        hidden_size: 4096,
        intermediate_size: 11008,
        num_hidden_layers: 21,
        num_attention_heads: 32,
        num_key_value_heads: 32,
        ..ModelSpec::tiny()
    };
    plan.lora.rank = 64;
    plan.lora.target_modules = TargetModule::ALL.to_vec();
    let initial = plan.initial_adapter();
    let params = initial.full_manifest().len();
    assert!(params >= 100_000_000, "{params} parameters");
    let b_len = initial.b_manifest().len();
    drop(initial);

    let config = aggregator_config(plan.clone(), &dir.path().join("out"));
    let server = fedaggregator::start(&config).await.unwrap();
    let weights = [1_000u64, 2_000, 3_000];
    let deltas = [0.004f32, -0.002, 0.001];
    let mut labs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let lab = WireLab::join(&server.url(), plan.clone(), name, *identities[i].bytes()).await;
        labs.push(tokio::spawn(lab.run(
            vec![deltas[i]; b_len],
            weights[i],
            WireBehaviour::Honest,
        )));
    }
    for lab in labs {
        lab.await.unwrap();
    }
    server.finished().await;
    let record = server.status().history[0].clone();
    assert_eq!(record.contributors, names);
    let bound = record.secure.as_ref().unwrap().error_bound;

    // The global B moved from zero by the weighted mean of the deltas, within the bound.
    let total: u64 = weights.iter().sum();
    let mean = weights
        .iter()
        .zip(deltas)
        .map(|(w, d)| *w as f64 * d as f64)
        .sum::<f64>()
        / total as f64;
    let adapter = Arc::new(fedcore::peft::read_dir(&dir.path().join("out/final")).unwrap());
    let b = adapter.flatten(&adapter.b_manifest()).unwrap();
    assert_eq!(b.len(), b_len);
    let worst = b
        .iter()
        .map(|v| (*v as f64 - mean).abs())
        .fold(0.0, f64::max);
    assert!(worst <= bound + 1e-9, "worst error {worst} > bound {bound}");
    server.shutdown().await.unwrap();
}
