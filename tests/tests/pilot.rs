//! The pilot end to end with a small budget: aggregator, labs, baselines, table, final
//! adapter on disk; in both layouts.

use fedclient::round_clock::Phase;
use fedcore::AggregationMode;
use mekong_examples::layout::Layout;
use mekong_examples::pilot::{ModelSize, PilotModel, PilotOptions};

/// The default layout and strategy at toy scale, through secure aggregation: three labs per
/// language, A shared by all, B by each language's labs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_country_pilot_gives_each_language_its_own_model() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "id".into()],
        rounds: 2,
        steps: 4,
        model: PilotModel::Preset(ModelSize::Tiny),
        device: fedclient::device::DeviceChoice::Cpu,
        batch_size: 4,
        seq_len: 32,
        out_dir: dir.path().join("pilot"),
        ..PilotOptions::default()
    };
    assert_eq!(options.layout, Layout::PerCountry, "the default layout");
    let report = mekong_examples::pilot::run(options).await.unwrap();
    assert_eq!(report.strategy, AggregationMode::GroupB);
    assert!(report.secure && report.max_error_bound > 0.0);
    let labs: Vec<&str> = report.rows.iter().map(|r| r.lab.as_str()).collect();
    assert_eq!(
        labs,
        [
            "lab-lo-ministry",
            "lab-lo-university",
            "lab-lo-hospital",
            "lab-id-ministry",
            "lab-id-university",
            "lab-id-hospital"
        ]
    );
    for lang in report.rows.chunks(3) {
        // The language's labs end with the same model (A and their language's B), judged on
        // the same held-out text; alone, each has its own.
        assert!(
            lang.iter()
                .all(|r| r.federated.loss == lang[0].federated.loss)
        );
        assert!(lang.iter().all(|r| r.centralised == lang[0].centralised));
        for r in lang {
            assert!(r.federated.loss < r.before.loss, "{r:?}");
            assert!(r.share_of_centralised_gain().is_some(), "{r:?}");
        }
    }
    // Lao and Indonesian end with different models; each scored once, not once per lab.
    assert_ne!(report.rows[0].federated.loss, report.rows[3].federated.loss);
    assert_eq!(
        (report.final_scoring.models, report.final_scoring.labs),
        (2, 6)
    );
    let table = mekong_examples::table::render(&report);
    assert!(
        table.contains("lab-id-hospital")
            && table.contains("group_b")
            && table.contains("of gain")
            && table.contains("federation beats training alone for")
            && table.contains("2 distinct for 6 labs (a language's labs end with the same model)"),
        "{table}"
    );
    // The final directory holds the global adapter and one complete adapter per language.
    let global = fedcore::strategy::global::read_dir(&report.final_adapter_dir).unwrap();
    assert_eq!(global.group_b.keys().collect::<Vec<_>>(), ["id", "lo"]);
    let lao = fedcore::peft::read_dir(&report.final_adapter_dir.join("groups/lo")).unwrap();
    assert_eq!(lao, global.for_group("lo").unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_runs_and_reports_every_language() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "km".into(), "id".into()],
        layout: Layout::OnePerLanguage,
        rounds: 2,
        steps: 4,
        model: PilotModel::Preset(ModelSize::Tiny),
        device: fedclient::device::DeviceChoice::Cpu,
        batch_size: 4,
        seq_len: 32,
        out_dir: dir.path().join("pilot"),
        // Distributed DP on every sum, and a canary in one lab's text.
        privacy: fedcore::privacy::PrivacySpec {
            mode: fedcore::privacy::PrivacyMode::Distributed,
            ..Default::default()
        },
        canary: Some(mekong_examples::canary::Canary::new("lab-km", 10, 1)),
        ..PilotOptions::default()
    };
    let report = mekong_examples::pilot::run(options).await.unwrap();
    assert_eq!(report.rows.len(), 3);
    let epsilon = report.rows[0].epsilon.expect("ε under [privacy]");
    assert!(epsilon > 0.0 && epsilon.is_finite());
    assert!(report.rows.iter().all(|r| r.epsilon == Some(epsilon)));
    let canary = report.canary.as_ref().expect("the canary was measured");
    for e in [canary.own, canary.global, canary.others_max] {
        assert_eq!(e.candidates, 999);
        assert!((1..=1000).contains(&e.rank));
        assert!(e.bits >= 0.0 && e.bits <= 1000f64.log2() + 1e-9);
    }
    // One lab per language: A shared, each lab's own B.
    assert_eq!(report.strategy, AggregationMode::FedSaLora);
    // Three labs, each with its own B: three models, three scores.
    assert_eq!(
        (report.final_scoring.models, report.final_scoring.labs),
        (3, 3)
    );
    assert!(report.secure, "the pilot aggregates securely by default");
    assert!(
        report.max_error_bound > 0.0 && report.max_error_bound < 1e-3,
        "{}",
        report.max_error_bound
    );
    for row in &report.rows {
        for e in [
            &row.before,
            &row.federated,
            row.local_only.as_ref().unwrap(),
            row.centralised.as_ref().unwrap(),
        ] {
            assert!(e.loss.is_finite() && e.loss > 0.0, "{row:?}");
            assert!(
                e.bits_per_char.is_finite() && e.bits_per_char > 0.0,
                "{row:?}"
            );
        }
        // A random base model on bytes starts near ln(256).
        assert!((row.before.loss - 256f64.ln()).abs() < 1.0, "{row:?}");
    }
    let table = mekong_examples::table::render(&report);
    assert!(
        table.contains("Lao (lo)")
            && table.contains("Indonesian (id)")
            && table.contains("secure aggregation: on")
            && table.contains("differential privacy: distributed")
            && table.contains("canary: \"The access code"),
        "{table}"
    );
    let adapter = fedcore::peft::read_dir(&report.final_adapter_dir).unwrap();
    assert_eq!(adapter.config().base_model, "mekong/tiny-llama-bytes");

    // Where the time went (issue #28): every lab's every round is split into phases that add
    // up to its wall time within 5%, training is among them, and so is secure aggregation.
    assert_eq!(report.lab_timings.len(), 3);
    for (lab, rounds) in &report.lab_timings {
        assert_eq!(rounds.len(), 2, "{lab}: {rounds:?}");
        for (i, t) in rounds.iter().enumerate() {
            let accounted = t.phases.total();
            assert!(t.wall_s > 0.0, "{lab} round {}: {t:?}", i + 1);
            assert!(
                (t.wall_s - accounted).abs() <= 0.05 * t.wall_s,
                "{lab} round {}: phases {accounted:.3} s of {:.3} s wall: {t:?}",
                i + 1,
                t.wall_s
            );
            assert!(t.phases.get(Phase::Train) > 0.0, "{lab}: {t:?}");
            assert!(t.phases.get(Phase::Secure) > 0.0, "{lab}: {t:?}");
            assert_eq!(
                t.phases.get(Phase::Upload),
                0.0,
                "secure rounds upload nothing in plaintext"
            );
        }
    }
    assert!(
        table.contains("where each lab's time went") && table.contains("× every lab alone"),
        "{table}"
    );
    assert!(report.local_only_time > std::time::Duration::ZERO);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_pilot_refuses_two_labs_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "id".into()],
        layout: Layout::OnePerLanguage,
        out_dir: dir.path().join("pilot"),
        ..PilotOptions::default()
    };
    let err = mekong_examples::pilot::run(options)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("at least 3 labs") && err.contains("--insecure-plaintext"),
        "{err}"
    );
}

/// The pilot's default when the model is cached: SmolLM2-135M-Instruct with its own
/// tokenizer, pinned in the plan by fingerprint. Skipped without the model file unless
/// `MEKONG_REQUIRE_MODEL=1` (CI fetches it and sets that).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_fine_tunes_the_cached_pretrained_model() {
    let path = fedclient::checkpoint::default_model_path();
    if !path.exists() {
        let required = std::env::var("MEKONG_REQUIRE_MODEL").is_ok_and(|v| v == "1");
        assert!(
            !required,
            "MEKONG_REQUIRE_MODEL=1 but {} is missing",
            path.display()
        );
        eprintln!(
            "SKIPPED: {} is missing (run scripts/fetch-model.sh)",
            path.display()
        );
        return;
    }
    let (model, note) = PilotModel::parse("auto").unwrap();
    assert_eq!(model, PilotModel::Checkpoint(path.clone()), "{note}");
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "th".into()],
        rounds: 1,
        steps: 2,
        seq_len: 64,
        device: fedclient::device::DeviceChoice::Cpu,
        out_dir: dir.path().join("pilot"),
        ..PilotOptions::for_model(model)
    };
    let report = mekong_examples::pilot::run(options).await.unwrap();
    assert_eq!(report.token_unit, "token");
    for row in &report.rows {
        // A pretrained model already knows these scripts: an untrained one over SmolLM2's
        // 49k-token vocabulary costs ~15 bits per token, about a character each here, and a
        // byte model ~24 bits per Lao or Thai character (3 bytes each). Windows of 64 tokens
        // leave less context than the 256 of the bits-per-character reference.
        assert!(row.before.bits_per_char < 10.0, "{row:?}");
        let local = row.local_only.as_ref().unwrap();
        for e in [&row.federated, local] {
            assert!(e.loss.is_finite(), "{row:?}");
        }
        assert!(local.loss < row.before.loss, "local training helps {row:?}");
    }
    let mean = |f: &dyn Fn(&mekong_examples::pilot::LabRow) -> f64| {
        report.rows.iter().map(f).sum::<f64>() / report.rows.len() as f64
    };
    assert!(
        mean(&|r| r.federated.loss) < mean(&|r| r.before.loss),
        "{}",
        mekong_examples::table::render(&report)
    );
    let table = mekong_examples::table::render(&report);
    assert!(table.contains("nats per token"), "{table}");
    let adapter = fedcore::peft::read_dir(&report.final_adapter_dir).unwrap();
    let checkpoint = fedclient::checkpoint::open(&path).unwrap();
    assert_eq!(adapter.config().base_model, checkpoint.spec.name);
}
