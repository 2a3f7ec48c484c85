//! What `fedclient` shows while it works: progress bars for training steps and for the
//! update's upload, and one summary line per round.
//!
//! Bars go to the terminal only (indicatif hides them when stderr is not one); the round
//! summaries are printed either way, so a lab's log keeps a line per round.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

use crate::participant::ParticipantObserver;
use crate::round_clock::{Phase, RoundTiming};
use crate::train::{StepReport, TrainObserver, TrainStats};

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template).expect("valid progress template")
}

/// Training progress: a bar with the step's loss, learning rate and tokens/s.
pub struct TrainBar {
    bar: ProgressBar,
    started: Instant,
    tokens: usize,
}

impl TrainBar {
    /// A bar of `steps` optimizer steps, prefixed by `label` (may be empty).
    pub fn new(steps: usize, label: &str) -> Self {
        let bar = ProgressBar::new(steps as u64)
            .with_style(style(
                "{prefix}{bar:30} {pos}/{len} steps · {msg} · eta {eta}",
            ))
            .with_prefix(label.to_string());
        TrainBar {
            bar,
            started: Instant::now(),
            tokens: 0,
        }
    }

    /// Ends the bar, leaving it on screen.
    pub fn finish(&self) {
        self.bar.finish();
    }
}

impl TrainObserver for TrainBar {
    fn step(&mut self, report: &StepReport) {
        self.tokens += report.tokens;
        let rate = self.tokens as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        self.bar.set_message(format!(
            "loss {:.4} · lr {:.2e} · {rate:.0} tokens/s",
            report.loss, report.learning_rate
        ));
        self.bar.inc(1);
    }
}

/// One round as the display has seen it so far.
#[derive(Default)]
struct RoundView {
    training: Option<TrainBar>,
    download: Option<ProgressBar>,
    upload: Option<ProgressBar>,
    stats: Option<TrainStats>,
    sent_bytes: u64,
}

/// The participant runtime's display for `fedclient join`.
pub struct JoinDisplay {
    bars: MultiProgress,
    rounds: Mutex<BTreeMap<u64, RoundView>>,
}

impl Default for JoinDisplay {
    fn default() -> Self {
        JoinDisplay {
            bars: MultiProgress::new(),
            rounds: Mutex::new(BTreeMap::new()),
        }
    }
}

impl JoinDisplay {
    /// Prints a line above the bars (or plainly when there are none).
    fn line(&self, text: String) {
        if self.bars.is_hidden() || self.bars.println(&text).is_err() {
            println!("{text}");
        }
    }

    fn transfer_bar(&self, total: u64, round: u64, what: &str) -> ProgressBar {
        self.bars.add(
            ProgressBar::new(total)
                .with_style(style(
                    "{prefix}{bar:30} {bytes}/{total_bytes} · {binary_bytes_per_sec}",
                ))
                .with_prefix(format!("round {round} {what} ")),
        )
    }

    fn with_round<T>(&self, round: u64, f: impl FnOnce(&mut RoundView) -> T) -> T {
        let mut rounds = self.rounds.lock().expect("display lock");
        f(rounds.entry(round).or_default())
    }
}

/// One line on where a round's time went at this lab: its wall time, then every phase that
/// took a tenth of a second or more, longest first.
pub fn timing_line(round: u64, timing: &RoundTiming) -> String {
    let mut phases: Vec<(Phase, f64)> = Phase::ALL
        .into_iter()
        .map(|p| (p, timing.phases.get(p)))
        .filter(|(_, s)| *s >= 0.05)
        .collect();
    phases.sort_by(|a, b| b.1.total_cmp(&a.1));
    let parts: Vec<String> = phases
        .iter()
        .map(|(p, s)| format!("{} {s:.1} s", p.name()))
        .collect();
    format!(
        "round {round}: {:.1} s at this lab ({})",
        timing.wall_s,
        if parts.is_empty() {
            "nothing measurable".to_string()
        } else {
            parts.join(", ")
        }
    )
}

/// `1.2 MiB`-style sizes for the summaries.
fn size(bytes: u64) -> String {
    indicatif::BinaryBytes(bytes).to_string()
}

impl ParticipantObserver for JoinDisplay {
    fn train_step(&self, _name: &str, round: u64, report: &StepReport, steps: usize) {
        self.with_round(round, |view| {
            let bar = view.training.get_or_insert_with(|| {
                let bar = TrainBar::new(steps, &format!("round {round} training "));
                // The same bar (indicatif's bars are shared handles), now drawn by the group.
                self.bars.add(bar.bar.clone());
                bar
            });
            bar.step(report);
            if report.step + 1 >= steps {
                bar.bar.finish_and_clear();
            }
        });
    }

    fn round_trained(&self, _name: &str, round: u64, stats: &TrainStats, _: &[f32], _: u64) {
        self.with_round(round, |view| {
            if let Some(bar) = view.training.take() {
                bar.bar.finish_and_clear();
            }
            view.stats = Some(stats.clone());
        });
    }

    fn download_progress(&self, _name: &str, round: u64, received: u64, total: u64) {
        self.with_round(round, |view| {
            let bar = view
                .download
                .get_or_insert_with(|| self.transfer_bar(total, round, "download"));
            bar.set_position(received);
            if received >= total {
                bar.finish_and_clear();
            }
        });
    }

    fn upload_progress(&self, _name: &str, round: u64, sent: u64, total: u64) {
        self.with_round(round, |view| {
            let bar = view
                .upload
                .get_or_insert_with(|| self.transfer_bar(total, round, "upload  "));
            bar.set_position(sent);
            view.sent_bytes = sent;
            if sent >= total {
                bar.finish_and_clear();
            }
        });
    }

    fn update_accepted(&self, _name: &str, round: u64, round_closed: bool) {
        let view = self
            .rounds
            .lock()
            .expect("display lock")
            .remove(&round)
            .unwrap_or_default();
        if let Some(bar) = &view.upload {
            bar.finish_and_clear();
        }
        let trained = match &view.stats {
            Some(s) => format!(
                "{} steps on {} tokens, loss {:.4} -> {:.4}",
                s.steps, s.tokens, s.first_loss, s.last_loss
            ),
            None => "trained".to_string(),
        };
        let closed = if round_closed { "; round closed" } else { "" };
        self.line(format!(
            "round {round}: {trained}; update of {} sent and accepted{closed}",
            size(view.sent_bytes)
        ));
    }

    fn round_finished(&self, _name: &str, round: u64, timing: &RoundTiming) {
        self.line(timing_line(round, timing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step(step: usize) -> StepReport {
        StepReport {
            step,
            loss: 4.0 - step as f64,
            learning_rate: 1e-3,
            grad_norm: None,
            tokens: 128,
            trained_targets: 127.0,
        }
    }

    #[test]
    fn the_timing_line_lists_the_phases_that_took_time_longest_first() {
        let mut timing = RoundTiming {
            wall_s: 77.14,
            ..RoundTiming::default()
        };
        for (phase, ms) in [
            (Phase::Train, 68_000),
            (Phase::Wait, 2_400),
            (Phase::Secure, 1_040),
            (Phase::Upload, 10),
        ] {
            timing
                .phases
                .add(phase, std::time::Duration::from_millis(ms));
        }
        assert_eq!(
            timing_line(2, &timing),
            "round 2: 77.1 s at this lab (train 68.0 s, wait 2.4 s, secure 1.0 s)"
        );
        assert_eq!(
            timing_line(1, &RoundTiming::default()),
            "round 1: 0.0 s at this lab (nothing measurable)"
        );
    }

    #[test]
    fn a_round_is_tracked_from_training_to_acceptance_and_then_forgotten() {
        let display = JoinDisplay::default();
        for s in 0..3 {
            display.train_step("lab", 2, &step(s), 3);
        }
        let stats = TrainStats {
            steps: 3,
            tokens: 384,
            first_loss: 4.0,
            last_loss: 2.0,
            mean_loss: 3.0,
        };
        display.round_trained("lab", 2, &stats, &[], 10);
        display.download_progress("lab", 2, 1 << 20, 1 << 20);
        display.upload_progress("lab", 2, 1 << 20, 2 << 20);
        display.upload_progress("lab", 2, 2 << 20, 2 << 20);
        {
            let rounds = display.rounds.lock().unwrap();
            let view = &rounds[&2];
            assert!(view.training.is_none());
            assert_eq!(view.sent_bytes, 2 << 20);
            assert_eq!(view.stats.as_ref().unwrap().steps, 3);
        }
        display.update_accepted("lab", 2, true);
        assert!(display.rounds.lock().unwrap().is_empty());
        assert_eq!(size(2 << 20), "2.00 MiB");
    }
}
