//! Where a lab's time goes, round by round (issue #28).
//!
//! The participant runtime charges every wait and every piece of work to a [`Phase`]: asking
//! for a task and sleeping until the next poll, downloading the global model, training,
//! held-out evaluation, the secure-aggregation exchanges, and handing in a plaintext update.
//! A lab's round runs from the end of its previous round (or from when it joined) to the
//! moment its update for this round is accepted, so consecutive rounds tile the lab's
//! timeline; what no phase covers is bookkeeping between awaits, and the test of the pilot
//! checks it stays under 5% of a round.
//!
//! Operators read these figures to tell a slow lab from a slow center: time in `wait` is the
//! center (or other labs) keeping this lab idle; the other phases are this lab's own cost.

use std::time::{Duration, Instant};

use mekong_proto::v1 as pb;

/// What a lab is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Phase {
    /// Asking for a task and sleeping until the next poll: waiting on the center.
    Wait,
    /// Fetching and checking the global model.
    Download,
    /// Local optimizer steps (loading the global into the model included).
    Train,
    /// Held-out evaluation (only when the lab shares its held-out loss).
    Evaluate,
    /// Secure aggregation: keys, shares, the masked update, signatures, reveals.
    Secure,
    /// Handing in a plaintext update (plans without secure aggregation).
    Upload,
}

impl Phase {
    /// Every phase, in the order reports list them.
    pub const ALL: [Phase; 6] = [
        Phase::Train,
        Phase::Evaluate,
        Phase::Download,
        Phase::Secure,
        Phase::Upload,
        Phase::Wait,
    ];

    /// The phase on the wire (`ReportMetrics.round_timing`).
    pub fn to_wire(self) -> pb::LabPhase {
        match self {
            Phase::Wait => pb::LabPhase::Wait,
            Phase::Download => pb::LabPhase::Download,
            Phase::Train => pb::LabPhase::Train,
            Phase::Evaluate => pb::LabPhase::Evaluate,
            Phase::Secure => pb::LabPhase::Secure,
            Phase::Upload => pb::LabPhase::Upload,
        }
    }

    /// A short lowercase name for tables and logs.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Wait => "wait",
            Phase::Download => "download",
            Phase::Train => "train",
            Phase::Evaluate => "evaluate",
            Phase::Secure => "secure",
            Phase::Upload => "upload",
        }
    }
}

/// Seconds spent in each phase.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct PhaseTimes {
    seconds: [f64; 6],
}

impl PhaseTimes {
    fn slot(phase: Phase) -> usize {
        match phase {
            Phase::Wait => 0,
            Phase::Download => 1,
            Phase::Train => 2,
            Phase::Evaluate => 3,
            Phase::Secure => 4,
            Phase::Upload => 5,
        }
    }

    /// Seconds in `phase`.
    pub fn get(&self, phase: Phase) -> f64 {
        self.seconds[Self::slot(phase)]
    }

    /// Adds `d` to `phase`.
    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.seconds[Self::slot(phase)] += d.as_secs_f64();
    }

    /// Adds every phase of `other`.
    pub fn merge(&mut self, other: &PhaseTimes) {
        for (a, b) in self.seconds.iter_mut().zip(other.seconds) {
            *a += b;
        }
    }

    /// Seconds in all phases together.
    pub fn total(&self) -> f64 {
        self.seconds.iter().sum()
    }
}

/// One round of one lab: its wall time and what filled it.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RoundTiming {
    /// From the end of the lab's previous round (or its joining) to this round's acceptance.
    pub wall_s: f64,
    pub phases: PhaseTimes,
}

impl RoundTiming {
    /// Seconds no phase accounts for.
    pub fn unaccounted_s(&self) -> f64 {
        self.wall_s - self.phases.total()
    }

    /// The wire form a lab that shares `round_timing` reports (`ReportMetrics`): the wall
    /// time and every phase, zeros included, so the center's counters move together.
    pub fn to_wire(&self) -> pb::LabRoundTiming {
        pb::LabRoundTiming {
            wall_seconds: self.wall_s,
            phases: Phase::ALL
                .into_iter()
                .map(|phase| pb::LabPhaseSeconds {
                    phase: phase.to_wire() as i32,
                    seconds: self.phases.get(phase),
                })
                .collect(),
        }
    }
}

/// Accumulates phase times for the round in progress.
#[derive(Debug, Clone)]
pub struct RoundClock {
    round_started: Instant,
    phases: PhaseTimes,
}

impl Default for RoundClock {
    fn default() -> Self {
        Self::new()
    }
}

impl RoundClock {
    /// Starts the first round's clock now.
    pub fn new() -> Self {
        RoundClock {
            round_started: Instant::now(),
            phases: PhaseTimes::default(),
        }
    }

    /// Charges `d` to `phase`.
    pub fn add(&mut self, phase: Phase, d: Duration) {
        self.phases.add(phase, d);
    }

    /// Runs `fut` and charges its duration to `phase`.
    pub async fn time<T>(&mut self, phase: Phase, fut: impl Future<Output = T>) -> T {
        let start = Instant::now();
        let out = fut.await;
        self.add(phase, start.elapsed());
        out
    }

    /// Closes the round in progress (its update was accepted) and starts the next one.
    pub fn finish_round(&mut self) -> RoundTiming {
        let now = Instant::now();
        let timing = RoundTiming {
            wall_s: now.duration_since(self.round_started).as_secs_f64(),
            phases: std::mem::take(&mut self.phases),
        };
        self.round_started = now;
        timing
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_fill_the_round_and_the_next_round_starts_empty() {
        let mut clock = RoundClock::new();
        clock.add(Phase::Train, Duration::from_millis(30));
        std::thread::sleep(Duration::from_millis(40));
        clock.add(Phase::Wait, Duration::from_millis(5));
        clock.add(Phase::Train, Duration::from_millis(10));
        let t = clock.finish_round();
        assert!((t.phases.get(Phase::Train) - 0.040).abs() < 1e-9);
        assert!((t.phases.total() - 0.045).abs() < 1e-9);
        assert!(t.wall_s >= 0.040, "{t:?}");
        let next = clock.finish_round();
        assert_eq!(next.phases.total(), 0.0);
        assert!(next.wall_s < t.wall_s);
    }

    #[tokio::test]
    async fn timing_a_future_charges_its_duration() {
        let mut clock = RoundClock::new();
        let v = clock
            .time(Phase::Download, async {
                tokio::time::sleep(Duration::from_millis(20)).await;
                7
            })
            .await;
        assert_eq!(v, 7);
        let t = clock.finish_round();
        assert!(t.phases.get(Phase::Download) >= 0.019, "{t:?}");
        assert!(t.unaccounted_s() < 0.01, "{t:?}");
    }
}
