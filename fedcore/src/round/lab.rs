//! The lab's side of a federation as a sans-IO state machine (issue #24): what a lab does
//! with each task the aggregator hands it, and what it refuses, with no network, runtime,
//! clock, model or file in it. `client/src/participant.rs` is the shell around it: it
//! fetches tasks, downloads the globals they name, trains with burn, sends what the machine
//! says (writing the reveal log first when told to), paces retries and reports progress,
//! and feeds each outcome back.
//!
//! The rules it keeps, each a refusal a cheating center runs into:
//! - secure or plaintext is the pinned plan's choice, never the task's;
//! - round and attempt numbers stay within the plan;
//! - the round's work (which factors, rank, upload layout) is derived from the pinned plan
//!   by [`RoundWork::derive`], the derivation the coordinator uses to state it, and a task
//!   that states other work is refused;
//! - shares are revealed at most once per starting global model and only for increasing
//!   rounds ([`RevealLog`]), and the log goes to disk before the shares leave;
//! - the same update is kept across attempts of its round (training is deterministic, so a
//!   restarted attempt masks the same values).

use std::sync::Arc;

use thiserror::Error;
use zeroize::Zeroizing;

use super::guard::{GuardError, RevealLog, Verdict};
use super::{
    LeaveReason, Reply, RoundWork, SecureMessage, SecureStep, SecureTrain, SecureUpload,
    UploadError, UploadSecrets, rounding_seed,
};
use crate::adapter::LoraAdapter;
use crate::plan::FederationPlan;
use crate::privacy::ledger::{epsilon_spent, record_epsilon};
use crate::secagg::participant::RoundRandomness;
use crate::secagg::spec::{RoundNumberError, check_round_numbers};
use crate::strategy::{
    AggregationMode, GlobalModel, ServerState, Strategy, StrategyError, TrainedFactors, hetlora,
};

/// How long to stay away from an attempt this lab already unmasked (ms).
pub const ALREADY_REVEALED_PAUSE_MS: u64 = 5_000;
/// The longest pause a `Wait` task may ask for (ms).
pub const MAX_WAIT_MS: u64 = 5_000;
/// The pause before asking again about a step this lab has no session for (ms).
pub const STEP_PAUSE_MS: u64 = 200;
/// Refusals of one round's plaintext update before the lab gives up.
pub const MAX_REFUSED_UPLOADS: u32 = 8;
/// The first pause after a refused plaintext update (ms); it doubles up to 30 s.
const FIRST_REFUSAL_PAUSE_MS: u64 = 500;
const MAX_REFUSAL_PAUSE_MS: u64 = 30_000;

/// A round's work as a task states it, checked for form when it was read off the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatedWork {
    pub mode: String,
    pub trains: TrainedFactors,
    pub rank: usize,
    pub upload_layout_hash: String,
    pub upload_len: usize,
}

impl StatedWork {
    /// How `work` under `mode` is stated (what the coordinator sends).
    pub fn of(mode: AggregationMode, work: &RoundWork<'_>) -> Self {
        StatedWork {
            mode: mode.name().to_string(),
            trains: work.trains,
            rank: work.rank,
            upload_layout_hash: work.layout.manifest().hash_hex(),
            upload_len: work.layout.len(),
        }
    }
}

/// Why the lab stops: the aggregator asked for something the pinned plan does not allow,
/// or the lab cannot do what it asks.
#[derive(Debug, Error)]
pub enum LabError {
    #[error(
        "round {round}: the aggregator asked for this lab's update in plaintext, but the pinned plan uses secure aggregation; refusing (a center that drops the secure session would read the update)"
    )]
    PlaintextRequested { round: u64 },
    #[error(
        "round {round}: the aggregator opened a secure-aggregation session, but the pinned plan runs without secure aggregation; refusing the inconsistent task"
    )]
    SecureUnplanned { round: u64 },
    #[error("the aggregator's task numbers are out of bounds: {0}")]
    RoundNumbers(#[from] RoundNumberError),
    #[error("unmask guard: {0}")]
    Guard(#[from] GuardError),
    #[error(
        "round {round}: the aggregator's task asks for {got}, but the pinned plan's strategy gives {expected}: refusing to train"
    )]
    WorkMismatch {
        round: u64,
        got: String,
        expected: String,
    },
    #[error("round {round}: the aggregator refused this lab's update {tries} times; giving up")]
    UpdateRefused { round: u64, tries: u32 },
    #[error(
        "this federation uses secure aggregation, which needs this lab's identity key (identity.key from `fedclient enroll`, named by participant.toml or --identity)"
    )]
    NoIdentity,
    #[error("secure aggregation: {0}")]
    Secure(#[from] UploadError),
    #[error("aggregation strategy: {0}")]
    Strategy(#[from] StrategyError),
    #[error("the plan is invalid: {0}")]
    Plan(#[from] crate::ConfigError),
    #[error(
        "this lab's policy caps its privacy budget (max_epsilon = {max_epsilon}), but the plan adds no differential-privacy noise ([privacy] mode = \"off\"): its updates would spend an unbounded ε, so it does not take part"
    )]
    NoPrivacy { max_epsilon: f64 },
    #[error("policy.max_epsilon = {0}: expected a positive number")]
    MaxEpsilon(f64),
    #[error(
        "the plan trains with DP-SGD ([privacy.record]) but this lab's sampling rate is {0:?}; expected batch_size / records, in (0, 1]"
    )]
    RecordRate(Option<f64>),
    #[error("the privacy accountant failed: {0}")]
    Accountant(#[from] crate::privacy::rdp::AccountantError),
}

/// Who the lab is and what its policy allows.
pub struct LabSetup {
    pub name: String,
    /// Rounds the lab's policy lets it take part in (`max_rounds`); none: no limit.
    pub max_rounds: Option<u64>,
    /// The fewest peers a secure attempt must have for this lab to take part.
    pub min_peers: usize,
    /// The lab's identity secret; needed under secure aggregation.
    pub identity_seed: Option<Zeroizing<[u8; 32]>>,
    /// The most ε (at the plan's δ) this lab's data may spend in this federation
    /// (`max_epsilon`); none: no limit. A lab with a limit refuses a plan without
    /// `[privacy]`, and leaves before the round that could take it past the limit (for
    /// each kind of DP the plan has: the client-level ε of the noised sums, the record-level
    /// ε of its DP-SGD).
    pub max_epsilon: Option<f64>,
    /// Under `[privacy.record]`: this lab's DP-SGD sampling rate, `batch_size / records`
    /// of its own text (the shell counts its records).
    pub record_sampling_rate: Option<f64>,
}

/// A training task, with the global adapter it names already downloaded by the shell.
pub struct TrainTask {
    pub round: u64,
    /// The secure-aggregation attempt the task opens; none for a plaintext round.
    pub secure: Option<SecureTrain>,
    /// The work the task states.
    pub work: StatedWork,
    pub global: GlobalModel,
    /// Fresh randomness for a secure session, drawn by the shell from the OS.
    pub randomness: RoundRandomness,
}

/// What the shell trains: start from `start` on a base with `base_delta` added, train the
/// factors `trains` for the plan's local steps with `seed`.
#[derive(Debug, Clone)]
pub struct TrainOrder {
    pub round: u64,
    pub seed: u64,
    pub start: LoraAdapter,
    pub trains: TrainedFactors,
    /// FedEx-LoRA's merged corrections (empty under every other mode).
    pub base_delta: std::collections::BTreeMap<String, crate::Matrix>,
}

/// A plaintext update to hand in.
#[derive(Debug, Clone)]
pub struct PlaintextUpload {
    pub round: u64,
    pub layout_hash: String,
    /// The content hash of the global the update was trained from.
    pub global_hash: String,
    pub values: Arc<Vec<f32>>,
    pub num_samples: u64,
}

/// Why the machine asks the shell to wait, for its log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pause {
    /// The aggregator said wait.
    Told,
    /// A restarted attempt of a round and model this lab already unmasked: it stays out.
    AlreadyRevealed { round: u64 },
    /// A step for an attempt this lab has no session for (e.g. the process restarted).
    NoSession,
    /// The plaintext update was refused; this is try `tries` of the round.
    Refused { round: u64, tries: u32 },
}

/// What the shell does next.
#[derive(Debug)]
pub enum Next {
    /// Nothing to do but ask for the next task, after `ms` milliseconds.
    Pause { ms: u64, why: Pause },
    /// Tell the aggregator the lab leaves, then end with `global`.
    Leave {
        reason: LeaveReason,
        global: GlobalModel,
    },
    /// Train as ordered, then call [`LabMachine::trained`].
    Train(TrainOrder),
    /// Send this stage message; then call [`LabMachine::sent`].
    Send(SecureMessage),
    /// Write `persist` durably, then send the message; then call [`LabMachine::sent`]. If
    /// the write fails, nothing may be sent.
    RevealAfter {
        persist: RevealLog,
        message: SecureMessage,
    },
    /// Stream the masked update; then call [`LabMachine::sent`].
    SendMasked(Vec<u32>),
    /// Hand in the plaintext update; then call [`LabMachine::uploaded`].
    Upload(PlaintextUpload),
    /// The round is done on this lab's side (its update taken, or its shares revealed).
    RoundDone { round: u64 },
    /// The aggregator answered a secure step in a way the protocol refuses: the lab drops
    /// out of the attempt (an honest aggregator counts it as dropped) and says why.
    Refuse {
        round: u64,
        attempt: u32,
        error: crate::secagg::protocol::ProtocolError,
    },
}

/// ε after one more round of `len` uploaded values on top of what `reveals` spent,
/// counting on the fewest labs a sum can hold (the threshold less the colluders): what a
/// lab's budget is checked against before it trains.
fn epsilon_after(
    plan: &FederationPlan,
    reveals: &RevealLog,
    round: u64,
    len: usize,
) -> Result<f64, LabError> {
    let mut spent = reveals.spent();
    if let Some(private) = plan.update_encoding(len, round)?.private() {
        spent.push(private.worst_case());
    }
    Ok(epsilon_spent(&spent, plan.privacy.delta)?)
}

/// The trained update of the open round, kept across its attempts.
struct Trained {
    round: u64,
    global_hash: String,
    values: Arc<Vec<f32>>,
    num_samples: u64,
}

/// A training task waiting for the shell's training.
struct Pending {
    round: u64,
    global_hash: String,
    secure: Option<SecureTrain>,
    randomness: RoundRandomness,
    download: LoraAdapter,
    /// HetLoRA below the global rank: the upload is of the first `rank` components.
    truncate_to: Option<usize>,
    layout: crate::strategy::UploadLayout,
    layout_hash: String,
}

/// What was last sent, for [`LabMachine::sent`].
enum InFlight {
    Nothing,
    Advertise(Box<SecureUpload>),
    Message,
    Reveal,
}

/// Refusals of one round's plaintext update.
struct Refusals {
    round: u64,
    tries: u32,
    pause_ms: u64,
}

/// The lab's side of a federation (see the module docs).
pub struct LabMachine {
    plan: FederationPlan,
    strategy: Strategy,
    setup: LabSetup,
    reveals: RevealLog,
    /// FedSA-LoRA: this lab's own B, kept across rounds (never uploaded).
    personal: Option<LoraAdapter>,
    /// The last global this lab received: what it ends with if it leaves while waiting.
    last_global: Option<GlobalModel>,
    rounds_done: u64,
    pending: Option<Pending>,
    trained: Option<Trained>,
    upload: Option<SecureUpload>,
    in_flight: InFlight,
    refusals: Option<Refusals>,
    /// The plaintext upload in flight.
    uploading: Option<u64>,
}

impl LabMachine {
    /// A lab following the pinned `plan`, with what it revealed so far in `reveals`.
    pub fn new(
        plan: FederationPlan,
        setup: LabSetup,
        reveals: RevealLog,
    ) -> Result<Self, LabError> {
        let strategy = Strategy::for_plan(plan.strategy.clone(), &plan)?;
        if plan.secure_aggregation.enabled && setup.identity_seed.is_none() {
            return Err(LabError::NoIdentity);
        }
        if let Some(max_epsilon) = setup.max_epsilon {
            if !(max_epsilon.is_finite() && max_epsilon > 0.0) {
                return Err(LabError::MaxEpsilon(max_epsilon));
            }
            if !plan.privacy.enabled() && !plan.privacy.record_level() {
                return Err(LabError::NoPrivacy { max_epsilon });
            }
        }
        if plan.privacy.record_level()
            && !setup
                .record_sampling_rate
                .is_some_and(|q| q > 0.0 && q <= 1.0)
        {
            return Err(LabError::RecordRate(setup.record_sampling_rate));
        }
        Ok(LabMachine {
            plan,
            strategy,
            setup,
            reveals,
            personal: None,
            last_global: None,
            rounds_done: 0,
            pending: None,
            trained: None,
            upload: None,
            in_flight: InFlight::Nothing,
            refusals: None,
            uploading: None,
        })
    }

    pub fn plan(&self) -> &FederationPlan {
        &self.plan
    }

    pub fn strategy(&self) -> &Strategy {
        &self.strategy
    }

    /// The ε (at the plan's δ) this lab's data has spent in this federation: every noised
    /// sum its updates entered, from its reveal record. None without `[privacy]`.
    pub fn epsilon_spent(&self) -> Result<Option<f64>, LabError> {
        if !self.plan.privacy.enabled() {
            return Ok(None);
        }
        Ok(Some(epsilon_spent(
            &self.reveals.spent(),
            self.plan.privacy.delta,
        )?))
    }

    /// The record-level ε (at the plan's δ) of this lab's DP-SGD: the steps of every round
    /// whose update left the lab (revealed under secure aggregation, handed in otherwise).
    /// None without `[privacy.record]`.
    pub fn record_epsilon_spent(&self) -> Result<Option<f64>, LabError> {
        self.record_epsilon_after(0)
    }

    /// The record-level ε after `more` further rounds (None without `[privacy.record]`).
    fn record_epsilon_after(&self, more: u64) -> Result<Option<f64>, LabError> {
        let (Some(record), Some(q)) = (&self.plan.privacy.record, self.setup.record_sampling_rate)
        else {
            return Ok(None);
        };
        let rounds = if self.plan.secure_aggregation.enabled {
            self.reveals.reveals()
        } else {
            self.rounds_done
        };
        let steps = (rounds + more) * self.plan.training.local_steps as u64;
        Ok(Some(record_epsilon(
            q,
            record.noise_multiplier,
            steps,
            self.plan.privacy.delta,
        )?))
    }

    /// Whether a secure session of this lab is open: leaving now would break its round.
    pub fn in_secure_session(&self) -> bool {
        self.upload.is_some()
    }

    /// The aggregator said wait. A lab whose operator asked it to leave leaves now, unless
    /// a secure session still needs it.
    pub fn wait(&mut self, retry_after_ms: u64, leave_requested: bool) -> Next {
        if leave_requested && self.upload.is_none() {
            return Next::Leave {
                reason: LeaveReason::OperatorRequest,
                global: self
                    .last_global
                    .take()
                    .unwrap_or_else(|| self.plan.initial_model()),
            };
        }
        Next::Pause {
            ms: retry_after_ms.min(MAX_WAIT_MS),
            why: Pause::Told,
        }
    }

    /// A training task (its global downloaded). Leaves first when the lab's policy or its
    /// operator says so (only here, between rounds); refuses a task the pinned plan does
    /// not allow; then trains, or goes on with the update trained for an earlier attempt of
    /// the same round and model.
    pub fn train(&mut self, task: TrainTask, leave_requested: bool) -> Result<Next, LabError> {
        let round = task.round;
        if let Some(max) = self.setup.max_rounds
            && self.rounds_done >= max
        {
            return Ok(Next::Leave {
                reason: LeaveReason::MaxRounds,
                global: task.global,
            });
        }
        if leave_requested {
            return Ok(Next::Leave {
                reason: LeaveReason::OperatorRequest,
                global: task.global,
            });
        }
        // Another round of DP-SGD would spend its steps whatever the round's layout.
        if let Some(limit) = self.setup.max_epsilon
            && self.record_epsilon_after(1)?.is_some_and(|e| e > limit)
        {
            return Ok(Next::Leave {
                reason: LeaveReason::PrivacyBudget,
                global: task.global,
            });
        }
        let global = self.last_global.insert(task.global);
        let global_hash = global.content_hash();
        match (&task.secure, self.plan.secure_aggregation.enabled) {
            (None, true) => return Err(LabError::PlaintextRequested { round }),
            (Some(_), false) => return Err(LabError::SecureUnplanned { round }),
            _ => {}
        }
        let attempt = task.secure.as_ref().map_or(0, |s| s.attempt);
        check_round_numbers(round, attempt, self.plan.rounds.rounds)?;
        if let Some(session) = &task.secure
            && self.reveals.check(round, &global_hash, &session.session)?
                == Verdict::AlreadyRevealed
        {
            return Ok(Next::Pause {
                ms: ALREADY_REVEALED_PAUSE_MS,
                why: Pause::AlreadyRevealed { round },
            });
        }
        // Round `round` follows `round − 1` aggregated rounds, all the strategy's per-round
        // choices (RoLoRA's phase) depend on.
        let state = ServerState {
            round: round.saturating_sub(1),
            ..Default::default()
        };
        let layout = self.strategy.upload_layout(global, &state);
        if let Some(limit) = self.setup.max_epsilon
            && self.plan.privacy.enabled()
            && epsilon_after(&self.plan, &self.reveals, round, layout.len())? > limit
        {
            return Ok(Next::Leave {
                reason: LeaveReason::PrivacyBudget,
                global: global.clone(),
            });
        }
        let ours = RoundWork::derive(
            &self.strategy,
            &self.plan.lora,
            &self.setup.name,
            &state,
            &layout,
        );
        let expected = StatedWork::of(self.strategy.mode(), &ours);
        if task.work != expected {
            return Err(LabError::WorkMismatch {
                round,
                got: format!("{:?}", task.work),
                expected: format!("{expected:?}"),
            });
        }
        let (trains, rank) = (ours.trains, ours.rank);
        let layout_hash = expected.upload_layout_hash;
        let fresh = self
            .trained
            .as_ref()
            .is_none_or(|t| t.round != round || t.global_hash != global_hash);
        if !fresh {
            return self.after_training(task.secure, task.randomness, layout_hash);
        }
        let download = self
            .strategy
            .download(global, &self.setup.name, self.personal.as_ref())?;
        // HetLoRA: train the first `rank` components at the global rank, the others held at
        // zero (they get no gradient; see hetlora::zero_beyond).
        let hetero = download.config().rank < self.plan.lora.rank;
        let start = if hetero {
            hetlora::zero_beyond(&global.adapter, rank)?
        } else {
            download.clone()
        };
        let order = TrainOrder {
            round,
            seed: self.plan.training.local_seed(&self.setup.name, round),
            start,
            trains,
            base_delta: global.base_delta.clone(),
        };
        self.pending = Some(Pending {
            round,
            global_hash,
            secure: task.secure,
            randomness: task.randomness,
            download,
            truncate_to: hetero.then_some(rank),
            layout,
            layout_hash,
        });
        Ok(Next::Train(order))
    }

    /// The shell trained as ordered: `trained` is the whole adapter it ended with, from
    /// `num_samples` training windows. Returns what to send.
    pub fn trained(&mut self, trained: LoraAdapter, num_samples: u64) -> Result<Next, LabError> {
        let pending = self
            .pending
            .take()
            .expect("trained() answers a Next::Train");
        let upload_from = match pending.truncate_to {
            Some(rank) => hetlora::truncate(&trained, rank)?,
            None => trained.clone(),
        };
        let values = self.strategy.upload(
            &pending.layout,
            &self.setup.name,
            &pending.download,
            &upload_from,
        )?;
        if self.strategy.mode() == AggregationMode::FedSaLora {
            self.personal = Some(trained);
        }
        self.trained = Some(Trained {
            round: pending.round,
            global_hash: pending.global_hash,
            values: Arc::new(values),
            num_samples,
        });
        self.after_training(pending.secure, pending.randomness, pending.layout_hash)
    }

    /// The update of the round is ready: open the secure session and advertise its keys,
    /// or hand it in in plaintext.
    fn after_training(
        &mut self,
        secure: Option<SecureTrain>,
        randomness: RoundRandomness,
        layout_hash: String,
    ) -> Result<Next, LabError> {
        let trained = self.trained.as_ref().expect("set before");
        let Some(session) = secure else {
            self.uploading = Some(trained.round);
            return Ok(Next::Upload(PlaintextUpload {
                round: trained.round,
                layout_hash,
                global_hash: trained.global_hash.clone(),
                values: trained.values.clone(),
                num_samples: trained.num_samples,
            }));
        };
        let identity_seed = self
            .setup
            .identity_seed
            .clone()
            .ok_or(LabError::NoIdentity)?;
        // Same update, same rounding in every attempt (see `rounding_seed`).
        let rounding = rounding_seed(&identity_seed, trained.round, &trained.global_hash);
        let (upload, advert) = SecureUpload::open(
            &self.plan,
            &self.setup.name,
            session,
            trained.round,
            &trained.global_hash,
            &trained.values,
            trained.num_samples,
            self.setup.min_peers,
            UploadSecrets {
                identity_seed,
                randomness,
                rounding_seed: rounding,
            },
        )?;
        self.in_flight = InFlight::Advertise(Box::new(upload));
        Ok(Next::Send(SecureMessage::Advertise(advert)))
    }

    /// The values of the open round's trained update and its sample count (what the
    /// shell's observer is shown once training ends).
    pub fn update(&self) -> Option<(&[f32], u64)> {
        self.trained
            .as_ref()
            .map(|t| (t.values.as_slice(), t.num_samples))
    }

    /// The open secure session, once its keys went out (for the shell's log lines).
    pub fn secure_upload(&self) -> Option<&SecureUpload> {
        match &self.in_flight {
            InFlight::Advertise(upload) => Some(upload),
            _ => self.upload.as_ref(),
        }
    }

    /// A secure step of attempt `attempt` of `round`. A step for no session of this lab
    /// waits; a step the protocol refuses drops this lab out of the attempt.
    pub fn secure_step(
        &mut self,
        round: u64,
        attempt: u32,
        step: &SecureStep<'_>,
    ) -> Result<Next, LabError> {
        let pause = Next::Pause {
            ms: STEP_PAUSE_MS,
            why: Pause::NoSession,
        };
        let Some(upload) = self.upload.as_mut() else {
            return Ok(pause);
        };
        if upload.round() != round || upload.attempt() != attempt {
            return Ok(pause);
        }
        let reply = match upload.respond(step) {
            Ok(reply) => reply,
            Err(error) => {
                self.upload = None;
                return Ok(Next::Refuse {
                    round,
                    attempt,
                    error,
                });
            }
        };
        if upload.revealed() {
            let session = upload.session();
            let Some(trained) = self.trained.as_ref() else {
                self.upload = None;
                return Ok(Next::Pause {
                    ms: 0,
                    why: Pause::NoSession,
                });
            };
            let mut next = self.reveals.clone();
            next.record(
                trained.round,
                &trained.global_hash,
                &session,
                upload.spent().cloned(),
            )?;
            self.reveals = next.clone();
            let Reply::Message(message) = reply else {
                unreachable!("unmasking answers with a message");
            };
            self.in_flight = InFlight::Reveal;
            return Ok(Next::RevealAfter {
                persist: next,
                message,
            });
        }
        self.in_flight = InFlight::Message;
        Ok(match reply {
            Reply::Message(message) => Next::Send(message),
            Reply::Masked(masked) => Next::SendMasked(masked.words),
        })
    }

    /// What became of the last secure message: `accepted` false when its stage had closed
    /// without it. After the reveal, the round is done on this lab's side.
    pub fn sent(&mut self, accepted: bool) -> Option<Next> {
        match std::mem::replace(&mut self.in_flight, InFlight::Nothing) {
            InFlight::Advertise(upload) => {
                self.upload = accepted.then_some(*upload);
                None
            }
            InFlight::Reveal => {
                self.upload = None;
                let trained = self.trained.take()?;
                accepted.then(|| {
                    self.rounds_done += 1;
                    Next::RoundDone {
                        round: trained.round,
                    }
                })
            }
            InFlight::Message | InFlight::Nothing => None,
        }
    }

    /// What became of the plaintext update: `taken`, or refused (usually the round closed
    /// without it; the next task moves on). A center that keeps refusing the same round is
    /// not answered at full speed, nor forever.
    pub fn uploaded(&mut self, taken: bool) -> Result<Next, LabError> {
        let round = self
            .uploading
            .take()
            .expect("uploaded() answers a Next::Upload");
        if taken {
            self.refusals = None;
            self.rounds_done += 1;
            return Ok(Next::RoundDone { round });
        }
        let r = self.refusals.get_or_insert(Refusals {
            round,
            tries: 0,
            pause_ms: FIRST_REFUSAL_PAUSE_MS,
        });
        if r.round != round {
            *r = Refusals {
                round,
                tries: 0,
                pause_ms: FIRST_REFUSAL_PAUSE_MS,
            };
        }
        r.tries += 1;
        if r.tries >= MAX_REFUSED_UPLOADS {
            return Err(LabError::UpdateRefused {
                round,
                tries: r.tries,
            });
        }
        let ms = r.pause_ms;
        r.pause_ms = (r.pause_ms * 2).min(MAX_REFUSAL_PAUSE_MS);
        Ok(Next::Pause {
            ms,
            why: Pause::Refused {
                round,
                tries: r.tries,
            },
        })
    }

    /// The adapter this lab uses once the run ended with `last`: FedSA-LoRA's personalised
    /// model (global A, own B), `group_b`'s model of its group (global A, the group's B),
    /// else the global adapter.
    pub fn own_adapter(&self, last: &GlobalModel) -> Result<LoraAdapter, LabError> {
        Ok(
            if matches!(
                self.strategy.mode(),
                AggregationMode::FedSaLora | AggregationMode::GroupB
            ) {
                self.strategy
                    .download(last, &self.setup.name, self.personal.as_ref())?
            } else {
                last.adapter.clone()
            },
        )
    }
}
