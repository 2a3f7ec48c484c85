//! Running the pilot federation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use fedaggregator::AggregatorConfig;
use fedaggregator::config::ServerSection;
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::device::{DeviceChoice, select_device};
use fedclient::eval::{EvalStats, evaluate};
use fedclient::identity::IdentitySeed;
use fedclient::model::LoraLlama;
use fedclient::participant::{self, ParticipantObserver, ParticipantOptions};
use fedclient::train::{TrainStats, train_local};
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TrainingSpec};

use crate::corpus::udhr;

/// Size presets of the model every lab initialises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ModelSize {
    /// 2 layers × 64 wide: seconds per round on two CPU cores.
    Tiny,
    /// 4 layers × 128 wide.
    Small,
    /// 6 layers × 256 wide: for a GPU.
    Base,
}

impl ModelSize {
    /// The architecture of this preset (byte-level vocabulary).
    pub fn spec(self) -> ModelSpec {
        let tiny = ModelSpec::tiny();
        match self {
            ModelSize::Tiny => tiny,
            ModelSize::Small => ModelSpec {
                name: "mekong/small-llama-bytes".into(),
                hidden_size: 128,
                intermediate_size: 344,
                num_hidden_layers: 4,
                num_attention_heads: 8,
                num_key_value_heads: 4,
                ..tiny
            },
            ModelSize::Base => ModelSpec {
                name: "mekong/base-llama-bytes".into(),
                hidden_size: 256,
                intermediate_size: 688,
                num_hidden_layers: 6,
                num_attention_heads: 8,
                num_key_value_heads: 2,
                max_position_embeddings: 512,
                ..tiny
            },
        }
    }
}

/// What the pilot runs.
#[derive(Debug, Clone)]
pub struct PilotOptions {
    /// Language codes, one lab each (see [`crate::corpus::UDHR`]).
    pub languages: Vec<String>,
    pub rounds: u64,
    /// Local optimizer steps per round.
    pub steps: usize,
    pub model: ModelSize,
    pub device: DeviceChoice,
    pub batch_size: usize,
    pub seq_len: usize,
    pub learning_rate: f64,
    pub lora_rank: usize,
    /// Fraction of each language's paragraphs held out for evaluation.
    pub heldout_fraction: f64,
    /// Where the aggregator writes `round-NNNN/` and `final/`.
    pub out_dir: PathBuf,
    /// Also train each language alone with the same number of steps.
    pub local_baseline: bool,
    /// Aggregate securely (default). Off only on request: the aggregator then sees every
    /// lab's update.
    pub secure: bool,
}

impl Default for PilotOptions {
    fn default() -> Self {
        PilotOptions {
            languages: crate::corpus::DEFAULT_LANGUAGES
                .iter()
                .map(|s| s.to_string())
                .collect(),
            rounds: 5,
            steps: 30,
            model: ModelSize::Small,
            device: DeviceChoice::Auto,
            batch_size: 8,
            seq_len: 64,
            learning_rate: 5e-3,
            lora_rank: 8,
            heldout_fraction: 0.1,
            out_dir: PathBuf::from("runs/pilot"),
            local_baseline: true,
            secure: true,
        }
    }
}

/// Held-out results of one language.
#[derive(Debug, Clone)]
pub struct LanguageRow {
    pub code: String,
    pub name: String,
    pub train_tokens: usize,
    pub before: EvalStats,
    pub federated: EvalStats,
    pub local_only: Option<EvalStats>,
}

/// The pilot's outcome.
#[derive(Debug, Clone)]
pub struct PilotReport {
    pub rows: Vec<LanguageRow>,
    pub device: String,
    pub rounds: u64,
    pub steps: usize,
    pub final_adapter_dir: PathBuf,
    pub federated_time: Duration,
    pub baseline_time: Duration,
    /// Whether rounds were securely aggregated, and the largest per-value quantisation
    /// error bound of any round's mean update.
    pub secure: bool,
    pub max_error_bound: f64,
}

/// Prints one line per trained round.
struct Progress;

impl ParticipantObserver for Progress {
    fn round_trained(&self, name: &str, round: u64, stats: &TrainStats, _: &[f32], _: u64) {
        println!(
            "  round {round}  {name:<10} trained {} steps  loss {:.3} -> {:.3}",
            stats.steps, stats.first_loss, stats.last_loss
        );
    }
}

impl PilotOptions {
    /// The name of the lab for language `code`.
    pub fn lab_name(code: &str) -> String {
        format!("lab-{code}")
    }

    /// The federation plan these options describe, with `identities` (one per language, in
    /// order) on the roster.
    pub fn plan(&self, identities: &[IdentitySeed]) -> FederationPlan {
        FederationPlan {
            federation: "mekong-pilot-udhr".into(),
            model: self.model.spec(),
            lora: LoraSpec {
                rank: self.lora_rank,
                ..LoraSpec::default()
            },
            training: TrainingSpec {
                local_steps: self.steps,
                batch_size: self.batch_size,
                seq_len: self.seq_len,
                learning_rate: self.learning_rate,
                ..TrainingSpec::default()
            },
            rounds: RoundSpec {
                rounds: self.rounds,
                participants: self.languages.len(),
                min_updates: self.languages.len(),
                round_timeout_ms: 3_600_000,
            },
            roster: self
                .languages
                .iter()
                .zip(identities)
                .map(|(code, id)| RosterEntry {
                    name: Self::lab_name(code),
                    public_key: id.public_key_hex(),
                })
                .collect(),
            secure_aggregation: SecureAggregationSpec {
                enabled: self.secure,
                ..Default::default()
            },
            strategy: Default::default(),
        }
    }
}

/// Runs the whole pilot: federation over gRPC on loopback, then the local-only baseline.
pub async fn run(options: PilotOptions) -> Result<PilotReport> {
    if options.languages.is_empty() {
        return Err(anyhow!("--languages must name at least one language"));
    }
    if options.secure && options.languages.len() < 3 {
        return Err(anyhow!(
            "secure aggregation needs at least 3 labs (with two, each learns the other's update from the sum); give --languages three or more, or pass --insecure-plaintext"
        ));
    }
    // Each simulated lab gets a fresh identity, as `fedclient keygen` would make.
    let dir = tempfile_dir(&options.out_dir)?;
    let identities = options
        .languages
        .iter()
        .map(|code| {
            IdentitySeed::generate(&dir.join(format!("{}.key", PilotOptions::lab_name(code))))
                .context("creating a lab identity")
        })
        .collect::<Result<Vec<_>>>()?;
    let plan = options.plan(&identities);
    plan.validate().context("pilot options")?;
    let selected = select_device(options.device).context("selecting the device")?;
    let device = selected.device.clone();

    let mut corpora = Vec::new();
    for code in &options.languages {
        let (name, text) = udhr(code).ok_or_else(|| {
            anyhow!("unknown language {code:?}; the pilot has lo, km, th, vi, my, id, ms, tl, en")
        })?;
        let corpus = LocalCorpus::from_text(code, text, options.heldout_fraction, &ByteTokenizer)
            .with_context(|| format!("preparing the {name} text"))?;
        corpora.push((code.clone(), name.to_string(), corpus));
    }

    let config = AggregatorConfig {
        server: ServerSection {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            output_dir: options.out_dir.clone(),
            linger_after_finish_ms: 10_000,
        },
        plan: plan.clone(),
    };
    let server = fedaggregator::start(&config)
        .await
        .context("starting the aggregator")?;
    println!(
        "aggregator on {} · {} labs · {} rounds × {} local steps · device {}",
        server.url(),
        corpora.len(),
        options.rounds,
        options.steps,
        selected.label
    );

    let started = Instant::now();
    let observer: Arc<dyn ParticipantObserver> = Arc::new(Progress);
    let mut labs = Vec::new();
    for ((code, _, corpus), identity) in corpora.iter().zip(identities) {
        let participant_options = ParticipantOptions {
            evaluate: true,
            connect_patience: Duration::from_secs(30),
            identity: Some(Arc::new(identity)),
            plan_sha256: Some(plan.fingerprint()),
            ..ParticipantOptions::new(&server.url(), &PilotOptions::lab_name(code), code)
        };
        labs.push(tokio::spawn(participant::run(
            participant_options,
            corpus.clone(),
            device.clone(),
            observer.clone(),
        )));
    }
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.context("participant task")??);
    }
    server.finished().await;
    let max_error_bound = server
        .status()
        .history
        .iter()
        .filter_map(|r| r.secure.as_ref().map(|s| s.error_bound))
        .fold(0.0, f64::max);
    server.drain(Duration::from_secs(5)).await;
    let _ = std::fs::remove_dir_all(&dir);
    let final_adapter_dir = server.store().final_dir();
    server.shutdown().await?;
    let federated_time = started.elapsed();

    let started = Instant::now();
    let mut baselines = Vec::new();
    if options.local_baseline {
        println!("local-only baseline: each lab alone, same steps");
        for (_, _, corpus) in &corpora {
            let plan = plan.clone();
            let corpus = corpus.clone();
            let device = device.clone();
            let name = PilotOptions::lab_name(&corpus.language);
            baselines.push(tokio::task::spawn_blocking(move || {
                local_only(&plan, &corpus, &name, &device)
            }));
        }
    }
    let mut local_results = Vec::new();
    for b in baselines {
        local_results.push(Some(b.await??));
    }
    let baseline_time = started.elapsed();

    let rows = corpora
        .into_iter()
        .enumerate()
        .map(|(i, (code, name, corpus))| {
            let report = &reports[i];
            Ok(LanguageRow {
                code,
                name,
                train_tokens: corpus.train_samples(),
                before: report
                    .initial_eval
                    .clone()
                    .ok_or_else(|| anyhow!("missing initial evaluation"))?,
                federated: report
                    .final_eval
                    .clone()
                    .ok_or_else(|| anyhow!("missing final evaluation"))?,
                local_only: local_results.get(i).cloned().flatten(),
            })
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(PilotReport {
        rows,
        device: selected.label,
        rounds: options.rounds,
        steps: options.steps,
        final_adapter_dir,
        federated_time,
        baseline_time,
        secure: options.secure,
        max_error_bound,
    })
}

/// A fresh directory for the simulated labs' identity files, beside the run's output.
fn tempfile_dir(out_dir: &std::path::Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let dir = out_dir.join(".identities");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One lab training alone: the same rounds × steps, the same seeds, no averaging.
fn local_only(
    plan: &FederationPlan,
    corpus: &LocalCorpus,
    name: &str,
    device: &burn::prelude::Device,
) -> Result<EvalStats> {
    let mut model = LoraLlama::new(&plan.model, &plan.lora, device)?;
    for round in 1..=plan.rounds.rounds {
        let seed = plan.training.local_seed(name, round);
        model = train_local(model, &corpus.train, &plan.training, seed, device)?.0;
    }
    Ok(evaluate(
        &model,
        &corpus.heldout,
        plan.training.seq_len,
        device,
    )?)
}
