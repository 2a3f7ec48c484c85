//! One round of local training: `local_steps` AdamW steps on the LoRA B matrices only.
//!
//! The model arrives and leaves as an inference model on a plain device; training switches it
//! to autodiff (`Module::train`) for the duration of the call and back (`Module::valid`) at
//! the end. Base weights and A are parameters without gradients, so the optimizer never
//! touches them and they stay bit-identical.
//!
//! The optimizer state is fresh for every call: each federated round starts from the newly
//! aggregated global B, and Adam moments accumulated against the previous local B would point
//! the wrong way. This is standard FedAvg practice (local optimizer state is not carried
//! across rounds).

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::Device;
use fedcore::TrainingSpec;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::error::ModelError;
use crate::model::LoraLlama;
use crate::model::batch::{check_vocab, windows};
use crate::model::loss::token_nll;

/// What a round of local training did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainStats {
    pub steps: usize,
    /// Predicted tokens over all steps: `steps × batch_size × seq_len`.
    pub tokens: usize,
    /// Mean next-token loss (nats) of the first batch, before any update.
    pub first_loss: f64,
    /// Mean loss of the last batch (before the last update).
    pub last_loss: f64,
    /// Mean of the per-step losses.
    pub mean_loss: f64,
}

/// Trains `model`'s LoRA B matrices on random windows of `tokens`.
///
/// Each step samples `batch_size` windows of `seq_len + 1` tokens uniformly from the corpus
/// with a ChaCha8 RNG seeded from `seed` (so a round is reproducible), takes the mean
/// next-token cross-entropy and applies one AdamW step (`learning_rate`, `weight_decay`).
/// The only host round trip per step is reading the scalar loss.
///
/// `spec.seed` is not read here: the caller derives `seed` from it per participant and round,
/// so that participants do not all draw the same batches.
///
/// `model` must live on `device` (a plain, non-autodiff device such as
/// [`SelectedDevice::device`](crate::device::SelectedDevice)).
pub fn train_local(
    model: LoraLlama,
    tokens: &[u32],
    spec: &TrainingSpec,
    seed: u64,
    device: &Device,
) -> Result<(LoraLlama, TrainStats), ModelError> {
    spec.validate(model.model_spec())?;
    let window = spec.seq_len + 1;
    if tokens.len() < window {
        return Err(ModelError::TooFewTokens {
            what: "training corpus",
            tokens: tokens.len(),
            needed: window,
        });
    }
    check_vocab(tokens, model.model_spec().vocab_size)?;
    if model.device() != *device {
        return Err(ModelError::DeviceMismatch {
            model: format!("{:?}", model.device()),
            requested: format!("{device:?}"),
        });
    }

    let autodiff = device.clone().autodiff();
    let mut model = model.train();
    let mut optim = AdamWConfig::new()
        .with_weight_decay(spec.weight_decay as f32)
        .init();
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let last_start = tokens.len() - window;
    let mut losses = Vec::with_capacity(spec.local_steps);

    for step in 0..spec.local_steps {
        let starts: Vec<usize> = (0..spec.batch_size)
            .map(|_| rng.random_range(0..=last_start))
            .collect();
        let (inputs, targets) = windows(tokens, &starts, spec.seq_len, &autodiff);
        let loss = token_nll(model.forward(inputs), targets).mean();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(spec.learning_rate, model, grads);
        let value: f32 = loss
            .try_into_scalar()
            .map_err(|e| ModelError::backend("reading the training loss", e))?;
        if !value.is_finite() {
            return Err(ModelError::Diverged { step, loss: value });
        }
        losses.push(f64::from(value));
    }

    let stats = TrainStats {
        steps: losses.len(),
        tokens: losses.len() * spec.batch_size * spec.seq_len,
        first_loss: losses[0],
        last_loss: losses[losses.len() - 1],
        mean_loss: losses.iter().sum::<f64>() / losses.len() as f64,
    };
    Ok((model.valid(), stats))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{ByteTokenizer, LocalCorpus, TextTokenizer};
    use crate::device::{DeviceChoice, select_device, wgpu_available};
    use crate::eval::evaluate;
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
