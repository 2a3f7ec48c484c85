//! Plaintext updates (secure aggregation explicitly off): whole in one message, or streamed
//! in checksummed chunks and resumed where the aggregator's copy ends.

use std::time::Duration;

use fedcore::{SubmittedUpdate, Task, UpdatePayload, WaitReason};
use mekong_proto::v1::{self as pb};
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::{FederationService, check_owner, participant_name};
use crate::partial_update::PartialUpdate;
use crate::status_map::status_for;
use sha2::{Digest, Sha256};

impl FederationService {
    pub(super) async fn handle_submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let certified = self.certified(&request)?;
        self.accept_update(certified, request.into_inner())
    }

    pub(super) async fn handle_submit_update_stream(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let certified = self.certified(&request)?;
        let mut stream = request.into_inner();
        let idle = self.shared.limits.stream_idle_timeout();
        let first = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| Status::deadline_exceeded("the update stream sent nothing"))??
            .ok_or_else(|| Status::invalid_argument("update stream carried no chunk"))?;
        let mut header = first
            .header
            .clone()
            .ok_or_else(|| Status::invalid_argument("the first update chunk carries no header"))?;
        header.payload = None;
        // Who is sending, and whether a plaintext update is taken at all, before anything
        // is buffered; then what the round's layout can hold bounds what is.
        let (limit, open_round) = {
            let c = self.shared.lock();
            check_owner(&c, &header.participant_id, certified.as_deref())?;
            if c.secure() {
                return Err(status_for(&fedcore::RoundError::SecureAggregationRequired));
            }
            self.shared.seen(&c, &header.participant_id);
            (4 * c.upload_manifest().len(), c.round_in_progress())
        };
        let _one_stream = self
            .shared
            .update_in_flight
            .claim(&header.participant_id)
            .ok_or_else(|| {
                Status::resource_exhausted(
                    "another update stream of this participant is still in flight; send again once it ended",
                )
            })?;
        let partials = &self.shared.partial_updates;
        partials.keep_round(open_round);
        let token = header.participant_id.clone();
        let mut partial = match partials.take(&token) {
            Some(p) if p.same_update(&header) && p.values.len() as u64 == first.offset => p,
            held => {
                let held_bytes = held
                    .as_ref()
                    .filter(|p| p.same_update(&header))
                    .map_or(0, |p| p.values.len());
                if first.offset != 0 {
                    if let Some(p) = held {
                        // It was held before: it fits where it was.
                        let _ = partials.hold(token, p);
                    }
                    return Err(Status::invalid_argument(format!(
                        "the update stream resumes at byte {}, but the aggregator holds {held_bytes} \
                         bytes of this update (ask UpdateReceived)",
                        first.offset
                    )));
                }
                // A fresh start replaces whatever was held.
                PartialUpdate::new(header.clone())
            }
        };
        let received = receive_update(&mut stream, first, limit, idle, &mut partial).await;
        match received {
            Ok(values_sha256) => {
                if partial.digest()[..] != values_sha256[..] {
                    return Err(Status::data_loss(format!(
                        "the update's SHA-256 is {}, the participant's {}; nothing of it was \
                         kept: send it again from byte 0",
                        hex::encode(partial.digest()),
                        hex::encode(&values_sha256)
                    )));
                }
                header.payload = Some(pb::submit_update_request::Payload::Plaintext(
                    pb::PlaintextUpdate {
                        values_f32_le: partial.values,
                    },
                ));
                self.accept_update(certified, header)
            }
            Err(status) => {
                let bytes = partial.values.len();
                let name = participant_name(&self.shared.lock(), &token);
                match partials.hold(token, partial) {
                    Ok(()) if bytes > 0 => {
                        warn!(participant = %name, round = header.round, bytes, %status, "update stream broke; what it carried is held for it to resume");
                    }
                    Ok(()) => {}
                    Err(over) => {
                        warn!(participant = %name, round = header.round, bytes, held = over.held, cap = over.cap, %status, "update stream broke; what it carried is dropped (limits.held_partial_update_bytes): it sends again from byte 0");
                    }
                }
                Err(status)
            }
        }
    }

    pub(super) async fn handle_update_received(
        &self,
        request: Request<pb::UpdateReceivedRequest>,
    ) -> Result<Response<pb::UpdateReceivedResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let c = self.shared.lock();
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        self.shared.seen(&c, &req.participant_id);
        let accepted = match c.task(&req.participant_id).map_err(|e| status_for(&e))? {
            Task::Wait(WaitReason::Submitted { round }) => round == req.round,
            _ if c.round_in_progress() != Some(req.round) => {
                return Err(Status::failed_precondition(format!(
                    "round {} is not open",
                    req.round
                )));
            }
            _ => false,
        };
        Ok(Response::new(pb::UpdateReceivedResponse {
            bytes_received: self
                .shared
                .partial_updates
                .held_bytes(&req.participant_id, req.round) as u64,
            accepted,
        }))
    }
}

/// Reads an update stream's chunks into `partial`, each checked against its SHA-256 and
/// its offset, until the last one; returns the whole-update SHA-256 the last chunk carries.
/// On an error, `partial` holds every chunk that passed its checks.
async fn receive_update(
    stream: &mut Streaming<pb::UpdateChunk>,
    first: pb::UpdateChunk,
    limit: usize,
    idle: Duration,
    partial: &mut PartialUpdate,
) -> Result<Vec<u8>, Status> {
    let mut chunk = first;
    loop {
        if chunk.offset != partial.values.len() as u64 {
            return Err(Status::invalid_argument(format!(
                "update chunk at byte {}, but {} bytes were received",
                chunk.offset,
                partial.values.len()
            )));
        }
        if Sha256::digest(&chunk.values_f32_le)[..] != chunk.sha256[..] {
            return Err(Status::data_loss(format!(
                "update chunk at byte {} failed its SHA-256 check; resume from byte {}",
                chunk.offset,
                partial.values.len()
            )));
        }
        if partial.values.len() + chunk.values_f32_le.len() > limit {
            return Err(Status::invalid_argument(format!(
                "the update stream carries more than the {limit} bytes of this round's upload layout"
            )));
        }
        partial.extend(&chunk.values_f32_le);
        if chunk.last {
            return Ok(chunk.values_sha256);
        }
        chunk = tokio::time::timeout(idle, stream.message())
            .await
            .map_err(|_| {
                Status::deadline_exceeded(format!(
                    "the update stream stalled after {} bytes",
                    partial.values.len()
                ))
            })??
            .ok_or_else(|| {
                Status::invalid_argument(format!(
                    "update stream ended after {} bytes without its last chunk",
                    partial.values.len()
                ))
            })?;
    }
}

impl FederationService {
    /// Checks and submits one plaintext update, however it arrived.
    fn accept_update(
        &self,
        certified: Option<String>,
        req: pb::SubmitUpdateRequest,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let payload = match req.payload {
            Some(pb::submit_update_request::Payload::Plaintext(p)) => {
                UpdatePayload::Plaintext(p.values_f32_le)
            }
            None => return Err(Status::invalid_argument("update has no payload")),
        };
        let update = SubmittedUpdate {
            round: req.round,
            layout_hash: req.layout_hash,
            base_adapter_hash: req.base_adapter_hash,
            num_samples: req.num_samples,
            payload,
        };
        let mut c = self.shared.lock();
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        let name = participant_name(&c, &req.participant_id);
        let rounds_before = c.history().len();
        match c.submit(&req.participant_id, &update, self.shared.now_ms()) {
            Ok(events) => {
                if let Some(m) = &req.metrics {
                    info!(
                        participant = %name,
                        round = req.round,
                        steps = m.steps,
                        loss_first = m.train_loss_first,
                        loss_last = m.train_loss_last,
                        "update accepted"
                    );
                }
                let status = c.status();
                let response = pb::SubmitUpdateResponse {
                    round_closed: c.history().len() > rounds_before,
                    updates_received: status.updates_received as u32,
                    cohort_size: status.cohort_size as u32,
                };
                self.shared.settle(&c, events)?;
                Ok(Response::new(response))
            }
            Err(e) => {
                warn!(participant = %name, round = req.round, error = %e, "update refused");
                Err(status_for(&e))
            }
        }
    }
}
