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
use crate::eval::{EvalStats, RowEvalStats, evaluate, evaluate_rows};
use crate::model::LoraLlama;
use crate::train::source::TrainRow;
use crate::train::{ShuffledRows, StepReport, TrainObserver, train};

/// One language's data: files or directories of `.txt` / `.jsonl`.
#[derive(Debug, Clone)]
pub struct LanguageData {
    pub language: String,
    pub paths: Vec<PathBuf>,
}

/// One language's held-out scores, before and after fine-tuning.
#[derive(Debug, Clone)]
pub struct LanguageEval {
    pub language: String,
    /// Every held-out example scored as training scores it (replies only for chat and
    /// prompt/response records).
    pub examples: (RowEvalStats, RowEvalStats),
    /// Held-out plain text: loss, perplexity and bits per character (`None` when every
    /// held-out unit is a chat or prompt/response record).
    pub text: Option<(EvalStats, EvalStats)>,
}

/// What a local fine-tuning run did.
#[derive(Debug, Clone)]
pub struct LocalRun {
    pub evaluations: Vec<LanguageEval>,
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
        .map(TrainRow::from)
        .collect();
    let train_rows = rows.len();
    let mut source = ShuffledRows::new(rows, spec.batch_size, spec.seed)?;
    let model = LoraLlama::from_checkpoint(checkpoint, lora, device)?;
    let heldout_rows: Vec<Vec<TrainRow>> = datasets
        .iter()
        .map(|d| {
            d.packed_heldout(spec.seq_len)
                .into_iter()
                .map(TrainRow::from)
                .collect()
        })
        .collect();
    type Scores = (RowEvalStats, Option<EvalStats>);
    let score = |model: &LoraLlama| -> Result<Vec<Scores>, ModelError> {
        datasets
            .iter()
            .zip(&heldout_rows)
            .map(|(d, rows)| {
                let examples = evaluate_rows(model, rows, device)?;
                let text = d
                    .heldout
                    .as_ref()
                    .map(|h| evaluate(model, h, spec.seq_len, device))
                    .transpose()?;
                Ok((examples, text))
            })
            .collect()
    };
    let before = score(&model)?;
    let (model, reports) = train(model, spec, &mut source, device, observer)?;
    let after = score(&model)?;
    let evaluations = datasets
        .iter()
        .zip(before.into_iter().zip(after))
        .map(|(d, ((eb, tb), (ea, ta)))| LanguageEval {
            language: d.language.clone(),
            examples: (eb, ea),
            text: tb.zip(ta),
        })
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
