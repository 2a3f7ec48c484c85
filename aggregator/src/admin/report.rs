//! The status snapshot `/api/status` serves (JSON), the page renders and
//! `fedaggregator status` prints. One type for all three, so they never disagree.

use serde::{Deserialize, Serialize};

/// Where the federation stands, as the operator sees it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StatusReport {
    pub federation: String,
    /// The plan fingerprint labs pin (`fedclient join --plan-sha256`).
    pub plan_sha256: String,
    pub secure_aggregation: bool,
    /// Seconds since the aggregator started.
    pub uptime_s: f64,
    /// When it started, seconds since the Unix epoch (UTC).
    pub started_unix_s: u64,
    /// `waiting_for_participants`, `training`, `paused` or `finished`.
    pub stage: String,
    /// The operator paused the run (`fedaggregator pause`); while a round is still open
    /// the pause takes effect when it closes.
    #[serde(default)]
    pub paused: bool,
    /// The operator stopped the run (`fedaggregator stop`): it finishes when the open
    /// round closes.
    #[serde(default)]
    pub stop_requested: bool,
    /// The open round, or the last closed one when finished, or 0 before the first.
    pub round: u64,
    pub rounds_total: u64,
    /// The open round's secure-aggregation stage and attempt, if any.
    pub secure_stage: Option<String>,
    pub secure_attempt: Option<u32>,
    pub participants_needed: usize,
    /// Members that left the federation (`Leave`), from the run's saved state: still
    /// counted after a restart, when `participants` (this process's record) starts empty.
    #[serde(default)]
    pub participants_left: usize,
    pub cohort_size: usize,
    pub updates_received: usize,
    pub global_adapter_sha256: String,
    pub participants: Vec<ParticipantStatus>,
    /// Closed rounds, oldest first.
    pub rounds: Vec<RoundRow>,
    /// gRPC traffic per method.
    pub traffic: Vec<RpcTraffic>,
    /// How long each stage of a round took.
    pub stage_timings: Vec<StageTiming>,
    pub secure_attempts_failed: u64,
    /// Cohort members dropped from closed rounds, summed over rounds.
    pub participants_dropped: u64,
    /// Held-out loss per language and round, from the labs that opted in.
    pub loss_curves: Vec<LossCurve>,
}

/// One joined participant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParticipantStatus {
    pub name: String,
    pub language: String,
    /// Seconds after the aggregator's start at which it (last) joined.
    pub joined_at_s: f64,
    /// Seconds since its last call.
    pub last_seen_s_ago: f64,
    /// It called within the last [`super::telemetry::CONNECTED_WINDOW_MS`].
    pub connected: bool,
    /// Closed rounds its update was aggregated into.
    pub rounds_contributed: u64,
    /// Rounds it reported held-out losses for (its policy allows it).
    pub metric_reports: u64,
    /// Set once it left the federation (`Leave`): when and why, e.g. "left after round 1
    /// (its max_rounds policy was reached)". Absent from older reports.
    #[serde(default)]
    pub left: Option<String>,
    /// Where its rounds' time went by its own clock, when its policy shares
    /// `round_timing`. Absent from older reports.
    #[serde(default)]
    pub round_timing: Option<LabRoundTimes>,
}

/// A lab's reported round timings (`share_metrics = ["round_timing"]`): the mean over the
/// rounds it reported, and its latest round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabRoundTimes {
    /// Rounds it reported timing for.
    pub rounds: u64,
    pub mean_wall_s: f64,
    /// Mean seconds per round in each phase it reported (`train`, `evaluate`, `download`,
    /// `secure`, `upload`, `wait`).
    pub mean_phases: Vec<PhaseSpan>,
    pub last_round: u64,
    pub last_wall_s: f64,
}

/// Seconds in one phase of a lab's round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSpan {
    pub phase: String,
    pub seconds: f64,
}

/// One closed round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RoundRow {
    pub round: u64,
    pub contributors: Vec<String>,
    pub dropped: Vec<String>,
    /// Cohort members that left the federation during the round (not in `dropped`).
    #[serde(default)]
    pub left: Vec<String>,
    pub total_samples: u64,
    /// The secure-aggregation attempt that succeeded (None without secure aggregation).
    pub secure_attempt: Option<u32>,
    /// Largest per-value error quantisation can have put into the mean update.
    pub quantisation_bound: Option<f64>,
    /// Under `[plan.privacy]`: ε of this round's noised sum, and the most any of its
    /// contributors has spent in the run so far.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_round: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub epsilon_spent: Option<f64>,
    /// From the round's opening to its close.
    pub duration_s: f64,
    pub adapter_sha256: String,
    /// The round's stages in the order they closed; their seconds add up to `duration_s`.
    /// Empty when this process did not see the round open (it resumed the round after a
    /// restart).
    #[serde(default)]
    pub stages: Vec<StageSpan>,
}

/// One stage of one round as the center saw it: from the previous stage's close (or the
/// round's opening) to this one's. Under secure aggregation the first stage,
/// `advertise_keys`, lasts while the cohort trains (labs advertise once trained);
/// `failed_attempt` is the time an attempt ran before it failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageSpan {
    pub stage: String,
    /// The secure-aggregation attempt (None without secure aggregation).
    pub attempt: Option<u32>,
    pub seconds: f64,
}

/// Bytes of gRPC message bodies (with gRPC's 5-byte framing, without HTTP/2 or TLS overhead).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RpcTraffic {
    pub rpc: String,
    pub calls: u64,
    pub received_bytes: u64,
    pub sent_bytes: u64,
}

/// Durations of one stage over all rounds and attempts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageTiming {
    pub stage: String,
    pub count: u64,
    pub mean_s: f64,
    pub max_s: f64,
    pub last_s: f64,
}

/// One language's held-out loss over rounds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossCurve {
    pub language: String,
    pub points: Vec<LossPoint>,
}

/// Token-weighted mean over the labs of one language that reported for a round.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LossPoint {
    pub round: u64,
    /// Loss of the model the labs started the round from (the global after the previous
    /// round).
    pub before: f64,
    /// Loss after the round's local training.
    pub after: f64,
    pub tokens: u64,
    pub labs: u64,
}

impl StatusReport {
    /// The operator's standing pause / stop, in words; none when the run goes on normally.
    pub fn operator_note(&self) -> Option<String> {
        if self.stop_requested {
            Some(format!(
                "stop requested: the run finishes when round {} closes (`fedaggregator stop`)",
                self.round
            ))
        } else if self.paused && self.stage == "paused" {
            Some(format!(
                "paused after round {}: no round opens until `fedaggregator resume`",
                self.round
            ))
        } else if self.paused && self.stage == "training" {
            Some(format!(
                "pause requested: no new round opens once round {} closes",
                self.round
            ))
        } else if self.paused {
            Some("paused: the first round does not open until `fedaggregator resume`".into())
        } else {
            None
        }
    }

    /// A few lines for a terminal (`fedaggregator status`).
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let secure = if self.secure_aggregation {
            "secure aggregation on"
        } else {
            "SECURE AGGREGATION OFF"
        };
        out.push_str(&format!(
            "federation {} — {}, round {}/{}, {secure}, up {:.0} s\n",
            self.federation, self.stage, self.round, self.rounds_total, self.uptime_s
        ));
        if let (Some(stage), Some(attempt)) = (&self.secure_stage, self.secure_attempt) {
            out.push_str(&format!(
                "  open round: secure stage {stage}, attempt {attempt}, {} in cohort\n",
                self.cohort_size
            ));
        }
        if let Some(line) = self.operator_note() {
            out.push_str(&format!("  operator: {line}\n"));
        }
        out.push_str(&format!("  plan sha256 {}\n", self.plan_sha256));
        let connected = self.participants.iter().filter(|p| p.connected).count();
        let left = self.participants_left;
        out.push_str(&format!(
            "participants: {} joined ({} needed), {connected} connected, {left} left\n",
            self.participants.len(),
            self.participants_needed
        ));
        for p in &self.participants {
            let state = match &p.left {
                Some(left) => format!(" ({left})"),
                None if p.connected => String::new(),
                None => " (not connected)".to_string(),
            };
            out.push_str(&format!(
                "  {:<20} {:<8} {} rounds, last seen {:.0} s ago{state}\n",
                p.name, p.language, p.rounds_contributed, p.last_seen_s_ago,
            ));
        }
        match self.rounds.last() {
            Some(r) => out.push_str(&format!(
                "last round: {} — {} contributors, {} dropped, {} left, {:.1} s, adapter {}\n",
                r.round,
                r.contributors.len(),
                r.dropped.len(),
                r.left.len(),
                r.duration_s,
                &r.adapter_sha256[..r.adapter_sha256.len().min(12)]
            )),
            None => out.push_str("no round closed yet\n"),
        }
        out.push_str(&format!(
            "secure attempts failed: {}, participants dropped: {}\n",
            self.secure_attempts_failed, self.participants_dropped
        ));
        for curve in &self.loss_curves {
            if let Some(last) = curve.points.last() {
                out.push_str(&format!(
                    "held-out loss [{}] round {}: {:.4} → {:.4} ({} labs)\n",
                    curve.language, last.round, last.before, last.after, last.labs
                ));
            }
        }
        out
    }
}
