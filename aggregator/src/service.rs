//! The tonic implementation of `mekong.v1.Federation`: a thin shell around fedcore's
//! [`Coordinator`]. It assigns secret participant ids, turns wire messages into coordinator
//! inputs and coordinator events into files on disk and wake-ups of long-polling callers.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use fedcore::{Coordinator, Event, SubmittedUpdate, Task, UpdatePayload, WaitReason};
use mekong_proto::convert::adapter_payload;
use mekong_proto::v1::{self as pb, federation_server::Federation};
use rand::RngCore;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::status_map::status_for;
use crate::store::AdapterStore;

/// Longest a FetchTask call is held while the answer is "wait".
const MAX_LONG_POLL: Duration = Duration::from_secs(20);

/// State shared by the gRPC handlers and the deadline ticker.
pub struct Shared {
    coordinator: Mutex<Coordinator>,
    /// Names of participants that have been told the run is finished.
    told_finished: Mutex<BTreeSet<String>>,
    store: AdapterStore,
    started: Instant,
    /// Bumped after every state change; long-polls wait on it.
    changes: watch::Sender<u64>,
}

impl Shared {
    /// Wraps a coordinator, saving its starting adapter as round 0.
    pub fn new(coordinator: Coordinator, store: AdapterStore) -> Result<Arc<Self>, Status> {
        store
            .save_initial(coordinator.global())
            .map_err(|e| Status::internal(format!("cannot save the initial adapter: {e}")))?;
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Shared {
            coordinator: Mutex::new(coordinator),
            told_finished: Mutex::new(BTreeSet::new()),
            store,
            started: Instant::now(),
            changes,
        }))
    }

    /// Milliseconds since the server started (the coordinator's clock).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The coordinator, locked. A handler that panicked cannot leave it half-updated (every
    /// coordinator method validates before it mutates), so a poisoned lock is recovered.
    pub fn lock(&self) -> MutexGuard<'_, Coordinator> {
        self.coordinator.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A receiver that sees every state change.
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// True once the run is finished and every participant has been told so.
    pub fn everyone_told(&self) -> bool {
        let c = self.lock();
        let status = c.status();
        status.stage == fedcore::round::Stage::Finished
            && self
                .told_finished
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .len()
                >= status.participants_joined
    }

    /// Persists what the events say and wakes long-polls. Called with the lock held so files
    /// are written in round order.
    pub fn apply_events(&self, coordinator: &Coordinator, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        for event in events {
            match event {
                Event::RoundStarted { round, cohort, .. } => {
                    info!(round, cohort = ?cohort, "round opened");
                }
                Event::RoundCompleted(record) => {
                    info!(
                        round = record.round,
                        contributors = ?record.contributors,
                        dropped = ?record.dropped,
                        total_samples = record.total_samples,
                        adapter = &record.adapter_hash[..12],
                        "round closed"
                    );
                    if let Err(e) = self.store.save_round(&record, coordinator.global()) {
                        warn!(round = record.round, error = %e, "cannot save the round's adapter");
                    }
                }
                Event::RoundExtended {
                    round,
                    received,
                    needed,
                    ..
                } => {
                    warn!(
                        round,
                        received, needed, "deadline passed with too few updates; round extended"
                    );
                }
                Event::RunFinished { rounds } => {
                    info!(rounds, dir = %self.store.final_dir().display(), "run finished");
                    if let Err(e) = self.store.save_final(coordinator.global()) {
                        warn!(error = %e, "cannot save the final adapter");
                    }
                }
            }
        }
        self.changes.send_modify(|v| *v += 1);
    }
}

/// The gRPC service.
#[derive(Clone)]
pub struct FederationService {
    shared: Arc<Shared>,
}

impl FederationService {
    pub fn new(shared: Arc<Shared>) -> Self {
        FederationService { shared }
    }
}

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
    }
}

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        let mut token = [0u8; 16];
        rand::rng().fill_bytes(&mut token);
        let token = hex::encode(token);
        let mut c = self.shared.lock();
        let events = c
            .join(
                token.clone(),
                &req.participant_name,
                &req.language,
                self.shared.now_ms(),
            )
            .map_err(|e| status_for(&e))?;
        info!(
            participant = %req.participant_name,
            language = %req.language,
            version = %req.client_version,
            "participant joined"
        );
        let response = pb::JoinResponse {
            participant_id: token,
            federation: c.plan().federation.clone(),
            plan_json: c.plan().to_json(),
            upload_layout_hash: c.upload_manifest().hash_hex(),
        };
        self.shared.apply_events(&c, events);
        self.shared.changes.send_modify(|v| *v += 1);
        Ok(Response::new(response))
    }

    async fn fetch_task(
        &self,
        request: Request<pb::FetchTaskRequest>,
    ) -> Result<Response<pb::FetchTaskResponse>, Status> {
        let req = request.into_inner();
        let wait = Duration::from_millis(req.wait_ms.into()).min(MAX_LONG_POLL);
        let give_up = tokio::time::Instant::now() + wait;
        let mut changes = self.shared.subscribe();
        loop {
            changes.borrow_and_update();
            let answer = {
                let c = self.shared.lock();
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
                        deadline_ms,
                    } => pb::fetch_task_response::Task::Train(pb::TrainTask {
                        round,
                        rounds_total: c.plan().rounds.rounds,
                        global_adapter: Some(adapter_payload(global, global_hash)),
                        deadline_in_ms: deadline_ms.saturating_sub(now),
                    }),
                    Task::Finished {
                        rounds,
                        global,
                        global_hash,
                    } => {
                        if let Some((name, _)) = c.participant(&req.participant_id) {
                            self.shared
                                .told_finished
                                .lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .insert(name.to_string());
                        }
                        self.shared.changes.send_modify(|v| *v += 1);
                        pb::fetch_task_response::Task::Finished(pb::Finished {
                            rounds_completed: rounds,
                            final_adapter: Some(adapter_payload(global, global_hash)),
                        })
                    }
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

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let req = request.into_inner();
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
        let name = c
            .participant(&req.participant_id)
            .map(|(n, _)| n.to_string())
            .unwrap_or_else(|| "<unknown>".into());
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
                self.shared.apply_events(&c, events);
                Ok(Response::new(response))
            }
            Err(e) => {
                warn!(participant = %name, round = req.round, error = %e, "update refused");
                Err(status_for(&e))
            }
        }
    }

    async fn round_status(
        &self,
        _request: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatusResponse>, Status> {
        let c = self.shared.lock();
        let s = c.status();
        let stage = match s.stage {
            fedcore::round::Stage::WaitingForParticipants => pb::Stage::WaitingForParticipants,
            fedcore::round::Stage::Training => pb::Stage::Training,
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
                    total_samples: r.total_samples,
                    adapter_hash: r.adapter_hash,
                })
                .collect(),
        }))
    }
}
