//! The Prometheus metrics `/metrics` exposes, in the text exposition format that
//! `prometheus-client` writes (OpenMetrics 1.0, which Prometheus scrapes natively).
//!
//! Counters and histograms are updated where things happen (the service's hooks, the
//! byte-counting layer, the coordinator's events); gauges that mirror the coordinator's
//! state are set from its status just before each scrape.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Label set of a family: `(name, value)` pairs.
pub type Labels = Vec<(String, String)>;

/// One label.
pub fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn stage_histogram() -> Histogram {
    // 50 ms .. ~30 min.
    Histogram::new(exponential_buckets(0.05, 2.0, 16))
}

/// Every metric, registered once.
pub struct Metrics {
    registry: Registry,
    pub rounds_completed: Counter,
    pub secure_attempts_failed: Counter,
    pub participants_dropped: Counter,
    pub metric_reports: Counter,
    pub rpc_calls: Family<Labels, Counter>,
    pub rpc_received_bytes: Family<Labels, Counter>,
    pub rpc_sent_bytes: Family<Labels, Counter>,
    pub round_duration: Histogram,
    pub stage_duration: Family<Labels, Histogram>,
    pub round: Gauge,
    pub rounds_total: Gauge,
    pub stage: Family<Labels, Gauge>,
    pub paused: Gauge,
    pub stop_requested: Gauge,
    pub secure_attempt: Gauge,
    pub participants_joined: Gauge,
    pub participants_left: Gauge,
    pub participants_connected: Gauge,
    pub participants_needed: Gauge,
    pub cohort_size: Gauge,
    pub updates_received: Gauge,
    pub heldout_loss: Family<Labels, Gauge<f64, AtomicU64>>,
    pub lab_phase_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    pub lab_round_seconds: Family<Labels, Counter<f64, AtomicU64>>,
    pub lab_rounds_timed: Family<Labels, Counter>,
    pub privacy_epsilon_spent: Gauge<f64, AtomicU64>,
    pub privacy_epsilon_round: Gauge<f64, AtomicU64>,
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("mekong");
        let m = Metrics {
            registry: Registry::default(),
            rounds_completed: Counter::default(),
            secure_attempts_failed: Counter::default(),
            participants_dropped: Counter::default(),
            metric_reports: Counter::default(),
            rpc_calls: Family::default(),
            rpc_received_bytes: Family::default(),
            rpc_sent_bytes: Family::default(),
            round_duration: stage_histogram(),
            stage_duration: Family::new_with_constructor(stage_histogram),
            round: Gauge::default(),
            rounds_total: Gauge::default(),
            stage: Family::default(),
            paused: Gauge::default(),
            stop_requested: Gauge::default(),
            secure_attempt: Gauge::default(),
            participants_joined: Gauge::default(),
            participants_left: Gauge::default(),
            participants_connected: Gauge::default(),
            participants_needed: Gauge::default(),
            cohort_size: Gauge::default(),
            updates_received: Gauge::default(),
            heldout_loss: Family::default(),
            lab_phase_seconds: Family::default(),
            lab_round_seconds: Family::default(),
            lab_rounds_timed: Family::default(),
            privacy_epsilon_spent: Gauge::default(),
            privacy_epsilon_round: Gauge::default(),
        };
        let r = &mut registry;
        r.register(
            "rounds_completed",
            "Rounds closed into a new global adapter",
            m.rounds_completed.clone(),
        );
        r.register(
            "secure_attempts_failed",
            "Secure-aggregation attempts that failed (too few survivors or a misbehaving participant) and were restarted",
            m.secure_attempts_failed.clone(),
        );
        r.register(
            "participants_dropped",
            "Cohort members whose update was not in their round's aggregate, summed over closed rounds",
            m.participants_dropped.clone(),
        );
        r.register(
            "metric_reports",
            "Opt-in held-out loss reports received from participants",
            m.metric_reports.clone(),
        );
        r.register(
            "rpc_calls",
            "gRPC calls received, by method",
            m.rpc_calls.clone(),
        );
        r.register(
            "rpc_received_bytes",
            "Bytes of gRPC request bodies received (messages with gRPC framing), by method",
            m.rpc_received_bytes.clone(),
        );
        r.register(
            "rpc_sent_bytes",
            "Bytes of gRPC response bodies sent (messages with gRPC framing), by method",
            m.rpc_sent_bytes.clone(),
        );
        r.register(
            "round_duration_seconds",
            "Time from a round's opening to its close",
            m.round_duration.clone(),
        );
        r.register(
            "stage_duration_seconds",
            "Time a round stage took: secure-aggregation stages from the previous stage's close (advertise_keys includes local training), plaintext_updates for a round without secure aggregation",
            m.stage_duration.clone(),
        );
        r.register(
            "round",
            "The open round, or the last closed one when finished, 0 before the first",
            m.round.clone(),
        );
        r.register(
            "rounds_total",
            "Rounds the plan runs",
            m.rounds_total.clone(),
        );
        r.register(
            "stage",
            "1 for the coordinator's current stage (waiting_for_participants, training, paused, finished)",
            m.stage.clone(),
        );
        r.register(
            "paused",
            "1 while the operator's pause is in force or pending (`fedaggregator pause`; it takes effect when the open round closes)",
            m.paused.clone(),
        );
        r.register(
            "stop_requested",
            "1 while the operator's stop waits for the open round to close (`fedaggregator stop`)",
            m.stop_requested.clone(),
        );
        r.register(
            "secure_attempt",
            "Secure-aggregation attempt of the open round (0 when none is open)",
            m.secure_attempt.clone(),
        );
        r.register(
            "participants_joined",
            "Participants that joined",
            m.participants_joined.clone(),
        );
        r.register(
            "participants_left",
            "Participants that left the federation (Leave): never sampled again, not counted as dropped",
            m.participants_left.clone(),
        );
        r.register(
            "participants_connected",
            "Joined participants whose last call was within the last 60 s (a lab busy training calls nothing until done)",
            m.participants_connected.clone(),
        );
        r.register(
            "participants_needed",
            "Participants the first round waits for",
            m.participants_needed.clone(),
        );
        r.register(
            "cohort_size",
            "Participants sampled into the open round",
            m.cohort_size.clone(),
        );
        r.register(
            "updates_received",
            "Updates received in the open round",
            m.updates_received.clone(),
        );
        r.register(
            "heldout_loss",
            "Token-weighted mean held-out loss (nats) of the labs of a language that opted in, for the latest round they reported, before and after local training",
            m.heldout_loss.clone(),
        );
        r.register(
            "lab_phase_seconds",
            "Seconds a lab spent in each phase of its rounds (train, evaluate, download, secure, upload, wait), by its own clock, from the labs whose policy shares round_timing",
            m.lab_phase_seconds.clone(),
        );
        r.register(
            "lab_round_seconds",
            "Wall time of a lab's rounds by its own clock (end of its previous round to its update's acceptance), from the labs that share round_timing",
            m.lab_round_seconds.clone(),
        );
        r.register(
            "lab_rounds_timed",
            "Rounds a lab reported timing for (divide lab_phase_seconds by it for the mean per round)",
            m.lab_rounds_timed.clone(),
        );
        r.register(
            "privacy_epsilon_spent",
            "Under [plan.privacy]: the most ε (at the plan's δ) any lab has spent in this run, composed over the noised rounds it contributed to (0 before the first, or without privacy)",
            m.privacy_epsilon_spent.clone(),
        );
        r.register(
            "privacy_epsilon_round",
            "Under [plan.privacy]: ε of the last closed round's noised sum alone",
            m.privacy_epsilon_round.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
