//! The strategy experiment of issue #5: which aggregation mode helps every language.
//!
//! Each arm trains the same byte-level base model on the pilot's UDHR languages (one lab per
//! language, each holding only its own text) and scores every language's held-out text
//! after every round:
//! - `ffa_lora`, `fedsvd`, `fedit`, `fedsa_lora`: a federation under that mode, run through
//!   fedcore's real [`fedcore::Strategy`] (download, upload = trained − downloaded, the
//!   token-weighted mean, aggregate) and the client's real training code. Updates are summed
//!   in plaintext here: secure aggregation returns the same sum within its quantisation
//!   bound (tests/tests/strategies.rs checks each mode both ways), and leaving it out keeps
//!   the experiment about the modes.
//! - `local_only`: every lab trains alone, the same steps.
//! - `centralised`: one model trained on every language at once; each step sees one batch
//!   of every language, so it consumes as many tokens as one local step of every lab.
//!
//! FedIT's aggregation error (how far the mean of the factors is from the mean of the
//! products, `‖Σpᵢ BᵢAᵢ − B̄Ā‖ / ‖Σpᵢ BᵢAᵢ − B_gA_g‖`) is measured every round on the
//! labs' trained adapters.
//!
//! [`arms`] runs the arms, [`report`] writes the Markdown and JSON, [`plot`] the PNG.

pub mod arms;
pub mod plot;
pub mod report;

use std::path::PathBuf;

use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedcore::{LoraSpec, ModelSpec, TrainingSpec};
use serde::Serialize;

use crate::corpus::udhr;
use crate::pilot::ModelSize;

/// What to run.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub languages: Vec<String>,
    pub model: ModelSize,
    pub rounds: u64,
    /// Local steps per round; one run of every arm per value.
    pub local_steps: Vec<usize>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub lora_rank: usize,
    pub heldout_fraction: f64,
    /// Which arms to run (all by default).
    pub arms: Vec<Arm>,
    pub seed: u64,
    pub out_dir: PathBuf,
}

impl Default for ExperimentOptions {
    fn default() -> Self {
        ExperimentOptions {
            languages: crate::corpus::DEFAULT_LANGUAGES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            model: ModelSize::Small,
            rounds: 8,
            local_steps: vec![1, 5, 20],
            batch_size: 8,
            seq_len: 64,
            learning_rate: 5e-3,
            lora_rank: 8,
            heldout_fraction: 0.1,
            arms: Arm::ALL.to_vec(),
            seed: 7,
            out_dir: PathBuf::from("docs/experiments"),
        }
    }
}

/// One way of training.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Arm {
    FfaLora,
    FedSvd,
    FedIt,
    FedSaLora,
    LocalOnly,
    Centralised,
}

impl Arm {
    pub const ALL: [Arm; 6] = [
        Arm::FfaLora,
        Arm::FedSvd,
        Arm::FedIt,
        Arm::FedSaLora,
        Arm::LocalOnly,
        Arm::Centralised,
    ];

    /// The name used on the command line, in the report and the plot.
    pub fn name(self) -> &'static str {
        match self {
            Arm::FfaLora => "ffa_lora",
            Arm::FedSvd => "fedsvd",
            Arm::FedIt => "fedit",
            Arm::FedSaLora => "fedsa_lora",
            Arm::LocalOnly => "local_only",
            Arm::Centralised => "centralised",
        }
    }

    pub fn parse(value: &str) -> Option<Arm> {
        Arm::ALL.into_iter().find(|a| a.name() == value)
    }
}

/// One language's data.
#[derive(Debug, Clone)]
pub struct Lab {
    pub code: String,
    pub name: String,
    pub corpus: LocalCorpus,
}

impl ExperimentOptions {
    pub fn model_spec(&self) -> ModelSpec {
        self.model.spec()
    }

    pub fn lora(&self) -> LoraSpec {
        LoraSpec {
            rank: self.lora_rank,
            alpha: 2.0 * self.lora_rank as f32,
            ..LoraSpec::default()
        }
    }

    /// Local training for `steps` steps per round.
    pub fn training(&self, steps: usize) -> TrainingSpec {
        TrainingSpec {
            local_steps: steps,
            batch_size: self.batch_size,
            seq_len: self.seq_len,
            learning_rate: self.learning_rate,
            ..TrainingSpec::default()
        }
    }

    /// The labs, one per language, with the pilot's split of each text.
    pub fn labs(&self) -> Result<Vec<Lab>, ExperimentError> {
        self.languages
            .iter()
            .map(|code| {
                let (name, text) =
                    udhr(code).ok_or_else(|| ExperimentError::UnknownLanguage(code.clone()))?;
                let corpus =
                    LocalCorpus::from_text(code, text, self.heldout_fraction, &ByteTokenizer)
                        .map_err(|e| ExperimentError::Corpus(code.clone(), e.to_string()))?;
                Ok(Lab {
                    code: code.clone(),
                    name: name.to_string(),
                    corpus,
                })
            })
            .collect()
    }
}

/// Held-out loss (nats per byte) of every language after one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundScores {
    /// 0 before any training.
    pub round: u64,
    /// In the order of [`ExperimentOptions::languages`].
    pub loss: Vec<f64>,
}

impl RoundScores {
    /// Mean over languages (each language counts once, whatever its size).
    pub fn mean(&self) -> f64 {
        self.loss.iter().sum::<f64>() / self.loss.len() as f64
    }
}

/// One arm at one number of local steps.
#[derive(Debug, Clone, Serialize)]
pub struct ArmRun {
    pub arm: Arm,
    pub local_steps: usize,
    pub rounds: Vec<RoundScores>,
    /// FedIT only: the relative aggregation error of each round (see the module docs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fedit_error: Vec<f64>,
    pub seconds: f64,
}

/// Everything one experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentResults {
    pub model: String,
    pub languages: Vec<String>,
    pub language_names: Vec<String>,
    pub train_bytes: Vec<usize>,
    pub rounds: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub lora_rank: usize,
    pub seed: u64,
    pub runs: Vec<ArmRun>,
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error("unknown language {0:?}; the experiment has lo, km, th, vi, my, id, ms, tl, en")]
    UnknownLanguage(String),
    #[error("preparing the {0} text: {1}")]
    Corpus(String, String),
    #[error(transparent)]
    Model(#[from] fedclient::error::ModelError),
    #[error(transparent)]
    Strategy(#[from] fedcore::strategy::StrategyError),
    #[error(transparent)]
    Config(#[from] fedcore::ConfigError),
    #[error(transparent)]
    Adapter(#[from] fedcore::AdapterError),
    #[error(transparent)]
    Aggregate(#[from] fedcore::aggregate::AggregateError),
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("drawing the plot: {0}")]
    Plot(String),
}

/// Runs every arm at every number of local steps on `device`, calling `progress` after
/// each run. Nothing is written; see [`write_outputs`].
pub fn run(
    options: &ExperimentOptions,
    device: &burn::tensor::Device,
    mut progress: impl FnMut(&ArmRun),
) -> Result<ExperimentResults, ExperimentError> {
    let labs = options.labs()?;
    let base = fedclient::model::LoraLlama::new(&options.model_spec(), &options.lora(), device)?;
    let mut runs = Vec::new();
    for &steps in &options.local_steps {
        for &arm in &options.arms {
            let run = arms::run_arm(arm, steps, options, &labs, &base, device)?;
            progress(&run);
            runs.push(run);
        }
    }
    Ok(ExperimentResults {
        model: options.model_spec().name,
        languages: labs.iter().map(|l| l.code.clone()).collect(),
        language_names: labs.iter().map(|l| l.name.clone()).collect(),
        train_bytes: labs.iter().map(|l| l.corpus.train_samples()).collect(),
        rounds: options.rounds,
        batch_size: options.batch_size,
        seq_len: options.seq_len,
        learning_rate: options.learning_rate,
        lora_rank: options.lora_rank,
        seed: options.seed,
        runs,
    })
}

/// Writes `strategies.json`, `strategies-tables.md` and `strategies.png` into `dir`.
pub fn write_outputs(
    results: &ExperimentResults,
    dir: &std::path::Path,
) -> Result<(), ExperimentError> {
    std::fs::create_dir_all(dir).map_err(|source| ExperimentError::Write {
        path: dir.to_path_buf(),
        source,
    })?;
    report::write_json(results, dir)?;
    report::write_tables(results, dir)?;
    plot::draw(results, &dir.join("strategies.png"))
}
