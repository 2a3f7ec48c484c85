//! Where the aggregator keeps every round's global adapter: `round-NNNN/` directories in the
//! Hugging Face PEFT format (round 0 is the starting adapter), a `round.json` beside each
//! adapter recording who contributed, and `final/` once the run is finished. Under
//! FedEx-LoRA each directory also holds `base_delta.safetensors`, the dense corrections to
//! add to the base weights ([`fedcore::strategy::global`]).

use std::path::{Path, PathBuf};

use fedcore::strategy::{GlobalModel, global};
use fedcore::{AdapterError, RoundRecord};
use serde::Serialize;

/// Directory-backed adapter history.
#[derive(Debug, Clone)]
pub struct AdapterStore {
    dir: PathBuf,
}

#[derive(Serialize)]
struct RoundFile<'a> {
    round: u64,
    contributors: &'a [String],
    dropped: &'a [String],
    /// Cohort members that left the federation (`Leave`) during the round.
    left: &'a [String],
    total_samples: u64,
    adapter_hash: &'a str,
    /// How the round was aggregated: `strategy.mode` and the factors labs trained.
    strategy: StrategyFile,
    /// Present for securely aggregated rounds.
    #[serde(skip_serializing_if = "Option::is_none")]
    secure_aggregation: Option<SecureFile<'a>>,
    /// Where the round's time went at the center; absent for a round this process resumed.
    #[serde(skip_serializing_if = "Option::is_none")]
    timing: Option<&'a CenterTiming>,
}

/// A round's time as the center saw it: from its opening to its close, and each stage in
/// the order it closed (their seconds add up to `duration_s`). What a lab spent inside a
/// stage (training, waiting, uploading) stays at the lab (`fedclient::round_clock`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CenterTiming {
    pub duration_s: f64,
    pub stages: Vec<crate::admin::report::StageSpan>,
}

#[derive(Serialize)]
struct StrategyFile {
    mode: &'static str,
    /// `["b"]`, `["a"]` or `["a", "b"]`.
    trained: Vec<&'static str>,
}

#[derive(Serialize)]
struct SecureFile<'a> {
    attempt: u32,
    /// Largest per-value error quantisation can have put into the mean update.
    quantisation_error_bound: f64,
    /// Under `[plan.privacy]`: the noised sum's mechanism and ε (round and spent).
    #[serde(skip_serializing_if = "Option::is_none")]
    differential_privacy: Option<&'a fedcore::round::PrivacyRecord>,
}

impl AdapterStore {
    /// A store rooted at `dir` (created on first write).
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        AdapterStore { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Directory of one round's adapter.
    pub fn round_dir(&self, round: u64) -> PathBuf {
        self.dir.join(format!("round-{round:04}"))
    }

    /// Directory of the final adapter.
    pub fn final_dir(&self) -> PathBuf {
        self.dir.join("final")
    }

    /// Saves the starting adapter as round 0.
    pub fn save_initial(&self, global: &GlobalModel) -> Result<(), AdapterError> {
        global::write_dir(&self.round_dir(0), global)
    }

    /// Saves a closed round's adapter and its record, with the center's timing of the round
    /// when it has one.
    pub fn save_round(
        &self,
        record: &RoundRecord,
        global: &GlobalModel,
        timing: Option<&CenterTiming>,
    ) -> Result<(), AdapterError> {
        let dir = self.round_dir(record.round);
        global::write_dir(&dir, global)?;
        let json = serde_json::to_string_pretty(&RoundFile {
            round: record.round,
            contributors: &record.contributors,
            dropped: &record.dropped,
            left: &record.left,
            total_samples: record.total_samples,
            adapter_hash: &record.adapter_hash,
            strategy: StrategyFile {
                mode: record.mode.name(),
                trained: [("a", record.trained.a), ("b", record.trained.b)]
                    .into_iter()
                    .filter_map(|(name, on)| on.then_some(name))
                    .collect(),
            },
            secure_aggregation: record.secure.as_ref().map(|s| SecureFile {
                attempt: s.attempt,
                quantisation_error_bound: s.error_bound,
                differential_privacy: s.privacy.as_ref(),
            }),
            timing,
        })
        .expect("record serialises");
        // Written last, under a temporary name then renamed: its presence says the round's
        // directory is complete (see `has_round`).
        let path = dir.join("round.json");
        let partial = dir.join("round.json.partial");
        std::fs::write(&partial, json)
            .and_then(|()| std::fs::rename(&partial, &path))
            .map_err(|source| AdapterError::Io {
                path: path.display().to_string(),
                source,
            })
    }

    /// Whether a round's directory is complete (a process killed while writing it leaves
    /// it without `round.json`).
    pub fn has_round(&self, round: u64) -> bool {
        self.round_dir(round).join("round.json").is_file()
    }

    /// Whether the final adapter is complete (its config is written after its weights).
    pub fn has_final(&self) -> bool {
        self.final_dir().join(fedcore::peft::CONFIG_FILE).is_file()
    }

    /// Saves the run's final adapter.
    pub fn save_final(&self, global: &GlobalModel) -> Result<(), AdapterError> {
        global::write_dir(&self.final_dir(), global)
    }
}
