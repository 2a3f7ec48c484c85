//! The few calls the gRPC service makes into the operator's record, kept here so that
//! `service.rs` changes by a line per hook.

use fedcore::Coordinator;
use fedcore::round::Stage;
use mekong_proto::v1 as pb;
use tonic::Status;

use super::telemetry::{LabTiming, LossReport};
use crate::service::Shared;

impl Shared {
    /// The participant holding `token` made a call (unknown tokens are ignored: the
    /// handler refuses them itself).
    pub(crate) fn seen(&self, coordinator: &Coordinator, token: &str) {
        if let Some((name, _)) = coordinator.participant(token) {
            self.telemetry.seen(name, self.now_ms());
        }
    }

    /// Checks and records a lab's opt-in report: held-out losses, its round's timing, or
    /// both. The language is the one the participant joined with; the round must have
    /// opened; losses must be finite and non-negative over at least one token; the timing
    /// must name each phase at most once, in finite non-negative seconds that fit in the
    /// round's wall time. Nothing of a refused report is recorded.
    pub(crate) fn record_metrics(
        &self,
        coordinator: &Coordinator,
        req: &pb::ReportMetricsRequest,
    ) -> Result<(), Status> {
        let Some((name, language)) = coordinator.participant(&req.participant_id) else {
            return Err(Status::unauthenticated(
                "unknown participant id; join first",
            ));
        };
        let status = coordinator.status();
        let opened = match status.stage {
            Stage::WaitingForParticipants => 0,
            Stage::Training | Stage::Paused | Stage::Finished => status.round,
        };
        if req.round == 0 || req.round > opened {
            return Err(Status::failed_precondition(format!(
                "metrics for round {} refused: rounds 1 to {opened} have opened",
                req.round
            )));
        }
        // A report without held-out numbers carries zeros in all three fields.
        let heldout = req.heldout_tokens != 0
            || req.heldout_loss_before != 0.0
            || req.heldout_loss_after != 0.0;
        if !heldout && req.round_timing.is_none() {
            return Err(Status::invalid_argument(
                "an empty report: neither held-out losses (heldout_tokens = 0) nor round_timing",
            ));
        }
        if heldout {
            for (field, value) in [
                ("heldout_loss_before", req.heldout_loss_before),
                ("heldout_loss_after", req.heldout_loss_after),
            ] {
                if !value.is_finite() || value < 0.0 {
                    return Err(Status::invalid_argument(format!(
                        "{field} must be a finite, non-negative loss, got {value}"
                    )));
                }
            }
            if req.heldout_tokens == 0 {
                return Err(Status::invalid_argument(
                    "heldout_tokens must be at least 1",
                ));
            }
        }
        let timing = req
            .round_timing
            .as_ref()
            .map(check_round_timing)
            .transpose()?;
        self.telemetry.seen(name, self.now_ms());
        if heldout {
            self.telemetry.loss_report(
                name,
                language,
                req.round,
                LossReport {
                    before: req.heldout_loss_before,
                    after: req.heldout_loss_after,
                    tokens: req.heldout_tokens,
                },
            );
            tracing::info!(
                participant = %name,
                language = %language,
                round = req.round,
                before = req.heldout_loss_before,
                after = req.heldout_loss_after,
                tokens = req.heldout_tokens,
                "held-out loss reported"
            );
        }
        if let Some(timing) = timing {
            tracing::debug!(participant = %name, round = req.round, wall_s = timing.wall_s, "round timing reported");
            self.telemetry.lab_timing(name, req.round, &timing);
        }
        Ok(())
    }
}

/// The longest round a lab may report: 30 days. Beyond it a figure is a broken clock.
const MAX_REPORTED_ROUND_S: f64 = 30.0 * 24.0 * 3600.0;

/// A lab's reported round timing, checked: a known phase at most once each, every figure
/// finite and non-negative, no phase and not all phases together longer than the round's
/// wall time (with 1% and half a second of slack for the lab's rounding).
fn check_round_timing(t: &pb::LabRoundTiming) -> Result<LabTiming, Status> {
    let wall = t.wall_seconds;
    if !wall.is_finite() || !(0.0..=MAX_REPORTED_ROUND_S).contains(&wall) {
        return Err(Status::invalid_argument(format!(
            "round_timing.wall_seconds must be between 0 and {MAX_REPORTED_ROUND_S} s, got {wall}"
        )));
    }
    let slack = wall * 1.01 + 0.5;
    let mut phases: Vec<(&'static str, f64)> = Vec::with_capacity(t.phases.len());
    for p in &t.phases {
        let name = match pb::LabPhase::try_from(p.phase) {
            Ok(pb::LabPhase::Train) => "train",
            Ok(pb::LabPhase::Evaluate) => "evaluate",
            Ok(pb::LabPhase::Download) => "download",
            Ok(pb::LabPhase::Secure) => "secure",
            Ok(pb::LabPhase::Upload) => "upload",
            Ok(pb::LabPhase::Wait) => "wait",
            Ok(pb::LabPhase::Unspecified) | Err(_) => {
                return Err(Status::invalid_argument(format!(
                    "round_timing names an unknown phase {}",
                    p.phase
                )));
            }
        };
        if phases.iter().any(|(n, _)| *n == name) {
            return Err(Status::invalid_argument(format!(
                "round_timing names phase {name} twice"
            )));
        }
        if !p.seconds.is_finite() || p.seconds < 0.0 || p.seconds > slack {
            return Err(Status::invalid_argument(format!(
                "round_timing: phase {name} took {} s of a {wall} s round",
                p.seconds
            )));
        }
        phases.push((name, p.seconds));
    }
    let total: f64 = phases.iter().map(|(_, s)| s).sum();
    if total > slack {
        return Err(Status::invalid_argument(format!(
            "round_timing: the phases add up to {total} s, more than the round's {wall} s"
        )));
    }
    Ok(LabTiming {
        wall_s: wall,
        phases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregatorConfig;
    use crate::store::AdapterStore;
    use tonic::Code;

    fn request(id: &str, round: u64, before: f64, tokens: u64) -> pb::ReportMetricsRequest {
        pb::ReportMetricsRequest {
            participant_id: id.into(),
            round,
            heldout_loss_before: before,
            heldout_loss_after: 1.5,
            heldout_tokens: tokens,
            round_timing: None,
        }
    }

    /// The service's shared state on the example plan, its files in `dir`.
    fn example_shared(dir: &std::path::Path) -> std::sync::Arc<Shared> {
        Shared::new(
            Coordinator::new(AggregatorConfig::example().plan, [7; 32]).unwrap(),
            AdapterStore::new(dir),
            crate::download::AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
        )
        .unwrap()
    }

    fn timing(wall: f64, phases: &[(pb::LabPhase, f64)]) -> pb::LabRoundTiming {
        pb::LabRoundTiming {
            wall_seconds: wall,
            phases: phases
                .iter()
                .map(|&(phase, seconds)| pb::LabPhaseSeconds {
                    phase: phase as i32,
                    seconds,
                })
                .collect(),
        }
    }

    fn timing_only(id: &str, round: u64, t: pb::LabRoundTiming) -> pb::ReportMetricsRequest {
        pb::ReportMetricsRequest {
            participant_id: id.into(),
            round,
            round_timing: Some(t),
            ..Default::default()
        }
    }

    #[test]
    fn round_timings_are_checked_counted_once_and_exposed() {
        use pb::LabPhase::{Secure, Train, Unspecified, Wait};
        let dir = tempfile::tempdir().unwrap();
        let shared = example_shared(dir.path());
        let refusal = |req: &pb::ReportMetricsRequest| {
            let c = shared.lock();
            shared
                .record_metrics(&c, req)
                .err()
                .map(|s| s.message().to_string())
        };
        {
            let mut c = shared.lock();
            for (token, name) in [("t-a", "lab-a"), ("t-b", "lab-b"), ("t-c", "lab-c")] {
                let events = c.join(token.into(), name, "lo", 0).unwrap();
                shared.telemetry.joined(name, "lo", 0);
                shared.telemetry.observe(&events, 0);
            }
        }
        let empty = pb::ReportMetricsRequest {
            participant_id: "t-a".into(),
            round: 1,
            ..Default::default()
        };
        assert!(refusal(&empty).unwrap().contains("empty report"));
        for (bad, says) in [
            (timing(f64::NAN, &[]), "wall_seconds"),
            (timing(-1.0, &[]), "wall_seconds"),
            (timing(1e12, &[]), "wall_seconds"),
            (timing(10.0, &[(Unspecified, 1.0)]), "unknown phase 0"),
            (timing(10.0, &[(Train, 1.0), (Train, 2.0)]), "train twice"),
            (timing(10.0, &[(Train, -1.0)]), "phase train took -1"),
            (timing(10.0, &[(Wait, 60.0)]), "phase wait took 60"),
            (
                timing(10.0, &[(Train, 8.0), (Wait, 8.0)]),
                "add up to 16 s, more than the round's 10 s",
            ),
        ] {
            let message = refusal(&timing_only("t-a", 1, bad)).expect("refused");
            assert!(message.contains(says), "{message} lacks {says}");
        }
        let mut unknown = timing(10.0, &[]);
        unknown.phases.push(pb::LabPhaseSeconds {
            phase: 99,
            seconds: 1.0,
        });
        assert!(
            refusal(&timing_only("t-a", 1, unknown))
                .unwrap()
                .contains("unknown phase 99")
        );
        assert!(
            shared.telemetry.report(&shared.lock(), 0).participants[0]
                .round_timing
                .is_none(),
            "nothing refused is recorded"
        );

        let good = timing(10.0, &[(Train, 7.0), (Secure, 0.5), (Wait, 2.4)]);
        assert_eq!(refusal(&timing_only("t-a", 1, good.clone())), None);
        // A retried report counts once.
        assert_eq!(refusal(&timing_only("t-a", 1, good)), None);
        // Held-out losses and timing in one report are both recorded.
        let mut both = request("t-b", 1, 2.0, 10);
        both.round_timing = Some(timing(12.0, &[(Train, 11.0), (Wait, 1.0)]));
        assert_eq!(refusal(&both), None);

        let report = shared.telemetry.report(&shared.lock(), 0);
        let a = report.participants[0].round_timing.as_ref().unwrap();
        assert_eq!((a.rounds, a.last_round), (1, 1));
        assert_eq!(a.mean_wall_s, 10.0);
        let phases: Vec<_> = a
            .mean_phases
            .iter()
            .map(|p| (p.phase.as_str(), p.seconds))
            .collect();
        assert_eq!(phases, [("train", 7.0), ("secure", 0.5), ("wait", 2.4)]);
        assert!(report.participants[2].round_timing.is_none());
        assert_eq!(report.loss_curves[0].points[0].tokens, 10);
        let metrics = shared.telemetry.metrics().encode();
        for line in [
            "mekong_lab_phase_seconds_total{participant=\"lab-a\",phase=\"train\"} 7.0",
            "mekong_lab_phase_seconds_total{participant=\"lab-a\",phase=\"wait\"} 2.4",
            "mekong_lab_round_seconds_total{participant=\"lab-a\"} 10.0",
            "mekong_lab_rounds_timed_total{participant=\"lab-a\"} 1",
            "mekong_lab_phase_seconds_total{participant=\"lab-b\",phase=\"train\"} 11.0",
        ] {
            assert!(metrics.contains(line), "{line} missing from\n{metrics}");
        }
    }

    #[test]
    fn reports_are_checked_before_they_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let shared = example_shared(dir.path());
        let code = |req: &pb::ReportMetricsRequest| {
            let c = shared.lock();
            shared.record_metrics(&c, req).map_err(|s| s.code())
        };
        {
            let mut c = shared.lock();
            c.join("t-a".into(), "lab-a", "lo", 0).unwrap();
            shared.telemetry.joined("lab-a", "lo", 0);
        }
        assert_eq!(
            code(&request("nobody", 1, 2.0, 10)),
            Err(Code::Unauthenticated)
        );
        // No round has opened while participants are still joining.
        assert_eq!(
            code(&request("t-a", 1, 2.0, 10)),
            Err(Code::FailedPrecondition)
        );
        {
            let mut c = shared.lock();
            c.join("t-b".into(), "lab-b", "km", 0).unwrap();
            let events = c.join("t-c".into(), "lab-c", "km", 0).unwrap();
            shared.telemetry.joined("lab-b", "km", 0);
            shared.telemetry.joined("lab-c", "km", 0);
            shared.telemetry.observe(&events, 0);
        }
        assert_eq!(
            code(&request("t-a", 2, 2.0, 10)),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            code(&request("t-a", 0, 2.0, 10)),
            Err(Code::FailedPrecondition)
        );
        assert_eq!(
            code(&request("t-a", 1, f64::NAN, 10)),
            Err(Code::InvalidArgument)
        );
        assert_eq!(
            code(&request("t-a", 1, -1.0, 10)),
            Err(Code::InvalidArgument)
        );
        assert_eq!(code(&request("t-a", 1, 2.0, 0)), Err(Code::InvalidArgument));
        let report = shared.telemetry.report(&shared.lock(), 0);
        assert!(report.loss_curves.is_empty(), "nothing refused is recorded");

        assert_eq!(code(&request("t-a", 1, 2.0, 10)), Ok(()));
        assert_eq!(code(&request("t-b", 1, 4.0, 10)), Ok(()));
        assert_eq!(code(&request("t-c", 1, 1.0, 30)), Ok(()));
        // A retried report replaces the first.
        assert_eq!(code(&request("t-c", 1, 1.0, 30)), Ok(()));
        let report = shared.telemetry.report(&shared.lock(), 0);
        let languages: Vec<_> = report
            .loss_curves
            .iter()
            .map(|c| c.language.as_str())
            .collect();
        // The language is the one each participant joined with.
        assert_eq!(languages, ["km", "lo"]);
        let km = &report.loss_curves[0].points[0];
        assert_eq!((km.round, km.labs, km.tokens), (1, 2, 40));
        assert!((km.before - (4.0 * 10.0 + 1.0 * 30.0) / 40.0).abs() < 1e-12);
        let reports: Vec<_> = report
            .participants
            .iter()
            .map(|p| (p.name.as_str(), p.metric_reports))
            .collect();
        assert_eq!(reports, [("lab-a", 1), ("lab-b", 1), ("lab-c", 1)]);
        let metrics = shared.telemetry.metrics().encode();
        assert!(
            metrics.contains("mekong_metric_reports_total 4"),
            "{metrics}"
        );
        assert!(
            metrics.contains("mekong_heldout_loss{language=\"km\",when=\"before\"} 1.75"),
            "{metrics}"
        );
    }
}
