//! Local training of the LoRA factors the round trains (B alone under FFA-LoRA, see
//! [`LoraLlama::set_trainable`]): AdamW (or plain SGD, `training.optimizer = "sgd"`) with a
//! warm-up + constant or cosine learning-rate schedule, gradient accumulation and
//! global-norm clipping, on batches of rows with a per-target loss weight (so prompt tokens
//! and padding count for nothing), and FedProx's proximal term when asked
//! ([`TrainOptions::prox_mu`]).
//!
//! The model arrives and leaves as an inference model on a plain device; training switches it
//! to autodiff (`Module::train`) for the duration of the call and back (`Module::valid`) at
//! the end. Base weights and A are parameters without gradients, so the optimizer never
//! touches them, holds no state for them, and they stay bit-identical.
//!
//! The optimizer state is fresh for every call: each federated round starts from the newly
//! aggregated global B, and Adam moments accumulated against the previous local B would point
//! the wrong way. This is standard FedAvg practice (local optimizer state is not carried
//! across rounds).
//!
//! Modules: [`schedule`] (learning rate per step), [`clip`] (global gradient norm),
//! [`source`] (where batches come from: random windows of a token stream, or shuffled packed
//! rows).

pub mod clip;
pub mod dp_sgd;
pub mod prox;
pub mod schedule;
pub mod source;

use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::{AdamWConfig, GradientsAccumulator, GradientsParams, SgdConfig};
use burn::tensor::Device;
use fedcore::{LocalOptimizer, TrainingSpec};

use crate::error::ModelError;
use crate::model::LoraLlama;
use crate::model::batch::check_vocab;
pub use source::{BatchSource, RandomWindows, ShuffledRows};

/// What a round of local training did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStats {
    pub steps: usize,
    /// Input positions processed over all steps: `steps × grad_accumulation × batch_size ×
    /// seq_len`.
    pub tokens: usize,
    /// Mean next-token loss (nats) of the first batch, before any update.
    pub first_loss: f64,
    /// Mean loss of the last batch (before the last update).
    pub last_loss: f64,
    /// Mean of the per-step losses.
    pub mean_loss: f64,
}

impl TrainStats {
    fn from_reports(reports: &[StepReport]) -> Self {
        TrainStats {
            steps: reports.len(),
            tokens: reports.iter().map(|r| r.tokens).sum(),
            first_loss: reports.first().map_or(f64::NAN, |r| r.loss),
            last_loss: reports.last().map_or(f64::NAN, |r| r.loss),
            mean_loss: reports.iter().map(|r| r.loss).sum::<f64>() / reports.len().max(1) as f64,
        }
    }
}

/// One optimizer step, as reported to a [`TrainObserver`].
#[derive(Debug, Clone, PartialEq)]
pub struct StepReport {
    /// 0-based step index.
    pub step: usize,
    /// Weighted mean next-token loss (nats) over the step's micro-batches, before the update.
    pub loss: f64,
    pub learning_rate: f64,
    /// Global gradient norm before clipping (only computed when clipping is on).
    pub grad_norm: Option<f64>,
    /// Input positions processed (padding included).
    pub tokens: usize,
    /// Predictions that counted in the loss (sum of target weights).
    pub trained_targets: f64,
}

/// Receives every optimizer step (a progress bar, a log, a test).
pub trait TrainObserver {
    fn step(&mut self, report: &StepReport);
}

/// Observes nothing.
impl TrainObserver for () {
    fn step(&mut self, _: &StepReport) {}
}

/// What a federated round adds to local training beyond the plan's [`TrainingSpec`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct TrainOptions {
    /// FedProx's `μ` (`strategy.fedprox.mu`): when positive, every step's gradient gains
    /// `μ·(w − w_t)` for each trained tensor, `w_t` its value when training started (the
    /// downloaded adapter), i.e. the gradient of `(μ/2)‖w − w_t‖²`.
    pub prox_mu: f64,
    /// Record-level DP-SGD (`[plan.privacy.record]`): per-record clipping and Gaussian
    /// noise on Poisson-sampled disjoint records ([`dp_sgd`]) instead of random windows.
    pub record_dp: Option<fedcore::privacy::RecordDpSpec>,
}

/// Trains `model`'s trainable LoRA factors for `spec.local_steps` optimizer steps on
/// batches from `source`, each step accumulating `spec.grad_accumulation` micro-batches.
///
/// The loss of a step is `Σ w·nll / Σ w` over all its micro-batches' targets, so
/// accumulation is exactly a larger batch. Clipping (if `spec.max_grad_norm`) applies to the
/// accumulated gradient. `model` must live on `device`, a plain (non-autodiff) device.
pub fn train(
    model: LoraLlama,
    spec: &TrainingSpec,
    source: &mut dyn BatchSource,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<(LoraLlama, Vec<StepReport>), ModelError> {
    train_with(
        model,
        spec,
        source,
        device,
        observer,
        &TrainOptions::default(),
    )
}

/// [`train`] with a round's [`TrainOptions`] (FedProx).
pub fn train_with(
    model: LoraLlama,
    spec: &TrainingSpec,
    source: &mut dyn BatchSource,
    device: &Device,
    observer: &mut dyn TrainObserver,
    options: &TrainOptions,
) -> Result<(LoraLlama, Vec<StepReport>), ModelError> {
    check_model(&model, spec, device)?;
    let vocab = model.model_spec().vocab_size;
    let max_positions = model.model_spec().max_position_embeddings;
    let autodiff = device.clone().autodiff();
    let model = model.train();
    let mut next_gradient = |model: &LoraLlama, step: usize| -> Result<StepGradient, ModelError> {
        let micro: Vec<_> = (0..spec.grad_accumulation)
            .map(|_| source.next_batch())
            .collect::<Result<_, _>>()?;
        for batch in &micro {
            batch.check(vocab, max_positions)?;
        }
        let weight: f64 = micro.iter().map(|b| b.trained_targets()).sum();
        // A step whose rows hold no trained target (all prompt) still steps the optimizer
        // with a zero gradient; dividing by 1 keeps the loss at 0 rather than NaN.
        let norm = weight.max(1.0);
        let mut accumulator = GradientsAccumulator::<LoraLlama>::new();
        let mut loss_sum = 0f64;
        let mut tokens = 0;
        for batch in &micro {
            let (nll, weights) = batch.to_device(&autodiff).nll(model);
            let loss = (nll * weights).sum().div_scalar(norm as f32);
            let grads = GradientsParams::from_grads(loss.backward(), model);
            let value: f32 = loss
                .try_into_scalar()
                .map_err(|e| ModelError::backend("reading the training loss", e))?;
            if !value.is_finite() {
                return Err(ModelError::Diverged { step, loss: value });
            }
            loss_sum += f64::from(value);
            tokens += batch.rows * batch.seq;
            accumulator.accumulate(model, grads);
        }
        Ok(StepGradient {
            grads: accumulator.grads(),
            loss: loss_sum,
            tokens,
            trained_targets: weight,
        })
    };
    train_steps(model, spec, observer, options, &mut next_gradient)
}

/// Record-level DP-SGD ([`dp_sgd`]): `spec.local_steps` steps, each on the noised gradient
/// of a Poisson sample of `records`, with sampling and noise drawn from `rng`.
#[allow(clippy::too_many_arguments)]
pub fn train_dp(
    model: LoraLlama,
    spec: &TrainingSpec,
    records: &dp_sgd::PoissonRecords<'_>,
    dp: fedcore::privacy::RecordDpSpec,
    device: &Device,
    observer: &mut dyn TrainObserver,
    options: &TrainOptions,
    rng: &mut dyn rand::RngCore,
) -> Result<(LoraLlama, Vec<StepReport>), ModelError> {
    check_model(&model, spec, device)?;
    let autodiff = device.clone().autodiff();
    let model = model.train();
    let mut next_gradient = |model: &LoraLlama, step: usize| {
        dp_sgd::noised_gradient(model, records, dp, &autodiff, step, rng)
    };
    train_steps(model, spec, observer, options, &mut next_gradient)
}

/// Checks `spec` against `model`'s architecture and that `model` lives on `device`.
fn check_model(model: &LoraLlama, spec: &TrainingSpec, device: &Device) -> Result<(), ModelError> {
    spec.validate(model.model_spec())?;
    if model.device() != *device {
        return Err(ModelError::DeviceMismatch {
            model: format!("{:?}", model.device()),
            requested: format!("{device:?}"),
        });
    }
    Ok(())
}

/// One optimizer step's gradient, with what it was computed from.
pub(crate) struct StepGradient {
    pub grads: GradientsParams,
    /// Weighted mean loss of the step's targets, before the update.
    pub loss: f64,
    pub tokens: usize,
    pub trained_targets: f64,
}

/// The optimizer loop shared by plain training and DP-SGD: `spec.local_steps` steps, each on
/// the gradient `next_gradient` computes for the model as it stands (then FedProx's term,
/// global clipping when configured, the learning-rate schedule, the optimizer).
fn train_steps(
    model: LoraLlama,
    spec: &TrainingSpec,
    observer: &mut dyn TrainObserver,
    options: &TrainOptions,
    next_gradient: &mut dyn FnMut(&LoraLlama, usize) -> Result<StepGradient, ModelError>,
) -> Result<(LoraLlama, Vec<StepReport>), ModelError> {
    let mut model = model;
    let mut optim = match spec.optimizer {
        // PyTorch's AdamW defaults (burn's epsilon default is 1e-5).
        LocalOptimizer::AdamW => AdamWConfig::new()
            .with_beta_1(0.9)
            .with_beta_2(0.999)
            .with_epsilon(1e-8)
            .with_weight_decay(spec.weight_decay as f32)
            .init(),
        LocalOptimizer::Sgd => SgdConfig::new()
            .with_weight_decay(
                (spec.weight_decay > 0.0).then(|| WeightDecayConfig::new(spec.weight_decay as f32)),
            )
            .init(),
    };
    let reference = (options.prox_mu > 0.0)
        .then(|| prox::Reference::capture(&model))
        .transpose()?;
    let mut reports = Vec::with_capacity(spec.local_steps);
    for step in 0..spec.local_steps {
        let StepGradient {
            mut grads,
            loss,
            tokens,
            trained_targets,
        } = next_gradient(&model, step)?;
        if let Some(reference) = &reference {
            reference.add_gradient(&model, &mut grads, options.prox_mu);
        }
        let grad_norm = spec
            .max_grad_norm
            .map(|max| clip::clip_global_norm(&model, &mut grads, max))
            .transpose()?;
        let learning_rate = schedule::learning_rate(spec, step);
        model = optim.step(learning_rate, model, grads);
        let report = StepReport {
            step,
            loss,
            learning_rate,
            grad_norm,
            tokens,
            trained_targets,
        };
        observer.step(&report);
        reports.push(report);
    }
    Ok((model.valid(), reports))
}

/// One federated round of local training: `spec.local_steps` steps on random windows of
/// `tokens` (see [`RandomWindows`]), seeded by `seed` so a round is reproducible.
///
/// `spec.seed` is not read here: the caller derives `seed` from it per participant and round,
/// so that participants do not all draw the same batches.
pub fn train_local(
    model: LoraLlama,
    tokens: &[u32],
    spec: &TrainingSpec,
    seed: u64,
    device: &Device,
) -> Result<(LoraLlama, TrainStats), ModelError> {
    train_local_with(model, tokens, spec, seed, device, &TrainOptions::default())
}

/// [`train_local`] with a round's [`TrainOptions`].
pub fn train_local_with(
    model: LoraLlama,
    tokens: &[u32],
    spec: &TrainingSpec,
    seed: u64,
    device: &Device,
    options: &TrainOptions,
) -> Result<(LoraLlama, TrainStats), ModelError> {
    train_local_observed(model, tokens, spec, seed, device, options, &mut ())
}

/// [`train_local_with`], telling `observer` about every step (the participant's progress
/// bar).
pub fn train_local_observed(
    model: LoraLlama,
    tokens: &[u32],
    spec: &TrainingSpec,
    seed: u64,
    device: &Device,
    options: &TrainOptions,
    observer: &mut dyn TrainObserver,
) -> Result<(LoraLlama, TrainStats), ModelError> {
    spec.validate(model.model_spec())?;
    check_vocab(tokens, model.model_spec().vocab_size)?;
    let prefix = model.window_prefix();
    if let Some(dp) = options.record_dp {
        let records = dp_sgd::PoissonRecords::new(tokens, spec.seq_len, prefix, spec.batch_size)?;
        // The sample and the noise must be secret: the OS's randomness, not the plan's seeds.
        let (model, reports) = train_dp(
            model,
            spec,
            &records,
            dp,
            device,
            observer,
            options,
            &mut rand::rng(),
        )?;
        return Ok((model, TrainStats::from_reports(&reports)));
    }
    let mut source = RandomWindows::new(tokens, spec.batch_size, spec.seq_len, prefix, seed)?;
    let (model, reports) = train_with(model, spec, &mut source, device, observer, options)?;
    Ok((model, TrainStats::from_reports(&reports)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ByteTokenizer, LocalCorpus, TextTokenizer};
    use crate::device::{DeviceChoice, select_device, wgpu_available};
    use crate::eval::evaluate;
    use crate::model::RowBatch;
    use crate::model::loss::token_nll;
    use fedcore::{LoraSpec, ModelSpec};

    /// A few paragraphs in the manner of the UDHR, repeated: enough structure for a tiny model
    /// to learn from in a few dozen steps.
    pub(crate) fn sample_text() -> String {
        let paragraphs = [
            "All human beings are born free and equal in dignity and rights.",
            "They are endowed with reason and conscience and should act towards one another in a spirit of brotherhood.",
            "Everyone is entitled to all the rights and freedoms set forth in this Declaration.",
            "Everyone has the right to life, liberty and security of person.",
            "No one shall be held in slavery or servitude.",
            "Everyone has the right to recognition everywhere as a person before the law.",
        ];
        let mut text = String::new();
        for round in 0..6 {
            for p in paragraphs.iter().skip(round % 2) {
                text.push_str(p);
                text.push('\n');
            }
        }
        text
    }

    fn tiny_lora() -> LoraSpec {
        LoraSpec::default()
    }

    fn spec(steps: usize, batch: usize, seq: usize, lr: f64) -> TrainingSpec {
        TrainingSpec {
            local_steps: steps,
            batch_size: batch,
            seq_len: seq,
            learning_rate: lr,
            weight_decay: 0.0,
            seed: 7,
            ..TrainingSpec::default()
        }
    }

    #[test]
    fn training_lowers_heldout_loss_and_touches_only_b() {
        let device = Device::flex();
        let corpus = LocalCorpus::from_text("en", &sample_text(), 0.1, &ByteTokenizer).unwrap();
        let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
        let before_params = crate::model::snapshot_parameters(&model);
        let before = evaluate(&model, &corpus.heldout, 64, &device).unwrap();
        let adapter_before = model.export_adapter();

        let (model, stats) =
            train_local(model, &corpus.train, &spec(40, 8, 64, 1e-2), 11, &device).unwrap();
        let after = evaluate(&model, &corpus.heldout, 64, &device).unwrap();
        eprintln!("train {stats:?}\nheld-out before {before:?}\nheld-out after  {after:?}");

        assert_eq!(stats.steps, 40);
        assert_eq!(stats.tokens, 40 * 8 * 64);
        assert!(stats.last_loss < stats.first_loss - 0.3, "{stats:?}");
        assert!(after.loss < before.loss - 0.3, "{before:?} → {after:?}");

        // Base weights and A bit-identical, B changed, in every module.
        let after_params = crate::model::snapshot_parameters(&model);
        assert_eq!(before_params.len(), after_params.len());
        let mut changed = 0;
        for ((name, v0), (name1, v1)) in before_params.iter().zip(&after_params) {
            assert_eq!(name, name1);
            if name.ends_with("b_t") {
                changed += usize::from(v0 != v1);
            } else {
                assert!(v0 == v1, "{name} changed during training");
            }
        }
        let adapter_after = model.export_adapter();
        assert_eq!(changed, adapter_after.modules().len());
        for ((name, m0), (_, m1)) in adapter_before.modules().iter().zip(adapter_after.modules()) {
            assert_eq!(m0.a, m1.a, "{name}: A changed");
            assert_ne!(m0.b, m1.b, "{name}: B did not change");
        }
    }

    #[test]
    fn same_seed_same_result() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let run = || {
            let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
            let (model, stats) =
                train_local(model, &tokens, &spec(3, 2, 16, 1e-2), 5, &device).unwrap();
            (model.export_adapter(), stats)
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn refuses_short_corpora_and_foreign_tokens() {
        let device = Device::flex();
        let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
        let err =
            train_local(model.clone(), &[1, 2, 3], &spec(1, 1, 16, 1e-2), 0, &device).unwrap_err();
        assert!(
            err.to_string().contains("training corpus has 3 tokens"),
            "{err}"
        );
        let err = train_local(model, &[300; 40], &spec(1, 1, 16, 1e-2), 0, &device).unwrap_err();
        assert!(err.to_string().contains("300"), "{err}");
    }

    /// Replays fixed batches.
    struct Fixed(std::collections::VecDeque<RowBatch>);

    impl BatchSource for Fixed {
        fn next_batch(&mut self) -> Result<RowBatch, ModelError> {
            Ok(self.0.pop_front().expect("enough batches"))
        }
    }

    fn b_values(model: &LoraLlama) -> Vec<f32> {
        model
            .export_adapter()
            .modules()
            .iter()
            .flat_map(|(_, m)| m.b.data().to_vec())
            .collect()
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    /// Two micro-batches of 2 rows accumulate to exactly one batch of 4 rows.
    #[test]
    fn gradient_accumulation_equals_the_larger_batch() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let starts = [0, 40, 90, 200];
        let whole = RowBatch::windows(&tokens, &starts, 24);
        let half_a = RowBatch::windows(&tokens, &starts[..2], 24);
        let half_b = RowBatch::windows(&tokens, &starts[2..], 24);
        let one_step = |batches: Vec<RowBatch>, accum: usize| {
            let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
            let spec = TrainingSpec {
                local_steps: 1,
                grad_accumulation: accum,
                seq_len: 24,
                learning_rate: 1e-2,
                ..TrainingSpec::default()
            };
            let (model, reports) =
                train(model, &spec, &mut Fixed(batches.into()), &device, &mut ()).unwrap();
            (b_values(&model), reports[0].loss)
        };
        let (b1, loss1) = one_step(vec![whole], 1);
        let (b2, loss2) = one_step(vec![half_a, half_b], 2);
        assert!((loss1 - loss2).abs() < 1e-5, "{loss1} vs {loss2}");
        assert!(max_diff(&b1, &b2) < 1e-6, "{}", max_diff(&b1, &b2));
        assert!(b1.iter().any(|&v| v != 0.0));
    }

    /// Targets with weight 0 (prompt tokens, padding) change nothing, whatever they are.
    #[test]
    fn zero_weight_targets_contribute_nothing() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let mut batch = RowBatch::windows(&tokens, &[3, 77], 16);
        for i in 0..batch.weights.len() {
            if i % 16 < 10 {
                batch.weights[i] = 0.0; // a "prompt" of 10 tokens per row
            }
        }
        let mut scrambled = batch.clone();
        for i in 0..scrambled.targets.len() {
            if scrambled.weights[i] == 0.0 {
                scrambled.targets[i] = (scrambled.targets[i] + 101) % 256;
            }
        }
        let run = |b: RowBatch| {
            let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
            let spec = TrainingSpec {
                local_steps: 1,
                seq_len: 16,
                learning_rate: 1e-2,
                ..TrainingSpec::default()
            };
            let (model, reports) =
                train(model, &spec, &mut Fixed(vec![b].into()), &device, &mut ()).unwrap();
            (b_values(&model), reports[0].clone())
        };
        let (b_plain, r_plain) = run(batch.clone());
        let (b_scrambled, r_scrambled) = run(scrambled);
        assert_eq!(b_plain, b_scrambled);
        assert_eq!(r_plain.loss, r_scrambled.loss);
        assert_eq!(r_plain.trained_targets, 12.0);
        // Scrambling a *trained* target does change the result: the test can fail.
        let mut trained = batch;
        trained.targets[15] = (trained.targets[15] + 101) % 256;
        let (b_trained, _) = run(trained);
        assert_ne!(b_plain, b_trained);
    }

    /// FedProx's term holds the trained factors near where the round started: with SGD and
    /// `lr·μ = 1` every step restarts from the downloaded values, so five steps move B about
    /// as far as one; without it they drift five steps' worth.
    #[test]
    fn fedprox_holds_the_factors_near_the_download() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let run = |mu: f64| {
            let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
            let start = b_values(&model);
            let spec = TrainingSpec {
                optimizer: fedcore::LocalOptimizer::Sgd,
                ..spec(5, 2, 16, 1e-2)
            };
            let options = TrainOptions {
                prox_mu: mu,
                ..Default::default()
            };
            let (model, _) = train_local_with(model, &tokens, &spec, 3, &device, &options).unwrap();
            let b = b_values(&model);
            let moved: f64 = b
                .iter()
                .zip(&start)
                .map(|(x, y)| f64::from(x - y).powi(2))
                .sum();
            moved.sqrt()
        };
        let (free, held) = (run(0.0), run(100.0));
        eprintln!("moved without FedProx {free:.3e}, with mu = 100: {held:.3e}");
        assert!(free > 0.0 && held < 0.5 * free, "{free} vs {held}");
    }

    /// Clipping scales all gradients by one factor down to the global norm.
    #[test]
    fn global_norm_clipping_hits_the_target_norm() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
        // Give B non-zero values so that gradients reach every B.
        let model = {
            let spec = spec(2, 2, 16, 1e-2);
            train_local(model, &tokens, &spec, 1, &device).unwrap().0
        };
        let ad = device.clone().autodiff();
        let model = model.train();
        let batch = RowBatch::windows(&tokens, &[5, 50], 16).to_device(&ad);
        let loss = token_nll(model.forward(batch.inputs), batch.targets).mean();
        let mut grads = GradientsParams::from_grads(loss.backward(), &model);
        let norm = clip::global_norm(&model, &grads).unwrap();
        assert!(norm > 0.0);
        let before = clip::clip_global_norm(&model, &mut grads, norm / 4.0).unwrap();
        assert_eq!(before, norm);
        let after = clip::global_norm(&model, &grads).unwrap();
        assert!(
            (after - norm / 4.0).abs() < 1e-4 * norm,
            "{after} vs {}",
            norm / 4.0
        );
        // Below the threshold nothing changes.
        let unchanged = clip::clip_global_norm(&model, &mut grads, norm).unwrap();
        assert!((unchanged - after).abs() < 1e-6 * norm);
    }

    /// Same init, same batches: the wgpu backend must follow flex step for step.
    #[test]
    fn wgpu_matches_flex_step_by_step() {
        let required = std::env::var("MEKONG_REQUIRE_WGPU").is_ok_and(|v| v == "1");
        if !wgpu_available() {
            assert!(!required, "MEKONG_REQUIRE_WGPU=1 but wgpu found no adapter");
            eprintln!("SKIPPED wgpu_matches_flex_step_by_step: no wgpu adapter on this machine");
            return;
        }
        let wgpu = select_device(DeviceChoice::Wgpu).unwrap();
        eprintln!("wgpu device: {}", wgpu.label);
        let tokens = ByteTokenizer.encode(&sample_text());
        let spec = spec(1, 4, 32, 1e-2);
        let steps = 4;
        let losses = |device: &Device| {
            let mut model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), device).unwrap();
            let mut out = Vec::new();
            for step in 0..steps {
                let (m, stats) = train_local(model, &tokens, &spec, step as u64, device).unwrap();
                model = m;
                out.push(stats.first_loss);
            }
            out
        };
        let flex = losses(&Device::flex());
        let gpu = losses(&wgpu.device);
        eprintln!("flex {flex:?}\nwgpu {gpu:?}");
        for (step, (a, b)) in flex.iter().zip(&gpu).enumerate() {
            assert!((a - b).abs() < 1e-3, "step {step}: flex {a} vs wgpu {b}");
        }
    }

    /// Step time of the pilot's configuration; run with
    /// `cargo test -p fedclient --lib -- --ignored --nocapture step_time`.
    #[test]
    #[ignore = "timing, not a check"]
    fn step_time_tiny_batch8_seq64() {
        let device = Device::flex();
        let tokens = ByteTokenizer.encode(&sample_text());
        let model = LoraLlama::new(&ModelSpec::tiny(), &tiny_lora(), &device).unwrap();
        // Warm-up round (allocations, first-use kernels).
        let (model, _) = train_local(model, &tokens, &spec(2, 8, 64, 5e-3), 1, &device).unwrap();
        let steps = 30;
        let t = std::time::Instant::now();
        let (_, stats) =
            train_local(model, &tokens, &spec(steps, 8, 64, 5e-3), 2, &device).unwrap();
        let per_step = t.elapsed().as_secs_f64() / steps as f64;
        eprintln!(
            "tiny, batch 8 x seq 64, flex: {per_step:.4} s/step, {:.0} tokens/s ({stats:?})",
            (8 * 64) as f64 / per_step
        );
    }
}
