//! `fedclient train`: fine-tune LoRA on a lab's own data with no federation, the way a lab
//! tries a base model and its data before joining one.
//!
//! Data: plain text and JSONL (text, prompt/response, chat messages) per language, rendered
//! with the model's chat template and packed into rows (prompt tokens carry no loss).
//! Evaluation: held-out loss, perplexity and bits per character per language, before and
//! after. Output: a PEFT adapter directory.

use std::path::PathBuf;

use burn::tensor::Device;
use fedcore::{LoraSpec, LrSchedule, TrainingSpec};

use crate::checkpoint::Checkpoint;
use crate::data::{ExampleBuilder, HfTokenizer, LocalDataset};
use crate::error::{CorpusError, ModelError};
use crate::eval::{EvalStats, evaluate};
use crate::model::LoraLlama;
use crate::train::{ShuffledRows, StepReport, TrainObserver, train};

/// One language's data: files or directories of `.txt` / `.jsonl`.
#[derive(Debug, Clone)]
pub struct LanguageData {
    pub language: String,
    pub paths: Vec<PathBuf>,
}

/// What a local fine-tuning run did.
#[derive(Debug, Clone)]
pub struct LocalRun {
    /// Per language: held-out scores before and after (when the language has held-out text).
    pub evaluations: Vec<(String, Option<EvalStats>, Option<EvalStats>)>,
    pub reports: Vec<StepReport>,
    pub train_rows: usize,
}

/// Loads every language's data with the checkpoint's tokenizer and chat template.
pub fn load_datasets(
    checkpoint: &Checkpoint,
    data: &[LanguageData],
    heldout_fraction: f64,
) -> Result<(HfTokenizer, Vec<LocalDataset>), CorpusError> {
    let tokenizer_files = checkpoint
        .tokenizer
        .clone()
        .ok_or_else(|| CorpusError::Tokenizer {
            reason: format!("checkpoint {} has no tokenizer", checkpoint.path.display()),
        })?;
    let tokenizer = HfTokenizer::new(tokenizer_files)?;
    let datasets = {
        let builder = ExampleBuilder::for_model(&tokenizer)?;
        data.iter()
            .map(|d| LocalDataset::load(&d.paths, &d.language, heldout_fraction, &builder))
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok((tokenizer, datasets))
}

/// Trains `spec.local_steps` steps on the packed rows of every dataset, evaluating each
/// language's held-out text before and after.
pub fn fine_tune(
    checkpoint: &Checkpoint,
    datasets: &[LocalDataset],
    lora: &LoraSpec,
    spec: &TrainingSpec,
    device: &Device,
    observer: &mut dyn TrainObserver,
) -> Result<(LoraLlama, LocalRun), ModelError> {
    let rows: Vec<_> = datasets
        .iter()
        .flat_map(|d| d.packed_train(spec.seq_len))
        .map(crate::train::source::TrainRow::from)
        .collect();
    let train_rows = rows.len();
    let mut source = ShuffledRows::new(rows, spec.batch_size, spec.seed)?;
    let model = LoraLlama::from_checkpoint(checkpoint, lora, device)?;
    let score = |model: &LoraLlama| -> Result<Vec<Option<EvalStats>>, ModelError> {
        datasets
            .iter()
            .map(|d| {
                d.heldout
                    .as_ref()
                    .map(|h| evaluate(model, h, spec.seq_len, device))
                    .transpose()
            })
            .collect()
    };
    let before = score(&model)?;
    let (model, reports) = train(model, spec, &mut source, device, observer)?;
    let after = score(&model)?;
    let evaluations = datasets
        .iter()
        .zip(before.into_iter().zip(after))
        .map(|(d, (b, a))| (d.language.clone(), b, a))
        .collect();
    Ok((
        model,
        LocalRun {
            evaluations,
            reports,
            train_rows,
        },
    ))
}

/// Defaults for local fine-tuning: warm-up then cosine, clipping at 1.0 (common LoRA recipes).
pub fn default_spec(steps: usize, batch_size: usize, seq_len: usize, lr: f64) -> TrainingSpec {
    TrainingSpec {
        local_steps: steps,
        batch_size,
        seq_len,
        learning_rate: lr,
        warmup_steps: (steps / 10).min(100),
        lr_schedule: LrSchedule::Cosine,
        max_grad_norm: Some(1.0),
        ..TrainingSpec::default()
    }
}
