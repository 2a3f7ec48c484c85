//! The strategy experiment (issue #5) at toy scale: every arm trains, the outputs are
//! written, and FedIT's measured aggregation error is what its definition says.

use burn::tensor::Device;
use fedcore::{AdapterConfig, LoraAdapter, LoraModule, Matrix, TargetModule};
use mekong_examples::experiment::arms::factor_averaging_error;
use mekong_examples::experiment::{self, Arm, ExperimentModel, ExperimentOptions, Layout};
use mekong_examples::pilot::ModelSize;

fn toy_options(out: &std::path::Path) -> ExperimentOptions {
    ExperimentOptions {
        languages: vec!["lo".into(), "vi".into(), "id".into()],
        model: ExperimentModel::Preset(ModelSize::Tiny),
        rounds: 2,
        local_steps: vec![1, 3],
        batch_size: 2,
        seq_len: 16,
        learning_rate: 1e-2,
        out_dir: out.to_path_buf(),
        ..ExperimentOptions::default()
    }
}

#[test]
fn every_arm_runs_and_the_report_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let options = toy_options(dir.path());
    let mut seen = Vec::new();
    let results = experiment::run(&options, &Device::flex(), |r| {
        seen.push((r.arm, r.local_steps))
    })
    .unwrap();
    assert_eq!(seen.len(), Arm::ALL.len() * 2);
    for run in &results.runs {
        assert_eq!(run.rounds.len(), 3, "round 0 and two rounds");
        let (before, after) = (run.rounds[0].mean(), run.rounds[2].mean());
        assert!(
            after < before,
            "{} with {} local steps did not learn: {before} -> {after}",
            run.arm.name(),
            run.local_steps
        );
        assert_eq!(run.rounds[0].loss.len(), 3);
        if run.arm == Arm::FedIt {
            assert_eq!(run.fedit_error.len(), 2);
            // Labs train A and B on different text: the factors' mean is not the mean of
            // the products.
            assert!(run.fedit_error.iter().all(|e| *e > 0.0 && e.is_finite()));
        } else {
            assert!(run.fedit_error.is_empty());
        }
    }
    // Every arm starts from the same base, so round 0 is the same for all of them.
    let r0 = results.runs[0].rounds[0].loss.clone();
    assert!(results.runs.iter().all(|r| r.rounds[0].loss == r0));

    experiment::write_outputs(&results, dir.path()).unwrap();
    let png = std::fs::read(dir.path().join("strategies.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let width = u32::from_be_bytes(png[16..20].try_into().unwrap());
    let height = u32::from_be_bytes(png[20..24].try_into().unwrap());
    assert_eq!((width, height), (1040, 840), "three panels in a 2 × 2 grid");
    let json: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.path().join("strategies.json")).unwrap())
            .unwrap();
    assert_eq!(json["runs"].as_array().unwrap().len(), 16);
    let tables = std::fs::read_to_string(dir.path().join("strategies-tables.md")).unwrap();
    for arm in Arm::ALL {
        assert!(tables.contains(arm.name()), "{tables}");
    }
    assert!(tables.contains("Lao") && tables.contains("FedIT's aggregation error"));
    // Bits per character beside the loss: the first lab's "before" cell is its round-0
    // score, to the table's three decimals.
    let (_, bpc_table) = tables
        .split_once("bits per character of the held-out text")
        .unwrap_or_else(|| panic!("no bits-per-character table: {tables}"));
    let first_lab = &results.labs[0];
    let before = results.runs[0].rounds[0].bits_per_char[0];
    assert!(
        bpc_table.contains(&format!(
            "| {} ({}) | {} | {before:.3} |",
            first_lab.name, first_lab.language_name, first_lab.train_tokens
        )),
        "{bpc_table}"
    );
}

fn adapter(a: &[f32], b: &[f32]) -> LoraAdapter {
    let config = AdapterConfig {
        rank: 1,
        alpha: 1.0,
        target_modules: vec![TargetModule::Q],
        base_model: "hand-computed".into(),
        dropout: 0.0,
    };
    LoraAdapter::new(
        config,
        vec![(
            "model.layers.0.self_attn.q_proj".into(),
            LoraModule {
                a: Matrix::new(1, 2, a.to_vec()).unwrap(),
                b: Matrix::new(2, 1, b.to_vec()).unwrap(),
            },
        )],
    )
    .unwrap()
}

/// The per-country layout at toy scale: three labs per language, each scored with the model
/// it would use, and a verdict per lab against local-only and centralised training.
#[test]
fn per_country_labs_are_judged_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let options = ExperimentOptions {
        languages: vec!["lo".into(), "id".into()],
        layout: Layout::PerCountry,
        rounds: 2,
        local_steps: vec![2],
        arms: vec![
            Arm::GroupB,
            Arm::FfaLora,
            Arm::LocalOnly,
            Arm::CentralisedLanguage,
        ],
        eval_every_round: false,
        ..toy_options(dir.path())
    };
    let results = experiment::run(&options, &Device::flex(), |_| {}).unwrap();
    let names: Vec<&str> = results.labs.iter().map(|l| l.name.as_str()).collect();
    assert_eq!(names[0], "lab-lo-ministry");
    assert_eq!(names.len(), 6);
    for run in &results.runs {
        // Before and after the last round only.
        assert_eq!(run.rounds.len(), 2, "{}", run.arm.name());
        let last = &run.rounds[1];
        // group_b and centralised_language: one model per language, so the language's labs
        // score alike; local-only: each lab its own model.
        match run.arm {
            Arm::GroupB | Arm::CentralisedLanguage | Arm::FfaLora => {
                assert_eq!(last.loss[0], last.loss[1]);
                assert_eq!(last.loss[3], last.loss[5]);
            }
            Arm::LocalOnly => assert_ne!(last.loss[0], last.loss[2]),
            _ => unreachable!(),
        }
        assert!(last.mean() < run.rounds[0].mean(), "{}", run.arm.name());
    }
    // A verdict per lab for each federated arm, with both references.
    assert_eq!(results.verdicts.len(), 12);
    for v in &results.verdicts {
        assert!(v.local_only.is_some() && v.centralised_language.is_some());
        assert_eq!(
            v.beats_local_only,
            Some(v.federated < v.local_only.unwrap())
        );
        let share = v.share_of_centralised_gain.unwrap();
        let want = (v.before - v.federated) / (v.before - v.centralised_language.unwrap());
        assert!((share - want).abs() < 1e-12);
    }
    experiment::write_outputs(&results, dir.path()).unwrap();
    let tables = std::fs::read_to_string(dir.path().join("strategies-tables.md")).unwrap();
    assert!(tables.contains("Does every lab gain?") && tables.contains("lab-id-hospital"));
}

/// Hand-computed: global zero; two equally weighted labs with rank-1 factors.
#[test]
fn fedit_error_matches_a_hand_computed_case() {
    let global = adapter(&[0.0, 0.0], &[0.0, 0.0]);
    let t1 = adapter(&[1.0, 0.0], &[1.0, 0.0]);
    let t2 = adapter(&[0.0, 1.0], &[0.0, 1.0]);
    // Σ p BA = ½(e1e1ᵀ + e2e2ᵀ) = ½ I; B̄Ā = (½,½)ᵀ(½,½) = ¼ J.
    // ‖½I − ¼J‖² = 2·(¼)² + 2·(¼)² = ¼; ‖½I‖² = ½ → error = √(½) ≈ 0.7071.
    let e = factor_averaging_error(&global, &[t1.clone(), t2], &[1.0, 1.0]).unwrap();
    assert!((e - 0.5f64.sqrt()).abs() < 1e-6, "{e}");
    // Identical labs: no error.
    let e = factor_averaging_error(&global, &[t1.clone(), t1], &[3.0, 1.0]).unwrap();
    assert!(e.abs() < 1e-7, "{e}");
}
