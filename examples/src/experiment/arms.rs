//! Running one arm of the experiment: a federation under one mode, local-only training, or
//! centralised training on every language at once.

use std::time::Instant;

use burn::tensor::Device;
use fedclient::error::ModelError;
use fedclient::eval::evaluate;
use fedclient::model::{LoraLlama, RowBatch};
use fedclient::train::{BatchSource, RandomWindows, train, train_local};
use fedcore::aggregate::WeightedSum;
use fedcore::strategy::{AggregatedUpload, GlobalModel, ServerState, StrategySpec};
use fedcore::{AggregationMode, LoraAdapter, Matrix, Strategy};

use super::{Arm, ArmRun, ExperimentError, ExperimentOptions, Lab, RoundScores};

/// Runs `arm` with `steps` local steps per round from `base` (B = 0, A from the shared
/// seed), scoring every language before training and after every round.
pub fn run_arm(
    arm: Arm,
    steps: usize,
    options: &ExperimentOptions,
    labs: &[Lab],
    base: &LoraLlama,
    device: &Device,
) -> Result<ArmRun, ExperimentError> {
    let started = Instant::now();
    let mut fedit_error = Vec::new();
    let rounds = match arm {
        Arm::LocalOnly => local_only(steps, options, labs, base, device)?,
        Arm::Centralised => centralised(steps, options, labs, base, device)?,
        Arm::FfaLora | Arm::FedSvd | Arm::FedIt | Arm::FedSaLora => {
            let mode = match arm {
                Arm::FfaLora => AggregationMode::FfaLora,
                Arm::FedSvd => AggregationMode::FedSvd,
                Arm::FedIt => AggregationMode::FedIt,
                _ => AggregationMode::FedSaLora,
            };
            federated(mode, steps, options, labs, base, device, &mut fedit_error)?
        }
    };
    Ok(ArmRun {
        arm,
        local_steps: steps,
        rounds,
        fedit_error,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// The seed of lab `lab`'s batches in `round` (distinct per lab and round, the same in every
/// arm so that arms see the same batches).
fn batch_seed(options: &ExperimentOptions, lab: usize, round: u64) -> u64 {
    options
        .seed
        .wrapping_mul(0x9E37_79B9_7F4A_7C15)
        .wrapping_add((lab as u64) << 32)
        .wrapping_add(round)
}

/// Held-out loss of every language under `model_for(lab index)`.
fn score<'a>(
    round: u64,
    labs: &[Lab],
    options: &ExperimentOptions,
    device: &Device,
    model_for: impl Fn(usize) -> &'a LoraLlama,
) -> Result<RoundScores, ModelError> {
    let loss = labs
        .iter()
        .enumerate()
        .map(|(i, lab)| {
            evaluate(model_for(i), &lab.corpus.heldout, options.seq_len, device).map(|s| s.loss)
        })
        .collect::<Result<_, _>>()?;
    Ok(RoundScores { round, loss })
}

/// A federation under `mode`: every lab every round, token-weighted mean of the uploads.
fn federated(
    mode: AggregationMode,
    steps: usize,
    options: &ExperimentOptions,
    labs: &[Lab],
    base: &LoraLlama,
    device: &Device,
    fedit_error: &mut Vec<f64>,
) -> Result<Vec<RoundScores>, ExperimentError> {
    let spec = options.training(steps);
    let (model_spec, lora) = (base.model_spec().clone(), base.lora_spec().clone());
    let modules = model_spec.lora_modules(&lora.target_modules);
    let strategy = Strategy::new(
        StrategySpec {
            mode,
            ..StrategySpec::default()
        },
        &lora,
        &modules,
        false,
    )?;
    let mut global = GlobalModel::new(base.export_adapter());
    let mut state = ServerState::default();
    // FedSA-LoRA: each lab's own B, kept between rounds.
    let mut personal: Vec<Option<LoraAdapter>> = vec![None; labs.len()];
    let load = |adapter: &LoraAdapter| base.clone().load_adapter(adapter);
    let mut scores = vec![score(0, labs, options, device, |_| base)?];
    for round in 1..=options.rounds {
        let layout = strategy.upload_layout(&global, &state);
        let trains = strategy.trains(&state);
        let mut sum = WeightedSum::new(layout.len());
        let mut trained_adapters = Vec::new();
        for (i, lab) in labs.iter().enumerate() {
            let name = format!("lab-{}", lab.code);
            let download = strategy.download(&global, &name, personal[i].as_ref())?;
            let model = load(&download)?.set_trainable(trains.a, trains.b);
            let seed = batch_seed(options, i, round);
            let (trained, _) = train_local(model, &lab.corpus.train, &spec, seed, device)?;
            let adapter = trained.export_adapter();
            let upload = strategy.upload(&layout, &download, &adapter)?;
            sum.add(lab.corpus.train_samples() as u64, &upload)?;
            trained_adapters.push(adapter);
        }
        if mode == AggregationMode::FedIt {
            let weights: Vec<f64> = labs
                .iter()
                .map(|l| l.corpus.train_samples() as f64)
                .collect();
            fedit_error.push(factor_averaging_error(
                &global.adapter,
                &trained_adapters,
                &weights,
            )?);
        }
        let outcome =
            strategy.aggregate(&global, &state, &AggregatedUpload::from_weighted_sum(&sum)?)?;
        global = outcome.global;
        state = outcome.state;
        let models: Vec<LoraLlama> = if mode == AggregationMode::FedSaLora {
            // Each lab is scored with its personalised model: the new global A, its own B.
            personal = trained_adapters.into_iter().map(Some).collect();
            labs.iter()
                .enumerate()
                .map(|(i, lab)| {
                    let name = format!("lab-{}", lab.code);
                    load(&strategy.download(&global, &name, personal[i].as_ref())?)
                        .map_err(ExperimentError::from)
                })
                .collect::<Result<_, _>>()?
        } else {
            vec![load(&global.adapter)?]
        };
        scores.push(score(round, labs, options, device, |i| {
            &models[i.min(models.len() - 1)]
        })?);
    }
    Ok(scores)
}

/// `‖Σpᵢ BᵢAᵢ − B̄Ā‖_F / ‖Σpᵢ BᵢAᵢ − B_g A_g‖_F` over all modules: FedIT's error relative to
/// the size of the round's exact mean update (`p` normalised from `weights`).
pub fn factor_averaging_error(
    global: &LoraAdapter,
    trained: &[LoraAdapter],
    weights: &[f64],
) -> Result<f64, ExperimentError> {
    let total: f64 = weights.iter().sum();
    let mut err2 = 0f64;
    let mut update2 = 0f64;
    for (name, g) in global.modules() {
        let (out_f, in_f) = (g.b.rows(), g.a.cols());
        let mut exact = vec![0f64; out_f * in_f];
        let mut a_mean = vec![0f64; g.a.data().len()];
        let mut b_mean = vec![0f64; g.b.data().len()];
        for (t, w) in trained.iter().zip(weights) {
            let p = w / total;
            let m = t.module(name).expect("same layout as the global");
            add_scaled(&mut exact, m.b.matmul(&m.a)?.data(), p);
            add_scaled(&mut a_mean, m.a.data(), p);
            add_scaled(&mut b_mean, m.b.data(), p);
        }
        let to_f32 = |v: &[f64]| v.iter().map(|&x| x as f32).collect::<Vec<f32>>();
        let naive = Matrix::new(out_f, g.b.cols(), to_f32(&b_mean))?.matmul(&Matrix::new(
            g.a.rows(),
            in_f,
            to_f32(&a_mean),
        )?)?;
        let before = g.b.matmul(&g.a)?;
        for ((e, n), b) in exact.iter().zip(naive.data()).zip(before.data()) {
            err2 += (e - f64::from(*n)).powi(2);
            update2 += (e - f64::from(*b)).powi(2);
        }
    }
    Ok(if update2 > 0.0 {
        (err2 / update2).sqrt()
    } else {
        0.0
    })
}

fn add_scaled(acc: &mut [f64], values: &[f32], p: f64) {
    for (a, v) in acc.iter_mut().zip(values) {
        *a += p * f64::from(*v);
    }
}

/// Every lab alone: the same rounds × steps and the same batches as in the federation.
fn local_only(
    steps: usize,
    options: &ExperimentOptions,
    labs: &[Lab],
    base: &LoraLlama,
    device: &Device,
) -> Result<Vec<RoundScores>, ExperimentError> {
    let spec = options.training(steps);
    let mut models: Vec<LoraLlama> = labs.iter().map(|_| base.clone()).collect();
    let mut scores = vec![score(0, labs, options, device, |_| base)?];
    for round in 1..=options.rounds {
        for (i, lab) in labs.iter().enumerate() {
            let seed = batch_seed(options, i, round);
            let model = models[i].clone();
            models[i] = train_local(model, &lab.corpus.train, &spec, seed, device)?.0;
        }
        scores.push(score(round, labs, options, device, |i| &models[i])?);
    }
    Ok(scores)
}

/// One batch of every language per step.
struct EveryLanguage<'a>(Vec<RandomWindows<'a>>);

impl BatchSource for EveryLanguage<'_> {
    fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
        let mut parts = self.0.iter_mut().map(|s| s.next_batch());
        let mut out = parts.next().expect("at least one language")?;
        for part in parts {
            out.append(&part?);
        }
        Ok(out)
    }
}

/// One model on the union of the data: `steps` steps per "round", each on one batch of
/// every language (the tokens all labs see in one local step).
fn centralised(
    steps: usize,
    options: &ExperimentOptions,
    labs: &[Lab],
    base: &LoraLlama,
    device: &Device,
) -> Result<Vec<RoundScores>, ExperimentError> {
    let spec = options.training(steps);
    let mut model = base.clone();
    let mut scores = vec![score(0, labs, options, device, |_| base)?];
    for round in 1..=options.rounds {
        let sources = labs
            .iter()
            .enumerate()
            .map(|(i, lab)| {
                RandomWindows::new(
                    &lab.corpus.train,
                    options.batch_size,
                    options.seq_len,
                    batch_seed(options, i, round),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        model = train(model, &spec, &mut EveryLanguage(sources), device, &mut ())?.0;
        scores.push(score(round, labs, options, device, |_| &model)?);
    }
    Ok(scores)
}
