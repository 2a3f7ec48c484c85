//! The strategy experiment (issues #5 and #17): which aggregation mode makes every lab
//! better off than training alone.
//!
//! A *layout* says who the labs are ([`Layout`]): one lab per language, or several labs per
//! language (a country's ministry, university and hospital), each holding a disjoint,
//! contiguous (so non-IID) shard of its language's text. Every lab is scored on its
//! language's held-out text with the model it would end up using:
//! - `ffa_lora`, `fedsvd`, `fedit`, `fedsa_lora`, `group_b`: a federation under that mode,
//!   run through fedcore's real [`fedcore::Strategy`] (download, upload = trained −
//!   downloaded, the token-weighted mean, aggregate) and the client's real training code.
//!   Updates are summed in plaintext here: secure aggregation returns the same sum within
//!   its quantisation bound (tests/tests/strategies.rs checks each mode both ways), and
//!   leaving it out keeps the experiment about the modes. FedSA-LoRA scores each lab with
//!   its own B, `group_b` with its language's B, the others with the one global adapter.
//! - `local_only`: every lab trains alone, the same steps on the same batches.
//! - `centralised_language`: one model per language on the language's pooled shards; each
//!   step takes one batch from each of the language's labs (what they consume together in
//!   one local step). The reference a federation of one language's labs could at best reach.
//! - `centralised`: one model on every lab's data at once, the same way.
//!
//! FedIT's aggregation error (how far the mean of the factors is from the mean of the
//! products, `‖Σpᵢ BᵢAᵢ − B̄Ā‖ / ‖Σpᵢ BᵢAᵢ − B_gA_g‖`) is measured every round on the
//! labs' trained adapters.
//!
//! [`arms`] runs the arms, [`report`] writes the Markdown and JSON, [`plot`] the PNG.

pub mod arms;
pub mod parallel;
pub mod plot;
pub mod report;

use std::path::PathBuf;

use fedclient::checkpoint::{self, Checkpoint};
use fedclient::data::{ByteTokenizer, HfTokenizer, LocalCorpus, TextTokenizer};
use fedcore::{LoraSpec, ModelSpec, TrainingSpec};
use serde::Serialize;

pub use crate::layout::Layout;
use crate::pilot::ModelSize;

/// The base model every arm starts from.
#[derive(Debug, Clone, PartialEq)]
pub enum ExperimentModel {
    /// A byte-level Llama drawn from a seed (knows no language).
    Preset(ModelSize),
    /// A pretrained checkpoint (GGUF file or Hugging Face directory) with its tokenizer.
    Checkpoint(PathBuf),
}

/// What to run.
#[derive(Debug, Clone)]
pub struct ExperimentOptions {
    pub languages: Vec<String>,
    pub model: ExperimentModel,
    pub layout: Layout,
    pub rounds: u64,
    /// Local steps per round; one run of every arm per value.
    pub local_steps: Vec<usize>,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub lora_rank: usize,
    pub heldout_fraction: f64,
    /// Score every lab after every round (the curves of the plot); otherwise only before
    /// training and after the last round, which is what a pretrained base can afford on a
    /// CPU.
    pub eval_every_round: bool,
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
            model: ExperimentModel::Preset(ModelSize::Small),
            layout: Layout::OnePerLanguage,
            rounds: 8,
            local_steps: vec![1, 5, 20],
            batch_size: 8,
            seq_len: 64,
            learning_rate: 5e-3,
            lora_rank: 8,
            heldout_fraction: 0.1,
            eval_every_round: true,
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
    GroupB,
    LocalOnly,
    CentralisedLanguage,
    Centralised,
}

impl Arm {
    pub const ALL: [Arm; 8] = [
        Arm::FfaLora,
        Arm::FedSvd,
        Arm::FedIt,
        Arm::FedSaLora,
        Arm::GroupB,
        Arm::LocalOnly,
        Arm::CentralisedLanguage,
        Arm::Centralised,
    ];

    /// The name used on the command line, in the report and the plot.
    pub fn name(self) -> &'static str {
        match self {
            Arm::FfaLora => "ffa_lora",
            Arm::FedSvd => "fedsvd",
            Arm::FedIt => "fedit",
            Arm::FedSaLora => "fedsa_lora",
            Arm::GroupB => "group_b",
            Arm::LocalOnly => "local_only",
            Arm::CentralisedLanguage => "centralised_language",
            Arm::Centralised => "centralised",
        }
    }

    pub fn parse(value: &str) -> Option<Arm> {
        Arm::ALL.into_iter().find(|a| a.name() == value)
    }

    /// A federation (as opposed to a baseline).
    pub fn is_federated(self) -> bool {
        !matches!(
            self,
            Arm::LocalOnly | Arm::CentralisedLanguage | Arm::Centralised
        )
    }
}

/// One lab's data.
#[derive(Debug, Clone)]
pub struct Lab {
    /// Participant name, e.g. `lo-ministry`.
    pub name: String,
    /// Language code.
    pub language: String,
    /// English name of the language.
    pub language_name: String,
    pub corpus: LocalCorpus,
}

/// What the report says about a lab.
#[derive(Debug, Clone, Serialize)]
pub struct LabInfo {
    pub name: String,
    pub language: String,
    pub language_name: String,
    pub train_tokens: usize,
    pub heldout_tokens: usize,
}

impl ExperimentOptions {
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

    /// The labs of the layout (see [`Layout::labs`]).
    pub fn labs(&self, tokenizer: &dyn TextTokenizer) -> Result<Vec<Lab>, ExperimentError> {
        Ok(self
            .layout
            .labs(&self.languages, self.heldout_fraction, tokenizer)?
            .into_iter()
            .map(|l| Lab {
                name: l.name,
                language: l.language,
                language_name: l.language_name,
                corpus: l.corpus,
            })
            .collect())
    }
}

/// The opened base: its architecture, checkpoint (for a pretrained model) and tokenizer.
pub struct Base {
    pub spec: ModelSpec,
    pub checkpoint: Option<Checkpoint>,
    pub tokenizer: Box<dyn TextTokenizer>,
    /// "byte" for the byte-level presets, "token" for a checkpoint's own tokenizer.
    pub loss_unit: &'static str,
}

impl Base {
    pub fn open(model: &ExperimentModel) -> Result<Self, ExperimentError> {
        match model {
            ExperimentModel::Preset(size) => Ok(Base {
                spec: size.spec(),
                checkpoint: None,
                tokenizer: Box::new(ByteTokenizer),
                loss_unit: "byte",
            }),
            ExperimentModel::Checkpoint(path) => {
                let ckpt = checkpoint::open(path).map_err(|e| ExperimentError::Base {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                let files = ckpt
                    .tokenizer
                    .clone()
                    .ok_or_else(|| ExperimentError::Base {
                        path: path.clone(),
                        reason: "the checkpoint has no tokenizer".into(),
                    })?;
                let tokenizer = HfTokenizer::new(files).map_err(|e| ExperimentError::Base {
                    path: path.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Base {
                    spec: ckpt.spec.clone(),
                    checkpoint: Some(ckpt),
                    tokenizer: Box::new(tokenizer),
                    loss_unit: "token",
                })
            }
        }
    }
}

/// Held-out loss of every lab after one round.
#[derive(Debug, Clone, Serialize)]
pub struct RoundScores {
    /// 0 before any training.
    pub round: u64,
    /// Nats per token (per byte for the byte-level presets), in the order of the labs.
    pub loss: Vec<f64>,
    /// Bits per character of the held-out text, in the order of the labs.
    pub bits_per_char: Vec<f64>,
}

impl RoundScores {
    /// Mean over labs (each lab counts once, whatever its size).
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

/// Whether one lab gained from one federated arm: its final loss against its local-only
/// model's and its language's centralised model's.
#[derive(Debug, Clone, Serialize)]
pub struct LabVerdict {
    pub arm: Arm,
    pub local_steps: usize,
    pub lab: String,
    pub before: f64,
    pub federated: f64,
    pub local_only: Option<f64>,
    pub centralised_language: Option<f64>,
    /// `federated < local_only`.
    pub beats_local_only: Option<bool>,
    /// `(before − federated) / (before − centralised_language)`: the share of the
    /// centralised improvement the federation reached.
    pub share_of_centralised_gain: Option<f64>,
}

/// Everything one experiment measured.
#[derive(Debug, Clone, Serialize)]
pub struct ExperimentResults {
    pub model: String,
    pub pretrained: bool,
    pub loss_unit: String,
    pub layout: Layout,
    pub labs: Vec<LabInfo>,
    pub rounds: u64,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub lora_rank: usize,
    pub seed: u64,
    pub runs: Vec<ArmRun>,
    pub verdicts: Vec<LabVerdict>,
}

impl ExperimentResults {
    /// The languages in lab order, each once: `(code, English name)`.
    pub fn languages(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = Vec::new();
        for lab in &self.labs {
            if !out.iter().any(|(c, _)| *c == lab.language) {
                out.push((lab.language.clone(), lab.language_name.clone()));
            }
        }
        out
    }

    fn run(&self, arm: Arm, steps: usize) -> Option<&ArmRun> {
        self.runs
            .iter()
            .find(|r| r.arm == arm && r.local_steps == steps)
    }

    /// Each federated arm's verdict for every lab (see [`LabVerdict`]).
    pub fn verdicts(&self) -> Vec<LabVerdict> {
        let mut out = Vec::new();
        for run in self.runs.iter().filter(|r| r.arm.is_federated()) {
            let last = |arm: Arm| {
                self.run(arm, run.local_steps)
                    .and_then(|r| r.rounds.last())
                    .map(|r| r.loss.clone())
            };
            let (local, central) = (last(Arm::LocalOnly), last(Arm::CentralisedLanguage));
            let fed = run.rounds.last().expect("round 0 at least");
            for (i, lab) in self.labs.iter().enumerate() {
                let before = run.rounds[0].loss[i];
                let federated = fed.loss[i];
                let local_only = local.as_ref().map(|l| l[i]);
                let centralised_language = central.as_ref().map(|c| c[i]);
                out.push(LabVerdict {
                    arm: run.arm,
                    local_steps: run.local_steps,
                    lab: lab.name.clone(),
                    before,
                    federated,
                    local_only,
                    centralised_language,
                    beats_local_only: local_only.map(|l| federated < l),
                    share_of_centralised_gain: centralised_language
                        .filter(|c| before - c > 0.0)
                        .map(|c| (before - federated) / (before - c)),
                });
            }
        }
        out
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ExperimentError {
    #[error(transparent)]
    Layout(#[from] crate::layout::LayoutError),
    #[error("opening the base model {}: {reason}", path.display())]
    Base { path: PathBuf, reason: String },
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
    let opened = Base::open(&options.model)?;
    let labs = options.labs(opened.tokenizer.as_ref())?;
    let base = fedclient::model::LoraLlama::for_plan(
        &opened.spec,
        &options.lora(),
        opened.checkpoint.as_ref(),
        device,
    )?;
    // Every arm starts from the same base: score it once.
    let before = arms::score(0, &labs, options, device, &[&base], |_| 0)?;
    let mut runs = Vec::new();
    for &steps in &options.local_steps {
        for &arm in &options.arms {
            let run = arms::run_arm(arm, steps, options, &labs, &base, &before, device)?;
            progress(&run);
            runs.push(run);
        }
    }
    let mut results = ExperimentResults {
        model: opened.spec.name.clone(),
        pretrained: opened.checkpoint.is_some(),
        loss_unit: opened.loss_unit.to_string(),
        layout: options.layout,
        labs: labs
            .iter()
            .map(|l| LabInfo {
                name: l.name.clone(),
                language: l.language.clone(),
                language_name: l.language_name.clone(),
                train_tokens: l.corpus.train_samples(),
                heldout_tokens: l.corpus.heldout.tokens.len(),
            })
            .collect(),
        rounds: options.rounds,
        batch_size: options.batch_size,
        seq_len: options.seq_len,
        learning_rate: options.learning_rate,
        lora_rank: options.lora_rank,
        seed: options.seed,
        runs,
        verdicts: Vec::new(),
    };
    results.verdicts = results.verdicts();
    Ok(results)
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
