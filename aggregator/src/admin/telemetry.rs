//! What the running service records for its operator: who joined and when each was last
//! seen, every closed round, stage timings, gRPC traffic and the held-out losses labs chose
//! to report. Fed only by the real service (its handlers, its byte-counting layer and the
//! coordinator's events), read by `/api/status`, `/metrics` and the page.
//!
//! Lock order: the coordinator's lock, then this record's, never the other way round.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use fedcore::round::Stage;
use fedcore::secagg::protocol::Stage as SecureStage;
use fedcore::{Coordinator, Event};

use super::metrics::{Metrics, labels};
use super::report::{
    LabRoundTimes, LossCurve, LossPoint, ParticipantStatus, PhaseSpan, RoundRow, RpcTraffic,
    StageSpan, StageTiming, StatusReport,
};

/// A participant whose last call is more recent than this counts as connected. A lab
/// long-polls FetchTask (at most 20 s per call) whenever it is not training.
pub const CONNECTED_WINDOW_MS: u64 = 60_000;

/// The gRPC methods of `mekong.v1.Federation`, the label of traffic metrics. Anything else
/// is `other`, so a caller cannot grow the label set.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Rpc {
    Join,
    FetchTask,
    SubmitUpdate,
    SecureAggregate,
    SubmitMasked,
    RoundStatus,
    ReportMetrics,
    SubmitUpdateStream,
    UpdateReceived,
    MaskedReceived,
    DownloadAdapter,
    Leave,
    Other,
}

impl Rpc {
    /// Every method of the service (all but `Other`).
    const METHODS: [Rpc; 12] = [
        Rpc::Join,
        Rpc::FetchTask,
        Rpc::SubmitUpdate,
        Rpc::SecureAggregate,
        Rpc::SubmitMasked,
        Rpc::RoundStatus,
        Rpc::ReportMetrics,
        Rpc::SubmitUpdateStream,
        Rpc::UpdateReceived,
        Rpc::MaskedReceived,
        Rpc::DownloadAdapter,
        Rpc::Leave,
    ];

    /// The method a gRPC request path (`/mekong.v1.Federation/Join`) names.
    pub fn from_path(path: &str) -> Rpc {
        path.strip_prefix("/mekong.v1.Federation/")
            .and_then(|m| Rpc::METHODS.into_iter().find(|r| r.name() == m))
            .unwrap_or(Rpc::Other)
    }

    pub fn name(self) -> &'static str {
        match self {
            Rpc::Join => "Join",
            Rpc::FetchTask => "FetchTask",
            Rpc::SubmitUpdate => "SubmitUpdate",
            Rpc::SecureAggregate => "SecureAggregate",
            Rpc::SubmitMasked => "SubmitMasked",
            Rpc::RoundStatus => "RoundStatus",
            Rpc::ReportMetrics => "ReportMetrics",
            Rpc::SubmitUpdateStream => "SubmitUpdateStream",
            Rpc::UpdateReceived => "UpdateReceived",
            Rpc::MaskedReceived => "MaskedReceived",
            Rpc::DownloadAdapter => "DownloadAdapter",
            Rpc::Leave => "Leave",
            Rpc::Other => "other",
        }
    }
}

/// Which way bytes went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Received,
    Sent,
}

/// One lab's held-out numbers for one round (`ReportMetrics`), already validated.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossReport {
    pub before: f64,
    pub after: f64,
    pub tokens: u64,
}

/// One lab's round as its own clock measured it (`ReportMetrics.round_timing`), already
/// validated: the wall time and the seconds per phase (`train`, `evaluate`, `download`,
/// `secure`, `upload`, `wait`).
#[derive(Debug, Clone, PartialEq)]
pub struct LabTiming {
    pub wall_s: f64,
    pub phases: Vec<(&'static str, f64)>,
}

#[derive(Debug, Clone)]
struct Participant {
    language: String,
    joined_ms: u64,
    last_seen_ms: u64,
    rounds_contributed: u64,
    metric_reports: u64,
    /// The rounds it reported timing for, summed.
    timing: Option<LabTimingSums>,
}

#[derive(Debug, Clone, Default)]
struct LabTimingSums {
    rounds: u64,
    wall_s: f64,
    /// In the order phases were first reported.
    phases: Vec<(&'static str, f64)>,
    last: Option<(u64, LabTiming)>,
}

#[derive(Debug, Clone)]
struct OpenRound {
    round: u64,
    opened_ms: u64,
    /// When the current stage began (round opening, a stage's close, a failed attempt).
    stage_began_ms: u64,
    /// The stages closed so far: (label, attempt, milliseconds); they tile the round from
    /// `opened_ms` to `stage_began_ms`.
    stages: Vec<(&'static str, Option<u32>, u64)>,
}

#[derive(Debug, Clone, Copy, Default)]
struct Timing {
    count: u64,
    total_ms: u64,
    max_ms: u64,
    last_ms: u64,
}

#[derive(Debug, Clone, Copy, Default)]
struct Traffic {
    calls: u64,
    received: u64,
    sent: u64,
}

#[derive(Debug, Default)]
struct Record {
    participants: BTreeMap<String, Participant>,
    rounds: Vec<RoundRow>,
    open: Option<OpenRound>,
    /// `(round, participant)` → the report, with the participant's language.
    losses: BTreeMap<(u64, String), (String, LossReport)>,
    /// `(round, participant)` pairs whose timing was counted (a retried report is not).
    timed: std::collections::BTreeSet<(u64, String)>,
    /// Keyed by the stage's metric label, in the order stages run.
    stages: BTreeMap<(u8, &'static str), Timing>,
    traffic: BTreeMap<Rpc, Traffic>,
    secure_attempts_failed: u64,
    participants_dropped: u64,
}

/// The operator's record of a running aggregator.
pub struct Telemetry {
    record: Mutex<Record>,
    metrics: Metrics,
    started_unix_s: u64,
}

impl Default for Telemetry {
    fn default() -> Self {
        Self::new()
    }
}

/// A secure stage's metric label, with its position in a round.
fn secure_stage_label(stage: SecureStage) -> (u8, &'static str) {
    match stage {
        SecureStage::AdvertiseKeys => (1, "advertise_keys"),
        SecureStage::ShareKeys => (2, "share_keys"),
        SecureStage::MaskedInput => (3, "masked_input"),
        SecureStage::ConsistencyCheck => (4, "consistency_check"),
        SecureStage::Unmask | SecureStage::Done => (5, "unmask"),
    }
}

const PLAINTEXT_STAGE: (u8, &str) = (0, "plaintext_updates");

/// The time a secure attempt ran before it failed (the next attempt starts afresh).
const FAILED_ATTEMPT: (u8, &str) = (6, "failed_attempt");

fn stage_name(stage: &Stage) -> &'static str {
    match stage {
        Stage::WaitingForParticipants => "waiting_for_participants",
        Stage::Training => "training",
        Stage::Paused => "paused",
        Stage::Finished => "finished",
    }
}

fn seconds(ms: u64) -> f64 {
    ms as f64 / 1000.0
}

impl Telemetry {
    pub fn new() -> Self {
        Telemetry {
            record: Mutex::new(Record::default()),
            metrics: Metrics::new(),
            started_unix_s: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }

    fn record(&self) -> MutexGuard<'_, Record> {
        // Every update below is a handful of field writes; a panic cannot leave it unusable.
        self.record.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The Prometheus metrics.
    pub fn metrics(&self) -> &Metrics {
        &self.metrics
    }

    /// A participant joined (or re-joined after a restart).
    pub fn joined(&self, name: &str, language: &str, now_ms: u64) {
        let mut r = self.record();
        let p = r
            .participants
            .entry(name.to_string())
            .or_insert_with(|| Participant {
                language: language.to_string(),
                joined_ms: now_ms,
                last_seen_ms: now_ms,
                rounds_contributed: 0,
                metric_reports: 0,
                timing: None,
            });
        p.language = language.to_string();
        p.joined_ms = now_ms;
        p.last_seen_ms = now_ms;
    }

    /// A joined participant made a call.
    pub fn seen(&self, name: &str, now_ms: u64) {
        if let Some(p) = self.record().participants.get_mut(name) {
            p.last_seen_ms = now_ms;
        }
    }

    /// A gRPC call arrived.
    pub fn call(&self, rpc: Rpc) {
        self.record().traffic.entry(rpc).or_default().calls += 1;
        self.metrics
            .rpc_calls
            .get_or_create(&labels(&[("rpc", rpc.name())]))
            .inc();
    }

    /// `bytes` of a gRPC body went by.
    pub fn bytes(&self, rpc: Rpc, direction: Direction, bytes: usize) {
        let bytes = bytes as u64;
        let key = labels(&[("rpc", rpc.name())]);
        let mut r = self.record();
        let t = r.traffic.entry(rpc).or_default();
        match direction {
            Direction::Received => {
                t.received += bytes;
                self.metrics
                    .rpc_received_bytes
                    .get_or_create(&key)
                    .inc_by(bytes);
            }
            Direction::Sent => {
                t.sent += bytes;
                self.metrics
                    .rpc_sent_bytes
                    .get_or_create(&key)
                    .inc_by(bytes);
            }
        }
    }

    /// A participant's validated held-out report for `round`; a repeated report for the
    /// same round (a retried call) replaces the first.
    pub fn loss_report(&self, name: &str, language: &str, round: u64, report: LossReport) {
        let mut r = self.record();
        let fresh = r
            .losses
            .insert((round, name.to_string()), (language.to_string(), report))
            .is_none();
        if fresh && let Some(p) = r.participants.get_mut(name) {
            p.metric_reports += 1;
        }
        self.metrics.metric_reports.inc();
        drop(r);
        if let Some(point) = self
            .curves()
            .into_iter()
            .find(|c| c.language == language)
            .and_then(|c| c.points.last().cloned())
        {
            for (when, value) in [("before", point.before), ("after", point.after)] {
                self.metrics
                    .heldout_loss
                    .get_or_create(&labels(&[("language", language), ("when", when)]))
                    .set(value);
            }
        }
    }

    /// A participant's validated round timing for `round`. A repeated report for the same
    /// round (a retried call) is ignored: the counters count each round once.
    pub fn lab_timing(&self, name: &str, round: u64, timing: &LabTiming) {
        let mut r = self.record();
        if !r.timed.insert((round, name.to_string())) {
            return;
        }
        let Some(p) = r.participants.get_mut(name) else {
            return;
        };
        let sums = p.timing.get_or_insert_with(LabTimingSums::default);
        sums.rounds += 1;
        sums.wall_s += timing.wall_s;
        for &(phase, seconds) in &timing.phases {
            match sums.phases.iter_mut().find(|(n, _)| *n == phase) {
                Some((_, total)) => *total += seconds,
                None => sums.phases.push((phase, seconds)),
            }
            self.metrics
                .lab_phase_seconds
                .get_or_create(&labels(&[("participant", name), ("phase", phase)]))
                .inc_by(seconds);
        }
        if sums.last.as_ref().is_none_or(|(last, _)| *last < round) {
            sums.last = Some((round, timing.clone()));
        }
        let key = labels(&[("participant", name)]);
        self.metrics
            .lab_round_seconds
            .get_or_create(&key)
            .inc_by(timing.wall_s);
        self.metrics.lab_rounds_timed.get_or_create(&key).inc();
    }

    /// What the coordinator's events say happened, at `now_ms`.
    pub fn observe(&self, events: &[Event], now_ms: u64) {
        let mut r = self.record();
        for event in events {
            match event {
                Event::RoundStarted { round, .. } => {
                    r.open = Some(OpenRound {
                        round: *round,
                        opened_ms: now_ms,
                        stage_began_ms: now_ms,
                        stages: Vec::new(),
                    });
                }
                Event::SecureStageClosed { stage, attempt, .. } => {
                    self.stage_done(&mut r, secure_stage_label(*stage), Some(*attempt), now_ms);
                }
                Event::SecureAttemptFailed { attempt, .. } => {
                    r.secure_attempts_failed += 1;
                    self.metrics.secure_attempts_failed.inc();
                    self.stage_done(&mut r, FAILED_ATTEMPT, Some(*attempt), now_ms);
                }
                Event::RoundCompleted(record) => {
                    if record.secure.is_none() {
                        self.stage_done(&mut r, PLAINTEXT_STAGE, None, now_ms);
                    }
                    let (opened, stages) = match r.open.take() {
                        Some(open) if open.round == record.round => (open.opened_ms, open.stages),
                        _ => (now_ms, Vec::new()),
                    };
                    let duration_ms = now_ms.saturating_sub(opened);
                    self.metrics.round_duration.observe(seconds(duration_ms));
                    self.metrics.rounds_completed.inc();
                    self.metrics
                        .participants_dropped
                        .inc_by(record.dropped.len() as u64);
                    r.participants_dropped += record.dropped.len() as u64;
                    let privacy = record.secure.as_ref().and_then(|s| s.privacy.as_ref());
                    if let Some(p) = privacy {
                        self.metrics.privacy_epsilon_spent.set(p.epsilon_spent);
                        self.metrics.privacy_epsilon_round.set(p.epsilon_round);
                    }
                    for name in &record.contributors {
                        if let Some(p) = r.participants.get_mut(name) {
                            p.rounds_contributed += 1;
                        }
                    }
                    r.rounds.push(RoundRow {
                        round: record.round,
                        contributors: record.contributors.clone(),
                        dropped: record.dropped.clone(),
                        left: record.left.clone(),
                        total_samples: record.total_samples,
                        secure_attempt: record.secure.as_ref().map(|s| s.attempt),
                        quantisation_bound: record.secure.as_ref().map(|s| s.error_bound),
                        epsilon_round: privacy.map(|p| p.epsilon_round),
                        epsilon_spent: privacy.map(|p| p.epsilon_spent),
                        duration_s: seconds(duration_ms),
                        adapter_sha256: record.adapter_hash.clone(),
                        stages: stages
                            .into_iter()
                            .map(|(stage, attempt, ms)| StageSpan {
                                stage: stage.to_string(),
                                attempt,
                                seconds: seconds(ms),
                            })
                            .collect(),
                    });
                }
                Event::RoundExtended { .. } | Event::RunFinished { .. } | Event::Paused { .. } => {}
            }
        }
    }

    fn stage_done(
        &self,
        r: &mut Record,
        stage: (u8, &'static str),
        attempt: Option<u32>,
        now_ms: u64,
    ) {
        let Some(open) = &mut r.open else {
            return;
        };
        let took = now_ms.saturating_sub(open.stage_began_ms);
        open.stage_began_ms = now_ms;
        open.stages.push((stage.1, attempt, took));
        let t = r.stages.entry(stage).or_default();
        t.count += 1;
        t.total_ms += took;
        t.max_ms = t.max_ms.max(took);
        t.last_ms = took;
        self.metrics
            .stage_duration
            .get_or_create(&labels(&[("stage", stage.1)]))
            .observe(seconds(took));
    }

    /// How a closed round's time went at the center, for its `round.json`: `None` when this
    /// process did not see the round open (resumed after a restart) or has no record of it.
    pub fn round_timing(&self, round: u64) -> Option<crate::store::CenterTiming> {
        let r = self.record();
        let row = r.rounds.iter().rev().find(|row| row.round == round)?;
        (!row.stages.is_empty()).then(|| crate::store::CenterTiming {
            duration_s: row.duration_s,
            stages: row.stages.clone(),
        })
    }

    /// Sets the gauges that mirror the coordinator, for a scrape.
    pub fn refresh_gauges(&self, coordinator: &Coordinator, now_ms: u64) {
        let s = coordinator.status();
        let m = &self.metrics;
        m.round.set(s.round as i64);
        m.rounds_total.set(s.rounds_total as i64);
        for stage in [
            Stage::WaitingForParticipants,
            Stage::Training,
            Stage::Paused,
            Stage::Finished,
        ] {
            m.stage
                .get_or_create(&labels(&[("stage", stage_name(&stage))]))
                .set(i64::from(stage == s.stage));
        }
        m.paused.set(i64::from(s.control.paused));
        m.stop_requested.set(i64::from(s.control.stop_requested));
        m.secure_attempt
            .set(s.secure.map_or(0, |(_, attempt)| i64::from(attempt)));
        m.participants_joined.set(s.participants_joined as i64);
        m.participants_left.set(s.participants_left as i64);
        m.participants_needed.set(s.participants_needed as i64);
        m.cohort_size.set(s.cohort_size as i64);
        m.updates_received.set(s.updates_received as i64);
        let connected = self
            .record()
            .participants
            .values()
            .filter(|p| now_ms.saturating_sub(p.last_seen_ms) < CONNECTED_WINDOW_MS)
            .count();
        m.participants_connected.set(connected as i64);
    }

    /// Per language, the token-weighted mean of each round's reports.
    fn curves(&self) -> Vec<LossCurve> {
        let r = self.record();
        // language → round → sums
        let mut sums: BTreeMap<&str, BTreeMap<u64, RoundSums>> = BTreeMap::new();
        for ((round, _), (language, report)) in &r.losses {
            let s = sums
                .entry(language.as_str())
                .or_default()
                .entry(*round)
                .or_default();
            let t = report.tokens as f64;
            s.before += t * report.before;
            s.after += t * report.after;
            s.tokens += report.tokens;
            s.labs += 1;
        }
        sums.into_iter()
            .map(|(language, rounds)| LossCurve {
                language: language.to_string(),
                points: rounds
                    .into_iter()
                    .map(|(round, s)| LossPoint {
                        round,
                        before: s.before / s.tokens as f64,
                        after: s.after / s.tokens as f64,
                        tokens: s.tokens,
                        labs: s.labs,
                    })
                    .collect(),
            })
            .collect()
    }

    /// The snapshot the page, `/api/status` and `fedaggregator status` show.
    pub fn report(&self, coordinator: &Coordinator, now_ms: u64) -> StatusReport {
        let s = coordinator.status();
        let curves = self.curves();
        let r = self.record();
        StatusReport {
            federation: coordinator.plan().federation.clone(),
            plan_sha256: coordinator.plan().fingerprint(),
            secure_aggregation: coordinator.secure(),
            uptime_s: seconds(now_ms),
            started_unix_s: self.started_unix_s,
            stage: stage_name(&s.stage).to_string(),
            paused: s.control.paused,
            stop_requested: s.control.stop_requested,
            round: s.round,
            rounds_total: s.rounds_total,
            secure_stage: s
                .secure
                .map(|(stage, _)| secure_stage_label(stage).1.to_string()),
            secure_attempt: s.secure.map(|(_, attempt)| attempt),
            participants_needed: s.participants_needed,
            participants_left: s.participants_left,
            cohort_size: s.cohort_size,
            updates_received: s.updates_received,
            global_adapter_sha256: s.global_hash,
            participants: r
                .participants
                .iter()
                .map(|(name, p)| {
                    let ago = now_ms.saturating_sub(p.last_seen_ms);
                    ParticipantStatus {
                        name: name.clone(),
                        language: p.language.clone(),
                        joined_at_s: seconds(p.joined_ms),
                        last_seen_s_ago: seconds(ago),
                        connected: ago < CONNECTED_WINDOW_MS,
                        rounds_contributed: p.rounds_contributed,
                        metric_reports: p.metric_reports,
                        left: coordinator.departures().get(name).map(|d| d.to_string()),
                        round_timing: p.timing.as_ref().map(|t| {
                            let n = t.rounds.max(1) as f64;
                            LabRoundTimes {
                                rounds: t.rounds,
                                mean_wall_s: t.wall_s / n,
                                mean_phases: t
                                    .phases
                                    .iter()
                                    .map(|(phase, total)| PhaseSpan {
                                        phase: phase.to_string(),
                                        seconds: total / n,
                                    })
                                    .collect(),
                                last_round: t.last.as_ref().map_or(0, |(round, _)| *round),
                                last_wall_s: t.last.as_ref().map_or(0.0, |(_, l)| l.wall_s),
                            }
                        }),
                    }
                })
                .collect(),
            rounds: r.rounds.clone(),
            traffic: r
                .traffic
                .iter()
                .map(|(rpc, t)| RpcTraffic {
                    rpc: rpc.name().to_string(),
                    calls: t.calls,
                    received_bytes: t.received,
                    sent_bytes: t.sent,
                })
                .collect(),
            stage_timings: r
                .stages
                .iter()
                .map(|((_, name), t)| StageTiming {
                    stage: name.to_string(),
                    count: t.count,
                    mean_s: seconds(t.total_ms) / t.count.max(1) as f64,
                    max_s: seconds(t.max_ms),
                    last_s: seconds(t.last_ms),
                })
                .collect(),
            secure_attempts_failed: r.secure_attempts_failed,
            participants_dropped: r.participants_dropped,
            loss_curves: curves,
        }
    }
}

/// One language's reports for one round, summed: Σ t·before, Σ t·after, Σ t, and how many
/// labs reported.
#[derive(Default)]
struct RoundSums {
    before: f64,
    after: f64,
    tokens: u64,
    labs: u64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcore::round::{RoundRecord, SecureRecord};
    use fedcore::strategy::TrainedFactors;

    fn closed(round: u64) -> Event {
        Event::RoundCompleted(RoundRecord {
            round,
            contributors: vec!["lab-a".into()],
            dropped: Vec::new(),
            left: Vec::new(),
            total_samples: 3,
            adapter_hash: "ab".repeat(32),
            mode: fedcore::AggregationMode::FfaLora,
            trained: TrainedFactors { a: false, b: true },
            secure: Some(SecureRecord {
                attempt: 1,
                error_bound: 1e-5,
                privacy: None,
            }),
        })
    }

    fn stage(round: u64, attempt: u32, stage: SecureStage) -> Event {
        Event::SecureStageClosed {
            round,
            attempt,
            stage,
            remaining: 3,
        }
    }

    #[test]
    fn a_rounds_stages_tile_it_failed_attempts_included() {
        let t = Telemetry::new();
        let opened = Event::RoundStarted {
            round: 1,
            cohort: vec!["lab-a".into()],
            deadline_ms: 60_000,
        };
        t.observe(&[opened], 1_000);
        t.observe(&[stage(1, 0, SecureStage::AdvertiseKeys)], 9_500);
        let failed = Event::SecureAttemptFailed {
            round: 1,
            attempt: 0,
            reason: "too few".into(),
        };
        t.observe(&[failed], 12_250);
        t.observe(&[stage(1, 1, SecureStage::AdvertiseKeys)], 12_300);
        t.observe(&[stage(1, 1, SecureStage::ShareKeys)], 12_400);
        t.observe(&[stage(1, 1, SecureStage::MaskedInput)], 13_000);
        t.observe(&[stage(1, 1, SecureStage::ConsistencyCheck)], 13_010);
        t.observe(&[stage(1, 1, SecureStage::Unmask), closed(1)], 13_100);

        let timing = t.round_timing(1).expect("the round opened in this process");
        assert_eq!(timing.duration_s, 12.1);
        let stages: Vec<_> = timing
            .stages
            .iter()
            .map(|s| (s.stage.as_str(), s.attempt, s.seconds))
            .collect();
        assert_eq!(
            stages,
            [
                ("advertise_keys", Some(0), 8.5),
                ("failed_attempt", Some(0), 2.75),
                ("advertise_keys", Some(1), 0.05),
                ("share_keys", Some(1), 0.1),
                ("masked_input", Some(1), 0.6),
                ("consistency_check", Some(1), 0.01),
                ("unmask", Some(1), 0.09),
            ]
        );
        let sum: f64 = timing.stages.iter().map(|s| s.seconds).sum();
        assert!((sum - timing.duration_s).abs() < 1e-9, "{sum}");
        assert_eq!(t.round_timing(2), None);
    }

    #[test]
    fn a_round_resumed_after_a_restart_has_no_timing() {
        // A restarted aggregator never saw the round open: it does not invent a duration.
        let t = Telemetry::new();
        t.observe(&[stage(4, 0, SecureStage::Unmask), closed(4)], 2_000);
        assert_eq!(t.round_timing(4), None);
    }
}
