//! The round coordinator: a sans-IO state machine the aggregator drives.
//!
//! The caller feeds it joins, submissions and the passing of time (`now_ms`, from any
//! monotonic clock) and acts on the [`Event`]s it returns (persist the new global adapter,
//! wake waiting participants). It holds no socket, no clock and no thread, so every schedule
//! of arrivals, duplicates, stale rounds and timeouts can be replayed exactly in a test.
//!
//! Lifecycle: wait until `rounds.participants` have joined; then for each round hand the
//! global adapter to the round's cohort (the plan's `strategy.sampling` draw from everyone
//! who had joined when it opened; by default all of them), fold each valid update into a
//! running weighted sum, and close the round when the whole cohort has submitted, or when the
//! deadline passes with at least `rounds.min_updates` updates (stragglers count as dropped
//! for that round). A deadline that passes with too few updates extends the round and keeps
//! what was received.
//!
//! What a round trains and uploads is the plan's [`Strategy`]: each round has an
//! [`UploadLayout`] (ΔB under FFA-LoRA; ΔA and/or ΔB, HetLoRA's coverage, ... under the other
//! modes), and a round closes through [`Strategy::aggregate`] on the weighted mean of the
//! uploads (plaintext: from the running sum; secure: from the decoded sum), keeping the
//! [`ServerState`] (round counter, server optimizer moments) across rounds.

mod control;
#[cfg(test)]
mod control_tests;
pub mod guard;
pub mod lab;
#[cfg(test)]
mod lab_tests;
mod leave;
#[cfg(test)]
mod leave_tests;
mod secure;
#[cfg(test)]
mod secure_tests;
pub mod snapshot;
#[cfg(test)]
mod snapshot_tests;
mod upload;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

pub use control::{Applied, Command, Control, ControlError};
pub use leave::{Departure, FinishReason, LeaveReason};
use secure::{Progress, SecureRound};
pub use secure::{SecureMessage, SecureStep};
pub use upload::{EncodedSummary, Reply, SecureUpload, UploadError, UploadSecrets, rounding_seed};

use crate::aggregate::{AggregateError, MAX_SAMPLE_WEIGHT, WeightedSum};
use crate::error::ConfigError;
use crate::manifest::LayoutManifest;
use crate::plan::FederationPlan;
use crate::privacy::ddg::DistributedDiscreteGaussian;
use crate::privacy::ledger::epsilon_spent;
use crate::privacy::rdp::AccountantError;
use crate::roster::{Roster, valid_name};
use crate::secagg::messages::Index;
use crate::secagg::protocol::{ProtocolError, Stage as SecureStage};
use crate::secagg::spec::{DecodeError, MAX_ATTEMPTS};
use crate::strategy::{
    AggregatedUpload, AggregationMode, GlobalModel, RoundOutcome, ServerState, Strategy,
    StrategyError, TrainedFactors, UploadLayout,
};
use crate::update::{SubmittedUpdate, UpdateError, UpdatePayload, decode_plaintext};

/// Why the coordinator refused a request. Each variant names what was wrong.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RoundError {
    #[error("unknown participant id {0:?}: join the federation first")]
    UnknownParticipant(String),
    /// Holds the name as [`crate::roster::shown_input`] shows it (quoted, cut when long).
    #[error("participant name must be 1 to 64 letters, digits, '-', '_' or '.', got {0}")]
    BadName(String),
    /// Holds the label as [`crate::roster::shown_input`] shows it (quoted, cut when long).
    #[error(
        "language must be 1 to 35 letters, digits, '-' or '_' (a BCP 47 tag such as lo or pt-BR), got {0}"
    )]
    BadLanguage(String),
    #[error("the run is finished; no round accepts updates")]
    RunFinished,
    #[error("no round is open yet: waiting for participants to join")]
    NoRoundOpen,
    #[error("no round is open: the operator paused the federation after round {after_round}")]
    Paused { after_round: u64 },
    #[error("update is for round {got}, which is closed; the current round is {current}")]
    StaleRound { got: u64, current: u64 },
    #[error("update is for round {got}, which has not started; the current round is {current}")]
    FutureRound { got: u64, current: u64 },
    #[error("participant {name} joined after round {round} opened and is not part of it")]
    NotInCohort { name: String, round: u64 },
    #[error(
        "participant {name} {departure}: a lab that left does not take part in this run again (it can join the next run)"
    )]
    Left { name: String, departure: Departure },
    #[error("participant {name} already submitted an update for round {round}")]
    DuplicateUpdate { name: String, round: u64 },
    #[error("update layout {got} does not match the round's upload layout {expected}")]
    LayoutMismatch { got: String, expected: String },
    #[error(
        "update was trained from global adapter {got}, but round {round} distributed {expected}"
    )]
    WrongBaseAdapter {
        got: String,
        expected: String,
        round: u64,
    },
    #[error("sample weight {0} is out of range (1..={MAX_SAMPLE_WEIGHT})")]
    SampleWeight(u64),
    #[error("invalid update: {0}")]
    Update(#[from] UpdateError),
    #[error("aggregation failed: {0}")]
    Aggregate(#[from] AggregateError),
    #[error(
        "this federation uses secure aggregation: plaintext updates are refused (send masked updates)"
    )]
    SecureAggregationRequired,
    #[error("this federation does not use secure aggregation; send a plaintext update")]
    SecureAggregationOff,
    #[error("participant {0} is not on the federation's roster")]
    NotOnRoster(String),
    #[error("message is for attempt {got} of round {round}, but attempt {current} is under way")]
    WrongAttempt { round: u64, got: u32, current: u32 },
    #[error("secure aggregation refused the message: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("the unmasked sum is unusable: {0}")]
    SecureSum(#[from] DecodeError),
    #[error("the aggregation strategy refused the round: {0}")]
    Strategy(#[from] StrategyError),
    #[error("the privacy accountant failed: {0}")]
    Accountant(#[from] AccountantError),
}

/// What happened as a result of an input; the caller persists and announces these.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// A round opened for `cohort` (participant names) until `deadline_ms`.
    RoundStarted {
        round: u64,
        cohort: Vec<String>,
        deadline_ms: u64,
    },
    /// A round closed; [`Coordinator::global`] is now its aggregate.
    RoundCompleted(RoundRecord),
    /// A deadline passed with fewer than `min_updates`; the round stays open until the new
    /// deadline, keeping the updates already folded.
    RoundExtended {
        round: u64,
        received: usize,
        needed: usize,
        deadline_ms: u64,
    },
    /// The run finished after `rounds` closed rounds: the run length was reached, the
    /// operator stopped it, or a round used up its secure-aggregation attempts.
    RunFinished { rounds: u64 },
    /// The operator's pause took effect: round `after_round` closed and no new round opens
    /// until resumed.
    Paused { after_round: u64 },
    /// A secure-aggregation stage closed; `remaining` participants go on to the next.
    SecureStageClosed {
        round: u64,
        attempt: u32,
        stage: SecureStage,
        remaining: usize,
    },
    /// A secure-aggregation attempt failed (too few survivors, or a misbehaving
    /// participant); the round starts again with attempt `attempt + 1`.
    SecureAttemptFailed {
        round: u64,
        attempt: u32,
        reason: String,
    },
}

/// The outcome of one closed round.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct RoundRecord {
    pub round: u64,
    /// Names of the participants whose updates were aggregated, sorted.
    pub contributors: Vec<String>,
    /// Cohort members that had not submitted when the round closed, sorted (those that
    /// left the federation are in `left` instead).
    pub dropped: Vec<String>,
    /// Cohort members that left the federation (`Leave`) during the round without
    /// contributing, sorted. Absent from records written before it existed.
    #[serde(default)]
    pub left: Vec<String>,
    /// `Σ n_i` over the contributors.
    pub total_samples: u64,
    /// Content hash of the new global adapter.
    pub adapter_hash: String,
    /// The aggregation mode and which factors the participants trained this round (they
    /// change from round to round under RoLoRA).
    pub mode: AggregationMode,
    pub trained: TrainedFactors,
    /// For a securely aggregated round: which attempt succeeded and the largest per-value
    /// error quantisation can have put into the mean update.
    pub secure: Option<SecureRecord>,
}

/// How a round's secure aggregation went.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SecureRecord {
    pub attempt: u32,
    pub error_bound: f64,
    /// The differential privacy of the sum, under `[privacy]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub privacy: Option<PrivacyRecord>,
}

/// The differential privacy of one round's noised sum (`[privacy] mode = "distributed"`).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrivacyRecord {
    /// The mechanism the center ran: its noise, grid and the labs summed whose noise no
    /// coalition of the center and the tolerated colluders can remove.
    pub mechanism: DistributedDiscreteGaussian,
    /// Standard deviation of the noise in each value of the mean update.
    pub noise_stddev: f64,
    pub delta: f64,
    /// ε of this round's sum alone.
    pub epsilon_round: f64,
    /// The most ε any contributor of this round has spent in this run so far (composed
    /// over the rounds it contributed to, this one included).
    pub epsilon_spent: f64,
}

/// Why a participant is told to wait.
#[derive(Debug, Clone, PartialEq)]
pub enum WaitReason {
    /// The first round opens when `needed` participants have joined.
    Participants { joined: usize, needed: usize },
    /// This participant's update for `round` is in; the next round opens when it closes.
    Submitted { round: u64 },
    /// This participant joined after `round` opened; it takes part from the next round.
    NextRound { round: u64 },
    /// `strategy.sampling` did not draw this participant for `round`.
    NotSampled { round: u64 },
    /// Secure aggregation of `round` is in `stage`, waiting for other participants.
    SecureStage { round: u64, stage: SecureStage },
    /// This participant missed a secure-aggregation stage of the attempt under way; it
    /// takes part again in the next attempt or round.
    DroppedFromAttempt { round: u64, attempt: u32 },
    /// The operator paused the federation after round `after_round` (0: before the first);
    /// the next round opens when they resume it.
    Paused { after_round: u64 },
}

/// What a participant should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Task<'a> {
    Wait(WaitReason),
    Train {
        round: u64,
        global: &'a GlobalModel,
        global_hash: &'a str,
        /// What to train and upload this round.
        work: RoundWork<'a>,
        deadline_ms: u64,
        /// Present when updates are securely aggregated: then, after training, the
        /// participant opens its session for this attempt and advertises its keys.
        secure: Option<SecureTrain>,
    },
    /// A secure-aggregation stage awaits this participant's answer.
    Secure {
        round: u64,
        attempt: u32,
        step: SecureStep<'a>,
        deadline_ms: u64,
    },
    Finished {
        rounds: u64,
        global: &'a GlobalModel,
        global_hash: &'a str,
    },
}

/// What the round's strategy asks of one participant: which factors to train, at which
/// rank, and the layout of the upload (trained minus downloaded).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RoundWork<'a> {
    pub trains: TrainedFactors,
    /// The participant's LoRA rank (below the global rank only under HetLoRA).
    pub rank: usize,
    pub layout: &'a UploadLayout,
}

impl<'a> RoundWork<'a> {
    /// The one derivation of a round's work: the coordinator states it with this, and the
    /// lab ([`lab::LabMachine`]) derives it from its pinned plan with this and refuses a task
    /// that states anything else. `state` is the strategy's state before the round (after
    /// `round − 1` aggregated rounds), `layout` the round's upload layout
    /// ([`Strategy::upload_layout`] of the global the round starts from).
    pub fn derive(
        strategy: &Strategy,
        lora: &crate::LoraSpec,
        name: &str,
        state: &ServerState,
        layout: &'a UploadLayout,
    ) -> Self {
        RoundWork {
            trains: strategy.trains(state),
            rank: strategy.spec().participant_rank(lora, name),
            layout,
        }
    }
}

/// What a participant needs to open its secure-aggregation session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SecureTrain {
    /// The run's session id, bound into every key and signature.
    pub session: [u8; 32],
    pub attempt: u32,
    /// This participant's protocol index (its roster position).
    pub index: Index,
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    WaitingForParticipants,
    Training,
    /// The operator paused the run between rounds (see [`Coordinator::pause`]).
    Paused,
    Finished,
}

/// A snapshot for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub stage: Stage,
    /// Open round, or the last closed one when finished, or 0 before the first.
    pub round: u64,
    pub rounds_total: u64,
    /// Members that ever joined, those that left included.
    pub participants_joined: usize,
    /// Members that left the federation (`Leave`).
    pub participants_left: usize,
    pub participants_needed: usize,
    pub cohort_size: usize,
    pub updates_received: usize,
    pub global_hash: String,
    /// The secure-aggregation stage and attempt of the open round, if any.
    pub secure: Option<(SecureStage, u32)>,
    /// The operator's standing pause / stop requests.
    pub control: Control,
    /// Why the run finished, once it has.
    pub finish_reason: Option<FinishReason>,
    pub history: Vec<RoundRecord>,
}

#[derive(Debug, Clone)]
struct Member {
    language: String,
}

#[derive(Debug)]
struct OpenRound {
    round: u64,
    cohort: BTreeSet<String>,
    /// Joined participants `strategy.sampling` left out of this round.
    not_sampled: BTreeSet<String>,
    submitted: BTreeSet<String>,
    sum: WeightedSum,
    /// Secure aggregation of this round (then `submitted` and `sum` stay empty).
    secure: Option<Box<SecureRound>>,
    deadline_ms: u64,
}

#[derive(Debug)]
enum State {
    Waiting,
    Open(OpenRound),
    /// Paused by the operator after round `after_round` closed; no round is open.
    Paused {
        after_round: u64,
    },
    Finished,
}

/// The aggregator's round state machine (see the module docs).
#[derive(Debug)]
pub struct Coordinator {
    plan: FederationPlan,
    strategy: Strategy,
    /// Server state across rounds: rounds aggregated, optimizer moments.
    server_state: ServerState,
    /// The open (or next) round's upload layout.
    layout: UploadLayout,
    /// The global model: the adapter, with FedEx-LoRA's dense corrections.
    global: GlobalModel,
    global_hash: String,
    /// name → member.
    members: BTreeMap<String, Member>,
    /// secret token → name.
    tokens: BTreeMap<String, String>,
    state: State,
    history: Vec<RoundRecord>,
    roster: Roster,
    /// The run's session id for secure aggregation.
    session: [u8; 32],
    /// The operator's pause / stop requests.
    control: Control,
    /// Members that left the federation, never sampled again (see `leave.rs`).
    left: BTreeMap<String, Departure>,
    /// Members told the run is finished.
    told_finished: BTreeSet<String>,
    finish_reason: Option<FinishReason>,
}

impl Coordinator {
    /// A coordinator for a validated plan, starting from the plan's initial adapter.
    /// `session` must be fresh random bytes for every run (a restarted aggregator included):
    /// it binds secure aggregation's keys and signatures to this run, so none can be
    /// replayed into another.
    pub fn new(plan: FederationPlan, session: [u8; 32]) -> Result<Self, ConfigError> {
        plan.validate()?;
        let roster = plan.roster()?;
        let strategy = Strategy::for_plan(plan.strategy.clone(), &plan)?;
        let global = plan.initial_model();
        let server_state = ServerState::default();
        let layout = strategy.upload_layout(&global, &server_state);
        let global_hash = global.content_hash();
        Ok(Coordinator {
            plan,
            strategy,
            server_state,
            layout,
            global,
            global_hash,
            members: BTreeMap::new(),
            tokens: BTreeMap::new(),
            state: State::Waiting,
            history: Vec::new(),
            roster,
            session,
            control: Control::default(),
            left: BTreeMap::new(),
            told_finished: BTreeSet::new(),
            finish_reason: None,
        })
    }

    /// Whether updates are securely aggregated.
    pub fn secure(&self) -> bool {
        self.plan.secure_aggregation.enabled
    }

    pub fn plan(&self) -> &FederationPlan {
        &self.plan
    }

    /// The current global model (adapter, and FedEx-LoRA's dense corrections).
    pub fn global(&self) -> &GlobalModel {
        &self.global
    }

    /// Content hash of the current global model ([`GlobalModel::content_hash`]: the
    /// adapter's when it carries no corrections).
    pub fn global_hash(&self) -> &str {
        &self.global_hash
    }

    /// The manifest of the open (or next) round's upload layout, which every update must
    /// use (ΔB only under FFA-LoRA).
    pub fn upload_manifest(&self) -> &LayoutManifest {
        self.layout.manifest()
    }

    /// The open (or next) round's upload layout.
    pub fn upload_layout(&self) -> &UploadLayout {
        &self.layout
    }

    /// The plan's aggregation strategy.
    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// Server state after the rounds closed so far.
    pub fn server_state(&self) -> &ServerState {
        &self.server_state
    }

    /// What the open (or next) round asks of participant `name`.
    pub fn work_for(&self, name: &str) -> RoundWork<'_> {
        RoundWork::derive(
            &self.strategy,
            &self.plan.lora,
            name,
            &self.server_state,
            &self.layout,
        )
    }

    /// Closed rounds, oldest first.
    pub fn history(&self) -> &[RoundRecord] {
        &self.history
    }

    /// Name and language of the participant holding `token`.
    pub fn participant(&self, token: &str) -> Option<(&str, &str)> {
        let name = self.tokens.get(token)?;
        let member = self.members.get(name)?;
        Some((name.as_str(), member.language.as_str()))
    }

    /// The earliest time at which [`Coordinator::tick`] can change anything.
    pub fn next_deadline(&self) -> Option<u64> {
        match &self.state {
            State::Open(open) => Some(
                open.secure
                    .as_ref()
                    .and_then(|s| s.stage_deadline_ms)
                    .unwrap_or(open.deadline_ms),
            ),
            _ => None,
        }
    }

    /// Registers a participant under a caller-chosen secret `token`. Joining again under the
    /// same name (a restarted participant) replaces its token and keeps its place.
    pub fn join(
        &mut self,
        token: String,
        name: &str,
        language: &str,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        if !valid_name(name) {
            return Err(RoundError::BadName(crate::roster::shown_input(name)));
        }
        if !crate::roster::valid_language(language) {
            return Err(RoundError::BadLanguage(crate::roster::shown_input(
                language,
            )));
        }
        if let Some(departure) = self.left.get(name) {
            return Err(RoundError::Left {
                name: name.to_string(),
                departure: *departure,
            });
        }
        if matches!(self.state, State::Finished) {
            return Err(RoundError::RunFinished);
        }
        if !self.roster.is_empty() && self.roster.index_of(name).is_none() {
            return Err(RoundError::NotOnRoster(name.to_string()));
        }
        self.tokens.retain(|_, n| n != name);
        self.tokens.insert(token, name.to_string());
        self.members.insert(
            name.to_string(),
            Member {
                language: language.to_string(),
            },
        );
        let mut events = Vec::new();
        if matches!(self.state, State::Waiting)
            && !self.control.paused
            && self.present() >= self.plan.rounds.participants
        {
            events.push(self.next_round(1, now_ms));
        }
        Ok(events)
    }

    /// What the participant holding `token` should do now.
    pub fn task(&self, token: &str) -> Result<Task<'_>, RoundError> {
        let name = self.present_name(token)?;
        Ok(match &self.state {
            State::Waiting if self.control.paused => {
                Task::Wait(WaitReason::Paused { after_round: 0 })
            }
            State::Waiting => Task::Wait(WaitReason::Participants {
                joined: self.present(),
                needed: self.plan.rounds.participants,
            }),
            State::Paused { after_round } => Task::Wait(WaitReason::Paused {
                after_round: *after_round,
            }),
            State::Finished => Task::Finished {
                rounds: self.rounds_closed(),
                global: &self.global,
                global_hash: &self.global_hash,
            },
            State::Open(open) if open.not_sampled.contains(name) => {
                Task::Wait(WaitReason::NotSampled { round: open.round })
            }
            State::Open(open) if !open.cohort.contains(name) => {
                Task::Wait(WaitReason::NextRound { round: open.round })
            }
            State::Open(open) if open.submitted.contains(name) => {
                Task::Wait(WaitReason::Submitted { round: open.round })
            }
            State::Open(open) => match &open.secure {
                None => Task::Train {
                    round: open.round,
                    global: &self.global,
                    global_hash: &self.global_hash,
                    work: self.work_for(name),
                    deadline_ms: open.deadline_ms,
                    secure: None,
                },
                Some(sec) => self.secure_task(open, sec, name),
            },
        })
    }

    fn secure_task<'a>(&'a self, open: &OpenRound, sec: &'a SecureRound, name: &str) -> Task<'a> {
        let index = self.roster.index_of(name).unwrap_or(0);
        let round = open.round;
        if sec.stage() == SecureStage::AdvertiseKeys {
            if !sec.awaits(index) {
                return Task::Wait(WaitReason::SecureStage {
                    round,
                    stage: sec.stage(),
                });
            }
            return Task::Train {
                round,
                global: &self.global,
                global_hash: &self.global_hash,
                work: self.work_for(name),
                deadline_ms: open.deadline_ms,
                secure: Some(SecureTrain {
                    session: self.session,
                    attempt: sec.attempt,
                    index,
                }),
            };
        }
        match sec.step_for(index) {
            Some(step) => Task::Secure {
                round,
                attempt: sec.attempt,
                step,
                deadline_ms: sec.stage_deadline_ms.unwrap_or(open.deadline_ms),
            },
            None if sec.server.expected().contains(&index) => Task::Wait(WaitReason::SecureStage {
                round,
                stage: sec.stage(),
            }),
            None => Task::Wait(WaitReason::DroppedFromAttempt {
                round,
                attempt: sec.attempt,
            }),
        }
    }

    /// Checks an update and folds it into the open round; closes the round when the whole
    /// cohort has submitted. A refused update changes nothing.
    pub fn submit(
        &mut self,
        token: &str,
        update: &SubmittedUpdate,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let name = self.present_name(token)?.to_string();
        if self.secure() {
            return Err(RoundError::SecureAggregationRequired);
        }
        let open = match &mut self.state {
            State::Waiting => return Err(RoundError::NoRoundOpen),
            State::Paused { after_round } => {
                return Err(RoundError::Paused {
                    after_round: *after_round,
                });
            }
            State::Finished => return Err(RoundError::RunFinished),
            State::Open(open) => open,
        };
        if update.round < open.round {
            return Err(RoundError::StaleRound {
                got: update.round,
                current: open.round,
            });
        }
        if update.round > open.round {
            return Err(RoundError::FutureRound {
                got: update.round,
                current: open.round,
            });
        }
        if !open.cohort.contains(&name) {
            return Err(RoundError::NotInCohort {
                name,
                round: open.round,
            });
        }
        if open.submitted.contains(&name) {
            return Err(RoundError::DuplicateUpdate {
                name,
                round: open.round,
            });
        }
        let expected_layout = self.layout.manifest().hash_hex();
        if update.layout_hash != expected_layout {
            return Err(RoundError::LayoutMismatch {
                got: update.layout_hash.clone(),
                expected: expected_layout,
            });
        }
        if update.base_adapter_hash != self.global_hash {
            return Err(RoundError::WrongBaseAdapter {
                got: update.base_adapter_hash.clone(),
                expected: self.global_hash.clone(),
                round: open.round,
            });
        }
        if update.num_samples == 0 || update.num_samples > MAX_SAMPLE_WEIGHT {
            return Err(RoundError::SampleWeight(update.num_samples));
        }
        let values = match &update.payload {
            UpdatePayload::Plaintext(bytes) => decode_plaintext(bytes, self.layout.manifest())?,
        };
        open.sum.add(update.num_samples, &values)?;
        open.submitted.insert(name);
        let left = &self.left;
        if open
            .cohort
            .iter()
            .all(|n| open.submitted.contains(n) || left.contains_key(n))
        {
            return self.close_round(now_ms);
        }
        Ok(Vec::new())
    }

    /// Lets time pass: closes or extends a round whose deadline is reached.
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let State::Open(open) = &mut self.state else {
            return Ok(Vec::new());
        };
        if open.secure.is_some() {
            return self.tick_secure(now_ms);
        }
        if now_ms < open.deadline_ms {
            return Ok(Vec::new());
        }
        let needed = self.plan.rounds.min_updates.min(open.cohort.len());
        if open.submitted.len() >= needed {
            return self.close_round(now_ms);
        }
        open.deadline_ms = now_ms + self.plan.rounds.round_timeout_ms;
        Ok(vec![Event::RoundExtended {
            round: open.round,
            received: open.submitted.len(),
            needed,
            deadline_ms: open.deadline_ms,
        }])
    }

    /// A snapshot for status displays.
    /// The round open now, if any (cheaper than [`Self::status`], which copies the history).
    pub fn round_in_progress(&self) -> Option<u64> {
        match &self.state {
            State::Open(o) => Some(o.round),
            _ => None,
        }
    }

    pub fn status(&self) -> Status {
        let last_closed = self.history.last().map_or(0, |r| r.round);
        let (stage, round, cohort_size, updates_received) = match &self.state {
            State::Waiting => (Stage::WaitingForParticipants, 0, 0, 0),
            State::Open(o) => (Stage::Training, o.round, o.cohort.len(), o.submitted.len()),
            State::Paused { after_round } => (Stage::Paused, *after_round, 0, 0),
            State::Finished => (Stage::Finished, last_closed, 0, 0),
        };
        Status {
            stage,
            round,
            rounds_total: self.plan.rounds.rounds,
            participants_joined: self.members.len(),
            participants_left: self.left.len(),
            participants_needed: self.plan.rounds.participants,
            cohort_size,
            updates_received,
            global_hash: self.global_hash.clone(),
            secure: match &self.state {
                State::Open(OpenRound {
                    secure: Some(s), ..
                }) => Some((s.stage(), s.attempt)),
                _ => None,
            },
            control: self.control,
            finish_reason: self.finish_reason,
            history: self.history.clone(),
        }
    }

    /// Feeds a secure-aggregation stage message (advertise keys, share keys, consistency
    /// signature, unmask) from the participant holding `token`. A refused message changes
    /// nothing.
    pub fn secure_message(
        &mut self,
        token: &str,
        round: u64,
        attempt: u32,
        msg: SecureMessage,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let index = self.secure_index(token)?;
        self.open_secure(round, attempt)?.receive(index, msg)?;
        Ok(self.drive_secure(now_ms, false))
    }

    /// Folds the next chunk of the caller's masked update into the running sum; returns the
    /// caller's index, which the caller keeps in case it must take the chunk back
    /// ([`Self::masked_retract`]) because the stream breaks before
    /// [`Self::masked_commit`].
    pub fn masked_chunk(
        &mut self,
        token: &str,
        round: u64,
        attempt: u32,
        offset: usize,
        words: &[u32],
    ) -> Result<Index, RoundError> {
        let index = self.secure_index(token)?;
        self.open_secure(round, attempt)?
            .server
            .receive_masked_chunk(index, offset, words)?;
        Ok(index)
    }

    /// The caller's masked update is complete.
    pub fn masked_commit(
        &mut self,
        token: &str,
        round: u64,
        attempt: u32,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let index = self.secure_index(token)?;
        self.open_secure(round, attempt)?
            .server
            .commit_masked(index)?;
        Ok(self.drive_secure(now_ms, false))
    }

    /// Takes back a chunk of participant `index`'s masked update that will never be
    /// committed. For an attempt no longer under way there is nothing to take back.
    /// How much of the participant's masked input for this attempt is folded: `(words,
    /// committed)`. A participant whose stream broke resumes at `words`.
    pub fn masked_received(
        &mut self,
        token: &str,
        round: u64,
        attempt: u32,
    ) -> Result<(usize, bool), RoundError> {
        let index = self.secure_index(token)?;
        Ok(self
            .open_secure(round, attempt)?
            .server
            .masked_received(index))
    }

    pub fn masked_retract(
        &mut self,
        index: Index,
        round: u64,
        attempt: u32,
        offset: usize,
        words: &[u32],
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        match self.open_secure(round, attempt) {
            Ok(sec) => sec.server.retract_masked_chunk(index, offset, words)?,
            Err(_) => return Ok(Vec::new()),
        }
        Ok(self.drive_secure(now_ms, false))
    }

    /// The protocol index of the participant holding `token`.
    fn secure_index(&self, token: &str) -> Result<Index, RoundError> {
        let name = self.present_name(token)?;
        if !self.secure() {
            return Err(RoundError::SecureAggregationOff);
        }
        self.roster
            .index_of(name)
            .ok_or_else(|| RoundError::NotOnRoster(name.to_string()))
    }

    /// The secure attempt under way, if it is the one named.
    fn open_secure(&mut self, round: u64, attempt: u32) -> Result<&mut SecureRound, RoundError> {
        let open = match &mut self.state {
            State::Waiting => return Err(RoundError::NoRoundOpen),
            State::Paused { after_round } => {
                return Err(RoundError::Paused {
                    after_round: *after_round,
                });
            }
            State::Finished => return Err(RoundError::RunFinished),
            State::Open(open) => open,
        };
        if round < open.round {
            return Err(RoundError::StaleRound {
                got: round,
                current: open.round,
            });
        }
        if round > open.round {
            return Err(RoundError::FutureRound {
                got: round,
                current: open.round,
            });
        }
        let sec = open
            .secure
            .as_mut()
            .ok_or(RoundError::SecureAggregationOff)?;
        if attempt != sec.attempt {
            return Err(RoundError::WrongAttempt {
                round,
                got: attempt,
                current: sec.attempt,
            });
        }
        Ok(sec)
    }

    /// Deadlines of a securely aggregated round: stage 0 runs under the round's deadline
    /// (and is extended like a plaintext round when too few have trained), later stages
    /// under their own.
    fn tick_secure(&mut self, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let round_timeout = self.plan.rounds.round_timeout_ms;
        let min_updates = self.plan.rounds.min_updates;
        let State::Open(open) = &mut self.state else {
            return Ok(Vec::new());
        };
        let Some(sec) = &open.secure else {
            return Ok(Vec::new());
        };
        match sec.stage_deadline_ms {
            None if now_ms >= open.deadline_ms => {
                let needed = min_updates
                    .min(open.cohort.len())
                    .max(sec.server.config().quorum());
                if sec.advertised() < needed {
                    open.deadline_ms = now_ms + round_timeout;
                    return Ok(vec![Event::RoundExtended {
                        round: open.round,
                        received: sec.advertised(),
                        needed,
                        deadline_ms: open.deadline_ms,
                    }]);
                }
                Ok(self.drive_secure(now_ms, true))
            }
            Some(deadline) if now_ms >= deadline => Ok(self.drive_secure(now_ms, true)),
            _ => Ok(Vec::new()),
        }
    }

    /// Closes whatever stages can close; completes the round from the unmasked sum, or
    /// starts a new attempt when this one failed.
    fn drive_secure(&mut self, now_ms: u64, deadline_passed: bool) -> Vec<Event> {
        let timeout = self.plan.secure_aggregation.stage_timeout_ms;
        let State::Open(open) = &mut self.state else {
            return Vec::new();
        };
        let round = open.round;
        let Some(sec) = open.secure.as_mut() else {
            return Vec::new();
        };
        let attempt = sec.attempt;
        let before = sec.stage();
        let progress = sec.advance(now_ms, timeout, deadline_passed);
        let mut events = Vec::new();
        if sec.stage() != before {
            events.push(Event::SecureStageClosed {
                round,
                attempt,
                stage: before,
                remaining: sec.server.expected().len(),
            });
        }
        let failure = match progress {
            Progress::Pending => return events,
            Progress::Failed(e) => e.to_string(),
            Progress::Finished { sum, survivors } => {
                match self.complete_secure(&sum, &survivors, now_ms) {
                    Ok(more) => {
                        events.extend(more);
                        return events;
                    }
                    Err(e) => e.to_string(),
                }
            }
        };
        events.push(Event::SecureAttemptFailed {
            round,
            attempt,
            reason: failure,
        });
        events.extend(self.retry_secure(round, attempt + 1, now_ms));
        events
    }

    /// Starts attempt `attempt` of `round` with the same cohort; participants train (or
    /// reuse their update) and advertise fresh keys.
    fn retry_secure(&mut self, round: u64, attempt: u32, now_ms: u64) -> Vec<Event> {
        let State::Open(open) = &self.state else {
            return Vec::new();
        };
        if attempt >= MAX_ATTEMPTS {
            return vec![self.finish(FinishReason::AttemptsExhausted { round })];
        }
        if !self.left.is_empty() {
            let present = open
                .cohort
                .iter()
                .filter(|n| !self.left.contains_key(*n))
                .count();
            let needed = self
                .plan
                .rounds
                .min_updates
                .min(open.cohort.len())
                .max(self.secure_quorum());
            if present < needed {
                return vec![self.finish(FinishReason::TooFewMembers {
                    remaining: present,
                    needed,
                })];
            }
        }
        let next = self.secure_attempt(round, &open.cohort, attempt);
        let deadline_ms = now_ms + self.plan.rounds.round_timeout_ms;
        if let State::Open(open) = &mut self.state {
            open.secure = Some(Box::new(next));
            open.deadline_ms = deadline_ms;
        }
        Vec::new()
    }

    /// Turns the unmasked sum of the survivors into the next global adapter.
    fn complete_secure(
        &mut self,
        sum: &[u32],
        survivors: &[Index],
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let State::Open(open) = &self.state else {
            return Ok(Vec::new());
        };
        let Some(sec) = &open.secure else {
            return Ok(Vec::new());
        };
        let decoded = sec.encoding.decode_sum(sum, survivors.len())?;
        let privacy = sec.encoding.private().map(|encoding| {
            (
                encoding.accounting().for_summed(survivors.len()),
                decoded.noise_stddev,
            )
        });
        let outcome = self.strategy.aggregate(
            &self.global,
            &self.server_state,
            &AggregatedUpload::from_decoded(&decoded),
        )?;
        let contributors: BTreeSet<String> = survivors
            .iter()
            .filter_map(|i| self.roster.name_of(*i))
            .map(str::to_string)
            .collect();
        let record = RoundRecord {
            round: open.round,
            dropped: open
                .cohort
                .iter()
                .filter(|n| !contributors.contains(*n) && !self.left.contains_key(*n))
                .cloned()
                .collect(),
            left: open
                .cohort
                .iter()
                .filter(|n| !contributors.contains(*n) && self.left.contains_key(*n))
                .cloned()
                .collect(),
            contributors: contributors.into_iter().collect(),
            total_samples: decoded.total_weight,
            adapter_hash: outcome.global.content_hash(),
            mode: self.strategy.mode(),
            trained: self.strategy.trains(&self.server_state),
            secure: Some(SecureRecord {
                attempt: sec.attempt,
                error_bound: decoded.error_bound,
                privacy: None,
            }),
        };
        let record = match privacy {
            Some((mechanism, noise_stddev)) => {
                self.with_privacy(record, mechanism, noise_stddev)?
            }
            None => record,
        };
        self.finish_round(record, outcome, now_ms)
    }

    /// `record` with its sum's privacy: ε of the round, and the most any of its
    /// contributors has spent in the run (its earlier noised rounds composed with this one).
    fn with_privacy(
        &self,
        mut record: RoundRecord,
        mechanism: DistributedDiscreteGaussian,
        noise_stddev: f64,
    ) -> Result<RoundRecord, RoundError> {
        let delta = self.plan.privacy.delta;
        let epsilon_round = epsilon_spent(std::slice::from_ref(&mechanism), delta)?;
        let mut epsilon_most = epsilon_round;
        for name in &record.contributors {
            let mut spent: Vec<DistributedDiscreteGaussian> = self
                .history
                .iter()
                .filter(|r| r.contributors.contains(name))
                .filter_map(|r| r.secure.as_ref()?.privacy.as_ref())
                .map(|p| p.mechanism.clone())
                .collect();
            spent.push(mechanism.clone());
            epsilon_most = epsilon_most.max(epsilon_spent(&spent, delta)?);
        }
        if let Some(secure) = record.secure.as_mut() {
            secure.privacy = Some(PrivacyRecord {
                mechanism,
                noise_stddev,
                delta,
                epsilon_round,
                epsilon_spent: epsilon_most,
            });
        }
        Ok(record)
    }

    fn name_of(&self, token: &str) -> Result<&str, RoundError> {
        self.tokens
            .get(token)
            .map(String::as_str)
            .ok_or_else(|| RoundError::UnknownParticipant(token.to_string()))
    }

    /// The name of the member holding `token`, refused once it has left.
    fn present_name(&self, token: &str) -> Result<&str, RoundError> {
        let name = self.name_of(token)?;
        match self.left.get(name) {
            Some(departure) => Err(RoundError::Left {
                name: name.to_string(),
                departure: *departure,
            }),
            None => Ok(name),
        }
    }

    fn open_round(&mut self, round: u64, now_ms: u64) -> Event {
        // Members that left are never sampled again.
        let eligible: Vec<String> = self
            .members
            .keys()
            .filter(|n| !self.left.contains_key(*n))
            .cloned()
            .collect();
        let cohort: BTreeSet<String> = self
            .strategy
            .spec()
            .sampling
            .sample(round, &eligible)
            .into_iter()
            .collect();
        let not_sampled = eligible
            .into_iter()
            .filter(|n| !cohort.contains(n))
            .collect();
        self.layout = self
            .strategy
            .upload_layout(&self.global, &self.server_state);
        let deadline_ms = now_ms + self.plan.rounds.round_timeout_ms;
        let event = Event::RoundStarted {
            round,
            cohort: cohort.iter().cloned().collect(),
            deadline_ms,
        };
        let secure = self
            .secure()
            .then(|| Box::new(self.secure_attempt(round, &cohort, 0)));
        self.state = State::Open(OpenRound {
            round,
            cohort,
            not_sampled,
            submitted: BTreeSet::new(),
            sum: WeightedSum::new(if secure.is_some() {
                0
            } else {
                self.layout.len()
            }),
            secure,
            deadline_ms,
        });
        event
    }

    /// A fresh secure-aggregation attempt for `round` over `cohort`.
    fn secure_attempt(&self, round: u64, cohort: &BTreeSet<String>, attempt: u32) -> SecureRound {
        let (cfg, encoding, indices) = self.secure_parts(round, cohort, attempt);
        SecureRound::new(cfg, self.roster.identities(), encoding, indices, attempt)
            .expect("the plan's neighbourhood was validated against the roster")
    }

    /// What an attempt of `round` over `cohort` is made of: its protocol parameters, the
    /// update encoding and the cohort's protocol indices.
    fn secure_parts(
        &self,
        round: u64,
        cohort: &BTreeSet<String>,
        attempt: u32,
    ) -> (
        crate::secagg::protocol::RoundConfig,
        crate::secagg::spec::UpdateEncoding,
        BTreeSet<Index>,
    ) {
        let spec = &self.plan.secure_aggregation;
        let encoding = self
            .plan
            .update_encoding(self.layout.len(), round)
            .expect("the plan's secure-aggregation and privacy sections were validated");
        let mut cfg = spec.round_config(
            &self.plan.fingerprint(),
            self.roster.len(),
            self.session,
            round,
            attempt,
            &self.global_hash,
            encoding.vector_len(),
            crate::secagg::protocol::MIN_PEERS_FLOOR,
        );
        cfg.groups = self.plan.survivor_groups();
        // A cohort member that left is not waited for by a new attempt.
        let indices = cohort
            .iter()
            .filter(|n| !self.left.contains_key(*n))
            .filter_map(|n| self.roster.index_of(n))
            .collect();
        (cfg, encoding, indices)
    }

    fn close_round(&mut self, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let State::Open(open) = &self.state else {
            return Ok(Vec::new());
        };
        let outcome = self.strategy.aggregate(
            &self.global,
            &self.server_state,
            &AggregatedUpload::from_weighted_sum(&open.sum)?,
        )?;
        let record = RoundRecord {
            round: open.round,
            contributors: open.submitted.iter().cloned().collect(),
            dropped: open
                .cohort
                .iter()
                .filter(|n| !open.submitted.contains(*n) && !self.left.contains_key(*n))
                .cloned()
                .collect(),
            left: open
                .cohort
                .iter()
                .filter(|n| !open.submitted.contains(*n) && self.left.contains_key(*n))
                .cloned()
                .collect(),
            total_samples: open.sum.total_weight(),
            adapter_hash: outcome.global.content_hash(),
            mode: self.strategy.mode(),
            trained: self.strategy.trains(&self.server_state),
            secure: None,
        };
        self.finish_round(record, outcome, now_ms)
    }

    /// Installs a closed round's adapter and server state, and opens the next round or
    /// finishes the run.
    fn finish_round(
        &mut self,
        record: RoundRecord,
        outcome: RoundOutcome,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let round = record.round;
        self.global_hash = record.adapter_hash.clone();
        self.global = outcome.global;
        self.server_state = outcome.state;
        self.history.push(record.clone());
        let mut events = vec![Event::RoundCompleted(record)];
        if round >= self.plan.rounds.rounds {
            events.push(self.finish(FinishReason::Completed));
        } else if let Some(held) = self.hold_after(round) {
            events.push(held);
        } else {
            events.push(self.next_round(round + 1, now_ms));
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
    use crate::update::encode_f32_le;

    pub(super) fn plan(participants: usize, min_updates: usize, rounds: u64) -> FederationPlan {
        FederationPlan {
            privacy: Default::default(),
            federation: "test".into(),
            model: ModelSpec::tiny(),
            lora: LoraSpec::default(),
            training: TrainingSpec::default(),
            rounds: RoundSpec {
                rounds,
                participants,
                min_updates,
                round_timeout_ms: 1_000,
            },
            roster: Vec::new(),
            secure_aggregation: crate::secagg::spec::SecureAggregationSpec {
                enabled: false,
                ..Default::default()
            },
            strategy: Default::default(),
        }
    }

    fn update(c: &Coordinator, round: u64, fill: f32, n: u64) -> SubmittedUpdate {
        SubmittedUpdate {
            round,
            layout_hash: c.upload_manifest().hash_hex(),
            base_adapter_hash: c.global_hash().to_string(),
            num_samples: n,
            payload: UpdatePayload::Plaintext(encode_f32_le(&vec![
                fill;
                c.upload_manifest().len()
            ])),
        }
    }

    fn joined(participants: usize, min: usize, rounds: u64) -> Coordinator {
        let mut c = Coordinator::new(plan(participants, min, rounds), [7; 32]).unwrap();
        for i in 0..participants {
            c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
        }
        c
    }

    #[test]
    fn first_round_opens_when_enough_participants_joined() {
        let mut c = Coordinator::new(plan(2, 1, 1), [7; 32]).unwrap();
        assert!(c.join("t0".into(), "p0", "lo", 0).unwrap().is_empty());
        assert_eq!(
            c.task("t0").unwrap(),
            Task::Wait(WaitReason::Participants {
                joined: 1,
                needed: 2
            })
        );
        let events = c.join("t1".into(), "p1", "km", 5).unwrap();
        assert!(matches!(
            &events[..],
            [Event::RoundStarted {
                round: 1,
                deadline_ms: 1005,
                ..
            }]
        ));
        assert!(matches!(
            c.task("t0").unwrap(),
            Task::Train { round: 1, .. }
        ));
    }

    #[test]
    fn round_closes_with_weighted_mean_when_cohort_is_complete() {
        let mut c = joined(2, 2, 2);
        let u0 = update(&c, 1, 1.0, 1);
        assert!(c.submit("t0", &u0, 10).unwrap().is_empty());
        assert_eq!(
            c.task("t0").unwrap(),
            Task::Wait(WaitReason::Submitted { round: 1 })
        );
        let u1 = update(&c, 1, 4.0, 2);
        let events = c.submit("t1", &u1, 20).unwrap();
        assert!(
            matches!(&events[0], Event::RoundCompleted(r) if r.round == 1 && r.total_samples == 3)
        );
        assert!(matches!(&events[1], Event::RoundStarted { round: 2, .. }));
        let b = c.global().adapter.flatten(c.upload_manifest()).unwrap();
        assert!(b.iter().all(|v| *v == 3.0));
        assert_eq!(c.history()[0].contributors, vec!["p0", "p1"]);
    }

    #[test]
    fn refused_updates_change_nothing_and_name_the_problem() {
        let mut c = joined(3, 2, 3);
        let good = update(&c, 1, 0.5, 10);

        assert!(matches!(
            c.submit("nobody", &good, 0),
            Err(RoundError::UnknownParticipant(_))
        ));
        let mut wrong_len = good.clone();
        wrong_len.payload = UpdatePayload::Plaintext(encode_f32_le(&[0.0; 3]));
        let err = c.submit("t0", &wrong_len, 0).unwrap_err();
        assert!(err.to_string().contains("has 3 values"), "{err}");
        let mut nan = good.clone();
        let mut v = vec![0.0f32; c.upload_manifest().len()];
        v[5] = f32::NAN;
        nan.payload = UpdatePayload::Plaintext(encode_f32_le(&v));
        assert!(
            c.submit("t0", &nan, 0)
                .unwrap_err()
                .to_string()
                .contains("NaN")
        );
        let mut future = good.clone();
        future.round = 2;
        assert!(matches!(
            c.submit("t0", &future, 0),
            Err(RoundError::FutureRound { .. })
        ));
        let mut layout = good.clone();
        layout.layout_hash = "00".into();
        assert!(matches!(
            c.submit("t0", &layout, 0),
            Err(RoundError::LayoutMismatch { .. })
        ));
        let mut base = good.clone();
        base.base_adapter_hash = "ff".into();
        assert!(matches!(
            c.submit("t0", &base, 0),
            Err(RoundError::WrongBaseAdapter { .. })
        ));
        let mut zero = good.clone();
        zero.num_samples = 0;
        assert!(matches!(
            c.submit("t0", &zero, 0),
            Err(RoundError::SampleWeight(0))
        ));
        assert_eq!(c.status().updates_received, 0);

        c.submit("t0", &good, 0).unwrap();
        assert!(matches!(
            c.submit("t0", &good, 0),
            Err(RoundError::DuplicateUpdate { .. })
        ));
        c.submit("t1", &update(&c, 1, 0.5, 10), 0).unwrap();
        // Deadline passes with 2 of 3: the round closes, p2 counts as dropped.
        let events = c.tick(1_000).unwrap();
        let Event::RoundCompleted(record) = &events[0] else {
            panic!("{events:?}")
        };
        assert_eq!(record.dropped, vec!["p2"]);
        // p2's late update for round 1 is stale now.
        let late = SubmittedUpdate {
            round: 1,
            ..update(&c, 2, 0.5, 10)
        };
        assert_eq!(
            c.submit("t2", &late, 1_001),
            Err(RoundError::StaleRound { got: 1, current: 2 })
        );
    }

    #[test]
    fn deadline_with_too_few_updates_extends_and_keeps_them() {
        let mut c = joined(3, 2, 1);
        c.submit("t0", &update(&c, 1, 1.0, 1), 0).unwrap();
        let events = c.tick(1_000).unwrap();
        assert_eq!(
            events,
            vec![Event::RoundExtended {
                round: 1,
                received: 1,
                needed: 2,
                deadline_ms: 2_000
            }]
        );
        c.submit("t1", &update(&c, 1, 3.0, 1), 1_500).unwrap();
        let events = c.tick(2_000).unwrap();
        assert!(matches!(
            events.last(),
            Some(Event::RunFinished { rounds: 1 })
        ));
        assert!(matches!(
            c.task("t2").unwrap(),
            Task::Finished { rounds: 1, .. }
        ));
        let b = c.global().adapter.flatten(c.upload_manifest()).unwrap();
        assert!(b.iter().all(|v| *v == 2.0));
        assert_eq!(
            c.submit("t0", &update(&c, 1, 1.0, 1), 0),
            Err(RoundError::RunFinished)
        );
    }

    fn strategy_plan(
        participants: usize,
        rounds: u64,
        strategy: crate::strategy::StrategySpec,
    ) -> FederationPlan {
        let mut p = plan(participants, 1, rounds);
        p.strategy = strategy;
        p
    }

    fn submit_fill(c: &mut Coordinator, token: &str, fill: f32, n: u64) -> Vec<Event> {
        let round = c.status().round;
        let u = update(c, round, fill, n);
        c.submit(token, &u, 0).unwrap()
    }

    #[test]
    fn rolora_alternates_the_trained_factor_and_its_layout() {
        use crate::strategy::{AggregationMode, StrategySpec};
        let spec = StrategySpec {
            mode: AggregationMode::RoLora,
            ..Default::default()
        };
        let mut c = Coordinator::new(strategy_plan(2, 3, spec), [7; 32]).unwrap();
        c.join("t0".into(), "p0", "lo", 0).unwrap();
        c.join("t1".into(), "p1", "km", 0).unwrap();
        let a0 = c.global().adapter.clone();
        // Round 1 trains B: the layout is FFA-LoRA's B-only manifest.
        let Task::Train { work, .. } = c.task("t0").unwrap() else {
            panic!()
        };
        assert!(!work.trains.a && work.trains.b && work.rank == 8);
        assert_eq!(c.upload_manifest(), &c.global().adapter.b_manifest());
        submit_fill(&mut c, "t0", 1.0, 1);
        submit_fill(&mut c, "t1", 4.0, 2);
        // Round 2 trains A alone; B kept its mean update, A is untouched.
        let Task::Train { work, round: 2, .. } = c.task("t1").unwrap() else {
            panic!()
        };
        assert!(work.trains.a && !work.trains.b);
        assert_eq!(c.server_state().round, 1);
        for ((_, m), (_, m0)) in c.global().adapter.modules().iter().zip(a0.modules()) {
            assert!(m.b.data().iter().all(|v| *v == 3.0));
            assert_eq!(m.a, m0.a);
        }
        let a_len: usize = a0.modules().iter().map(|(_, m)| m.a.data().len()).sum();
        assert_eq!(c.upload_manifest().len(), a_len);
        // An update in round 1's layout is refused now, and changes nothing.
        let mut stale_layout = update(&c, 2, 0.5, 1);
        stale_layout.layout_hash = a0.b_manifest().hash_hex();
        assert!(matches!(
            c.submit("t0", &stale_layout, 0),
            Err(RoundError::LayoutMismatch { .. })
        ));
        assert_eq!(c.status().updates_received, 0);
        submit_fill(&mut c, "t0", 0.5, 1);
        submit_fill(&mut c, "t1", 0.5, 1);
        for ((_, m), (_, m0)) in c.global().adapter.modules().iter().zip(a0.modules()) {
            for (a, a0) in m.a.data().iter().zip(m0.a.data()) {
                assert_eq!(*a, (*a0 as f64 + 0.5) as f32);
            }
        }
        assert_eq!(c.upload_manifest(), &c.global().adapter.b_manifest());
    }

    #[test]
    fn server_optimizers_apply_across_rounds() {
        use crate::strategy::{AdaptiveSpec, ServerOptimizerSpec, StrategySpec};
        let spec = StrategySpec {
            optimizer: ServerOptimizerSpec::FedAdam(AdaptiveSpec {
                eta: 0.1,
                ..Default::default()
            }),
            ..Default::default()
        };
        let mut c = Coordinator::new(strategy_plan(1, 2, spec), [7; 32]).unwrap();
        c.join("t0".into(), "p0", "lo", 0).unwrap();
        submit_fill(&mut c, "t0", 1.0, 1);
        // m = 0.1·Δ, v = 0.99·τ² + 0.01·Δ²: x = η·m/(√v + τ).
        let (m, v) = (0.1, 0.99 * 1e-6 + 0.01);
        let expected = (0.1 * m / (f64::sqrt(v) + 1e-3)) as f32;
        let b = c.global().adapter.flatten(c.upload_manifest()).unwrap();
        assert!(
            b.iter().all(|x| (*x - expected).abs() < 1e-6),
            "{} vs {expected}",
            b[0]
        );
        assert!(!c.server_state().optimizer.slots.is_empty());
    }

    #[test]
    fn sampling_picks_the_cohort_and_tells_the_others_to_wait() {
        use crate::strategy::{SamplingSpec, StrategySpec};
        let spec = StrategySpec {
            sampling: SamplingSpec {
                fraction: 0.5,
                min_participants: 1,
                seed: 3,
            },
            ..Default::default()
        };
        let mut c = Coordinator::new(strategy_plan(4, 2, spec.clone()), [7; 32]).unwrap();
        for i in 0..4 {
            c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
        }
        let names: Vec<String> = (0..4).map(|i| format!("p{i}")).collect();
        let cohort = spec.sampling.sample(1, &names);
        assert_eq!(cohort.len(), 2);
        assert_eq!(c.status().cohort_size, 2);
        for i in 0..4 {
            let task = c.task(&format!("t{i}")).unwrap();
            if cohort.contains(&format!("p{i}")) {
                assert!(matches!(task, Task::Train { round: 1, .. }));
            } else {
                assert_eq!(task, Task::Wait(WaitReason::NotSampled { round: 1 }));
                let u = update(&c, 1, 1.0, 1);
                assert!(matches!(
                    c.submit(&format!("t{i}"), &u, 0),
                    Err(RoundError::NotInCohort { .. })
                ));
            }
        }
        for name in &cohort {
            let token = format!("t{}", &name[1..]);
            submit_fill(&mut c, &token, 1.0, 1);
        }
        assert_eq!(c.history()[0].contributors, cohort);
        assert_eq!(c.status().round, 2);
        assert_eq!(c.status().cohort_size, 2);
    }

    #[test]
    fn late_joiner_waits_for_next_round_and_rejoin_replaces_token() {
        let mut c = joined(1, 1, 2);
        c.join("late".into(), "p9", "th", 0).unwrap();
        assert_eq!(
            c.task("late").unwrap(),
            Task::Wait(WaitReason::NextRound { round: 1 })
        );
        c.submit("t0", &update(&c, 1, 1.0, 1), 0).unwrap();
        assert!(matches!(
            c.task("late").unwrap(),
            Task::Train { round: 2, .. }
        ));
        c.join("t0-new".into(), "p0", "lo", 0).unwrap();
        assert!(matches!(
            c.task("t0"),
            Err(RoundError::UnknownParticipant(_))
        ));
        assert!(matches!(
            c.task("t0-new").unwrap(),
            Task::Train { round: 2, .. }
        ));
        assert!(matches!(
            c.join("x".into(), "bad name", "lo", 0),
            Err(RoundError::BadName(_))
        ));
        // A language label is short and printable; a huge one is refused and shown cut.
        for bad in ["", "lo\u{1b}[31m", "l o", &"x".repeat(36)] {
            assert!(
                matches!(
                    c.join("x".into(), "p9", bad, 0),
                    Err(RoundError::BadLanguage(_))
                ),
                "{bad:?}"
            );
        }
        let huge = "a".repeat(10_000_000);
        let message = c.join("x".into(), "p9", &huge, 0).unwrap_err().to_string();
        assert!(
            message.len() < 300 && message.contains("(10000000 bytes)"),
            "{message}"
        );
        let message = c.join("x".into(), &huge, "lo", 0).unwrap_err().to_string();
        assert!(
            message.len() < 300 && message.contains("(10000000 bytes)"),
            "{message}"
        );
        for good in ["lo", "pt-BR", "zh_Hant", "x-mekong-1"] {
            assert!(
                c.join(format!("t-{good}"), &format!("lab-{good}"), good, 0)
                    .is_ok(),
                "{good}"
            );
        }
    }
}
