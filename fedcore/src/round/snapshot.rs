//! The coordinator's durable form, so that an aggregator killed at any moment resumes its
//! run (same session id, same members and tokens, every closed round) instead of starting
//! over. fedcore does no IO: it encodes and decodes, the aggregator stores.
//!
//! A coordinator is saved in three parts, each at its own pace, because their sizes differ
//! by orders of magnitude:
//!
//! - **state** ([`Coordinator::encode_state`]): members, tokens, members that left and
//!   those told the run finished (both bounded by the members), why it finished, the open
//!   round's cohort and secure-aggregation attempt. Small and of bounded size however long
//!   the run; saved after every change.
//! - **history** ([`Coordinator::history`]): one [`RoundRecord`] per closed round, saved
//!   once when its round closes (kept out of the state, which would otherwise grow with
//!   every round and be rewritten with every change).
//! - **model** ([`Coordinator::encode_server_state`] and [`Coordinator::global`]): the
//!   global adapter and the strategy's server state (optimizer moments). Adapter-sized;
//!   changes once per closed round ([`Coordinator::rounds_closed`]).
//! - **sum** ([`Coordinator::durable_sum`]): a secure attempt's running masked sum, from the
//!   close of its masked-input stage on. Vector-sized; changes only at that stage boundary
//!   (and when a broken stream is retracted after it), never per chunk.
//!
//! What a restart does with the round that was open ([`Resumed`]):
//!
//! - A plaintext round starts collecting again: its running sum is not saved (it changes
//!   with every update), and each participant keeps its trained update and hands it in
//!   again when the task says so.
//! - A secure attempt whose masked-input stage had not closed is **restarted** as the next
//!   attempt, with fresh keys. The server had not asked anyone to reveal a share, so it
//!   learned nothing; masked inputs that had arrived are masked with keys of the abandoned
//!   attempt and are useless. Resuming instead would need the running sum and every share
//!   delivery saved on each masked input, which for large adapters and many labs is far too
//!   much writing.
//! - A secure attempt in its consistency-check or unmask stage is **resumed**: same attempt,
//!   same survivor list, the saved signatures and revealed shares. It must never be
//!   restarted: a participant may already have revealed shares that unmask this attempt's
//!   sum, and a second attempt with a different survivor set would let the server
//!   difference two sums (participants refuse a second unmasking of a round too).
//!   [`Coordinator::restore`] refuses such a state without its sum.
//!
//! Deadlines are not saved: the coordinator's clock restarts with the process, and the
//! labs need time to reconnect. The open round (or stage) gets a fresh deadline.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use super::secure::SecureRound;
use super::{Control, Coordinator, Departure, FinishReason, Member, OpenRound, RoundRecord, State};
use crate::aggregate::WeightedSum;
use crate::error::ConfigError;
use crate::plan::FederationPlan;
use crate::secagg::messages::Index;
use crate::secagg::protocol::{ProtocolError, Stage};
use crate::secagg::server::{ServerSession, SessionState};
use crate::secagg::spec::MAX_ATTEMPTS;
use crate::strategy::{GlobalModel, ServerState};

/// Version of the state encoding; bumped on any incompatible change. Version 2 added the
/// operator's pause / stop requests (and the paused run); version 3 the members that left
/// (`Leave`), who was told the run finished, and why it finished. Older states still read
/// (as a run without them), while an older build refuses a newer state rather than silently
/// dropping a pause or sampling a lab that left.
pub const STATE_VERSION: u32 = 3;

/// The oldest state version [`Coordinator::restore`] reads.
pub const OLDEST_STATE_VERSION: u32 = 1;

/// Why a saved coordinator could not be restored. Each names the part that was wrong.
#[derive(Debug, Error)]
pub enum SnapshotError {
    #[error("the saved {part} is not readable: {message}")]
    Decode { part: &'static str, message: String },
    #[error(
        "the saved coordinator state has format version {got}; this build reads version {expected}"
    )]
    Version { got: u32, expected: u32 },
    #[error(
        "the saved run belongs to plan {saved}, but the configuration's plan is {configured}: refusing to resume it under another plan"
    )]
    PlanMismatch { saved: String, configured: String },
    #[error("the saved global adapter has hash {got}, but the saved state says {expected}")]
    GlobalMismatch { got: String, expected: String },
    #[error("the saved state is inconsistent: {0}")]
    Inconsistent(String),
    #[error("the plan is invalid: {0}")]
    Plan(#[from] ConfigError),
    #[error("the saved secure-aggregation attempt cannot be resumed: {0}")]
    Secure(#[from] ProtocolError),
}

/// What a restart did with the round that was open when the state was saved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Resumed {
    /// Still waiting for participants to join.
    Waiting,
    /// The run had finished.
    Finished,
    /// A plaintext round collects its updates again.
    RoundRestarted { round: u64 },
    /// A secure attempt that had not closed its masked-input stage starts over as
    /// `attempt` (the saved one + 1), with fresh keys.
    AttemptRestarted { round: u64, attempt: u32 },
    /// A secure attempt past its masked-input stage goes on where it was.
    AttemptResumed {
        round: u64,
        attempt: u32,
        stage: Stage,
    },
    /// The operator had paused the run after round `after_round`; it stays paused.
    Paused { after_round: u64 },
}

/// The running masked sum of the open secure attempt, once worth saving (its masked-input
/// stage has closed). Save it again whenever [`DurableSum::key`] changes.
#[derive(Debug, Clone, Copy)]
pub struct DurableSum<'a> {
    pub round: u64,
    pub attempt: u32,
    /// Inputs partly folded into `words` (streams broken at the stage's close whose
    /// retraction has not finished), with the words folded of each.
    pub partial: &'a BTreeMap<Index, usize>,
    pub words: &'a [u32],
}

impl DurableSum<'_> {
    /// Changes exactly when the saved sum would: a new attempt, or a finished retraction.
    pub fn key(&self) -> (u64, u32, usize) {
        (self.round, self.attempt, self.partial.len())
    }

    /// The words, little-endian.
    pub fn words_le(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.words.len() * 4);
        for w in self.words {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out
    }

    /// The partial-input map, encoded.
    pub fn encode_partial(&self) -> Vec<u8> {
        encode(self.partial)
    }
}

/// A saved sum read back (see [`DurableSum`]).
#[derive(Debug, Clone)]
pub struct SavedSum {
    pub round: u64,
    pub attempt: u32,
    /// [`DurableSum::encode_partial`].
    pub partial: Vec<u8>,
    /// [`DurableSum::words_le`].
    pub words_le: Vec<u8>,
}

/// The saved parts a coordinator is restored from.
#[derive(Debug)]
pub struct Saved<'a> {
    /// [`Coordinator::encode_state`].
    pub state: &'a [u8],
    /// [`Coordinator::encode_server_state`].
    pub server_state: &'a [u8],
    /// [`Coordinator::global`] when the state was saved.
    pub global: GlobalModel,
    /// [`Coordinator::history`] when the state was saved, oldest first.
    pub history: Vec<RoundRecord>,
    pub sum: Option<SavedSum>,
}

#[derive(Serialize, Deserialize)]
struct StateSnapshot {
    version: u32,
    plan_sha256: String,
    session: [u8; 32],
    global_hash: String,
    /// name → language.
    members: BTreeMap<String, String>,
    /// token → name.
    tokens: BTreeMap<String, String>,
    /// How many records the history must have.
    rounds_closed: u64,
    run: RunSnapshot,
    /// The operator's requests (absent from version 1 states: none).
    #[serde(default)]
    paused: bool,
    #[serde(default)]
    stop_requested: bool,
    /// Members that left, by name (absent before version 3: none).
    #[serde(default)]
    left: BTreeMap<String, Departure>,
    /// Members told the run finished (absent before version 3: none).
    #[serde(default)]
    told_finished: BTreeSet<String>,
    /// Why the run finished (absent before version 3: not recorded).
    #[serde(default)]
    finish_reason: Option<FinishReason>,
}

#[derive(Serialize, Deserialize)]
enum RunSnapshot {
    Waiting,
    Open(Box<OpenSnapshot>),
    Finished,
    Paused { after_round: u64 },
}

#[derive(Serialize, Deserialize)]
struct OpenSnapshot {
    round: u64,
    cohort: BTreeSet<String>,
    not_sampled: BTreeSet<String>,
    secure: Option<SecureSnapshot>,
}

#[derive(Serialize, Deserialize)]
struct SecureSnapshot {
    attempt: u32,
    stage: Stage,
    /// Present from the close of the masked-input stage on: the attempt is then resumed.
    session: Option<SessionState>,
}

fn encode<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::new();
    ciborium::into_writer(value, &mut out).expect("writing CBOR into memory cannot fail");
    out
}

fn decode<T: for<'de> Deserialize<'de>>(
    bytes: &[u8],
    part: &'static str,
) -> Result<T, SnapshotError> {
    ciborium::from_reader(bytes).map_err(|e| SnapshotError::Decode {
        part,
        message: e.to_string(),
    })
}

/// Whether an attempt in `stage` is resumed (rather than restarted) after a restart.
fn resumable(stage: Stage) -> bool {
    matches!(stage, Stage::ConsistencyCheck | Stage::Unmask)
}

impl Coordinator {
    /// The run's session id (bound into every secure-aggregation key and signature).
    pub fn session(&self) -> [u8; 32] {
        self.session
    }

    /// Rounds closed so far; the saved model changes exactly when this does.
    pub fn rounds_closed(&self) -> u64 {
        self.history.len() as u64
    }

    /// The small, frequently changing part of the coordinator (see the module docs).
    pub fn encode_state(&self) -> Vec<u8> {
        let run = match &self.state {
            State::Waiting => RunSnapshot::Waiting,
            State::Finished => RunSnapshot::Finished,
            State::Paused { after_round } => RunSnapshot::Paused {
                after_round: *after_round,
            },
            State::Open(open) => RunSnapshot::Open(Box::new(OpenSnapshot {
                round: open.round,
                cohort: open.cohort.clone(),
                not_sampled: open.not_sampled.clone(),
                secure: open.secure.as_ref().map(|sec| SecureSnapshot {
                    attempt: sec.attempt,
                    stage: sec.stage(),
                    session: resumable(sec.stage()).then(|| sec.server.state()),
                }),
            })),
        };
        encode(&StateSnapshot {
            version: STATE_VERSION,
            plan_sha256: self.plan.fingerprint(),
            session: self.session,
            global_hash: self.global_hash.clone(),
            members: self
                .members
                .iter()
                .map(|(n, m)| (n.clone(), m.language.clone()))
                .collect(),
            tokens: self.tokens.clone(),
            rounds_closed: self.rounds_closed(),
            run,
            paused: self.control.paused,
            stop_requested: self.control.stop_requested,
            left: self.left.clone(),
            told_finished: self.told_finished.clone(),
            finish_reason: self.finish_reason,
        })
    }

    /// The strategy's server state (optimizer moments), saved with the global adapter.
    pub fn encode_server_state(&self) -> Vec<u8> {
        encode(&self.server_state)
    }

    /// The open attempt's running masked sum, once its masked-input stage has closed.
    pub fn durable_sum(&self) -> Option<DurableSum<'_>> {
        let State::Open(open) = &self.state else {
            return None;
        };
        let sec = open.secure.as_ref()?;
        if !resumable(sec.stage()) {
            return None;
        }
        let (words, partial) = sec.server.sum();
        Some(DurableSum {
            round: open.round,
            attempt: sec.attempt,
            partial,
            words,
        })
    }

    /// A coordinator for `plan` restored from what an aggregator saved, at `now_ms` on the
    /// restarted process's clock; see the module docs for what becomes of the open round.
    /// Refuses a state saved under another plan, a global adapter that is not the one the
    /// state names, and a resumable attempt without its sum.
    pub fn restore(
        plan: FederationPlan,
        saved: Saved<'_>,
        now_ms: u64,
    ) -> Result<(Self, Resumed), SnapshotError> {
        let snap: StateSnapshot = decode(saved.state, "coordinator state")?;
        if !(OLDEST_STATE_VERSION..=STATE_VERSION).contains(&snap.version) {
            return Err(SnapshotError::Version {
                got: snap.version,
                expected: STATE_VERSION,
            });
        }
        let configured = plan.fingerprint();
        if snap.plan_sha256 != configured {
            return Err(SnapshotError::PlanMismatch {
                saved: snap.plan_sha256,
                configured,
            });
        }
        let server_state: ServerState = decode(saved.server_state, "server state")?;
        let got = saved.global.content_hash();
        if got != snap.global_hash {
            return Err(SnapshotError::GlobalMismatch {
                got,
                expected: snap.global_hash,
            });
        }
        let mut c = Coordinator::new(plan, snap.session)?;
        if saved.global.adapter.config() != c.global.adapter.config() {
            return Err(SnapshotError::Inconsistent(
                "the saved global adapter's LoRA configuration differs from the plan's".into(),
            ));
        }
        if saved.global.manifest() != c.global.manifest() {
            return Err(SnapshotError::Inconsistent(
                "the saved global model's layout (modules, shapes, dense corrections) differs \
                 from the plan's"
                    .into(),
            ));
        }
        c.global = saved.global;
        c.global_hash = snap.global_hash;
        c.server_state = server_state;
        c.layout = c.strategy.upload_layout(&c.global, &c.server_state);
        for (name, language) in snap.members {
            if !c.roster.is_empty() && c.roster.index_of(&name).is_none() {
                return Err(SnapshotError::Inconsistent(format!(
                    "member {name:?} is not on the plan's roster"
                )));
            }
            c.members.insert(name, Member { language });
        }
        if let Some(name) = snap.tokens.values().find(|n| !c.members.contains_key(*n)) {
            return Err(SnapshotError::Inconsistent(format!(
                "a token belongs to {name:?}, who is not a member"
            )));
        }
        c.tokens = snap.tokens;
        if let Some(name) = snap
            .left
            .keys()
            .chain(&snap.told_finished)
            .find(|n| !c.members.contains_key(*n))
        {
            return Err(SnapshotError::Inconsistent(format!(
                "{name:?} is recorded as having left or been told the run finished, but is not a member"
            )));
        }
        c.left = snap.left;
        c.told_finished = snap.told_finished;
        c.finish_reason = snap.finish_reason;
        if saved.history.len() as u64 != snap.rounds_closed
            || saved
                .history
                .iter()
                .enumerate()
                .any(|(i, r)| r.round != i as u64 + 1)
        {
            return Err(SnapshotError::Inconsistent(format!(
                "the state says {} rounds closed, the history holds rounds {:?}",
                snap.rounds_closed,
                saved.history.iter().map(|r| r.round).collect::<Vec<_>>()
            )));
        }
        if let Some(last) = saved.history.last()
            && last.adapter_hash != c.global_hash
        {
            return Err(SnapshotError::Inconsistent(format!(
                "round {} closed with adapter {}, but the saved global adapter is {}",
                last.round, last.adapter_hash, c.global_hash
            )));
        }
        c.history = saved.history;
        c.control = Control {
            paused: snap.paused,
            stop_requested: snap.stop_requested,
        };
        let resumed = match snap.run {
            RunSnapshot::Waiting => Resumed::Waiting,
            RunSnapshot::Finished => {
                c.state = State::Finished;
                Resumed::Finished
            }
            RunSnapshot::Paused { after_round } => {
                if !snap.paused || after_round != c.rounds_closed() {
                    return Err(SnapshotError::Inconsistent(format!(
                        "paused after round {after_round} with {} closed rounds (pause flag {})",
                        c.rounds_closed(),
                        snap.paused
                    )));
                }
                c.state = State::Paused { after_round };
                Resumed::Paused { after_round }
            }
            RunSnapshot::Open(open) => c.reopen(*open, saved.sum, now_ms)?,
        };
        Ok((c, resumed))
    }

    /// Reinstates the round that was open (see the module docs).
    fn reopen(
        &mut self,
        open: OpenSnapshot,
        sum: Option<SavedSum>,
        now_ms: u64,
    ) -> Result<Resumed, SnapshotError> {
        let round = open.round;
        if round != self.rounds_closed() + 1 {
            return Err(SnapshotError::Inconsistent(format!(
                "round {round} is open after {} closed rounds",
                self.rounds_closed()
            )));
        }
        if let Some(name) = open
            .cohort
            .iter()
            .chain(&open.not_sampled)
            .find(|n| !self.members.contains_key(*n))
        {
            return Err(SnapshotError::Inconsistent(format!(
                "round {round} names {name:?}, who is not a member"
            )));
        }
        let mut reopened = OpenRound {
            round,
            cohort: open.cohort,
            not_sampled: open.not_sampled,
            submitted: BTreeSet::new(),
            sum: WeightedSum::new(if self.secure() { 0 } else { self.layout.len() }),
            secure: None,
            deadline_ms: now_ms + self.plan.rounds.round_timeout_ms,
        };
        let resumed = match (open.secure, self.secure()) {
            (None, false) => Resumed::RoundRestarted { round },
            (None, true) | (Some(_), false) => {
                return Err(SnapshotError::Inconsistent(format!(
                    "round {round}'s secure-aggregation state does not match the plan's secure_aggregation.enabled"
                )));
            }
            (Some(sec), true) => match sec.session {
                None => {
                    let attempt = sec.attempt + 1;
                    if attempt >= MAX_ATTEMPTS {
                        return Err(SnapshotError::Inconsistent(format!(
                            "round {round} has used every secure-aggregation attempt"
                        )));
                    }
                    reopened.secure = Some(Box::new(self.secure_attempt(
                        round,
                        &reopened.cohort,
                        attempt,
                    )));
                    Resumed::AttemptRestarted { round, attempt }
                }
                Some(state) => {
                    let stage = state.stage;
                    let secure = self.resume_attempt(
                        round,
                        sec.attempt,
                        &reopened.cohort,
                        &state,
                        sum,
                        now_ms,
                    )?;
                    reopened.secure = Some(Box::new(secure));
                    Resumed::AttemptResumed {
                        round,
                        attempt: sec.attempt,
                        stage,
                    }
                }
            },
        };
        self.state = State::Open(reopened);
        Ok(resumed)
    }

    /// The saved attempt past its masked-input stage, with its sum.
    fn resume_attempt(
        &self,
        round: u64,
        attempt: u32,
        cohort: &BTreeSet<String>,
        state: &SessionState,
        sum: Option<SavedSum>,
        now_ms: u64,
    ) -> Result<SecureRound, SnapshotError> {
        let sum = sum.ok_or_else(|| {
            SnapshotError::Inconsistent(format!(
                "attempt {attempt} of round {round} is past its masked input, but its running sum was not saved"
            ))
        })?;
        if (sum.round, sum.attempt) != (round, attempt) {
            return Err(SnapshotError::Inconsistent(format!(
                "the saved sum is attempt {} of round {}, the open attempt is {attempt} of round {round}",
                sum.attempt, sum.round
            )));
        }
        if sum.words_le.len() % 4 != 0 {
            return Err(SnapshotError::Inconsistent(format!(
                "the saved sum has {} bytes, not a whole number of words",
                sum.words_le.len()
            )));
        }
        let words = sum
            .words_le
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        let partial: BTreeMap<Index, usize> = decode(&sum.partial, "partial-input map")?;
        let (cfg, encoding, indices) = self.secure_parts(round, cohort, attempt);
        let server = ServerSession::resume(cfg, self.roster.identities(), state, words, partial)?;
        let mut secure = SecureRound::resume(
            server,
            encoding,
            indices,
            attempt,
            now_ms + self.plan.secure_aggregation.stage_timeout_ms,
        );
        // Members that left during the attempt stay dropped from it.
        for index in cohort
            .iter()
            .filter(|n| self.left.contains_key(*n))
            .filter_map(|n| self.roster.index_of(n))
        {
            secure.depart(index);
        }
        Ok(secure)
    }
}
