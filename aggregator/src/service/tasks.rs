//! Joining, the task long-poll, the run's status, metrics reports and leaving.

use std::time::Duration;

use fedcore::secagg::protocol::Stage as SecureStage;
use fedcore::{Task, WaitReason};
use mekong_proto::convert::{leave_reason_from_wire, leave_reason_to_wire, work_to_wire};
use mekong_proto::secure::step_to_wire;
use mekong_proto::v1 as pb;
use rand::RngCore;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use super::{FederationService, check_owner, check_present, participant_name};
use crate::status_map::status_for;

/// Longest a FetchTask call is held while the answer is "wait".
const MAX_LONG_POLL: Duration = Duration::from_secs(20);

fn wait_reason(reason: &WaitReason) -> String {
    match reason {
        WaitReason::Participants { joined, needed } => {
            format!("waiting for participants: {joined} of {needed} joined")
        }
        WaitReason::Submitted { round } => {
            format!("update for round {round} received; waiting for the round to close")
        }
        WaitReason::NextRound { round } => {
            format!("round {round} was already open when you joined; you take part from the next")
        }
        WaitReason::NotSampled { round } => {
            format!("round {round}: not sampled this round (strategy.sampling); wait for the next")
        }
        WaitReason::SecureStage { round, stage } => {
            format!(
                "round {round}: secure aggregation stage {stage:?} is waiting for other participants"
            )
        }
        WaitReason::DroppedFromAttempt { round, attempt } => format!(
            "round {round}: you missed a stage of secure-aggregation attempt {attempt}; you take part again in the next attempt or round"
        ),
        WaitReason::Paused { after_round: 0 } => {
            "the operator paused the federation before its first round; it goes on when resumed"
                .to_string()
        }
        WaitReason::Paused { after_round } => format!(
            "the operator paused the federation after round {after_round}; the next round opens when it is resumed"
        ),
    }
}

/// The wire form of a secure-aggregation stage.
fn secure_stage(stage: SecureStage) -> pb::SecureStage {
    match stage {
        SecureStage::AdvertiseKeys => pb::SecureStage::AdvertiseKeys,
        SecureStage::ShareKeys => pb::SecureStage::ShareKeys,
        SecureStage::MaskedInput => pb::SecureStage::MaskedInput,
        SecureStage::ConsistencyCheck => pb::SecureStage::ConsistencyCheck,
        SecureStage::Unmask | SecureStage::Done => pb::SecureStage::Unmask,
    }
}

impl FederationService {
    pub(super) async fn handle_join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        if let Some(cert) = &certified
            && *cert != req.participant_name
        {
            warn!(certificate = %cert, claimed = %req.participant_name, "join under another name refused");
            return Err(Status::permission_denied(format!(
                "this connection's certificate names participant {cert:?}; it cannot join as {:?}",
                req.participant_name
            )));
        }
        // The only free-form string of a join; it goes into the log line below.
        if req.client_version.len() > 64
            || !req.client_version.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(Status::invalid_argument(format!(
                "client_version must be at most 64 printable ASCII characters without spaces, got {}",
                fedcore::roster::shown_input(&req.client_version)
            )));
        }
        let mut token = [0u8; 16];
        rand::rng().fill_bytes(&mut token);
        let token = hex::encode(token);
        let now = self.shared.now_ms();
        let response = self.shared.transact(
            |c| {
                let events = c
                    .join(token.clone(), &req.participant_name, &req.language, now)
                    .map_err(|e| status_for(&e))?;
                Ok(((), events))
            },
            // Logged once on disk: a crash before this line loses the join, and the lab
            // simply joins again.
            |c, ()| {
                info!(
                    participant = %req.participant_name,
                    language = %req.language,
                    version = %req.client_version,
                    "participant joined"
                );
                self.shared
                    .telemetry
                    .joined(&req.participant_name, &req.language, now);
                pb::JoinResponse {
                    participant_id: token.clone(),
                    federation: c.plan().federation.clone(),
                    plan_json: c.plan().to_json(),
                    upload_layout_hash: c.upload_manifest().hash_hex(),
                }
            },
        )?;
        Ok(Response::new(response))
    }

    pub(super) async fn handle_fetch_task(
        &self,
        request: Request<pb::FetchTaskRequest>,
    ) -> Result<Response<pb::FetchTaskResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        {
            let c = self.shared.lock();
            check_owner(&c, &req.participant_id, certified.as_deref())?;
            self.shared.seen(&c, &req.participant_id);
        }
        let wait = Duration::from_millis(req.wait_ms.into()).min(MAX_LONG_POLL);
        let give_up = tokio::time::Instant::now() + wait;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            let answer = {
                let mut c = self.shared.lock();
                // Who was told the run finished is committed before the answer goes out,
                // so a restarted aggregator still knows whether everyone was.
                if c.mark_told_finished(&req.participant_id) {
                    self.shared.settle(&c, Vec::new())?;
                }
                let now = self.shared.now_ms();
                match c.task(&req.participant_id).map_err(|e| status_for(&e))? {
                    Task::Wait(reason) => pb::fetch_task_response::Task::Wait(pb::Wait {
                        reason: wait_reason(&reason),
                        retry_after_ms: 200,
                    }),
                    Task::Train {
                        round,
                        global,
                        global_hash,
                        work,
                        deadline_ms,
                        secure,
                    } => pb::fetch_task_response::Task::Train(pb::TrainTask {
                        work: Some(work_to_wire(c.strategy().mode().name(), &work)),
                        round,
                        rounds_total: c.plan().rounds.rounds,
                        global_adapter: Some(self.shared.adapters.payload(global, global_hash)),
                        deadline_in_ms: deadline_ms.saturating_sub(now),
                        secure: secure.map(|s| pb::SecureSession {
                            session: s.session.to_vec(),
                            attempt: s.attempt,
                            index: s.index,
                        }),
                    }),
                    Task::Secure {
                        round,
                        attempt,
                        step,
                        deadline_ms,
                    } => pb::fetch_task_response::Task::SecureStep(pb::SecureStep {
                        round,
                        attempt,
                        deadline_in_ms: deadline_ms.saturating_sub(now),
                        step: Some(step_to_wire(&step)),
                    }),
                    Task::Finished {
                        rounds,
                        global,
                        global_hash,
                    } => pb::fetch_task_response::Task::Finished(pb::Finished {
                        rounds_completed: rounds,
                        final_adapter: Some(self.shared.adapters.payload(global, global_hash)),
                        reason: c
                            .finish_reason()
                            .map_or_else(String::new, |r| r.to_string()),
                    }),
                }
            };
            let is_wait = matches!(answer, pb::fetch_task_response::Task::Wait(_));
            if !is_wait || tokio::time::Instant::now() >= give_up {
                return Ok(Response::new(pb::FetchTaskResponse { task: Some(answer) }));
            }
            // Sleep until something changes or the long-poll expires.
            if tokio::time::timeout_at(give_up, changes.changed())
                .await
                .is_err()
            {
                continue;
            }
        }
    }

    pub(super) async fn handle_round_status(
        &self,
        request: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatusResponse>, Status> {
        self.certified(&request)?;
        let c = self.shared.lock();
        let s = c.status();
        let stage = match s.stage {
            fedcore::round::Stage::WaitingForParticipants => pb::Stage::WaitingForParticipants,
            fedcore::round::Stage::Training => pb::Stage::Training,
            fedcore::round::Stage::Paused => pb::Stage::Paused,
            fedcore::round::Stage::Finished => pb::Stage::Finished,
        };
        Ok(Response::new(pb::RoundStatusResponse {
            federation: c.plan().federation.clone(),
            stage: stage as i32,
            round: s.round,
            rounds_total: s.rounds_total,
            participants_joined: s.participants_joined as u32,
            participants_needed: s.participants_needed as u32,
            cohort_size: s.cohort_size as u32,
            updates_received: s.updates_received as u32,
            global_adapter_hash: s.global_hash,
            history: s
                .history
                .into_iter()
                .map(|r| pb::RoundSummary {
                    round: r.round,
                    contributors: r.contributors,
                    dropped: r.dropped,
                    left: r.left,
                    total_samples: r.total_samples,
                    adapter_hash: r.adapter_hash,
                    secure: r.secure.is_some(),
                    secure_attempt: r.secure.as_ref().map_or(0, |s| s.attempt),
                    quantisation_error_bound: r.secure.as_ref().map_or(0.0, |s| s.error_bound),
                })
                .collect(),
            secure_aggregation: c.secure(),
            secure_stage: s.secure.map_or(pb::SecureStage::Unspecified, |(stage, _)| {
                secure_stage(stage)
            }) as i32,
            secure_attempt: s.secure.map_or(0, |(_, a)| a),
            participants_left: s.participants_left as u32,
            finish_reason: s.finish_reason.map_or_else(String::new, |r| r.to_string()),
        }))
    }

    pub(super) async fn handle_report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let c = self.shared.lock();
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        check_present(&c, &req.participant_id)?;
        self.shared.record_metrics(&c, &req)?;
        Ok(Response::new(pb::ReportMetricsResponse {}))
    }

    pub(super) async fn handle_leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let reason = leave_reason_from_wire(req.reason);
        let mut c = self.shared.lock();
        // A connection makes only its own participant leave.
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        self.shared.seen(&c, &req.participant_id);
        let name = participant_name(&c, &req.participant_id);
        let (departure, events) = c
            .leave(&req.participant_id, reason, self.shared.now_ms())
            .map_err(|e| status_for(&e))?;
        // The log says the departure before what it caused.
        let response = self.shared.settle_with(&c, events, |c| {
            info!(participant = %name, after_round = departure.after_round, reason = departure.reason.describe(), "participant left the federation");
            pb::LeaveResponse {
                message: format!("{name} {departure}"),
                participant_name: name.clone(),
                reason: leave_reason_to_wire(departure.reason) as i32,
                after_round: departure.after_round,
                run_finished: c.finished(),
            }
        })?;
        Ok(Response::new(response))
    }
}
