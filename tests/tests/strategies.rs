//! Every sum-only aggregation mode the participant runtime supports, end to end over gRPC on
//! loopback with real burn training: three labs, two rounds, once with secure aggregation and
//! once in plaintext.
//!
//! Checked per mode (issue #5: "every sum-only mode runs through secure aggregation end to
//! end and gives the same global adapter as its plaintext run, within the quantisation
//! bound"):
//! 1. each securely aggregated round's global equals the plaintext aggregation
//!    (`Strategy::aggregate` over a `WeightedSum`) of the very uploads the labs made, from the
//!    previous global, within the round's reported quantisation bound;
//! 2. the plaintext run's labs upload bit for bit what the secure run's labs uploaded in
//!    round 1 (same start, deterministic training), and the two runs' round-1 globals agree
//!    within the bound; the final globals agree within the sum of the two rounds' bounds
//!    (local training is plain SGD, which carries a start that differs by the quantisation
//!    error into an update that differs by about as much);
//! 3. the mode did what it says: which factors moved, HetLoRA's ranks, FedSA-LoRA's B,
//!    FedEx-LoRA's dense corrections (written beside each round's adapter, and exact: the
//!    global's effective update is the labs' weighted mean within the quantisation bound).
//!
//! FedEx-LoRA is compared on A, B and on each module's effective update
//! `base_delta + (α/r)·B·A`, which its dense upload makes exact: `base_delta` alone absorbs
//! the rounding of `B̄Ā`, so only the effective update is bounded by the upload's
//! quantisation error.

use std::sync::Arc;

use burn::prelude::Device;
use fedclient::participant;
use fedcore::aggregate::WeightedSum;
use fedcore::strategy::{
    AggregatedUpload, AggregationMode, GlobalModel, GroupSpec, HetLoraSpec, ServerState,
    StrategySpec, global,
};
use fedcore::{FederationPlan, Strategy};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};

const CODES: [&str; 3] = ["lo", "km", "th"];
const ROUNDS: u64 = 2;

struct Run {
    /// Globals of rounds 0..=ROUNDS as written by the aggregator.
    globals: Vec<GlobalModel>,
    /// Per round: the quantisation bound (0 in plaintext).
    bounds: Vec<f64>,
    recorder: Arc<Recorder>,
}

fn plan(mode: AggregationMode, secure: bool) -> FederationPlan {
    let names: Vec<String> = CODES.iter().map(|c| format!("lab-{c}")).collect();
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, ROUNDS, 300_000, 60_000);
    plan.secure_aggregation.enabled = secure;
    // Plain SGD: a start that differs by the quantisation error moves the next round's
    // uploads by about as much (AdamW's normalised step could flip the sign of a
    // near-zero gradient), so the two runs stay comparable after round 1 too.
    plan.training.optimizer = fedcore::LocalOptimizer::Sgd;
    plan.training.learning_rate = 0.1;
    plan.strategy = StrategySpec {
        mode,
        hetlora: (mode == AggregationMode::HetLora).then(|| HetLoraSpec {
            ranks: [("lab-lo".to_string(), 2), ("lab-km".to_string(), 3)].into(),
            default_rank: None,
        }),
        // One group of all three labs: with secure aggregation a group needs at least
        // max_colluding + 2 = 3 (tests/tests/group_b.rs runs two groups).
        groups: (mode == AggregationMode::GroupB).then(|| GroupSpec {
            members: names
                .iter()
                .map(|n| (n.clone(), "sea".to_string()))
                .collect(),
            min_labs: 3,
        }),
        ..Default::default()
    };
    plan.validate().unwrap();
    plan
}

async fn run(plan: &FederationPlan) -> Run {
    let dir = tempfile::tempdir().unwrap();
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    let mut finals = Vec::new();
    for (i, code) in CODES.iter().enumerate() {
        let mut options = participant_options(&server.url(), &format!("lab-{code}"), code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    for lab in labs {
        let report = lab.await.unwrap().unwrap();
        assert_eq!(report.rounds.len(), ROUNDS as usize);
        finals.push((
            report.name.clone(),
            report.final_adapter,
            report.own_adapter,
            report.final_base_delta,
        ));
    }
    server.finished().await;
    let status = server.status();
    assert_eq!(status.history.len(), ROUNDS as usize);
    let globals: Vec<GlobalModel> = (0..=ROUNDS)
        .map(|r| global::read_dir(&server.store().round_dir(r)).unwrap())
        .collect();
    // Every lab received the last global, corrections included.
    let last = globals.last().unwrap();
    for (name, adapter, own, base_delta) in finals {
        assert_eq!(&adapter, &last.adapter);
        assert_eq!(&base_delta, &last.base_delta);
        // What the lab uses: its group's model under group_b.
        if let Some(group) = plan.strategy.participant_group(&name) {
            assert_eq!(own, last.for_group(group).unwrap(), "{name}");
        } else if plan.strategy.mode != AggregationMode::FedSaLora {
            assert_eq!(own, last.adapter, "{name}");
        }
    }
    let bounds = status
        .history
        .iter()
        .map(|h| h.secure.as_ref().map_or(0.0, |s| s.error_bound))
        .collect();
    server.shutdown().await.unwrap();
    Run {
        globals,
        bounds,
        recorder,
    }
}

/// The plaintext aggregation of `round`'s recorded uploads from `previous`.
fn plaintext_aggregate(
    plan: &FederationPlan,
    previous: &GlobalModel,
    round: u64,
    recorder: &Recorder,
) -> GlobalModel {
    let strategy = Strategy::for_plan(plan.strategy.clone(), plan).unwrap();
    let state = ServerState {
        round: round - 1,
        ..Default::default()
    };
    let layout = strategy.upload_layout(previous, &state);
    let mut sum = WeightedSum::new(layout.len());
    let uploads = recorder.round(round);
    assert_eq!(
        uploads.len(),
        CODES.len(),
        "round {round}: every lab uploads"
    );
    for u in &uploads {
        sum.add(u.num_samples, &u.values).unwrap();
    }
    let upload = AggregatedUpload::from_weighted_sum(&sum).unwrap();
    strategy
        .aggregate(previous, &state, &upload)
        .unwrap()
        .global
}

/// Largest deviation of `got` from `want`, in units of the allowed error: per value of A and
/// B (`bound` each), or, for FedSVD (whose SVD re-factorisation is a post-processing of the
/// sum), per value of `B·A`, where an error of `bound` per value of `B̄` (in the basis of the
/// previous global's A, `basis`) moves `(B̄A)_ij` by at most `bound · Σ_k |A_kj|`.
/// FedEx-LoRA: per value of A and B, and per value of the effective update, where an error
/// of `bound` per value of the dense upload moves it by at most `(α/r)·bound`.
fn deviation(
    mode: AggregationMode,
    got: &GlobalModel,
    want: &GlobalModel,
    bound: f64,
    basis: &GlobalModel,
) -> f64 {
    let mut worst = 0f64;
    if mode == AggregationMode::FedExLora {
        assert_eq!(
            got.manifest(),
            want.manifest(),
            "FedEx globals carry corrections"
        );
        let scaling = got.adapter.config().scaling() as f64;
        for (name, _) in got.adapter.modules() {
            let (g, w) = (
                got.effective_delta(name).unwrap(),
                want.effective_delta(name).unwrap(),
            );
            for (x, y) in g.iter().zip(w.iter()) {
                // f32 storage of the correction, relative to the update's size.
                let allowed = scaling * bound + 1e-6 + 1e-6 * y.abs();
                worst = worst.max((x - y).abs() / allowed);
            }
        }
    }
    for (((name, g), (_, w)), (_, p)) in got
        .adapter
        .modules()
        .iter()
        .zip(want.adapter.modules())
        .zip(basis.adapter.modules())
    {
        if mode == AggregationMode::FedSvd {
            let (pg, pw) = (g.delta(1.0).unwrap(), w.delta(1.0).unwrap());
            let cols = pw.cols();
            for (idx, (x, y)) in pg.data().iter().zip(pw.data()).enumerate() {
                let j = idx % cols;
                let colsum: f64 = (0..p.a.rows()).map(|k| p.a.get(k, j).abs() as f64).sum();
                let allowed = bound * colsum + 1e-6;
                worst = worst.max((*x as f64 - *y as f64).abs() / allowed);
            }
        } else {
            for (t, (x, y)) in [("A", (&g.a, &w.a)), ("B", (&g.b, &w.b))] {
                for (a, b) in x.data().iter().zip(y.data()) {
                    let d = (*a as f64 - *b as f64).abs() / (bound + 1e-6);
                    assert!(d.is_finite(), "{name}.{t}");
                    worst = worst.max(d);
                }
            }
        }
    }
    worst
}

fn max_abs_change(a: &fedcore::Matrix, b: &fedcore::Matrix) -> f32 {
    a.data()
        .iter()
        .zip(b.data())
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

async fn check_mode(mode: AggregationMode) {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let secure_plan = plan(mode, true);
    let plain_plan = plan(mode, false);
    let secure = run(&secure_plan).await;
    let plain = run(&plain_plan).await;

    // 1. Each secure round equals the plaintext aggregation of its own uploads.
    for round in 1..=ROUNDS {
        let r = round as usize;
        let bound = secure.bounds[r - 1];
        assert!(bound > 0.0 && bound < 1e-4, "round {round}: bound {bound}");
        let want = plaintext_aggregate(
            &secure_plan,
            &secure.globals[r - 1],
            round,
            &secure.recorder,
        );
        let dev = deviation(
            mode,
            &secure.globals[r],
            &want,
            bound,
            &secure.globals[r - 1],
        );
        eprintln!(
            "{}: round {round}: secure vs plaintext of the same uploads: {dev:.3} × bound ({bound:.2e})",
            mode.name()
        );
        assert!(dev <= 1.0, "{}: round {round}: {dev} × bound", mode.name());
        // The plaintext run's aggregator computed the same thing from its uploads.
        let want_plain =
            plaintext_aggregate(&plain_plan, &plain.globals[r - 1], round, &plain.recorder);
        assert!(
            deviation(
                mode,
                &plain.globals[r],
                &want_plain,
                0.0,
                &plain.globals[r - 1]
            ) <= 1.0,
            "{}: plaintext round {round} is not the weighted aggregate of its uploads",
            mode.name()
        );
    }

    // 2. The secure run against the plaintext run.
    let mut first_secure = secure.recorder.round(1);
    let mut first_plain = plain.recorder.round(1);
    first_secure.sort_by(|a, b| a.name.cmp(&b.name));
    first_plain.sort_by(|a, b| a.name.cmp(&b.name));
    for (s, p) in first_secure.iter().zip(&first_plain) {
        assert_eq!(s.name, p.name);
        assert_eq!(s.values, p.values, "{}: round-1 uploads differ", s.name);
        assert_eq!(s.num_samples, p.num_samples);
    }
    let dev1 = deviation(
        mode,
        &secure.globals[1],
        &plain.globals[1],
        secure.bounds[0],
        &secure.globals[0],
    );
    assert!(dev1 <= 1.0, "{}: round 1: {dev1} × bound", mode.name());
    let last = ROUNDS as usize;
    let bound_total: f64 = secure.bounds.iter().sum();
    let dev_final = deviation(
        mode,
        &secure.globals[last],
        &plain.globals[last],
        bound_total,
        &secure.globals[last - 1],
    );
    eprintln!(
        "{}: secure vs plaintext run: round 1 {dev1:.3} × bound, final {dev_final:.3} × Σ bounds ({bound_total:.2e})",
        mode.name()
    );
    assert!(
        dev_final <= 1.0,
        "{}: final {dev_final} × Σ bounds",
        mode.name()
    );

    // 3. What the mode does.
    let (g0, g1, g2) = (
        &secure.globals[0].adapter,
        &secure.globals[1].adapter,
        &secure.globals[2].adapter,
    );
    let corrections = |r: usize| &secure.globals[r].base_delta;
    for ((name, m0), ((_, m1), (_, m2))) in g0
        .modules()
        .iter()
        .zip(g1.modules().iter().zip(g2.modules()))
    {
        let (da1, db1) = (max_abs_change(&m0.a, &m1.a), max_abs_change(&m0.b, &m1.b));
        let (da2, db2) = (max_abs_change(&m1.a, &m2.a), max_abs_change(&m1.b, &m2.b));
        match mode {
            AggregationMode::FfaLora => {
                assert!(da1 == 0.0 && da2 == 0.0 && db1 > 0.0 && db2 > 0.0, "{name}")
            }
            // Round 1 trains B; the SVD then rotates A.
            AggregationMode::FedSvd => assert!(db1 > 0.0 && da1 > 0.0, "{name}"),
            AggregationMode::RoLora => {
                assert!(da1 == 0.0 && db1 > 0.0, "{name}: round 1 trains B alone");
                assert!(da2 > 0.0 && db2 == 0.0, "{name}: round 2 trains A alone");
            }
            AggregationMode::FedIt | AggregationMode::HetLora => {
                assert!(da1 > 0.0 && db1 > 0.0 && da2 > 0.0 && db2 > 0.0, "{name}")
            }
            // Both factors train, and the residual FedIT would lose is merged into the base:
            // zero at the start, then a correction that changes every round.
            AggregationMode::FedExLora => {
                assert!(da1 > 0.0 && db1 > 0.0 && da2 > 0.0 && db2 > 0.0, "{name}");
                let zero = fedcore::Matrix::zeros(m0.b.rows(), m0.a.cols());
                assert_eq!(corrections(0)[name], zero, "{name}: round 0");
                assert!(max_abs_change(&corrections(0)[name], &corrections(1)[name]) > 0.0);
                assert!(max_abs_change(&corrections(1)[name], &corrections(2)[name]) > 0.0);
            }
            // B is personal: the global B stays at its start, A is averaged.
            AggregationMode::FedSaLora => {
                assert!(db1 == 0.0 && db2 == 0.0 && da1 > 0.0 && da2 > 0.0, "{name}")
            }
            // A and the group's B both move; with one group, its B is the global's B.
            AggregationMode::GroupB => {
                assert!(da1 > 0.0 && db1 > 0.0 && da2 > 0.0 && db2 > 0.0, "{name}");
                for r in 0..=2 {
                    let g = &secure.globals[r];
                    assert_eq!(g.group_b["sea"][name], g.adapter.module(name).unwrap().b);
                }
            }
            _ => unreachable!(),
        }
        if mode != AggregationMode::FedExLora {
            assert!(corrections(2).is_empty(), "{}: no corrections", mode.name());
        }
    }
    if mode == AggregationMode::HetLora {
        // lab-lo (rank 2) and lab-km (rank 3) upload zeros beyond their rank; lab-th has 4.
        for u in secure.recorder.round(1) {
            let rank = match u.name.as_str() {
                "lab-lo" => 2,
                "lab-km" => 3,
                _ => 4,
            };
            let coverage = &u.values[u.values.len() - 4..];
            let expected: Vec<f32> = (0..4).map(|j| f32::from(u8::from(j < rank))).collect();
            assert_eq!(coverage, expected.as_slice(), "{}", u.name);
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn group_b_secure_equals_plaintext() {
    check_mode(AggregationMode::GroupB).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ffa_lora_secure_equals_plaintext() {
    check_mode(AggregationMode::FfaLora).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedsvd_secure_equals_plaintext() {
    check_mode(AggregationMode::FedSvd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedit_secure_equals_plaintext() {
    check_mode(AggregationMode::FedIt).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hetlora_secure_equals_plaintext() {
    check_mode(AggregationMode::HetLora).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedsa_lora_secure_equals_plaintext() {
    check_mode(AggregationMode::FedSaLora).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolora_secure_equals_plaintext() {
    check_mode(AggregationMode::RoLora).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fedex_lora_secure_equals_plaintext() {
    check_mode(AggregationMode::FedExLora).await;
}
