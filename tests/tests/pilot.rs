//! The pilot end to end with a small budget: aggregator, labs, local-only baseline, table,
//! final adapter on disk.

use mekong_examples::pilot::{ModelSize, PilotOptions};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pilot_runs_and_reports_every_language() {
    let dir = tempfile::tempdir().unwrap();
    let options = PilotOptions {
        languages: vec!["lo".into(), "km".into(), "id".into()],
        rounds: 2,
        steps: 4,
        model: ModelSize::Tiny,
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
