//! Distributed differential privacy end to end over gRPC on loopback, with real burn
//! training (issue #20): four labs under `[plan.privacy] mode = "distributed"`, each adding
//! its share of discrete Gaussian noise before masking. The center's global adapter is
//! exactly what the plaintext sum of the labs' noised encodings gives (it never held a sum
//! without noise); the ε it records is the accountant's and agrees with each lab's own
//! ledger; a lab whose `max_epsilon` covers two rounds leaves cleanly before the third and
//! the federation goes on; its status page and /metrics show the ε spent.

use std::sync::Arc;

use burn::prelude::Device;
use fedaggregator::admin::client::fetch_status;
use fedaggregator::config::AdminSection;
use fedclient::participant::{self, RunEnd};
use fedcore::privacy::ledger::epsilon_spent;
use fedcore::privacy::{PrivacyMode, PrivacySpec};
use fedcore::round::rounding_seed;
use fedcore::strategy::{AggregatedUpload, ServerState, Strategy};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn noised_secure_rounds_are_accounted_and_a_lab_leaves_at_its_budget() {
    let dir = tempfile::tempdir().unwrap();
    let codes = ["lo", "km", "th", "vi"];
    let names: Vec<String> = codes.iter().map(|c| format!("lab-{c}")).collect();
    let identities: Vec<_> = (0..4).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 3, 120_000, 60_000);
    plan.privacy = PrivacySpec {
        mode: PrivacyMode::Distributed,
        noise_multiplier: 1.0,
        l2_clip: 0.05,
        delta: 1e-5,
        record: None,
    };
    plan.validate().unwrap();
    let len = plan.initial_adapter().b_manifest().len();
    // Four labs, one colluder tolerated: a sum of four carries three labs' noise that no
    // coalition removes, and the worst sum the protocol allows (the threshold, 3) two.
    let mechanism = |round: u64, honest: usize| {
        plan.update_encoding(len, round)
            .unwrap()
            .private()
            .unwrap()
            .mechanism(honest)
    };
    let budget = 0.999
        * epsilon_spent(
            &[mechanism(1, 3), mechanism(2, 3), mechanism(3, 2)],
            plan.privacy.delta,
        )
        .unwrap();

    let mut config = aggregator_config(plan.clone(), dir.path());
    config.admin = Some(AdminSection::loopback(0));
    let server = fedaggregator::start(&config).await.unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        let mut options = participant_options(&server.url(), &names[i], code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        options.state_dir = Some(dir.path().join(format!("state-{code}")));
        if *code == "km" {
            options.max_epsilon = Some(budget);
        }
        labs.push(tokio::spawn(participant::run(
            options,
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
    let history = &status.history;
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].contributors.len(), 4);
    assert_eq!(history[1].contributors.len(), 4);
    assert_eq!(history[2].contributors, ["lab-lo", "lab-th", "lab-vi"]);

    // The lab at its budget left before round 3, saying why, with what it spent.
    let km = &reports[1];
    let spent_km = epsilon_spent(&[mechanism(1, 3), mechanism(2, 3)], plan.privacy.delta).unwrap();
    assert_eq!(
        km.ended,
        RunEnd::PrivacyBudget {
            max_epsilon: budget,
            spent: spent_km
        }
    );
    assert_eq!(km.epsilon_spent, Some(spent_km));
    assert_eq!(
        km.rounds.iter().map(|r| r.round).collect::<Vec<_>>(),
        [1, 2]
    );
    assert_eq!(history[2].left, ["lab-km"]);

    // Each round's record: the mechanism of its survivors, ε of the round alone and spent.
    let mut every_round = Vec::new();
    for (r, record) in history.iter().enumerate() {
        let privacy = record
            .secure
            .as_ref()
            .and_then(|s| s.privacy.as_ref())
            .expect("a noised round records its privacy");
        let honest = record.contributors.len() - 1;
        assert_eq!(privacy.mechanism, mechanism(r as u64 + 1, honest));
        assert_eq!(
            privacy.epsilon_round,
            epsilon_spent(std::slice::from_ref(&privacy.mechanism), 1e-5).unwrap()
        );
        every_round.push(privacy.mechanism.clone());
        assert_eq!(
            privacy.epsilon_spent,
            epsilon_spent(&every_round, 1e-5).unwrap()
        );
    }
    let spent_all = history[2]
        .secure
        .as_ref()
        .unwrap()
        .privacy
        .as_ref()
        .unwrap()
        .epsilon_spent;
    for other in [&reports[0], &reports[2], &reports[3]] {
        assert_eq!(
            other.ended,
            RunEnd::Finished {
                rounds_completed: 3
            }
        );
        assert_eq!(other.epsilon_spent, Some(spent_all), "{}", other.name);
    }
    assert!(spent_km < budget && budget < spent_all);

    // Round 1's global is what the plaintext sum of the labs' noised encodings gives: the
    // center unmasked that and nothing less noisy.
    let initial = plan.initial_model();
    let encoding = plan.update_encoding(len, 1).unwrap();
    let mut sum = vec![0u32; encoding.vector_len()];
    let uploads = recorder.round(1);
    assert_eq!(uploads.len(), 4);
    for upload in &uploads {
        let i = names.iter().position(|n| *n == upload.name).unwrap();
        let seed = rounding_seed(&test_identity(i as u8).bytes(), 1, &initial.content_hash());
        let words = encoding
            .encode(&upload.values, upload.num_samples, seed)
            .unwrap()
            .words;
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(w);
        }
    }
    let decoded = encoding.decode_sum(&sum, 4).unwrap();
    let strategy = Strategy::for_plan(plan.strategy.clone(), &plan).unwrap();
    let expected = strategy
        .aggregate(
            &initial,
            &ServerState::default(),
            &AggregatedUpload::from_decoded(&decoded),
        )
        .unwrap();
    assert_eq!(history[0].adapter_hash, expected.global.content_hash());
    assert!(decoded.noise_stddev > 0.0);

    // The operator sees ε per round, and the most spent on /metrics.
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let report = fetch_status(&admin).await.unwrap();
    assert_eq!(report.rounds[2].epsilon_spent, Some(spent_all));
    let (_, metrics) = fedaggregator::admin::client::get(&admin, "/metrics")
        .await
        .unwrap();
    let line = metrics
        .lines()
        .find(|l| l.starts_with("mekong_privacy_epsilon_spent "))
        .unwrap_or_else(|| panic!("{metrics}"));
    let shown: f64 = line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!((shown - spent_all).abs() < 1e-9 * spent_all, "{line}");
    // round.json carries it too.
    let round_json: serde_json::Value = serde_json::from_slice(
        &std::fs::read(server.store().round_dir(3).join("round.json")).unwrap(),
    )
    .unwrap();
    let dp = &round_json["secure_aggregation"]["differential_privacy"];
    assert_eq!(
        dp["epsilon_spent"].as_f64(),
        Some(spent_all),
        "{round_json}"
    );
}

/// Record-level DP-SGD in every lab (`[plan.privacy.record]`) under secure aggregation: the
/// run completes, and each lab's record-level ε (counted from the rounds it revealed) is
/// the accountant's for its own sampling rate (its number of disjoint records) over the
/// steps it took. The guarantee is each lab's own; without secure aggregation it holds too
/// (`a_lab_leaves_before_dp_sgd_would_exceed_its_budget` covers the counting).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn record_level_dp_sgd_runs_and_each_lab_counts_its_own_epsilon() {
    use fedclient::train::dp_sgd::PoissonRecords;
    use fedcore::privacy::RecordDpSpec;
    use fedcore::privacy::rdp::RdpAccountant;

    let dir = tempfile::tempdir().unwrap();
    let codes = ["lo", "km", "th"];
    let names: Vec<String> = codes.iter().map(|c| format!("lab-{c}")).collect();
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 2, 60_000, 60_000);
    plan.privacy.record = Some(RecordDpSpec {
        noise_multiplier: 1.1,
        max_grad_norm: 0.5,
    });
    plan.validate().unwrap();
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let mut labs = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        let mut options = participant_options(&server.url(), &names[i], code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            Arc::new(fedclient::participant::Quiet),
        )));
    }
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    server.finished().await;
    assert_eq!(server.status().history.len(), 2);
    for (report, code) in reports.iter().zip(codes) {
        assert_eq!(
            report.ended,
            RunEnd::Finished {
                rounds_completed: 2
            }
        );
        assert_eq!(report.epsilon_spent, None, "no noise on the sum");
        let data = corpus(code);
        let rate = PoissonRecords::new(
            &data.train,
            plan.training.seq_len,
            None,
            plan.training.batch_size,
        )
        .unwrap()
        .rate();
        let mut accountant = RdpAccountant::default();
        let steps = 2 * plan.training.local_steps as u64;
        accountant.subsampled_gaussian(rate, 1.1, steps).unwrap();
        let (expected, _) = accountant.epsilon(plan.privacy.delta).unwrap();
        assert_eq!(report.record_epsilon, Some(expected), "{}", report.name);
        assert!(expected > 0.0 && expected.is_finite());
    }
}
