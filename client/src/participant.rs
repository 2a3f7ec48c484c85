//! The participant runtime: what a lab runs to take part in a federation.
//!
//! Join, then loop: fetch the round's task (long-poll), load the global adapter into the
//! local model, train on local text, hand in the update, repeat until the aggregator says the
//! run is finished. Local text never leaves this module.
//!
//! What to do with each task, and what to refuse, is decided by the sans-IO round machine
//! [`fedcore::round::lab::LabMachine`]; this module is its shell: it performs the machine's
//! [`Next`] (gRPC calls with retries, training with burn, the reveal record on disk,
//! pauses), feeds each outcome back, and reports progress and timing.
//!
//! What a round trains and uploads comes from the plan's `[strategy]` (see
//! `fedcore::strategy`), derived here from the pinned plan and the round number and checked
//! against the task's `RoundWork`: the participant starts from [`Strategy::download`] (the
//! global; HetLoRA's first `rank` components; FedSA-LoRA's global A with this lab's own B,
//! kept across rounds), trains the factors [`Strategy::trains`] names (B only, A only, or
//! both; the base never trains), with FedProx's proximal term when `strategy.fedprox.mu > 0`,
//! and uploads [`Strategy::upload`]: trained minus downloaded, in the round's upload layout.
//!
//! With secure aggregation (the default) the only things sent are the participant's name and
//! language label and the messages of the protocol: signed public keys, encrypted shares,
//! the masked update (streamed in chunks), a signature over the survivors, and revealed
//! shares. The update itself, its sample weight and the training losses never leave in the
//! clear. The participant checks the plan against the fingerprint it was given (and refuses
//! to follow an unpinned plan unless its operator explicitly trusts the aggregator), derives
//! every protocol parameter from it, and decides from the pinned plan alone whether an
//! update is masked: a task that asks for it in plaintext under a secure plan is refused.
//! It reveals shares at most once per starting global model and only for strictly
//! increasing rounds within the plan, recorded durably before the shares leave
//! ([`crate::reveal_record`]), so a server that restarts an attempt, replays a round or
//! resends a global under a new round number cannot difference two sums.
//! Without secure aggregation (a plan that says so, pinned) the update, its sample weight
//! and aggregate losses are sent in plaintext through [`crate::upload`].
//!
//! One more message leaves only if the lab's local policy allows it
//! ([`ParticipantOptions::share_metrics`], from `share_metrics` in its participant.toml;
//! empty by default): `ReportMetrics`, with `heldout_loss` the mean held-out loss before
//! and after each round's local training and the number of held-out tokens it covers, for
//! the operator's per-language loss curves; with `round_timing` the round's wall time at
//! the lab and the seconds of it in each [`Phase`]. Aggregate numbers only; see
//! [`report_metrics`] and [`report_round_timing`].

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use burn::prelude::Device;
use fedcore::round::lab::{
    LabError, LabMachine, LabSetup, Next, Pause, PlaintextUpload, TrainOrder, TrainTask,
};
use fedcore::round::{SecureMessage, SecureTrain, UploadError};
use fedcore::secagg::participant::RoundRandomness;
use fedcore::secagg::protocol::MIN_PEERS_FLOOR;
use fedcore::strategy::{GlobalModel, ServerState};
use fedcore::{FederationPlan, LoraAdapter, Matrix, StrategyError};
use mekong_proto::MAX_MESSAGE_BYTES;
use mekong_proto::convert::{PayloadError, work_from_wire};
use mekong_proto::policy::{LocalPolicy, SharedMetric};
use mekong_proto::secure::{WireError, encode_words, message_to_wire, step_from_wire};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::transport::Channel;
use tracing::{error, info, warn};

use crate::checkpoint::Checkpoint;
use crate::data::LocalCorpus;
use crate::download::{DownloadError, DownloadOptions, Fetched, fetch_adapter};
use crate::error::ModelError;
use crate::eval::{EvalStats, evaluate};
use crate::identity::IdentitySeed;
use crate::model::LoraLlama;
use crate::reveal_record::RevealRecord;
use crate::round_clock::{Phase, RoundClock, RoundTiming};
use crate::train::dp_sgd::PoissonRecords;
use crate::train::{StepReport, TrainObserver, TrainOptions, TrainStats, train_local_observed};
use crate::upload;

/// Words per masked-input chunk (1 MiB).
const MASKED_CHUNK_WORDS: usize = 256 * 1024;

/// Why a participant stopped.
#[derive(Debug, Error)]
pub enum ParticipantError {
    #[error("cannot reach the aggregator at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("cannot set up TLS to the aggregator: {0}")]
    TlsSetup(#[from] mekong_proto::tls::TlsError),
    #[error("TLS to the aggregator at {url} failed: {refusal}")]
    Handshake {
        url: String,
        refusal: mekong_proto::tls::HandshakeRefusal,
    },
    #[error("aggregator refused {call}: {status}")]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("the aggregator's plan is invalid: {0}")]
    Plan(#[from] fedcore::ConfigError),
    #[error("the aggregator sent an unusable adapter: {0}")]
    Adapter(#[from] PayloadError),
    #[error("downloading the global adapter: {0}")]
    Download(#[from] DownloadError),
    #[error(
        "round {round}: the aggregator says it holds {held} words of this lab's masked update, which has {len}"
    )]
    MaskedResume { round: u64, held: u64, len: usize },
    #[error(
        "round {round}: the aggregator says it holds {held} bytes of this lab's {len}-byte update, which is not where a stream can resume"
    )]
    UpdateResume { round: u64, held: u64, len: u64 },
    #[error("the aggregator sent an empty answer to {0}")]
    EmptyAnswer(&'static str),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("local training task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(
        "the aggregator's plan has fingerprint {got}, not the pinned {expected}: refusing to take part"
    )]
    PlanMismatch { got: String, expected: String },
    #[error(
        "this federation uses secure aggregation, which needs this lab's identity key (identity.key from `fedclient enroll`, named by participant.toml or --identity)"
    )]
    NoIdentity,
    #[error(
        "this lab's identity key is not the one the roster lists for {name}: roster has {roster}, the key file gives {ours}"
    )]
    IdentityMismatch {
        name: String,
        roster: String,
        ours: String,
    },
    #[error("secure aggregation: {0}")]
    Secure(#[from] UploadError),
    #[error("the aggregator sent a malformed secure-aggregation message: {0}")]
    Wire(#[from] WireError),
    #[error("aggregation strategy: {0}")]
    Strategy(#[from] StrategyError),
    #[error(
        "no plan fingerprint pinned: refusing to follow the aggregator's plan (fingerprint {fingerprint}) unchecked, since it could turn secure aggregation off or change the roster and threshold; pin the fingerprint agreed with the other labs (policy.plan_sha256 in participant.toml, or --plan-sha256), or pass --trust-aggregator-plan to accept whatever the aggregator sends"
    )]
    NoPlanPin { fingerprint: String },
    #[error(
        "round {round}: the aggregator asked for this lab's update in plaintext, but the pinned plan uses secure aggregation; refusing (a center that drops the secure session would read the update)"
    )]
    PlaintextRequested { round: u64 },
    #[error(
        "round {round}: the aggregator opened a secure-aggregation session, but the pinned plan runs without secure aggregation; refusing the inconsistent task"
    )]
    SecureUnplanned { round: u64 },
    #[error("the aggregator's task numbers are out of bounds: {0}")]
    RoundNumbers(#[from] fedcore::secagg::spec::RoundNumberError),
    #[error("unmask guard: {0}")]
    Guard(#[from] fedcore::round::guard::GuardError),
    #[error(
        "round {round}: the aggregator refused this lab's update {tries} times ({status}); giving up"
    )]
    UpdateRefused {
        round: u64,
        tries: u32,
        status: tonic::Status,
    },
    #[error(
        "round {round}: the aggregator's task asks for {got}, but the pinned plan's strategy gives {expected}: refusing to train"
    )]
    WorkMismatch {
        round: u64,
        got: String,
        expected: String,
    },
    /// The lab's privacy budget (`policy.max_epsilon`) against the plan's `[privacy]`.
    #[error("privacy: {0}")]
    Privacy(LabError),
}

impl From<LabError> for ParticipantError {
    fn from(e: LabError) -> Self {
        match e {
            LabError::PlaintextRequested { round } => {
                ParticipantError::PlaintextRequested { round }
            }
            LabError::SecureUnplanned { round } => ParticipantError::SecureUnplanned { round },
            LabError::RoundNumbers(e) => ParticipantError::RoundNumbers(e),
            LabError::Guard(e) => ParticipantError::Guard(e),
            LabError::WorkMismatch {
                round,
                got,
                expected,
            } => ParticipantError::WorkMismatch {
                round,
                got,
                expected,
            },
            LabError::UpdateRefused { round, tries } => ParticipantError::UpdateRefused {
                round,
                tries,
                status: tonic::Status::failed_precondition("the update was refused"),
            },
            LabError::NoIdentity => ParticipantError::NoIdentity,
            LabError::Secure(e) => ParticipantError::Secure(e),
            LabError::Strategy(e) => ParticipantError::Strategy(e),
            e @ (LabError::NoPrivacy { .. }
            | LabError::MaxEpsilon(_)
            | LabError::Accountant(_)
            | LabError::RecordRate(_)) => ParticipantError::Privacy(e),
            LabError::Plan(e) => ParticipantError::Plan(e),
        }
    }
}

/// The lab operator's request to leave the federation (`fedclient join` sets it on Ctrl-C).
/// The runtime honours it at the first moment it can leave without breaking a round: before
/// training a new round, or while waiting with no secure-aggregation session open (an
/// update it already handed in stays in its round). It then tells the aggregator (`Leave`,
/// reason: operator request) and ends with [`RunEnd::LeftOnRequest`].
#[derive(Debug, Clone, Default)]
pub struct LeaveRequest(Arc<AtomicBool>);

impl LeaveRequest {
    /// Asks the runtime holding a clone of this request to leave.
    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    /// Whether leaving was asked for.
    pub fn is_requested(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

/// How to take part.
#[derive(Debug, Clone)]
pub struct ParticipantOptions {
    /// `http://host:port` of the aggregator (plaintext, only when the federation explicitly
    /// runs without TLS); ignored when `kit` is set.
    pub aggregator_url: String,
    /// The lab's provisioning kit (`fedaggregator provision`): the aggregator's address and
    /// CA, this lab's certificate and key. With a kit every connection is mutual TLS and the
    /// aggregator knows the lab by its certificate.
    pub kit: Option<Arc<mekong_proto::tls::ParticipantKit>>,
    /// Stable lab name (1-64 of `[A-Za-z0-9._-]`).
    pub name: String,
    /// Language label of the local data, for reports.
    pub language: String,
    /// Which held-out scores the lab computes: the base before the first round, the model
    /// it ends with, both (what `fedclient join` does) or neither.
    pub scoring: Scoring,
    /// How long to keep retrying an unreachable aggregator before giving up.
    pub connect_patience: Duration,
    /// The lab's identity (required when the federation uses secure aggregation).
    pub identity: Option<Arc<IdentitySeed>>,
    /// The plan fingerprint agreed out of band (`fedaggregator check-config` prints it).
    /// When set, a different plan is refused; when not, the participant refuses to take
    /// part unless [`Self::trust_aggregator_plan`] is set.
    pub plan_sha256: Option<String>,
    /// Follow whatever plan the aggregator sends when no fingerprint is pinned (logged
    /// loudly). Off by default: an unpinned plan lets a cheating center turn secure
    /// aggregation off, or change the roster or threshold, and read this lab's update.
    pub trust_aggregator_plan: bool,
    /// Where the lab keeps its durable state between processes (the record of what it
    /// unmasked, see [`crate::reveal_record`]). `None`: in memory only (warned at start).
    pub state_dir: Option<std::path::PathBuf>,
    /// Fewest peers this lab accepts in a secure round (never below 3).
    pub min_peers: usize,
    /// The pretrained base model, when the plan pins one (`model.weights_sha256`); checked
    /// against the plan before the first round.
    pub base: Option<Arc<Checkpoint>>,
    /// This lab's local policy: the aggregate metrics it reports beyond the protocol's
    /// messages. Empty (the default): it reports nothing.
    pub share_metrics: BTreeSet<SharedMetric>,
    /// This lab's local policy: the most rounds it contributes to before it leaves the
    /// federation on its own. `None`: every round of the plan.
    pub max_rounds: Option<u64>,
    /// This lab's local policy: the most ε its data may spend (`max_epsilon`); it refuses
    /// a plan without `[privacy]` and leaves before a round that could exceed it.
    pub max_epsilon: Option<f64>,
    /// Set by the lab's operator to leave before the run ends (see [`LeaveRequest`]).
    pub leave: LeaveRequest,
}

impl ParticipantOptions {
    /// Where the aggregator is, for messages: the kit's address under TLS.
    pub fn address(&self) -> String {
        match &self.kit {
            Some(kit) => format!("{} (TLS, server name {})", kit.aggregator, kit.server_name),
            None => self.aggregator_url.clone(),
        }
    }

    /// Options with the defaults for everything but the address, name and language.
    pub fn new(aggregator_url: &str, name: &str, language: &str) -> Self {
        ParticipantOptions {
            aggregator_url: aggregator_url.to_string(),
            kit: None,
            name: name.to_string(),
            language: language.to_string(),
            scoring: Scoring::NONE,
            connect_patience: Duration::from_secs(120),
            identity: None,
            plan_sha256: None,
            trust_aggregator_plan: false,
            state_dir: None,
            min_peers: MIN_PEERS_FLOOR,
            base: None,
            share_metrics: BTreeSet::new(),
            max_rounds: None,
            max_epsilon: None,
            leave: LeaveRequest::default(),
        }
    }

    /// These options under a lab's `[policy]` (participant.toml): its fewest peers, most
    /// rounds, shared metrics and, when it pins one, the agreed plan fingerprint.
    pub fn with_policy(mut self, policy: &LocalPolicy) -> Self {
        self.min_peers = policy.min_peers;
        self.max_rounds = policy.max_rounds;
        self.max_epsilon = policy.max_epsilon;
        self.share_metrics = policy.share_metrics.iter().copied().collect();
        if policy.plan_sha256.is_some() {
            self.plan_sha256 = policy.plan_sha256.clone();
        }
        self
    }
}

/// Progress notifications, for progress displays and tests.
pub trait ParticipantObserver: Send + Sync {
    /// Called after local training of a round, with the values about to be uploaded: the
    /// update (trained minus downloaded factors, in the round's upload layout; `B_local −
    /// B_global` under FFA-LoRA), sent as is in a plaintext federation, weighted, quantised
    /// and masked under secure aggregation.
    fn round_trained(
        &self,
        _name: &str,
        _round: u64,
        _stats: &TrainStats,
        _upload: &[f32],
        _num_samples: u64,
    ) {
    }
    /// Called when the aggregator has accepted the round's update (under secure aggregation:
    /// when this participant has revealed its shares).
    fn update_accepted(&self, _name: &str, _round: u64, _round_closed: bool) {}
    /// Called as a global adapter sent by reference arrives: `received` of `total` bytes.
    fn download_progress(&self, _name: &str, _round: u64, _received: u64, _total: u64) {}
    /// Called after each optimizer step of a round's local training, of `steps` in all.
    fn train_step(&self, _name: &str, _round: u64, _report: &StepReport, _steps: usize) {}
    /// Called as the update leaves: `sent` of `total` bytes handed to the connection (the
    /// masked update chunk by chunk; a plaintext update at once).
    fn upload_progress(&self, _name: &str, _round: u64, _sent: u64, _total: u64) {}
    /// Called when this lab's part of a round is over (its update accepted; under secure
    /// aggregation its shares revealed), with where the round's time went at the lab.
    fn round_finished(&self, _name: &str, _round: u64, _timing: &RoundTiming) {}
    /// Called before each secure-aggregation stage is answered; return false to go silent
    /// instead (fault-injection tests simulate a lab that dies at a chosen stage).
    fn secure_step(
        &self,
        _name: &str,
        _round: u64,
        _stage: fedcore::secagg::protocol::Stage,
    ) -> bool {
        true
    }
}

/// An observer that ignores everything.
pub struct Quiet;
impl ParticipantObserver for Quiet {}

/// One round as this participant saw it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub train: TrainStats,
    /// Where this lab's time went in the round ([`crate::round_clock`]).
    pub timing: RoundTiming,
}

/// Why a participant's run ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RunEnd {
    /// The aggregator finished the run.
    Finished { rounds_completed: u64 },
    /// The lab's policy (`max_rounds`) was reached; it left while the run went on.
    MaxRounds { max_rounds: u64 },
    /// The lab's operator asked it to leave ([`LeaveRequest`]); it left while the run went
    /// on.
    LeftOnRequest,
    /// Another round could have taken the lab past its privacy budget (`max_epsilon`); it
    /// left with `spent` ε spent (the larger of its client-level and record-level ε),
    /// while the run went on.
    PrivacyBudget { max_epsilon: f64, spent: f64 },
}

/// Which held-out scores a participant computes on its own text. Each costs a forward pass
/// over the held-out text, about as much as a few training steps on a CPU; a caller that
/// already knows the base's score (the pilot scores each language's base once, not once per
/// lab) asks only for the final one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Scoring {
    /// Score the base model (the starting adapter) before the first round.
    pub base: bool,
    /// Score the model the lab ends with ([`ParticipantReport::own_adapter`]).
    pub final_model: bool,
}

impl Scoring {
    /// No held-out scores.
    pub const NONE: Scoring = Scoring {
        base: false,
        final_model: false,
    };
    /// The base before the first round and the model the lab ends with.
    pub const BOTH: Scoring = Scoring {
        base: true,
        final_model: true,
    };
    /// Only the model the lab ends with.
    pub const FINAL: Scoring = Scoring {
        base: false,
        final_model: true,
    };
}

/// What a participant ends with.
#[derive(Debug, Clone)]
pub struct ParticipantReport {
    pub name: String,
    pub language: String,
    pub plan: FederationPlan,
    pub rounds: Vec<RoundReport>,
    /// Held-out evaluation of the starting adapter (the base model), when asked for
    /// ([`Scoring::base`]).
    pub initial_eval: Option<EvalStats>,
    /// Held-out evaluation of [`Self::own_adapter`], when asked for
    /// ([`Scoring::final_model`]).
    pub final_eval: Option<EvalStats>,
    /// The run's final global adapter, or the last one this lab saw when it left early.
    pub final_adapter: LoraAdapter,
    /// The adapter this lab uses after the run: the global one, or under FedSA-LoRA the
    /// global A with its own B, under `group_b` the global A with its group's B.
    pub own_adapter: LoraAdapter,
    /// FedEx-LoRA's dense corrections to the base weights that go with `final_adapter`
    /// (`[out, in]` per adapted module, already scaled; empty under every other mode).
    pub final_base_delta: BTreeMap<String, Matrix>,
    pub ended: RunEnd,
    /// Under `[privacy]`: the ε (at the plan's δ) this lab's data spent, from its reveal
    /// record (earlier runs of the same plan included).
    pub epsilon_spent: Option<f64>,
    /// Under `[privacy.record]`: the record-level ε (at the plan's δ) of this lab's DP-SGD
    /// over the steps it took in this run.
    pub record_epsilon: Option<f64>,
    /// Where the run's time went outside the rounds.
    pub timing: RunTiming,
}

/// A lab's whole run in seconds: what happened before its first round and after its last,
/// beside the rounds ([`RoundReport::timing`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RunTiming {
    /// From the call to [`run`] to its return.
    pub wall_s: f64,
    /// Connecting, joining and building the model on the base, before the first round.
    pub setup_s: f64,
    /// Scoring the base model before the first round (when asked for).
    pub initial_eval_s: f64,
    /// Scoring the model the lab ends with (when asked for).
    pub final_eval_s: f64,
}

/// Takes part in a federation until it finishes.
pub async fn run(
    options: ParticipantOptions,
    corpus: LocalCorpus,
    device: Device,
    observer: Arc<dyn ParticipantObserver>,
) -> Result<ParticipantReport, ParticipantError> {
    let run_started = std::time::Instant::now();
    let client = connect(&options).await?;
    let joined = call_with_retry(&options, "Join", || {
        let mut c = client.clone();
        let req = pb::JoinRequest {
            participant_name: options.name.clone(),
            language: options.language.clone(),
            client_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        async move { c.join(req).await }
    })
    .await?;
    let plan = FederationPlan::from_json(&joined.plan_json)?;
    check_plan(&options, &plan)?;
    let mut reveals = RevealRecord::open(
        options.state_dir.as_deref(),
        &plan.fingerprint(),
        &options.name,
    )?;
    let corpus = Arc::new(corpus);
    let mut model = LoraLlama::for_plan(&plan.model, &plan.lora, options.base.as_deref(), &device)?;
    // Record-level DP-SGD: this lab's sampling rate, from its own number of records.
    let record_sampling_rate = match &plan.privacy.record {
        Some(_) => Some(
            PoissonRecords::new(
                &corpus.train,
                plan.training.seq_len,
                model.window_prefix(),
                plan.training.batch_size,
            )?
            .rate(),
        ),
        None => None,
    };
    // The round protocol, as a sans-IO machine: this function performs what it decides.
    let mut lab = LabMachine::new(
        plan.clone(),
        LabSetup {
            max_epsilon: options.max_epsilon,
            record_sampling_rate,
            name: options.name.clone(),
            max_rounds: options.max_rounds,
            min_peers: options.min_peers.max(MIN_PEERS_FLOOR),
            identity_seed: options.identity.as_ref().map(|i| i.bytes()),
        },
        reveals.log().clone(),
    )?;
    let template = plan.initial_model();
    // The open round's layout: one of the first two rounds' (RoLoRA alternates).
    let layout_of = |round| {
        let state = ServerState {
            round,
            ..Default::default()
        };
        lab.strategy()
            .upload_layout(&template, &state)
            .manifest()
            .hash_hex()
    };
    if ![layout_of(0), layout_of(1)].contains(&joined.upload_layout_hash) {
        return Err(ParticipantError::Plan(fedcore::ConfigError::field(
            "plan",
            "the upload layout derived from the plan differs from the aggregator's",
        )));
    }
    info!(participant = %options.name, federation = %joined.federation, "joined");
    let id = joined.participant_id;
    let name = options.name.clone();
    let secure_plan = plan.secure_aggregation.enabled;
    // The rank a task states when its aggregator predates strategies (see work_from_wire).
    let default_rank = plan.strategy.participant_rank(&plan.lora, &name);
    let b_layout = template.adapter.b_manifest();

    let setup_s = run_started.elapsed().as_secs_f64();
    let evaluating = std::time::Instant::now();
    let initial_eval = if options.scoring.base {
        let (m, stats) = evaluate_blocking(model, &corpus, plan.training.seq_len, &device).await?;
        model = m;
        Some(stats)
    } else {
        None
    };
    let initial_eval_s = evaluating.elapsed().as_secs_f64();
    let mut rounds = Vec::new();
    // The training statistics of the update in flight, for its round's report.
    let mut last_stats: Option<TrainStats> = None;
    // Set by the observer to simulate a lab that died mid-protocol.
    let mut silent = false;
    let mut clock = RoundClock::new();
    // Round-timing reports in flight (sent off the round's path); awaited before returning.
    let mut timing_reports: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    let (final_model, ended) = 'run: loop {
        let task = clock
            .time(
                Phase::Wait,
                call_with_retry(&options, "FetchTask", || {
                    let mut c = client.clone();
                    let req = pb::FetchTaskRequest {
                        participant_id: id.clone(),
                        wait_ms: 10_000,
                    };
                    async move { c.fetch_task(req).await }
                }),
            )
            .await?
            .task
            .ok_or(ParticipantError::EmptyAnswer("FetchTask"))?;

        let mut next = match task {
            pb::fetch_task_response::Task::Wait(w) => {
                tracing::debug!(participant = %name, reason = %w.reason, "waiting");
                lab.wait(w.retry_after_ms.into(), options.leave.is_requested())
            }
            pb::fetch_task_response::Task::Train(t) => {
                let Fetched::Adapter(global) = clock
                    .time(
                        Phase::Download,
                        fetch_global(
                            &client,
                            &options,
                            &id,
                            t.round,
                            t.global_adapter.as_ref(),
                            &template,
                            &observer,
                        ),
                    )
                    .await?
                else {
                    continue;
                };
                let secure = match &t.secure {
                    Some(s) => Some(SecureTrain {
                        session: session_id(&s.session)?,
                        attempt: s.attempt,
                        index: s.index,
                    }),
                    None => None,
                };
                let work = work_from_wire(
                    t.work.as_ref(),
                    default_rank,
                    (&b_layout.hash_hex(), b_layout.len()),
                )?;
                let task = TrainTask {
                    round: t.round,
                    secure,
                    work,
                    global,
                    randomness: RoundRandomness::draw(&mut rand::rng()),
                };
                let deciding = std::time::Instant::now();
                let next = lab
                    .train(task, options.leave.is_requested())
                    .inspect_err(|e| {
                        error!(participant = %name, round = t.round, error = %e, "refusing the aggregator's task");
                    })?;
                // Under a secure plan this opens the session again for a later attempt.
                clock.add(
                    if secure_plan {
                        Phase::Secure
                    } else {
                        Phase::Train
                    },
                    deciding.elapsed(),
                );
                next
            }
            pb::fetch_task_response::Task::SecureStep(step) => {
                let owned = step_from_wire(step.step.as_ref())?;
                let stage = owned.as_step().stage();
                if silent || !observer.secure_step(&name, step.round, stage) {
                    silent = true;
                    let pause = Duration::from_millis(fedcore::round::lab::STEP_PAUSE_MS);
                    clock.time(Phase::Wait, tokio::time::sleep(pause)).await;
                    continue;
                }
                let responding = std::time::Instant::now();
                let next = lab.secure_step(step.round, step.attempt, &owned.as_step())?;
                clock.add(Phase::Secure, responding.elapsed());
                next
            }
            pb::fetch_task_response::Task::Finished(f) => {
                let Fetched::Adapter(final_model) = fetch_global(
                    &client,
                    &options,
                    &id,
                    f.rounds_completed,
                    f.final_adapter.as_ref(),
                    &template,
                    &observer,
                )
                .await?
                else {
                    continue;
                };
                info!(participant = %name, rounds = f.rounds_completed, reason = %f.reason, "run finished");
                break (
                    final_model,
                    RunEnd::Finished {
                        rounds_completed: f.rounds_completed,
                    },
                );
            }
        };
        // Perform what the machine decided, feeding each outcome back, until it says to ask
        // for the next task.
        loop {
            next = match next {
                Next::Pause { ms, why } => {
                    if let Pause::AlreadyRevealed { round } = why {
                        error!(participant = %name, round, "the aggregator restarted secure aggregation of a round this lab already unmasked; not taking part again");
                    }
                    clock
                        .time(Phase::Wait, tokio::time::sleep(Duration::from_millis(ms)))
                        .await;
                    break;
                }
                Next::Leave { reason, global } => {
                    let (end, wire) = match reason {
                        fedcore::round::LeaveReason::MaxRounds => {
                            let max_rounds = options.max_rounds.unwrap_or_default();
                            info!(participant = %name, max_rounds, "this lab's policy allows no more rounds; leaving the federation");
                            (RunEnd::MaxRounds { max_rounds }, pb::LeaveReason::MaxRounds)
                        }
                        fedcore::round::LeaveReason::PrivacyBudget => {
                            let max_epsilon = options.max_epsilon.unwrap_or_default();
                            // The larger ε: whichever kind reached the budget.
                            let spent = lab
                                .epsilon_spent()?
                                .into_iter()
                                .chain(lab.record_epsilon_spent()?)
                                .fold(0.0, f64::max);
                            info!(participant = %name, max_epsilon, spent, "another round could exceed this lab's privacy budget; leaving the federation");
                            (
                                RunEnd::PrivacyBudget { max_epsilon, spent },
                                pb::LeaveReason::PrivacyBudget,
                            )
                        }
                        _ => {
                            info!(participant = %name, "leaving the federation, as this lab's operator asked");
                            (RunEnd::LeftOnRequest, pb::LeaveReason::OperatorRequest)
                        }
                    };
                    leave(&client, &options, &id, wire).await;
                    break 'run (global, end);
                }
                Next::Train(order) => {
                    let round = order.round;
                    let (trained, stats, scores, evaluating, training) =
                        train_round(model, order, &plan, &corpus, &device, &options, &observer)
                            .await?;
                    model = trained;
                    if let Some(scores) = &scores {
                        clock
                            .time(
                                Phase::Evaluate,
                                report_metrics(&client, &options, &id, round, scores),
                            )
                            .await;
                    }
                    let trained_full = model.try_export_adapter()?;
                    let num_samples = corpus.train_samples() as u64;
                    let opening = std::time::Instant::now();
                    let next = lab.trained(trained_full, num_samples)?;
                    clock.add(
                        if secure_plan {
                            Phase::Secure
                        } else {
                            Phase::Train
                        },
                        opening.elapsed(),
                    );
                    clock.add(Phase::Evaluate, evaluating);
                    clock.add(Phase::Train, training.saturating_sub(evaluating));
                    if let Some((values, num_samples)) = lab.update() {
                        observer.round_trained(&name, round, &stats, values, num_samples);
                    }
                    last_stats = Some(stats);
                    next
                }
                Next::Send(SecureMessage::Advertise(advert)) => {
                    let Some(upload) = lab.secure_upload() else {
                        break;
                    };
                    let (round, attempt) = (upload.round(), upload.attempt());
                    if !observer.secure_step(
                        &name,
                        round,
                        fedcore::secagg::protocol::Stage::AdvertiseKeys,
                    ) {
                        silent = true;
                    }
                    if silent {
                        let pause = Duration::from_millis(fedcore::round::lab::STEP_PAUSE_MS);
                        clock.time(Phase::Wait, tokio::time::sleep(pause)).await;
                        break;
                    }
                    let encoded = upload.encoded();
                    let clipped = encoded.clipped;
                    info!(
                        participant = %name,
                        round,
                        attempt,
                        loss_first = last_stats.as_ref().map(|s| s.first_loss),
                        loss_last = last_stats.as_ref().map(|s| s.last_loss),
                        clipped,
                        "trained; advertising keys for secure aggregation"
                    );
                    if let Some(norm) = encoded.l2_norm {
                        // The whole update is scaled to the L2 clip: its norm says whether the
                        // clip suits this model and data (docs/privacy.md).
                        info!(participant = %name, round, l2_norm = norm, l2_clip = plan.privacy.l2_clip, scaled_down = clipped > 0, "update noised for differential privacy");
                    } else if clipped > 0 {
                        warn!(participant = %name, clipped, clip = plan.secure_aggregation.clip, "update values clipped before quantisation");
                    }
                    let accepted = clock
                        .time(
                            Phase::Secure,
                            send_secure(
                                &client,
                                &options,
                                &id,
                                round,
                                attempt,
                                SecureMessage::Advertise(advert),
                            ),
                        )
                        .await?;
                    match lab.sent(accepted) {
                        Some(next) => next,
                        None => break,
                    }
                }
                Next::Send(message) => {
                    let (round, attempt) = session_attempt(&lab);
                    let accepted = clock
                        .time(
                            Phase::Secure,
                            send_secure(&client, &options, &id, round, attempt, message),
                        )
                        .await?;
                    match lab.sent(accepted) {
                        Some(next) => next,
                        None => break,
                    }
                }
                Next::RevealAfter { persist, message } => {
                    // On disk, synced, before a single share leaves; then sent as any other
                    // stage message.
                    reveals.save(persist)?;
                    Next::Send(message)
                }
                Next::SendMasked(words) => {
                    let (round, attempt) = session_attempt(&lab);
                    let accepted = clock
                        .time(
                            Phase::Secure,
                            send_masked(&client, &options, &id, (round, attempt), words, &observer),
                        )
                        .await?;
                    match lab.sent(accepted) {
                        Some(next) => next,
                        None => break,
                    }
                }
                Next::Upload(update) => {
                    // Set with the update: the machine asks for an upload only of what it
                    // had this process train.
                    let stats = last_stats
                        .clone()
                        .expect("an update is uploaded only after it was trained");
                    let submitted = clock
                        .time(
                            Phase::Upload,
                            submit_plaintext(&client, &options, &id, &update, &stats, &*observer),
                        )
                        .await?;
                    match submitted {
                        Submitted::Taken => lab.uploaded(true)?,
                        Submitted::Refused(status) => match lab.uploaded(false) {
                            Ok(next) => next,
                            Err(LabError::UpdateRefused { round, tries }) => {
                                return Err(ParticipantError::UpdateRefused {
                                    round,
                                    tries,
                                    status,
                                });
                            }
                            Err(e) => return Err(e.into()),
                        },
                    }
                }
                Next::RoundDone { round } => {
                    if secure_plan {
                        info!(participant = %name, round, "shares revealed; secure aggregation of this round is done on our side");
                        observer.update_accepted(&name, round, false);
                    }
                    if let Some(spent) = lab.epsilon_spent()? {
                        info!(participant = %name, round, epsilon = spent, delta = plan.privacy.delta, "privacy spent by this lab's data so far (every noised sum its updates entered)");
                    }
                    if let Some(spent) = lab.record_epsilon_spent()? {
                        info!(participant = %name, round, epsilon = spent, delta = plan.privacy.delta, sampling_rate = record_sampling_rate, "record-level privacy spent by this lab's DP-SGD so far (every round whose update left it)");
                    }
                    let timing = clock.finish_round();
                    observer.round_finished(&name, round, &timing);
                    timing_reports
                        .extend(report_round_timing(&client, &options, &id, round, &timing));
                    rounds.push(RoundReport {
                        round,
                        train: last_stats
                            .clone()
                            .expect("a round is done only after its update was trained"),
                        timing,
                    });
                    break;
                }
                Next::Refuse {
                    round,
                    attempt,
                    error,
                } => {
                    // The aggregator misbehaved (or lost data): refuse and say why.
                    error!(participant = %name, round, attempt, %error, "refusing the aggregator's secure-aggregation request");
                    break;
                }
            };
        }
    };
    let own_adapter = lab.own_adapter(&final_model)?;
    // The last round's timing report goes out while the run ends; give it a moment.
    for report in timing_reports {
        let _ = tokio::time::timeout(Duration::from_secs(5), report).await;
    }
    let evaluating = std::time::Instant::now();
    let final_eval = if options.scoring.final_model {
        let m = model
            .load_base_delta(&final_model.base_delta)?
            .load_adapter(&own_adapter)?;
        Some(
            evaluate_blocking(m, &corpus, plan.training.seq_len, &device)
                .await?
                .1,
        )
    } else {
        None
    };
    let epsilon_spent = lab.epsilon_spent()?;
    let record_epsilon = lab.record_epsilon_spent()?;
    Ok(ParticipantReport {
        name: options.name,
        language: options.language,
        plan,
        rounds,
        initial_eval,
        final_eval,
        final_adapter: final_model.adapter,
        own_adapter,
        final_base_delta: final_model.base_delta,
        epsilon_spent,
        record_epsilon,
        ended,
        timing: RunTiming {
            wall_s: run_started.elapsed().as_secs_f64(),
            setup_s,
            initial_eval_s,
            final_eval_s: evaluating.elapsed().as_secs_f64(),
        },
    })
}

/// The round and attempt of the lab's open secure session (what its messages are for).
fn session_attempt(lab: &LabMachine) -> (u64, u32) {
    lab.secure_upload()
        .map(|u| (u.round(), u.attempt()))
        .unwrap_or_default()
}

/// Trains one round as the machine ordered, off the async runtime: the model after
/// training, its statistics, the held-out scores before and after when the lab's policy
/// lets it report them, and the time spent evaluating and in all.
async fn train_round(
    model: LoraLlama,
    order: TrainOrder,
    plan: &FederationPlan,
    corpus: &Arc<LocalCorpus>,
    device: &Device,
    options: &ParticipantOptions,
    observer: &Arc<dyn ParticipantObserver>,
) -> Result<
    (
        LoraLlama,
        TrainStats,
        Option<HeldoutScores>,
        Duration,
        Duration,
    ),
    ParticipantError,
> {
    let spec = plan.training.clone();
    let data = corpus.clone();
    let dev = device.clone();
    let train_options = TrainOptions {
        prox_mu: plan.strategy.fedprox.mu,
        record_dp: plan.privacy.record,
    };
    // Only when the lab's policy lets it report them (see module docs).
    let score = options.share_metrics.contains(&SharedMetric::HeldoutLoss);
    let mut steps = RoundSteps {
        observer: observer.clone(),
        name: options.name.clone(),
        round: order.round,
        steps: spec.local_steps,
    };
    let started = std::time::Instant::now();
    let (trained, stats, scores, evaluating) = tokio::task::spawn_blocking(move || {
        let mut evaluating = Duration::ZERO;
        // A failed evaluation costs the report, never the round.
        let mut heldout = |m: &LoraLlama| {
            let start = std::time::Instant::now();
            let stats = evaluate(m, &data.heldout, spec.seq_len, &dev)
                .inspect_err(|e| warn!(error = %e, "held-out evaluation failed; no metrics report this round"))
                .ok();
            evaluating += start.elapsed();
            stats
        };
        let m = model
            .load_base_delta(&order.base_delta)?
            .load_adapter(&order.start)?;
        let before = if score { heldout(&m) } else { None };
        let m = m.set_trainable(order.trains.a, order.trains.b);
        let (m, stats) = train_local_observed(
            m,
            &data.train,
            &spec,
            order.seed,
            &dev,
            &train_options,
            &mut steps,
        )?;
        let scores = before.and_then(|before| {
            Some(HeldoutScores {
                after: heldout(&m)?,
                before,
            })
        });
        Ok::<_, ModelError>((m, stats, scores, evaluating))
    })
    .await??;
    Ok((trained, stats, scores, evaluating, started.elapsed()))
}

/// Tries of a `Leave` call before giving up, and how long each may take.
const LEAVE_TRIES: u32 = 4;
const LEAVE_CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// Tells the aggregator this lab leaves the federation, so later rounds do not wait for it
/// and the records say it left. Best effort: a few quick tries while the aggregator is
/// unreachable (at most about a minute in all), then a warning; the lab leaves either way
/// (an aggregator that never hears of it counts it as a straggler, as before `Leave`).
async fn leave(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    reason: pb::LeaveReason,
) {
    let mut backoff = Duration::from_millis(200);
    for attempt in 1..=LEAVE_TRIES {
        let mut c = client.clone();
        let req = pb::LeaveRequest {
            participant_id: id.to_string(),
            reason: reason as i32,
        };
        let status = match tokio::time::timeout(LEAVE_CALL_TIMEOUT, c.leave(req)).await {
            Ok(Ok(answer)) => {
                let answer = answer.into_inner();
                info!(participant = %options.name, recorded = %answer.message, run_finished = answer.run_finished, "the aggregator recorded this lab's departure");
                return;
            }
            Ok(Err(status)) => status,
            Err(_) => {
                tonic::Status::unavailable(format!("no answer within {LEAVE_CALL_TIMEOUT:?}"))
            }
        };
        if !transient(&status) || attempt == LEAVE_TRIES {
            warn!(participant = %options.name, code = ?status.code(), error = %status.message(), "could not tell the aggregator that this lab leaves; it will count this lab as a straggler");
            return;
        }
        warn!(participant = %options.name, error = %status.message(), "Leave failed; retrying in {backoff:?}");
        tokio::time::sleep(backoff).await;
        backoff *= 2;
    }
}

/// The task's global adapter, downloaded in chunks when it came by reference.
async fn fetch_global(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    round: u64,
    payload: Option<&pb::AdapterPayload>,
    template: &GlobalModel,
    observer: &Arc<dyn ParticipantObserver>,
) -> Result<Fetched, ParticipantError> {
    let progress = download_reporter(observer.clone(), options.name.clone(), round);
    let download = DownloadOptions {
        patience: options.connect_patience,
        transient: &transient,
        progress: &progress,
    };
    Ok(fetch_adapter(client, id, payload, template, &download).await?)
}

/// Hands each training step of one round to the participant's observer.
struct RoundSteps {
    observer: Arc<dyn ParticipantObserver>,
    name: String,
    round: u64,
    steps: usize,
}

impl TrainObserver for RoundSteps {
    fn step(&mut self, report: &StepReport) {
        self.observer
            .train_step(&self.name, self.round, report, self.steps);
    }
}

/// Held-out scores of one round: the model the lab started from and the one it trained.
struct HeldoutScores {
    before: EvalStats,
    after: EvalStats,
}

/// Sends one round's held-out losses (`ReportMetrics`), a message beyond the protocol's,
/// only when [`ParticipantOptions::share_metrics`] lists `heldout_loss`:
/// two mean losses and a token count, never text, tokens or per-example values. A refusal
/// or failure is logged and changes nothing else: the numbers are for the operator's page.
async fn report_metrics(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    round: u64,
    scores: &HeldoutScores,
) {
    debug_assert!(options.share_metrics.contains(&SharedMetric::HeldoutLoss));
    let request = pb::ReportMetricsRequest {
        participant_id: id.to_string(),
        round,
        heldout_loss_before: scores.before.loss,
        heldout_loss_after: scores.after.loss,
        heldout_tokens: scores.after.tokens as u64,
        round_timing: None,
    };
    match client.clone().report_metrics(request).await {
        Ok(_) => info!(
            participant = %options.name,
            round,
            before = scores.before.loss,
            after = scores.after.loss,
            "held-out loss reported (share_metrics allows heldout_loss)"
        ),
        Err(status) => warn!(
            participant = %options.name,
            round,
            %status,
            "the aggregator did not take the held-out loss report; going on"
        ),
    }
}

/// Sends where this lab's round time went (`ReportMetrics.round_timing`), only when
/// [`ParticipantOptions::share_metrics`] lists `round_timing`: seconds per phase and the
/// round's wall time. Sent off the round's path (a task of its own), so the report costs
/// the next round nothing; a refusal or failure is logged and changes nothing else.
fn report_round_timing(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    round: u64,
    timing: &RoundTiming,
) -> Option<tokio::task::JoinHandle<()>> {
    if !options.share_metrics.contains(&SharedMetric::RoundTiming) {
        return None;
    }
    let request = pb::ReportMetricsRequest {
        participant_id: id.to_string(),
        round,
        round_timing: Some(timing.to_wire()),
        ..Default::default()
    };
    let (mut client, name) = (client.clone(), options.name.clone());
    Some(tokio::spawn(async move {
        match client.report_metrics(request).await {
            Ok(_) => {
                tracing::debug!(participant = %name, round, "round timing reported (share_metrics allows round_timing)")
            }
            Err(status) => warn!(
                participant = %name,
                round,
                %status,
                "the aggregator did not take the round-timing report; going on"
            ),
        }
    }))
}

/// Evaluates on the held-out text off the async runtime's worker threads.
async fn evaluate_blocking(
    model: LoraLlama,
    corpus: &Arc<LocalCorpus>,
    seq_len: usize,
    device: &Device,
) -> Result<(LoraLlama, EvalStats), ParticipantError> {
    let corpus = corpus.clone();
    let device = device.clone();
    tokio::task::spawn_blocking(move || {
        let stats = evaluate(&model, &corpus.heldout, seq_len, &device)?;
        Ok((model, stats))
    })
    .await?
}

async fn connect(
    options: &ParticipantOptions,
) -> Result<FederationClient<Channel>, ParticipantError> {
    if let Some(kit) = &options.kit {
        // Checks the kit's files (CA, certificate chain, key match) before the first call.
        let channel = kit.channel()?;
        return Ok(FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES));
    }
    let endpoint = Channel::from_shared(options.aggregator_url.clone()).map_err(|e| {
        ParticipantError::Connect {
            url: options.aggregator_url.clone(),
            message: e.to_string(),
        }
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Whether a failed call may simply be repeated: the aggregator was unreachable (down, or
/// restarting after a crash), or the connection broke under the call. tonic reports a
/// broken connection as `Unknown` or `Internal` with an HTTP/2 or transport message, or as
/// `Cancelled` when hyper gave up the request with its connection; the aggregator itself
/// never answers `Cancelled`, and its `Internal` refusals carry fedcore's messages. Every
/// call is safe to repeat: a message that did arrive the first time is answered
/// `AlreadyExists`, and the aggregator commits before it answers, so what it accepted it
/// still knows after a restart.
pub fn transient(status: &tonic::Status) -> bool {
    let m = status.message();
    let broken = m.starts_with("h2 protocol error") || m.starts_with("transport error");
    match status.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => true,
        tonic::Code::Unknown | tonic::Code::Internal => broken,
        _ => false,
    }
}

/// Calls `f` until it succeeds, retrying with exponential backoff (200 ms doubling to 5 s)
/// while the aggregator is unreachable, for at most `connect_patience`.
async fn call_with_retry<T, F, Fut>(
    options: &ParticipantOptions,
    call: &'static str,
    mut f: F,
) -> Result<T, ParticipantError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let mut pacing = Pacing::new(options);
    loop {
        let status = match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) => status,
        };
        handshake_refused(options, &status)?;
        if !transient(&status) {
            return Err(ParticipantError::Refused { call, status });
        }
        pacing.wait(options, &status, call).await?;
    }
}

/// A refused certificate stays refused: reported with why, never retried.
fn handshake_refused(
    options: &ParticipantOptions,
    status: &tonic::Status,
) -> Result<(), ParticipantError> {
    match mekong_proto::tls::handshake_refusal(status) {
        Some(refusal) => Err(ParticipantError::Handshake {
            url: options.address(),
            refusal,
        }),
        None => Ok(()),
    }
}

/// How a call or a resumable upload retries while the aggregator is unreachable: a backoff
/// doubling from 200 ms to 5 s, for at most `connect_patience`, counted again from the last
/// progress an upload made ([`Pacing::progressed`]).
struct Pacing {
    backoff: Duration,
    give_up: tokio::time::Instant,
}

impl Pacing {
    fn new(options: &ParticipantOptions) -> Self {
        Pacing {
            backoff: Duration::from_millis(200),
            give_up: tokio::time::Instant::now() + options.connect_patience,
        }
    }

    /// Waits out the backoff after `what` failed with `status`, or gives up (`Connect`)
    /// when that would go past the patience.
    async fn wait(
        &mut self,
        options: &ParticipantOptions,
        status: &tonic::Status,
        what: &str,
    ) -> Result<(), ParticipantError> {
        if tokio::time::Instant::now() + self.backoff > self.give_up {
            return Err(ParticipantError::Connect {
                url: options.address(),
                message: status.message().to_string(),
            });
        }
        warn!(participant = %options.name, error = %status.message(), "{what} failed; retrying in {:?}", self.backoff);
        tokio::time::sleep(self.backoff).await;
        self.backoff = (self.backoff * 2).min(Duration::from_secs(5));
        Ok(())
    }

    /// The other side took more of an upload: the backoff and the patience start over.
    fn progressed(&mut self, options: &ParticipantOptions) {
        *self = Pacing::new(options);
    }
}

/// Whether a resumable upload's stream broke on the way (or a chunk arrived damaged), so
/// that it resumes; anything else is the aggregator's answer about the upload.
fn stream_broke(status: &tonic::Status) -> bool {
    transient(status) || status.code() == tonic::Code::DataLoss
}

/// Refuses a plan other than the pinned one, and a secure plan this lab cannot sign for.
fn check_plan(options: &ParticipantOptions, plan: &FederationPlan) -> Result<(), ParticipantError> {
    let fingerprint = plan.fingerprint();
    match &options.plan_sha256 {
        Some(expected) if !expected.eq_ignore_ascii_case(&fingerprint) => {
            return Err(ParticipantError::PlanMismatch {
                got: fingerprint,
                expected: expected.clone(),
            });
        }
        Some(_) => {}
        None if options.trust_aggregator_plan => warn!(
            participant = %options.name,
            plan_sha256 = %fingerprint,
            "NO PLAN FINGERPRINT PINNED and the operator chose to trust the aggregator: following its plan, roster, threshold and secure-aggregation setting as sent; a cheating center could read this lab's update"
        ),
        None => return Err(ParticipantError::NoPlanPin { fingerprint }),
    }
    if !plan.secure_aggregation.enabled {
        warn!(participant = %options.name, "this federation does NOT use secure aggregation: the aggregator will see this lab's update");
        return Ok(());
    }
    let identity = options
        .identity
        .as_ref()
        .ok_or(ParticipantError::NoIdentity)?;
    let ours = identity.public_key_hex();
    let listed = plan
        .roster
        .iter()
        .find(|e| e.name == options.name)
        .ok_or_else(|| UploadError::NotOnRoster(options.name.clone()))?;
    if !listed.public_key.trim().eq_ignore_ascii_case(&ours) {
        return Err(ParticipantError::IdentityMismatch {
            name: options.name.clone(),
            roster: listed.public_key.clone(),
            ours,
        });
    }
    Ok(())
}

/// The 32-byte session id of a secure task.
fn session_id(bytes: &[u8]) -> Result<[u8; 32], WireError> {
    bytes.try_into().map_err(|_| WireError::Bytes {
        field: "session",
        got: bytes.len(),
        expected: 32,
    })
}

/// Sends one stage message; false when the stage had already closed without us.
async fn send_secure(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    round: u64,
    attempt: u32,
    msg: SecureMessage,
) -> Result<bool, ParticipantError> {
    let request = pb::SecureAggregateRequest {
        participant_id: id.to_string(),
        round,
        attempt,
        message: Some(message_to_wire(&msg)),
    };
    let sent = call_with_retry(options, "SecureAggregate", || {
        let mut c = client.clone();
        let req = request.clone();
        async move { c.secure_aggregate(req).await }
    })
    .await;
    late_is_not_fatal(options, round, sent.map(|_| ()))
}

/// Streams the masked update in chunks, each with its SHA-256; false when the stage had
/// already closed. A stream that breaks (connection lost, aggregator restarting, a chunk
/// damaged on the way) is resumed at the first word the aggregator has not folded, as
/// `MaskedReceived` says: finished chunks are never sent again. Tells `observer` as each
/// chunk is handed to the connection.
async fn send_masked(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    (round, attempt): (u64, u32),
    words: Vec<u32>,
    observer: &Arc<dyn ParticipantObserver>,
) -> Result<bool, ParticipantError> {
    // Shared by the streams that send it (a resumed one starts further in), not copied.
    let vector_sha256 = vector_sha256(&words);
    let words = Arc::new(words);
    let mut start = 0usize;
    let mut pacing = Pacing::new(options);
    loop {
        let mut c = client.clone();
        let stream = upload_reporter(
            MaskedUpload {
                participant_id: id.to_string(),
                round,
                attempt,
                words: words.clone(),
                vector_sha256,
            },
            start,
            observer.clone(),
            options.name.clone(),
        );
        let status = match c.submit_masked(stream).await {
            Ok(_) => return Ok(true),
            Err(status) => status,
        };
        handshake_refused(options, &status)?;
        if !stream_broke(&status) {
            return late_is_not_fatal(
                options,
                round,
                Err(ParticipantError::Refused {
                    call: "SubmitMasked",
                    status,
                }),
            );
        }
        pacing
            .wait(options, &status, &format!("round {round}'s masked upload"))
            .await?;
        let request = pb::MaskedReceivedRequest {
            participant_id: id.to_string(),
            round,
            attempt,
        };
        let held = call_with_retry(options, "MaskedReceived", || {
            let mut c = client.clone();
            let req = request.clone();
            async move { c.masked_received(req).await }
        })
        .await;
        let held = match held {
            Ok(h) => h,
            Err(e) => return late_is_not_fatal(options, round, Err(e)),
        };
        if held.committed {
            let total = 4 * words.len() as u64;
            observer.upload_progress(&options.name, round, total, total);
            return Ok(true);
        }
        let resume_at = usize::try_from(held.words_received).unwrap_or(usize::MAX);
        if resume_at > words.len() {
            return Err(ParticipantError::MaskedResume {
                round,
                held: held.words_received,
                len: words.len(),
            });
        }
        if resume_at > start {
            pacing.progressed(options);
        }
        info!(participant = %options.name, round, resume_at, of = words.len(), "resuming the masked upload");
        start = resume_at;
    }
}

/// One masked update, shared by the streams that send it.
struct MaskedUpload {
    participant_id: String,
    round: u64,
    attempt: u32,
    words: Arc<Vec<u32>>,
    /// SHA-256 of the whole vector, sent on the last chunk.
    vector_sha256: [u8; 32],
}

/// SHA-256 of a masked vector's little-endian bytes, without encoding it whole.
fn vector_sha256(words: &[u32]) -> [u8; 32] {
    let mut h = Sha256::new();
    for chunk in words.chunks(MASKED_CHUNK_WORDS) {
        h.update(encode_words(chunk));
    }
    h.finalize().into()
}

/// Largest plaintext update sent as one `SubmitUpdate` message (4 MiB); larger ones go
/// through `SubmitUpdateStream` in 1 MiB chunks, so no message grows with the adapter.
const PLAINTEXT_ONE_MESSAGE_BYTES: u64 = 4 * 1024 * 1024;

/// A plaintext update as `SubmitUpdateStream` chunks from byte `start` on, made as they are
/// sent: `header` (the request without its payload) on the first (a resumed stream names its
/// update again), then the values in 1 MiB pieces, each with its SHA-256, and the whole
/// update's SHA-256 on the last.
fn plaintext_chunks(
    header: pb::SubmitUpdateRequest,
    values: Arc<Vec<u8>>,
    start: usize,
    values_sha256: [u8; 32],
) -> impl tokio_stream::Stream<Item = pb::UpdateChunk> + Send + 'static {
    let piece = 4 * MASKED_CHUNK_WORDS;
    let len = values.len();
    let starts: Vec<usize> = if start >= len {
        vec![len]
    } else {
        (start..len).step_by(piece).collect()
    };
    let count = starts.len();
    tokio_stream::iter(starts.into_iter().enumerate().map(move |(k, from)| {
        let to = (from + piece).min(len);
        let bytes = &values[from..to];
        let last = k + 1 == count;
        pb::UpdateChunk {
            header: (k == 0).then(|| header.clone()),
            offset: from as u64,
            sha256: Sha256::digest(bytes).to_vec(),
            values_f32_le: bytes.to_vec(),
            last,
            values_sha256: if last {
                values_sha256.to_vec()
            } else {
                Vec::new()
            },
        }
    }))
}

/// Streams a plaintext update too large for one message, resuming after a broken
/// connection where `UpdateReceived` says the aggregator's copy ends. `None`: the update
/// was accepted, but the answer was lost with the connection.
async fn stream_plaintext(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    mut request: pb::SubmitUpdateRequest,
) -> Result<Option<pb::SubmitUpdateResponse>, ParticipantError> {
    // Shared by the streams that send it (a resumed one starts further in), not copied.
    let values = Arc::new(match request.payload.take() {
        Some(pb::submit_update_request::Payload::Plaintext(p)) => p.values_f32_le,
        None => Vec::new(),
    });
    let values_sha256: [u8; 32] = Sha256::digest(values.as_slice()).into();
    let mut start = 0usize;
    let mut pacing = Pacing::new(options);
    loop {
        let chunks = plaintext_chunks(request.clone(), values.clone(), start, values_sha256);
        let mut c = client.clone();
        let status = match c.submit_update_stream(chunks).await {
            Ok(r) => return Ok(Some(r.into_inner())),
            Err(status) => status,
        };
        handshake_refused(options, &status)?;
        if !stream_broke(&status) {
            return Err(ParticipantError::Refused {
                call: "SubmitUpdateStream",
                status,
            });
        }
        pacing
            .wait(
                options,
                &status,
                &format!("round {}'s update upload", request.round),
            )
            .await?;
        let ask = pb::UpdateReceivedRequest {
            participant_id: request.participant_id.clone(),
            round: request.round,
        };
        let held = call_with_retry(options, "UpdateReceived", || {
            let mut c = client.clone();
            let req = ask.clone();
            async move { c.update_received(req).await }
        })
        .await?;
        if held.accepted {
            return Ok(None);
        }
        let resume_at = usize::try_from(held.bytes_received).unwrap_or(usize::MAX);
        if resume_at > values.len() || resume_at % 4 != 0 {
            return Err(ParticipantError::UpdateResume {
                round: request.round,
                held: held.bytes_received,
                len: values.len() as u64,
            });
        }
        if resume_at > start {
            pacing.progressed(options);
        }
        info!(participant = %options.name, round = request.round, resume_at, of = values.len(), "resuming the update upload");
        start = resume_at;
    }
}

// The two reporters are free functions with owned arguments: a closure defined inside the
// async functions above would carry their lifetimes into the futures, which rustc then
// cannot prove `Send` for every lifetime (and `tokio::spawn` needs that).

/// The masked update from word `start` on, as a stream of checksummed chunks made as they
/// are sent, telling `observer` as each one is taken.
fn upload_reporter(
    upload: MaskedUpload,
    start: usize,
    observer: Arc<dyn ParticipantObserver>,
    name: String,
) -> impl tokio_stream::Stream<Item = pb::MaskedChunk> + Send + 'static {
    let len = upload.words.len();
    let total = 4 * len as u64;
    let starts = (start..len).step_by(MASKED_CHUNK_WORDS);
    tokio_stream::iter(starts.map(move |from| {
        let to = (from + MASKED_CHUNK_WORDS).min(len);
        let words_u32_le = encode_words(&upload.words[from..to]);
        observer.upload_progress(&name, upload.round, 4 * to as u64, total);
        pb::MaskedChunk {
            participant_id: upload.participant_id.clone(),
            round: upload.round,
            attempt: upload.attempt,
            offset: from as u64,
            sha256: Sha256::digest(&words_u32_le).to_vec(),
            words_u32_le,
            last: to == len,
            vector_sha256: if to == len {
                upload.vector_sha256.to_vec()
            } else {
                Vec::new()
            },
        }
    }))
}

/// Download progress for `observer`.
fn download_reporter(
    observer: Arc<dyn ParticipantObserver>,
    name: String,
    round: u64,
) -> impl Fn(u64, u64) + Send + Sync + 'static {
    move |received, total| observer.download_progress(&name, round, received, total)
}

/// A refusal because the stage or attempt moved on is expected after a slow answer: the
/// next task says what to do. Anything else stops the participant.
fn late_is_not_fatal(
    options: &ParticipantOptions,
    round: u64,
    result: Result<(), ParticipantError>,
) -> Result<bool, ParticipantError> {
    match result {
        Ok(()) => Ok(true),
        // A retry of a message that had arrived before the connection broke.
        Err(ParticipantError::Refused { status, .. })
            if status.code() == tonic::Code::AlreadyExists =>
        {
            Ok(true)
        }
        Err(ParticipantError::Refused { call, status })
            if matches!(
                status.code(),
                tonic::Code::FailedPrecondition | tonic::Code::DeadlineExceeded
            ) =>
        {
            warn!(participant = %options.name, round, call, %status, "not taken: the stage moved on");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// What became of a plaintext update.
enum Submitted {
    Taken,
    /// Refused (the round closed without it, or the aggregator would not take it).
    Refused(tonic::Status),
}

/// Hands in a plaintext update (secure aggregation off).
async fn submit_plaintext(
    client: &FederationClient<Channel>,
    options: &ParticipantOptions,
    id: &str,
    update: &PlaintextUpload,
    stats: &TrainStats,
    observer: &dyn ParticipantObserver,
) -> Result<Submitted, ParticipantError> {
    let round = update.round;
    let request = pb::SubmitUpdateRequest {
        participant_id: id.to_string(),
        round,
        layout_hash: update.layout_hash.clone(),
        base_adapter_hash: update.global_hash.clone(),
        num_samples: update.num_samples,
        payload: Some(upload::encode(&update.values)),
        metrics: Some(pb::TrainingMetrics {
            steps: stats.steps as u32,
            tokens: stats.tokens as u64,
            train_loss_first: stats.first_loss,
            train_loss_last: stats.last_loss,
        }),
    };
    let bytes = 4 * update.values.len() as u64;
    let submitted = if bytes <= PLAINTEXT_ONE_MESSAGE_BYTES {
        call_with_retry(options, "SubmitUpdate", || {
            let mut c = client.clone();
            let req = request.clone();
            async move { c.submit_update(req).await }
        })
        .await
        .map(Some)
    } else {
        // Too large for one message: the header, then checksummed chunks, resumed where
        // the aggregator's copy ends if the connection breaks.
        stream_plaintext(client, options, request).await
    };
    match submitted {
        Ok(None) => {
            observer.upload_progress(&options.name, round, bytes, bytes);
            info!(participant = %options.name, round, "update accepted (its answer was lost with the connection)");
            observer.update_accepted(&options.name, round, false);
            Ok(Submitted::Taken)
        }
        Ok(Some(r)) => {
            observer.upload_progress(&options.name, round, bytes, bytes);
            info!(
                participant = %options.name,
                round,
                loss_first = stats.first_loss,
                loss_last = stats.last_loss,
                received = r.updates_received,
                cohort = r.cohort_size,
                "update accepted"
            );
            observer.update_accepted(&options.name, round, r.round_closed);
            Ok(Submitted::Taken)
        }
        // The round closed without us (deadline): the next task tells us what next.
        Err(ParticipantError::Refused { status, .. })
            if status.code() == tonic::Code::FailedPrecondition =>
        {
            warn!(participant = %options.name, round, %status, "update not taken");
            Ok(Submitted::Refused(status))
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::transient;
    use tonic::{Code, Status};

    #[test]
    fn a_dead_or_restarting_aggregator_is_retried_and_refusals_are_not() {
        for status in [
            Status::unavailable("tcp connect error: Connection refused"),
            Status::cancelled("operation was canceled: connection closed"),
            Status::unknown("h2 protocol error: connection reset"),
            Status::internal("h2 protocol error: stream no longer needed"),
            Status::unknown("transport error"),
        ] {
            assert!(transient(&status), "{status}");
        }
        for status in [
            Status::internal("the unmasked sum is unusable: weight word is zero"),
            Status::new(Code::FailedPrecondition, "message is for attempt 0"),
            Status::unauthenticated("unknown participant id"),
            Status::unknown("something else"),
        ] {
            assert!(!transient(&status), "{status}");
        }
    }
}
