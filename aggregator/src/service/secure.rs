//! The secure-aggregation stages: stage messages, masked streams folded into the running
//! sum as they arrive (and resumed), and the sweep that takes never-completed masked inputs
//! back out of the sum once their stage has closed.

use std::sync::Arc;

use fedcore::secagg::protocol::Stage as SecureStage;
use mekong_proto::secure::{decode_words, message_from_wire};
use mekong_proto::v1 as pb;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use super::{FederationService, Shared, check_owner, participant_name};
use crate::held::{Held, MaskedKey};
use crate::spool::Spool;
use crate::status_map::status_for;
use sha2::{Digest, Sha256};

impl FederationService {
    pub(super) async fn handle_secure_aggregate(
        &self,
        request: Request<pb::SecureAggregateRequest>,
    ) -> Result<Response<pb::SecureAggregateResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let msg = message_from_wire(req.message.as_ref())
            .map_err(|e| Status::invalid_argument(format!("secure aggregation message: {e}")))?;
        let kind = match &msg {
            fedcore::round::SecureMessage::Advertise(_) => "advertise_keys",
            fedcore::round::SecureMessage::ShareKeys(_) => "share_keys",
            fedcore::round::SecureMessage::Consistency(_) => "consistency_check",
            fedcore::round::SecureMessage::Unmask(_) => "unmask",
        };
        let mut c = self.shared.lock();
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        let name = participant_name(&c, &req.participant_id);
        match c.secure_message(
            &req.participant_id,
            req.round,
            req.attempt,
            msg,
            self.shared.now_ms(),
        ) {
            Ok(events) => {
                self.shared.settle_with(&c, events, |_| {
                    tracing::debug!(participant = %name, round = req.round, attempt = req.attempt, kind, "secure aggregation message accepted");
                })?;
                Ok(Response::new(pb::SecureAggregateResponse {}))
            }
            Err(e) => {
                warn!(participant = %name, round = req.round, attempt = req.attempt, error = %e, "secure aggregation message refused");
                Err(status_for(&e))
            }
        }
    }

    pub(super) async fn handle_submit_masked(
        &self,
        request: Request<Streaming<pb::MaskedChunk>>,
    ) -> Result<Response<pb::SubmitMaskedResponse>, Status> {
        // The stream is served by its own task, so that a broken connection (which drops
        // this future) still runs the retraction to its end.
        let certified = self.certified(&request)?;
        let shared = self.shared.clone();
        tokio::spawn(receive_masked(shared, request.into_inner(), certified))
            .await
            .map_err(|e| Status::internal(format!("masked stream task failed: {e}")))?
            .map(Response::new)
    }

    pub(super) async fn handle_masked_received(
        &self,
        request: Request<pb::MaskedReceivedRequest>,
    ) -> Result<Response<pb::MaskedReceivedResponse>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let mut c = self.shared.lock();
        check_owner(&c, &req.participant_id, certified.as_deref())?;
        self.shared.seen(&c, &req.participant_id);
        let (words, committed) = c
            .masked_received(&req.participant_id, req.round, req.attempt)
            .map_err(|e| status_for(&e))?;
        Ok(Response::new(pb::MaskedReceivedResponse {
            words_received: words as u64,
            committed,
        }))
    }
}

/// Receives one masked update, or the rest of one whose stream broke: checks each chunk
/// against its SHA-256, folds it into the running sum as it arrives and logs it to a spool;
/// commits on the last chunk. If the stream breaks or stalls, what it folded is held (see
/// [`crate::held`]) for the participant to resume; what is never completed is taken back
/// out of the sum when the stage closes.
async fn receive_masked(
    shared: Arc<Shared>,
    mut stream: Streaming<pb::MaskedChunk>,
    certified: Option<String>,
) -> Result<pb::SubmitMaskedResponse, Status> {
    sweep_held(&shared);
    let stage_deadline = {
        let c = shared.lock();
        shared.instant_at(c.next_deadline().unwrap_or_else(|| shared.now_ms()))
    };
    // The first chunk says who is sending; nothing shared is taken before it is checked,
    // so a silent stream holds no reading slot, and a lab has at most one stream in
    // flight: a lab (or a stranger) cannot take the slots honest labs need.
    let first = tokio::time::timeout_at(
        stage_deadline.min(tokio::time::Instant::now() + shared.limits.stream_idle_timeout()),
        stream.message(),
    )
    .await
    .map_err(|_| Status::deadline_exceeded("the masked stream sent nothing"))??
    .ok_or_else(|| Status::invalid_argument("masked stream carried no chunk"))?;
    check_owner(&shared.lock(), &first.participant_id, certified.as_deref())?;
    let _one_stream = shared
        .masked_in_flight
        .claim(&first.participant_id)
        .ok_or_else(|| {
            Status::resource_exhausted(
                "another masked stream of this participant is still in flight; send again once it ended",
            )
        })?;
    let _slot = tokio::time::timeout_at(stage_deadline, shared.masked_slots.acquire())
        .await
        .map_err(|_| {
            Status::deadline_exceeded("the masked-input stage closed before this stream's turn")
        })?
        .map_err(|_| Status::unavailable("the aggregator is shutting down"))?;
    let key = MaskedKey {
        token: first.participant_id.clone(),
        round: first.round,
        attempt: first.attempt,
    };
    let spool = Spool::new(&shared.spool_dir)
        .map_err(|e| Status::unavailable(format!("aggregator cannot spool masked input: {e}")))?;
    let mut held = shared.held.take(&key).unwrap_or_default();
    held.spools.push(spool);
    let outcome = fold_stream(&shared, &key, first, &mut stream, stage_deadline, &mut held).await;
    match outcome {
        Ok(words) => Ok(pb::SubmitMaskedResponse {
            words_received: words as u64,
        }),
        Err(status) => {
            let name = participant_name(&shared.lock(), &key.token);
            let words = held.words();
            if words > 0 {
                warn!(participant = %name, round = key.round, attempt = key.attempt, words, %status, "masked stream broke; its folded words are held for it to resume until the stage closes");
                shared.held.hold(key, held);
                // The stage may have closed while the stream was open.
                sweep_held(&shared);
            } else {
                warn!(participant = %name, round = key.round, attempt = key.attempt, %status, "masked input not taken");
            }
            Err(status)
        }
    }
}

/// Takes back, out of the sum, every held masked input whose attempt is no longer in its
/// masked-input stage: its participant never completed it. Called by each new masked
/// stream and by the deadline ticker, without the coordinator locked.
pub(crate) fn sweep_held(shared: &Shared) {
    // Cheap when nothing broke, which is nearly always: the ticker calls this 4 times a
    // second and the coordinator's status is not free.
    if shared.held.is_empty() {
        return;
    }
    let open = {
        let c = shared.lock();
        let s = c.status();
        (s.round, s.secure)
    };
    let gone = shared.held.drain_unless(|k| {
        matches!(open, (round, Some((SecureStage::MaskedInput, attempt)))
            if round == k.round && attempt == k.attempt)
    });
    for (key, held) in gone {
        if let Some(index) = held.index {
            let name = participant_name(&shared.lock(), &key.token);
            info!(participant = %name, round = key.round, attempt = key.attempt, words = held.words(), "taking a masked input that was never completed back out of the sum");
            retract(shared, &key, index, held.spools);
        }
    }
}

async fn fold_stream(
    shared: &Shared,
    key: &MaskedKey,
    first: pb::MaskedChunk,
    stream: &mut Streaming<pb::MaskedChunk>,
    deadline: tokio::time::Instant,
    held: &mut Held,
) -> Result<usize, Status> {
    let mut next = Some(first);
    loop {
        let chunk = match next.take() {
            Some(c) => c,
            None => match tokio::time::timeout_at(
                deadline.min(tokio::time::Instant::now() + shared.limits.stream_idle_timeout()),
                stream.message(),
            )
            .await
            {
                Err(_) => {
                    return Err(Status::deadline_exceeded(format!(
                        "the stream stalled or the masked-input stage closed after {} words",
                        held.words()
                    )));
                }
                Ok(Err(status)) => return Err(status),
                Ok(Ok(None)) => {
                    return Err(Status::invalid_argument(format!(
                        "masked stream ended after {} words without its last chunk",
                        held.words()
                    )));
                }
                Ok(Ok(Some(c))) => c,
            },
        };
        if chunk.sha256.is_empty() {
            return Err(Status::invalid_argument(format!(
                "masked chunk at word {} carries no SHA-256",
                chunk.offset
            )));
        }
        if Sha256::digest(&chunk.words_u32_le)[..] != chunk.sha256[..] {
            return Err(Status::data_loss(format!(
                "masked chunk at word {} failed its SHA-256 check; resume from word {}",
                chunk.offset,
                held.words()
            )));
        }
        let words = decode_words(&chunk.words_u32_le)
            .map_err(|e| Status::invalid_argument(format!("masked chunk: {e}")))?;
        let folded = {
            let mut c = shared.lock();
            c.masked_chunk(
                &key.token,
                key.round,
                key.attempt,
                chunk.offset as usize,
                &words,
            )
            .map_err(|e| status_for(&e))?
        };
        held.index = Some(folded);
        let spool = held.spools.last_mut().expect("the stream's own spool");
        if let Err(e) = spool.append(&words) {
            // The chunk is folded but not logged: take it back directly.
            let mut c = shared.lock();
            if let Ok(events) = c.masked_retract(
                folded,
                key.round,
                key.attempt,
                chunk.offset as usize,
                &words,
                shared.now_ms(),
            ) {
                let _ = shared.settle(&c, events);
            }
            return Err(Status::unavailable(format!(
                "aggregator cannot spool masked input: {e}"
            )));
        }
        held.hash(&chunk.words_u32_le);
        if chunk.last {
            let got = held.digest();
            if got[..] != chunk.vector_sha256[..] {
                // Every chunk matched its own hash, so the vector was assembled wrongly
                // (or the participant hashed something else): none of it can stay.
                let spools = std::mem::take(&mut held.spools);
                *held = Held::default();
                retract(shared, key, folded, spools);
                return Err(Status::data_loss(if chunk.vector_sha256.is_empty() {
                    "the last masked chunk carries no whole-vector SHA-256; the input was taken \
                     back out of the sum: send it again from word 0"
                        .to_string()
                } else {
                    format!(
                        "the masked vector's SHA-256 is {}, the participant's {}; the input was \
                         taken back out of the sum: send it again from word 0",
                        hex::encode(got),
                        hex::encode(&chunk.vector_sha256)
                    )
                }));
            }
            let mut c = shared.lock();
            let events = c
                .masked_commit(&key.token, key.round, key.attempt, shared.now_ms())
                .map_err(|e| status_for(&e))?;
            shared.settle_with(&c, events, |c| {
                tracing::debug!(participant = %participant_name(c, &key.token), round = key.round, attempt = key.attempt, words = held.words(), "masked input accepted");
            })?;
            return Ok(held.words());
        }
    }
}

fn retract(
    shared: &Shared,
    key: &MaskedKey,
    index: fedcore::secagg::messages::Index,
    spools: Vec<Spool>,
) {
    let mut events = Vec::new();
    let mut failure = None;
    let mut base = 0;
    for spool in spools {
        let len = spool.len();
        let replayed = spool.replay(|offset, words| {
            let mut c = shared.lock();
            match c.masked_retract(
                index,
                key.round,
                key.attempt,
                base + offset,
                words,
                shared.now_ms(),
            ) {
                Ok(e) => events.extend(e),
                Err(e) => failure = Some(e.to_string()),
            }
        });
        if let Err(e) = replayed {
            failure = Some(format!("cannot read the spool back: {e}"));
        }
        base += len;
    }
    if let Some(reason) = failure {
        // The round cannot finish with a partial input in its sum; the attempt fails at
        // the unmask deadline and is retried.
        tracing::error!(index, round = key.round, attempt = key.attempt, %reason, "retracting a broken masked stream failed");
    }
    let c = shared.lock();
    // A retraction after the stage closed changes the saved sum. A failed commit is
    // logged and stops the service (see `Shared::settle`).
    let _ = shared.settle(&c, events);
}
