//! The pilot end to end with a small budget: aggregator, labs, local-only baseline, table,
//! final adapter on disk.

use mekong_examples::pilot::{ModelSize, PilotModel, PilotOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_runs_and_reports_every_language() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "km".into(), "id".into()],
        rounds: 2,
        steps: 4,
        model: PilotModel::Preset(ModelSize::Tiny),
        device: fedclient::device::DeviceChoice::Cpu,
        batch_size: 4,
        seq_len: 32,
        out_dir: dir.path().join("pilot"),
        ..PilotOptions::default()
    };
    let report = mekong_examples::pilot::run(options).await.unwrap();
    assert_eq!(report.rows.len(), 3);
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
            && table.contains("secure aggregation: on"),
        "{table}"
    );
    let adapter = fedcore::peft::read_dir(&report.final_adapter_dir).unwrap();
    assert_eq!(adapter.config().base_model, "mekong/tiny-llama-bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_pilot_refuses_two_labs_and_says_what_to_do() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "id".into()],
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
        languages: vec!["lo".into(), "th".into(), "id".into()],
        rounds: 1,
        steps: 3,
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
    let mean = |f: &dyn Fn(&mekong_examples::pilot::LanguageRow) -> f64| {
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
