//! The few calls the gRPC service makes into the operator's record, kept here so that
//! `service.rs` changes by a line per hook.

use fedcore::Coordinator;
use fedcore::round::Stage;
use mekong_proto::v1 as pb;
use tonic::Status;

use super::telemetry::LossReport;
use crate::service::Shared;

impl Shared {
    /// The participant holding `token` made a call (unknown tokens are ignored: the
    /// handler refuses them itself).
    pub(crate) fn seen(&self, coordinator: &Coordinator, token: &str) {
        if let Some((name, _)) = coordinator.participant(token) {
            self.telemetry.seen(name, self.now_ms());
        }
    }

    /// Checks and records a lab's opt-in held-out report. The language is the one the
    /// participant joined with; the round must have opened; losses must be finite and
    /// non-negative over at least one token.
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
        self.telemetry.seen(name, self.now_ms());
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
        Ok(())
    }
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
        }
    }

    #[test]
    fn reports_are_checked_before_they_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let plan = AggregatorConfig::example().plan;
        let shared = Shared::new(
            Coordinator::new(plan, [7; 32]).unwrap(),
            AdapterStore::new(dir.path()),
            crate::download::AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
        )
        .unwrap();
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
