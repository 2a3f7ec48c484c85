//! A lab leaving the federation (`Leave`), and why a run finished.
//!
//! A lab whose own policy allows no more rounds (`[policy] max_rounds`) says so instead of
//! falling silent, so the rounds after it do not wait for it until their deadline and the
//! records say it left rather than that it dropped. The rules:
//!
//! - **A lab that left is never sampled again.** Each round's cohort is drawn
//!   (`strategy.sampling`, deterministically) from the members still present.
//! - **The open round stops waiting for it.** If it is in the open round's cohort and has
//!   not submitted, the round closes as soon as everyone else in the cohort has (not at the
//!   deadline). An update it handed in before leaving stays in the round.
//! - **Under secure aggregation a departure is a dropout of the stage under way.** The
//!   participant runtime leaves only between rounds (before advertising keys), but a
//!   `Leave` that arrives while an attempt runs with the lab in it is treated exactly as if
//!   it had missed the stage: the stage closes without it, and the attempt goes on or fails
//!   by the protocol's own rules. Nothing is restarted because of it, so the one-unmasking
//!   rule holds.
//! - **Too few left: the run finishes with a reason.** Once anyone has left, a run whose
//!   present members are fewer than `rounds.min_updates` (or, securely aggregated, the
//!   protocol's quorum) finishes at once with [`FinishReason::TooFewMembers`], as does an
//!   open round that can no longer reach its quorum and a roster federation waiting for
//!   its first round that can no longer gather `rounds.participants`. The final adapter is
//!   the last closed round's.
//! - **Leaving is final for the run.** A lab that left and joins again is refused
//!   ([`RoundError::Left`]): the records, the remaining labs' cohorts and a finish for too
//!   few members all rest on it staying away. To take part again it joins the next run.
//!   A repeated `Leave` (a retried call) answers with what was recorded the first time.
//! - **Who was told the run finished** is part of the coordinator's state, so a restarted
//!   aggregator still knows whether every member has been told ([`Coordinator::everyone_told`]);
//!   a member that left needs no telling.

use std::fmt;

use serde::{Deserialize, Serialize};

use super::{Control, Coordinator, Event, RoundError, State};
use crate::secagg::protocol::{MIN_PEERS_FLOOR, Stage as SecureStage};

/// Why a lab left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LeaveReason {
    /// Its own policy (`[policy] max_rounds`) allows no more rounds.
    MaxRounds,
    /// The lab's operator asked it to leave.
    OperatorRequest,
    /// Another round would take it past its privacy budget (`[policy] max_epsilon`).
    PrivacyBudget,
    /// It gave no reason.
    Unspecified,
}

impl LeaveReason {
    /// The reason in words, for logs, records and the status page.
    pub fn describe(self) -> &'static str {
        match self {
            LeaveReason::MaxRounds => "its max_rounds policy was reached",
            LeaveReason::OperatorRequest => "its operator asked it to leave",
            LeaveReason::PrivacyBudget => "another round would exceed its privacy budget",
            LeaveReason::Unspecified => "no reason given",
        }
    }
}

/// What the coordinator recorded about a lab that left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Departure {
    pub reason: LeaveReason,
    /// Rounds closed when it left.
    pub after_round: u64,
}

impl fmt::Display for Departure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "left after round {} ({})",
            self.after_round,
            self.reason.describe()
        )
    }
}

/// Why the run finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum FinishReason {
    /// Every round of the plan closed.
    Completed,
    /// The operator stopped it (`fedaggregator stop`).
    Stopped,
    /// Round `round` used up its secure-aggregation attempts.
    AttemptsExhausted { round: u64 },
    /// Labs left until `remaining` could take part, fewer than the `needed` the plan asks
    /// for (`rounds.min_updates`, the secure-aggregation quorum, or `rounds.participants`
    /// before the first round).
    TooFewMembers { remaining: usize, needed: usize },
}

impl fmt::Display for FinishReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FinishReason::Completed => write!(f, "every round of the plan closed"),
            FinishReason::Stopped => write!(f, "the operator stopped the run"),
            FinishReason::AttemptsExhausted { round } => {
                write!(f, "round {round} used up its secure-aggregation attempts")
            }
            FinishReason::TooFewMembers { remaining, needed } => write!(
                f,
                "too few labs remain after departures: {remaining} can take part, the plan needs {needed}"
            ),
        }
    }
}

impl Coordinator {
    /// The member holding `token` leaves the federation at `now_ms` (see the module docs).
    /// Returns what was recorded (the first record again for a repeated call) and the
    /// events of the departure: the open round closing early, or the run finishing.
    pub fn leave(
        &mut self,
        token: &str,
        reason: LeaveReason,
        now_ms: u64,
    ) -> Result<(Departure, Vec<Event>), RoundError> {
        let name = self.name_of(token)?.to_string();
        if let Some(departure) = self.left.get(&name) {
            return Ok((*departure, Vec::new()));
        }
        let departure = Departure {
            reason,
            after_round: self.rounds_closed(),
        };
        self.left.insert(name.clone(), departure);
        let events = self.after_departure(&name, now_ms)?;
        Ok((departure, events))
    }

    /// Whether the run is finished.
    pub fn finished(&self) -> bool {
        matches!(self.state, State::Finished)
    }

    /// Members that left, by name.
    pub fn departures(&self) -> &std::collections::BTreeMap<String, Departure> {
        &self.left
    }

    /// Why the run finished (none while it runs; none either for a run finished by a build
    /// that did not record reasons).
    pub fn finish_reason(&self) -> Option<FinishReason> {
        self.finish_reason
    }

    /// Records that the member holding `token` is being told the run is finished; true
    /// when that is new (the caller then commits the state before answering).
    pub fn mark_told_finished(&mut self, token: &str) -> bool {
        if !matches!(self.state, State::Finished) {
            return false;
        }
        match self.tokens.get(token) {
            Some(name) if !self.left.contains_key(name) => self.told_finished.insert(name.clone()),
            _ => false,
        }
    }

    /// True once the run is finished and every member that did not leave has been told so.
    pub fn everyone_told(&self) -> bool {
        matches!(self.state, State::Finished)
            && self
                .members
                .keys()
                .all(|n| self.told_finished.contains(n) || self.left.contains_key(n))
    }

    /// Members that have not left.
    pub(super) fn present(&self) -> usize {
        self.members.len() - self.left.len()
    }

    /// The fewest members a round needs once someone has left: `rounds.min_updates`, and
    /// with secure aggregation the protocol's quorum.
    pub(super) fn members_needed(&self) -> usize {
        let needed = self.plan.rounds.min_updates;
        if self.secure() {
            needed.max(self.secure_quorum())
        } else {
            needed
        }
    }

    /// The fewest labs a secure-aggregation attempt can finish with (the protocol's
    /// quorum: the threshold, never fewer than three).
    pub(super) fn secure_quorum(&self) -> usize {
        self.plan
            .secure_aggregation
            .threshold_for(self.roster.len())
            .max(MIN_PEERS_FLOOR)
    }

    /// Opens round `round`, unless departures left too few members for it: then the run
    /// finishes instead.
    pub(super) fn next_round(&mut self, round: u64, now_ms: u64) -> Event {
        let (present, needed) = (self.present(), self.members_needed());
        if !self.left.is_empty() && present < needed {
            return self.finish(FinishReason::TooFewMembers {
                remaining: present,
                needed,
            });
        }
        self.open_round(round, now_ms)
    }

    /// Ends the run now with `reason`; the final adapter is the last closed round's.
    pub(super) fn finish(&mut self, reason: FinishReason) -> Event {
        self.state = State::Finished;
        self.control = Control::default();
        self.finish_reason = Some(reason);
        Event::RunFinished {
            rounds: self.rounds_closed(),
        }
    }

    /// What member `name`'s departure does to the run (see the module docs).
    fn after_departure(&mut self, name: &str, now_ms: u64) -> Result<Vec<Event>, RoundError> {
        let too_few =
            (self.present() < self.members_needed()).then(|| FinishReason::TooFewMembers {
                remaining: self.present(),
                needed: self.members_needed(),
            });
        let min_updates = self.plan.rounds.min_updates;
        let index = self.roster.index_of(name);
        let open = match &mut self.state {
            State::Finished => return Ok(Vec::new()),
            State::Waiting => {
                let possible = self.roster.len().saturating_sub(self.left.len());
                let needed = self.plan.rounds.participants;
                if !self.roster.is_empty() && possible < needed {
                    return Ok(vec![self.finish(FinishReason::TooFewMembers {
                        remaining: possible,
                        needed,
                    })]);
                }
                return Ok(Vec::new());
            }
            State::Paused { .. } => {
                return Ok(too_few.map(|r| vec![self.finish(r)]).unwrap_or_default());
            }
            State::Open(open) => open,
        };
        if !open.cohort.contains(name) || open.submitted.contains(name) {
            // Not awaited by the open round; it closes as it would have, and whether the
            // next one opens is decided then.
            return Ok(Vec::new());
        }
        let needed = min_updates.min(open.cohort.len());
        let Some(sec) = open.secure.as_mut() else {
            let awaited = open
                .cohort
                .iter()
                .filter(|n| !open.submitted.contains(*n) && !self.left.contains_key(*n))
                .count();
            let reachable = open.submitted.len() + awaited;
            if reachable < needed {
                return Ok(vec![self.finish(FinishReason::TooFewMembers {
                    remaining: reachable,
                    needed,
                })]);
            }
            if awaited == 0 {
                return self.close_round(now_ms);
            }
            return Ok(Vec::new());
        };
        if let Some(index) = index {
            sec.depart(index);
        }
        if sec.stage() == SecureStage::AdvertiseKeys {
            let needed = needed.max(sec.server.config().quorum());
            let reachable = sec.advertised() + sec.awaited();
            if reachable < needed {
                return Ok(vec![self.finish(FinishReason::TooFewMembers {
                    remaining: reachable,
                    needed,
                })]);
            }
        }
        Ok(self.drive_secure(now_ms, false))
    }
}
