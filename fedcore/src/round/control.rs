//! The operator's pause, resume and stop of a running federation (issue #6).
//!
//! These are pure state changes of the [`Coordinator`]; the aggregator feeds them from its
//! state database (`fedaggregator pause|resume|stop`), commits the result and tells
//! participants through their next task. None of them cuts a round short: a round in
//! progress (a secure attempt included) always finishes normally, so no lab's training is
//! wasted and no secure attempt is abandoned after shares went out.
//!
//! - **Pause** takes effect at the next round boundary: the open round closes as usual,
//!   then no new round opens ([`Stage::Paused`]) and participants are told to wait because
//!   the operator paused the federation ([`WaitReason::Paused`]). Paused before the first
//!   round, the first round does not open when enough participants have joined.
//! - **Resume** lifts a pause: the next round opens at once (if none is open and enough
//!   participants have joined); a pause that had not taken effect yet is simply cancelled.
//! - **Stop** ends the run early with the current global adapter as the final one: at once
//!   when no round is open (waiting, or paused), otherwise when the open round closes. The
//!   run is then finished with `rounds_completed` = the rounds actually closed.

use thiserror::Error;

use super::{Coordinator, Event, Stage, State};

/// An operator command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Pause,
    Resume,
    Stop,
}

impl Command {
    /// The command's name as the operator types it and the state database stores it.
    pub fn name(self) -> &'static str {
        match self {
            Command::Pause => "pause",
            Command::Resume => "resume",
            Command::Stop => "stop",
        }
    }

    /// The command named `name` (see [`Command::name`]).
    pub fn from_name(name: &str) -> Option<Self> {
        [Command::Pause, Command::Resume, Command::Stop]
            .into_iter()
            .find(|c| c.name() == name)
    }
}

/// The operator's standing requests, kept in the coordinator's saved state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Control {
    /// No new round opens while set (the open one, if any, finishes first).
    pub paused: bool,
    /// The run finishes when the open round closes.
    pub stop_requested: bool,
}

/// Why an operator command was refused. Each names the state the run is in.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ControlError {
    #[error("the run is already finished (after {rounds} rounds); there is nothing to {command}")]
    Finished { command: &'static str, rounds: u64 },
    #[error("the run is already paused{}", pending(*.round_open))]
    AlreadyPaused { round_open: Option<u64> },
    #[error("the run is not paused (it is {state}); there is nothing to resume")]
    NotPaused { state: String },
    #[error("a stop is already requested: the run finishes when round {round} closes")]
    AlreadyStopping { round: u64 },
    #[error(
        "a stop is requested: the run finishes when round {round} closes, so it cannot be {command}d"
    )]
    Stopping { command: &'static str, round: u64 },
}

fn pending(round_open: Option<u64>) -> String {
    match round_open {
        Some(round) => format!(": no new round opens once round {round} closes"),
        None => String::new(),
    }
}

/// What an applied command did.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    /// What the operator is told, e.g. "paused: round 3 finishes, then no new round opens".
    pub message: String,
    pub events: Vec<Event>,
}

impl Coordinator {
    /// The operator's standing requests.
    pub fn control(&self) -> Control {
        self.control
    }

    /// Applies an operator command at `now_ms`; a refused command changes nothing.
    pub fn command(&mut self, command: Command, now_ms: u64) -> Result<Applied, ControlError> {
        match command {
            Command::Pause => self.pause(),
            Command::Resume => self.resume(now_ms),
            Command::Stop => self.stop(),
        }
    }

    /// Pauses the run at the next round boundary (see the module docs).
    pub fn pause(&mut self) -> Result<Applied, ControlError> {
        self.check_not_finished("pause")?;
        let open = self.open_round_number();
        if self.control.paused {
            return Err(ControlError::AlreadyPaused { round_open: open });
        }
        if self.control.stop_requested {
            return Err(ControlError::Stopping {
                command: "pause",
                round: open.unwrap_or(0),
            });
        }
        self.control.paused = true;
        let message = match (&self.state, open) {
            (_, Some(round)) => {
                format!("paused: round {round} finishes, then no new round opens until resumed")
            }
            (State::Waiting, None) => {
                "paused: the first round does not open until resumed".to_string()
            }
            _ => "paused".to_string(),
        };
        Ok(Applied {
            message,
            events: Vec::new(),
        })
    }

    /// Lifts a pause: the next round opens now if it can (see the module docs).
    pub fn resume(&mut self, now_ms: u64) -> Result<Applied, ControlError> {
        self.check_not_finished("resume")?;
        if !self.control.paused {
            return Err(ControlError::NotPaused {
                state: self.describe_state(),
            });
        }
        self.control.paused = false;
        let mut events = Vec::new();
        let message = match &self.state {
            State::Open(open) => format!(
                "resumed: the pause had not taken effect; round {} goes on and the next opens after it",
                open.round
            ),
            State::Paused { after_round } => {
                let next = after_round + 1;
                events.push(self.next_round(next, now_ms));
                format!("resumed: round {next} opened")
            }
            State::Waiting if self.present() >= self.plan.rounds.participants => {
                events.push(self.next_round(1, now_ms));
                "resumed: round 1 opened".to_string()
            }
            State::Waiting => format!(
                "resumed: round 1 opens when {} participants have joined ({} so far)",
                self.plan.rounds.participants,
                self.present()
            ),
            State::Finished => unreachable!("checked above"),
        };
        // Departures can have left too few labs for the round that was to open.
        let message = match self.finish_reason() {
            Some(reason) => format!("resumed, but the run finished instead: {reason}"),
            None => message,
        };
        Ok(Applied { message, events })
    }

    /// Stops the run: now if no round is open, else when the open round closes.
    pub fn stop(&mut self) -> Result<Applied, ControlError> {
        self.check_not_finished("stop")?;
        if let Some(round) = self.open_round_number() {
            if self.control.stop_requested {
                return Err(ControlError::AlreadyStopping { round });
            }
            self.control.stop_requested = true;
            return Ok(Applied {
                message: format!(
                    "stopping: the run finishes when round {round} closes, with its adapter as the final one"
                ),
                events: Vec::new(),
            });
        }
        let rounds = self.rounds_closed();
        let event = self.finish(super::FinishReason::Stopped);
        Ok(Applied {
            message: format!(
                "stopped: the run is finished after {rounds} of {} rounds; the final adapter is round {rounds}'s",
                self.plan.rounds.rounds
            ),
            events: vec![event],
        })
    }

    /// After a round closed: whether the operator's requests keep the next round from
    /// opening, and the events of that. `None`: open the next round as usual.
    pub(super) fn hold_after(&mut self, round: u64) -> Option<Event> {
        if self.control.stop_requested {
            debug_assert_eq!(round, self.rounds_closed());
            return Some(self.finish(super::FinishReason::Stopped));
        }
        if self.control.paused {
            self.state = State::Paused { after_round: round };
            return Some(Event::Paused { after_round: round });
        }
        None
    }

    fn check_not_finished(&self, command: &'static str) -> Result<(), ControlError> {
        if matches!(self.state, State::Finished) {
            return Err(ControlError::Finished {
                command,
                rounds: self.rounds_closed(),
            });
        }
        Ok(())
    }

    fn open_round_number(&self) -> Option<u64> {
        match &self.state {
            State::Open(open) => Some(open.round),
            _ => None,
        }
    }

    /// The run's state in words, for refusals.
    fn describe_state(&self) -> String {
        match (&self.state, self.status().stage) {
            (State::Open(open), _) => format!("running round {}", open.round),
            (_, Stage::WaitingForParticipants) => "waiting for participants".to_string(),
            (_, stage) => format!("{stage:?}").to_lowercase(),
        }
    }
}
