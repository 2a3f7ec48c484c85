//! The round coordinator: a sans-IO state machine the aggregator drives.
//!
//! The caller feeds it joins, submissions and the passing of time (`now_ms`, from any
//! monotonic clock) and acts on the [`Event`]s it returns (persist the new global adapter,
//! wake waiting participants). It holds no socket, no clock and no thread, so every schedule
//! of arrivals, duplicates, stale rounds and timeouts can be replayed exactly in a test.
//!
//! Lifecycle: wait until `rounds.participants` have joined; then for each round hand the
//! global adapter to the round's cohort (everyone who had joined when it opened), fold each
//! valid update into a running weighted sum, and close the round when the whole cohort has
//! submitted, or when the deadline passes with at least `rounds.min_updates` updates
//! (stragglers count as dropped for that round). A deadline that passes with too few updates
//! extends the round and keeps what was received.

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::adapter::LoraAdapter;
use crate::aggregate::{AggregateError, MAX_SAMPLE_WEIGHT, WeightedSum, ffa_fedavg};
use crate::error::ConfigError;
use crate::manifest::LayoutManifest;
use crate::plan::FederationPlan;
use crate::update::{SubmittedUpdate, UpdateError, UpdatePayload, decode_plaintext};

/// Why the coordinator refused a request. Each variant names what was wrong.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum RoundError {
    #[error("unknown participant id {0:?}: join the federation first")]
    UnknownParticipant(String),
    #[error("participant name must be 1 to 64 letters, digits, '-', '_' or '.', got {0:?}")]
    BadName(String),
    #[error("the run is finished; no round accepts updates")]
    RunFinished,
    #[error("no round is open yet: waiting for participants to join")]
    NoRoundOpen,
    #[error("update is for round {got}, which is closed; the current round is {current}")]
    StaleRound { got: u64, current: u64 },
    #[error("update is for round {got}, which has not started; the current round is {current}")]
    FutureRound { got: u64, current: u64 },
    #[error("participant {name} joined after round {round} opened and is not part of it")]
    NotInCohort { name: String, round: u64 },
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
    /// The last round closed.
    RunFinished { rounds: u64 },
}

/// The outcome of one closed round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundRecord {
    pub round: u64,
    /// Names of the participants whose updates were aggregated, sorted.
    pub contributors: Vec<String>,
    /// Cohort members that had not submitted when the round closed, sorted.
    pub dropped: Vec<String>,
    /// `Σ n_i` over the contributors.
    pub total_samples: u64,
    /// Content hash of the new global adapter.
    pub adapter_hash: String,
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
}

/// What a participant should do now.
#[derive(Debug, Clone, PartialEq)]
pub enum Task<'a> {
    Wait(WaitReason),
    Train {
        round: u64,
        global: &'a LoraAdapter,
        global_hash: &'a str,
        deadline_ms: u64,
    },
    Finished {
        rounds: u64,
        global: &'a LoraAdapter,
        global_hash: &'a str,
    },
}

/// Where the run stands.
#[derive(Debug, Clone, PartialEq)]
pub enum Stage {
    WaitingForParticipants,
    Training,
    Finished,
}

/// A snapshot for status displays.
#[derive(Debug, Clone, PartialEq)]
pub struct Status {
    pub stage: Stage,
    /// Open round, or the last closed one when finished, or 0 before the first.
    pub round: u64,
    pub rounds_total: u64,
    pub participants_joined: usize,
    pub participants_needed: usize,
    pub cohort_size: usize,
    pub updates_received: usize,
    pub global_hash: String,
    pub history: Vec<RoundRecord>,
}

#[derive(Debug, Clone)]
struct Member {
    language: String,
}

#[derive(Debug, Clone)]
struct OpenRound {
    round: u64,
    cohort: BTreeSet<String>,
    submitted: BTreeSet<String>,
    sum: WeightedSum,
    deadline_ms: u64,
}

#[derive(Debug, Clone)]
enum State {
    Waiting,
    Open(OpenRound),
    Finished,
}

/// The aggregator's round state machine (see the module docs).
#[derive(Debug, Clone)]
pub struct Coordinator {
    plan: FederationPlan,
    upload_manifest: LayoutManifest,
    global: LoraAdapter,
    global_hash: String,
    /// name → member.
    members: BTreeMap<String, Member>,
    /// secret token → name.
    tokens: BTreeMap<String, String>,
    state: State,
    history: Vec<RoundRecord>,
}

impl Coordinator {
    /// A coordinator for a validated plan, starting from the plan's initial adapter.
    pub fn new(plan: FederationPlan) -> Result<Self, ConfigError> {
        plan.validate()?;
        let global = plan.initial_adapter();
        let upload_manifest = global.b_manifest();
        let global_hash = global.content_hash();
        Ok(Coordinator {
            plan,
            upload_manifest,
            global,
            global_hash,
            members: BTreeMap::new(),
            tokens: BTreeMap::new(),
            state: State::Waiting,
            history: Vec::new(),
        })
    }

    pub fn plan(&self) -> &FederationPlan {
        &self.plan
    }

    /// The current global adapter.
    pub fn global(&self) -> &LoraAdapter {
        &self.global
    }

    /// Content hash of the current global adapter.
    pub fn global_hash(&self) -> &str {
        &self.global_hash
    }

    /// The B-only layout every update must use.
    pub fn upload_manifest(&self) -> &LayoutManifest {
        &self.upload_manifest
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
            State::Open(open) => Some(open.deadline_ms),
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
            return Err(RoundError::BadName(name.to_string()));
        }
        if matches!(self.state, State::Finished) {
            return Err(RoundError::RunFinished);
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
            && self.members.len() >= self.plan.rounds.participants
        {
            events.push(self.open_round(1, now_ms));
        }
        Ok(events)
    }

    /// What the participant holding `token` should do now.
    pub fn task(&self, token: &str) -> Result<Task<'_>, RoundError> {
        let name = self.name_of(token)?;
        Ok(match &self.state {
            State::Waiting => Task::Wait(WaitReason::Participants {
                joined: self.members.len(),
                needed: self.plan.rounds.participants,
            }),
            State::Finished => Task::Finished {
                rounds: self.plan.rounds.rounds,
                global: &self.global,
                global_hash: &self.global_hash,
            },
            State::Open(open) if !open.cohort.contains(name) => {
                Task::Wait(WaitReason::NextRound { round: open.round })
            }
            State::Open(open) if open.submitted.contains(name) => {
                Task::Wait(WaitReason::Submitted { round: open.round })
            }
            State::Open(open) => Task::Train {
                round: open.round,
                global: &self.global,
                global_hash: &self.global_hash,
                deadline_ms: open.deadline_ms,
            },
        })
    }

    /// Checks an update and folds it into the open round; closes the round when the whole
    /// cohort has submitted. A refused update changes nothing.
    pub fn submit(
        &mut self,
        token: &str,
        update: &SubmittedUpdate,
        now_ms: u64,
    ) -> Result<Vec<Event>, RoundError> {
        let name = self.name_of(token)?.to_string();
        let open = match &mut self.state {
            State::Waiting => return Err(RoundError::NoRoundOpen),
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
        let expected_layout = self.upload_manifest.hash_hex();
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
            UpdatePayload::Plaintext(bytes) => decode_plaintext(bytes, &self.upload_manifest)?,
        };
        open.sum.add(update.num_samples, &values)?;
        open.submitted.insert(name);
        if open.submitted.len() == open.cohort.len() {
            return self.close_round(now_ms);
        }
        Ok(Vec::new())
    }

    /// Lets time pass: closes or extends a round whose deadline is reached.
    pub fn tick(&mut self, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let State::Open(open) = &mut self.state else {
            return Ok(Vec::new());
        };
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
    pub fn status(&self) -> Status {
        let last_closed = self.history.last().map_or(0, |r| r.round);
        let (stage, round, cohort_size, updates_received) = match &self.state {
            State::Waiting => (Stage::WaitingForParticipants, 0, 0, 0),
            State::Open(o) => (Stage::Training, o.round, o.cohort.len(), o.submitted.len()),
            State::Finished => (Stage::Finished, last_closed, 0, 0),
        };
        Status {
            stage,
            round,
            rounds_total: self.plan.rounds.rounds,
            participants_joined: self.members.len(),
            participants_needed: self.plan.rounds.participants,
            cohort_size,
            updates_received,
            global_hash: self.global_hash.clone(),
            history: self.history.clone(),
        }
    }

    fn name_of(&self, token: &str) -> Result<&str, RoundError> {
        self.tokens
            .get(token)
            .map(String::as_str)
            .ok_or_else(|| RoundError::UnknownParticipant(token.to_string()))
    }

    fn open_round(&mut self, round: u64, now_ms: u64) -> Event {
        let cohort: BTreeSet<String> = self.members.keys().cloned().collect();
        let deadline_ms = now_ms + self.plan.rounds.round_timeout_ms;
        let event = Event::RoundStarted {
            round,
            cohort: cohort.iter().cloned().collect(),
            deadline_ms,
        };
        self.state = State::Open(OpenRound {
            round,
            cohort,
            submitted: BTreeSet::new(),
            sum: WeightedSum::new(self.upload_manifest.len()),
            deadline_ms,
        });
        event
    }

    fn close_round(&mut self, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let State::Open(open) = &self.state else {
            return Ok(Vec::new());
        };
        let next = ffa_fedavg(&self.global, &self.upload_manifest, &open.sum)?;
        let record = RoundRecord {
            round: open.round,
            contributors: open.submitted.iter().cloned().collect(),
            dropped: open.cohort.difference(&open.submitted).cloned().collect(),
            total_samples: open.sum.total_weight(),
            adapter_hash: next.content_hash(),
        };
        let round = open.round;
        self.global_hash = record.adapter_hash.clone();
        self.global = next;
        self.history.push(record.clone());
        let mut events = vec![Event::RoundCompleted(record)];
        if round >= self.plan.rounds.rounds {
            self.state = State::Finished;
            events.push(Event::RunFinished { rounds: round });
        } else {
            events.push(self.open_round(round + 1, now_ms));
        }
        Ok(events)
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::{LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
    use crate::update::encode_f32_le;

    fn plan(participants: usize, min_updates: usize, rounds: u64) -> FederationPlan {
        FederationPlan {
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
        let mut c = Coordinator::new(plan(participants, min, rounds)).unwrap();
        for i in 0..participants {
            c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
        }
        c
    }

    #[test]
    fn first_round_opens_when_enough_participants_joined() {
        let mut c = Coordinator::new(plan(2, 1, 1)).unwrap();
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
        let b = c.global().flatten(c.upload_manifest()).unwrap();
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
        let b = c.global().flatten(c.upload_manifest()).unwrap();
        assert!(b.iter().all(|v| *v == 2.0));
        assert_eq!(
            c.submit("t0", &update(&c, 1, 1.0, 1), 0),
            Err(RoundError::RunFinished)
        );
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
    }
}
