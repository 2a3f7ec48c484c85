//! A real federation over gRPC on loopback: 3 participants × 2 rounds with real burn
//! training; the global adapters the aggregator writes must equal the previous global B plus
//! the sample-weighted mean of the updates `B_i − B_global` the participants submitted
//! (computed in f64, rounded once), bit for bit: the weighted mean of their B matrices.

use std::sync::Arc;

use burn::prelude::Device;
use fedclient::participant;
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, test_plan, weighted_mean_f64,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_participants_two_rounds_write_the_exact_weighted_mean() {
    let dir = tempfile::tempdir().unwrap();
    let plan = test_plan(3, 2, 3, 600_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for code in ["lo", "km", "vi"] {
        labs.push(tokio::spawn(participant::run(
            participant_options(&server.url(), &format!("lab-{code}"), code),
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    server.finished().await;
    let status = server.status();
    assert_eq!(status.history.len(), 2);

    let template = plan.initial_adapter();
    let b_layout = template.b_manifest();
    let mut previous = template.clone();
    for round in 1..=2u64 {
        let uploads = recorder.round(round);
        assert_eq!(uploads.len(), 3, "round {round}: every lab uploads");
        // Distinct languages give distinct updates (the test would be weak otherwise).
        assert_ne!(uploads[0].values, uploads[1].values);
        let written = fedcore::peft::read_dir(&server.store().round_dir(round)).unwrap();
        let expected: Vec<f32> = previous
            .flatten(&b_layout)
            .unwrap()
            .iter()
            .zip(weighted_mean_f64(&uploads))
            .map(|(b, d)| (*b as f64 + d) as f32)
            .collect();
        assert_eq!(
            written.flatten(&b_layout).unwrap(),
            expected,
            "round {round}: written B = B_global + Σ n_i (B_i − B_global) / Σ n_i"
        );
        // FFA-LoRA: A never changes.
        for ((_, w), (_, p)) in written.modules().iter().zip(previous.modules()) {
            assert_eq!(w.a, p.a);
        }
        assert_eq!(
            written.content_hash(),
            status.history[round as usize - 1].adapter_hash
        );
        previous = written;
    }
    // The final adapter equals round 2's and is what every participant received.
    let final_adapter = fedcore::peft::read_dir(&server.store().final_dir()).unwrap();
    assert_eq!(final_adapter, previous);
    for r in &reports {
        assert_eq!(r.final_adapter, final_adapter);
        assert_eq!(r.rounds.len(), 2);
    }
    // Round 0 is the shared starting point.
    assert_eq!(
        fedcore::peft::read_dir(&server.store().round_dir(0)).unwrap(),
        template
    );
    server.shutdown().await.unwrap();
}
