//! Federated equals centralised (issue #5): with FFA-LoRA, plain FedAvg, and one full-batch
//! SGD step per round (each participant's whole dataset as one batch, sample weight = its
//! trained token count), 20 rounds over 4 participants give the adapter that 20 full-batch
//! SGD steps on the union of their data give, to 1e-5 relative, on the client's real model
//! code and fedcore's real `Strategy` (upload = trained − downloaded, server = weighted mean).
//!
//! Why it must hold: participant i's loss is its mean target loss `L_i = Σ nll / n_i`, so the
//! weighted mean of `B − lr·∇L_i` with weights `n_i` is `B − lr·∇(Σ_all nll / N)`, the
//! centralised step; ΔW = (α/r)·B·A is linear in B with A frozen. Weighting each participant
//! equally instead breaks it, which the test also checks (so it can fail).

use burn::tensor::Device;
use fedclient::data::{ByteTokenizer, TextTokenizer};
use fedclient::error::ModelError;
use fedclient::model::{LoraLlama, RowBatch};
use fedclient::train::{BatchSource, train};
use fedcore::aggregate::WeightedSum;
use fedcore::strategy::{AggregatedUpload, GlobalModel, ServerState, StrategySpec};
use fedcore::{LocalOptimizer, LoraAdapter, LoraSpec, ModelSpec, Strategy, TrainingSpec};

const SEQ: usize = 24;
const ROUNDS: usize = 20;

/// One full batch, every step.
struct FullBatch(RowBatch);

impl BatchSource for FullBatch {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
        Ok(self.0.clone())
    }
}

/// Four "labs" with different text and different amounts of it.
fn datasets() -> Vec<RowBatch> {
    let texts = [
        "All human beings are born free and equal in dignity and rights. They are endowed with reason and conscience.",
        "Tous les êtres humains naissent libres et égaux en dignité et en droits. Ils sont doués de raison et de conscience.",
        "Todos los seres humanos nacen libres e iguales en dignidad y derechos y, dotados como están de razón y conciencia.",
        "Alle Menschen sind frei und gleich an Würde und Rechten geboren. Sie sind mit Vernunft und Gewissen begabt.",
    ];
    texts
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let tokens = ByteTokenizer.encode(text);
            let rows = i + 2;
            let stride = (tokens.len() - SEQ - 1) / rows;
            let starts: Vec<usize> = (0..rows).map(|r| r * stride).collect();
            RowBatch::windows(&tokens, &starts, SEQ)
        })
        .collect()
}

/// The rows of every batch as one batch.
fn union(batches: &[RowBatch]) -> RowBatch {
    let mut out = batches[0].clone();
    for b in &batches[1..] {
        out.append(b);
    }
    out
}

fn spec() -> TrainingSpec {
    TrainingSpec {
        local_steps: 1,
        batch_size: 1,
        seq_len: SEQ,
        learning_rate: 0.5,
        weight_decay: 0.0,
        optimizer: LocalOptimizer::Sgd,
        ..TrainingSpec::default()
    }
}

fn b_values(adapter: &LoraAdapter) -> Vec<f64> {
    adapter
        .flatten(&adapter.b_manifest())
        .unwrap()
        .iter()
        .map(|v| *v as f64)
        .collect()
}

fn norm(v: impl Iterator<Item = f64>) -> f64 {
    v.map(|x| x * x).sum::<f64>().sqrt()
}

/// `ROUNDS` federated rounds; `weight` gives a participant's sample weight.
fn federated(base: &LoraLlama, data: &[RowBatch], weight: impl Fn(&RowBatch) -> u64) -> Vec<f64> {
    let device = Device::flex();
    let (model_spec, lora) = (base.model_spec().clone(), base.lora_spec().clone());
    let modules = model_spec.lora_modules(&lora.target_modules);
    let strategy = Strategy::new(StrategySpec::default(), &lora, &modules, false).unwrap();
    let mut global = GlobalModel::new(base.export_adapter());
    let mut state = ServerState::default();
    for _ in 0..ROUNDS {
        let layout = strategy.upload_layout(&global, &state);
        let trains = strategy.trains(&state);
        let mut sum = WeightedSum::new(layout.len());
        for batch in data {
            let download = strategy.download(&global, "lab", None).unwrap();
            let model = base
                .clone()
                .load_adapter(&download)
                .unwrap()
                .set_trainable(trains.a, trains.b);
            let (trained, _) = train(
                model,
                &spec(),
                &mut FullBatch(batch.clone()),
                &device,
                &mut (),
            )
            .unwrap();
            let upload = strategy
                .upload(&layout, "p", &download, &trained.export_adapter())
                .unwrap();
            sum.add(weight(batch), &upload).unwrap();
        }
        let outcome = strategy
            .aggregate(
                &global,
                &state,
                &AggregatedUpload::from_weighted_sum(&sum).unwrap(),
            )
            .unwrap();
        global = outcome.global;
        state = outcome.state;
    }
    assert_eq!(state.round, ROUNDS as u64);
    b_values(&global.adapter)
}

#[test]
fn twenty_full_batch_sgd_rounds_over_four_labs_equal_centralised_training() {
    let device = Device::flex();
    let lora = LoraSpec {
        rank: 4,
        alpha: 8.0,
        ..LoraSpec::default()
    };
    let base = LoraLlama::new(&ModelSpec::tiny(), &lora, &device).unwrap();
    let data = datasets();
    let all = union(&data);
    let weights: Vec<f64> = data.iter().map(RowBatch::trained_targets).collect();
    assert_eq!(weights.iter().sum::<f64>(), all.trained_targets());

    // Centralised: ROUNDS full-batch SGD steps on the union.
    let mut model = base.clone();
    let start = b_values(&model.export_adapter());
    let mut losses = Vec::new();
    for _ in 0..ROUNDS {
        let (m, reports) = train(
            model,
            &spec(),
            &mut FullBatch(all.clone()),
            &device,
            &mut (),
        )
        .unwrap();
        model = m;
        losses.push(reports[0].loss);
    }
    let central = b_values(&model.export_adapter());
    assert!(
        losses[ROUNDS - 1] < losses[0] - 0.05,
        "training moved: {losses:?}"
    );

    let fed = federated(&base, &data, |b| b.trained_targets() as u64);
    let moved = norm(central.iter().zip(&start).map(|(c, s)| c - s));
    let err = norm(fed.iter().zip(&central).map(|(f, c)| f - c));
    let rel = err / norm(central.iter().copied());
    eprintln!(
        "‖B_central‖ = {:.4e}, moved {moved:.4e}; ‖B_fed − B_central‖ = {err:.3e}, relative {rel:.3e}; loss {:.4} → {:.4}",
        norm(central.iter().copied()),
        losses[0],
        losses[ROUNDS - 1]
    );
    assert!(
        moved > 1e-2,
        "B barely moved ({moved}): the comparison would be vacuous"
    );
    assert!(
        rel <= 1e-5,
        "federated vs centralised: relative error {rel:.3e}"
    );

    // Weighting labs equally is not the centralised step: the test can fail.
    let uniform = federated(&base, &data, |_| 1);
    let rel_uniform =
        norm(uniform.iter().zip(&central).map(|(f, c)| f - c)) / norm(central.iter().copied());
    eprintln!("equal weights instead of token counts: relative error {rel_uniform:.3e}");
    assert!(rel_uniform > 100.0 * rel.max(1e-7), "{rel_uniform:.3e}");
}
