//! The tonic implementation of `mekong.v1.Federation`: a thin shell around fedcore's
//! [`Coordinator`]. It assigns secret participant ids, turns wire messages into coordinator
//! inputs and coordinator events into files on disk and wake-ups of long-polling callers.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use fedcore::secagg::protocol::Stage as SecureStage;
use fedcore::{Coordinator, Event, SubmittedUpdate, Task, UpdatePayload, WaitReason};
use mekong_proto::convert::{leave_reason_from_wire, leave_reason_to_wire, work_to_wire};
use mekong_proto::secure::{decode_words, message_from_wire, step_to_wire};
use mekong_proto::tls::{PeerCertificate, Revocations};
use mekong_proto::v1::{self as pb, federation_server::Federation};
use rand::RngCore;
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::{info, warn};

use crate::download::AdapterCache;
use crate::held::{Held, HeldInputs, MaskedKey};
use crate::limits::LimitsSection;
use crate::partial_update::{PartialUpdate, PartialUpdates};
use crate::spool::Spool;
use crate::status_map::status_for;
use crate::store::AdapterStore;
use sha2::{Digest, Sha256};

/// Longest a FetchTask call is held while the answer is "wait".
const MAX_LONG_POLL: Duration = Duration::from_secs(20);

/// Participant ids with a stream in flight; a claim lasts until its guard is dropped (the
/// stream ended, however it ended).
#[derive(Default)]
struct InFlight(Arc<Mutex<std::collections::HashSet<String>>>);

/// One participant's claim on [`InFlight`].
struct InFlightClaim {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    token: String,
}

impl InFlight {
    /// Claims `token`, or `None` while an earlier claim on it is held.
    fn claim(&self, token: &str) -> Option<InFlightClaim> {
        let mut set = self.0.lock().unwrap_or_else(|p| p.into_inner());
        set.insert(token.to_string()).then(|| InFlightClaim {
            set: self.0.clone(),
            token: token.to_string(),
        })
    }
}

impl Drop for InFlightClaim {
    fn drop(&mut self) {
        self.set
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.token);
    }
}

/// State shared by the gRPC handlers and the deadline ticker.
pub struct Shared {
    coordinator: Mutex<Coordinator>,
    store: AdapterStore,
    /// Where masked-input streams keep their undo logs.
    spool_dir: PathBuf,
    /// What one caller can make the service hold (`[limits]`).
    limits: LimitsSection,
    /// Reading slots for masked-input streams (`limits.masked_streams`). Each holds about
    /// one chunk in transit, so this bounds the memory for masked inputs at a constant,
    /// whatever the number of labs; the rest wait their turn (within the stage deadline)
    /// with only flow-control windows buffered.
    masked_slots: tokio::sync::Semaphore,
    /// Participants with a masked-input stream in flight (one each).
    masked_in_flight: InFlight,
    /// Participants with a plaintext update stream in flight (one each).
    update_in_flight: InFlight,
    /// Masked inputs whose stream broke, held for their participants to resume.
    held: HeldInputs,
    /// Plaintext update streams that broke, held for their participants to resume.
    partial_updates: PartialUpdates,
    started: Instant,
    /// Bumped after every state change; long-polls wait on it.
    changes: watch::Sender<u64>,
    /// The operator's record (admin port).
    pub(crate) telemetry: crate::admin::Telemetry,
    /// The global adapter's wire form, encoded once per content hash.
    adapters: AdapterCache,
    /// The crash-safe state; none only for in-memory services built by tests.
    db: Option<Mutex<crate::db::StateDb>>,
    /// Set when a state change could not be committed: the service then refuses every call
    /// (the participants retry) until the process is restarted from what is on disk.
    failed: std::sync::atomic::AtomicBool,
}

impl Shared {
    /// Wraps a coordinator kept in memory only, saving its starting adapter as round 0.
    pub fn new(
        coordinator: Coordinator,
        store: AdapterStore,
        adapters: AdapterCache,
    ) -> Result<Arc<Self>, Status> {
        Self::build(coordinator, store, None, adapters, LimitsSection::default())
    }

    /// Wraps a coordinator whose every change is committed to `db` before it is answered.
    /// Commits the coordinator as it is (a new run's first record, or a resumed run's
    /// restarted round), then writes the `round-NNNN/` directories of kept rounds that are
    /// missing (a kill between a round's commit and its export) and `final/` of a finished
    /// run.
    pub fn with_db(
        coordinator: Coordinator,
        store: AdapterStore,
        mut db: crate::db::StateDb,
        adapters: AdapterCache,
        limits: LimitsSection,
    ) -> Result<Arc<Self>, StartError> {
        db.save(&coordinator)?;
        for round in db.kept_rounds()? {
            let record = coordinator.history().iter().find(|r| r.round == round);
            if let (Some(record), false) = (record, store.has_round(round))
                && let Some(adapter) = db.adapter(coordinator.plan(), round)?
                && let Err(e) = store.save_round(record, &adapter, None)
            {
                warn!(round, error = %e, "cannot write the round's adapter directory");
            }
        }
        if coordinator.status().stage == fedcore::round::Stage::Finished
            && !store.has_final()
            && let Err(e) = store.save_final(coordinator.global())
        {
            warn!(error = %e, "cannot write the final adapter directory");
        }
        let dir = store.dir().display().to_string();
        Self::build(coordinator, store, Some(db), adapters, limits).map_err(|status| {
            StartError::Store {
                dir,
                message: status.message().to_string(),
            }
        })
    }

    fn build(
        coordinator: Coordinator,
        store: AdapterStore,
        db: Option<crate::db::StateDb>,
        adapters: AdapterCache,
        limits: LimitsSection,
    ) -> Result<Arc<Self>, Status> {
        if !store
            .round_dir(0)
            .join(fedcore::peft::CONFIG_FILE)
            .is_file()
        {
            store
                .save_initial(&coordinator.plan().initial_model())
                .map_err(|e| Status::internal(format!("cannot save the initial adapter: {e}")))?;
        }
        let (changes, _) = watch::channel(0);
        Ok(Arc::new(Shared {
            coordinator: Mutex::new(coordinator),
            spool_dir: store.dir().join(".spool"),
            masked_slots: tokio::sync::Semaphore::new(limits.masked_streams),
            masked_in_flight: InFlight::default(),
            update_in_flight: InFlight::default(),
            held: HeldInputs::default(),
            partial_updates: PartialUpdates::new(limits.held_partial_update_bytes),
            limits,
            store,
            started: Instant::now(),
            changes,
            telemetry: crate::admin::Telemetry::new(),
            adapters,
            db: db.map(Mutex::new),
            failed: std::sync::atomic::AtomicBool::new(false),
        }))
    }

    /// Whether a state change could not be committed (see [`Shared::settle`]).
    pub fn failed(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Refuses calls once the state on disk has fallen behind.
    fn check_healthy(&self) -> Result<(), Status> {
        if self.failed() {
            return Err(Status::unavailable(
                "the aggregator could not save its state and stopped taking calls; it resumes from its database when restarted",
            ));
        }
        Ok(())
    }

    /// The one path by which a call changes the coordinator: locks it, applies `change`,
    /// and [settles](Self::settle_with) what changed, with `answer` building the reply
    /// (and logging what must come before the events' own lines) once it is on disk.
    /// A `change` that fails changes nothing and commits nothing.
    pub(crate) fn transact<T, R>(
        &self,
        change: impl FnOnce(&mut Coordinator) -> Result<(T, Vec<Event>), Status>,
        answer: impl FnOnce(&Coordinator, T) -> R,
    ) -> Result<R, Status> {
        let mut c = self.lock();
        let (value, events) = change(&mut c)?;
        self.settle_with(&c, events, |c| answer(c, value))
    }

    /// Commits the coordinator's state, then acts on its events and wakes every long-poll.
    /// Called with the coordinator locked, after every change and before the call is
    /// answered, so that nothing a participant is told is missing from the database after a
    /// crash. A commit that fails stops the service taking calls (fail-stop): answering from
    /// a state that is not on disk could, after a restart, contradict what labs were told.
    pub fn settle(&self, coordinator: &Coordinator, events: Vec<Event>) -> Result<(), Status> {
        self.settle_with(coordinator, events, |_| ())
    }

    /// [`Self::settle`], with `committed` run between the commit and the events: the reply
    /// is built from the committed state, and a log line that explains the events (a join,
    /// a departure) comes before theirs.
    pub(crate) fn settle_with<R>(
        &self,
        coordinator: &Coordinator,
        events: Vec<Event>,
        committed: impl FnOnce(&Coordinator) -> R,
    ) -> Result<R, Status> {
        self.commit(coordinator)?;
        let reply = committed(coordinator);
        self.apply_events(coordinator, events);
        self.changes.send_modify(|v| *v += 1);
        Ok(reply)
    }

    /// The commit half of [`Shared::settle`]; every change goes through `settle`.
    fn commit(&self, coordinator: &Coordinator) -> Result<(), Status> {
        if let Some(db) = &self.db {
            let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
            if let Err(e) = db.save(coordinator) {
                tracing::error!(error = %e, "cannot commit the aggregator's state; refusing further calls until restarted");
                self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
                self.changes.send_modify(|v| *v += 1);
                return Err(Status::unavailable(format!(
                    "the aggregator could not save its state: {e}"
                )));
            }
        }
        Ok(())
    }

    /// Applies the operator's pending requests from the state database (see
    /// [`crate::control`]); called by the deadline ticker with the coordinator locked. A
    /// commit that fails stops the service, as in [`Shared::commit`].
    pub(crate) fn apply_control(&self, coordinator: &mut Coordinator) {
        let Some(db) = &self.db else {
            return;
        };
        let result = {
            let mut db = db.lock().unwrap_or_else(|p| p.into_inner());
            crate::control::apply_pending(&mut db, coordinator, self.now_ms())
        };
        match result {
            Ok(events) => {
                self.apply_events(coordinator, events);
                self.changes.send_modify(|v| *v += 1);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot commit an operator request; refusing further calls until restarted");
                self.failed.store(true, std::sync::atomic::Ordering::SeqCst);
                self.changes.send_modify(|v| *v += 1);
            }
        }
    }

    /// Milliseconds since the server started (the coordinator's clock).
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// The async-runtime instant of coordinator time `ms`.
    fn instant_at(&self, ms: u64) -> tokio::time::Instant {
        tokio::time::Instant::from_std(self.started + Duration::from_millis(ms))
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

    /// True once the run is finished and every participant that did not leave has been
    /// told so. Who was told is part of the committed state, so this holds across restarts.
    pub fn everyone_told(&self) -> bool {
        self.lock().everyone_told()
    }

    /// Persists and logs what the events say (the caller wakes long-polls). Called with the lock held so files
    /// are written in round order, only once the state that produced the events is on disk
    /// ([`Self::settle`], or the operator's requests, which commit themselves).
    fn apply_events(&self, coordinator: &Coordinator, events: Vec<Event>) {
        if events.is_empty() {
            return;
        }
        self.telemetry.observe(&events, self.now_ms());
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
                        left = ?record.left,
                        total_samples = record.total_samples,
                        adapter = &record.adapter_hash[..12],
                        "round closed"
                    );
                    let timing = self.telemetry.round_timing(record.round);
                    if let Err(e) =
                        self.store
                            .save_round(&record, coordinator.global(), timing.as_ref())
                    {
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
                Event::SecureStageClosed {
                    round,
                    attempt,
                    stage,
                    remaining,
                } => {
                    info!(round, attempt, stage = ?stage, remaining, "secure aggregation stage closed");
                }
                Event::SecureAttemptFailed {
                    round,
                    attempt,
                    reason,
                } => {
                    warn!(round, attempt, %reason, "secure aggregation attempt failed; starting the next attempt");
                }
                Event::Paused { after_round } => {
                    warn!(
                        after_round,
                        "paused by the operator: no round opens until `fedaggregator resume`"
                    );
                }
                Event::RunFinished { rounds } => {
                    let reason = coordinator
                        .finish_reason()
                        .map_or_else(String::new, |r| r.to_string());
                    info!(rounds, %reason, dir = %self.store.final_dir().display(), "run finished");
                    if let Err(e) = self.store.save_final(coordinator.global()) {
                        warn!(error = %e, "cannot save the final adapter");
                    }
                }
            }
        }
    }
}

/// Why the service cannot start on a saved state (the server reports it as its own
/// `ServeError`; this module does not know the server).
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("state database: {0}")]
    State(#[from] crate::db::DbError),
    #[error("cannot prepare {dir}: {message}")]
    Store { dir: String, message: String },
}

/// The gRPC service.
#[derive(Clone)]
pub struct FederationService {
    shared: Arc<Shared>,
    /// With mutual TLS on: the current revocation list. Every call must then come over a
    /// connection with a verified participant certificate that is not revoked since.
    revocations: Option<watch::Receiver<Revocations>>,
}

impl FederationService {
    /// A service for plaintext connections (calls carry no certificate).
    pub fn new(shared: Arc<Shared>) -> Self {
        FederationService {
            shared,
            revocations: None,
        }
    }

    /// A service behind mutual TLS: every call must carry the [`PeerCertificate`] of its
    /// connection, not revoked in the latest `revocations`, and a participant acts only
    /// under the name its certificate gives it.
    pub fn with_certificates(
        shared: Arc<Shared>,
        revocations: watch::Receiver<Revocations>,
    ) -> Self {
        FederationService {
            shared,
            revocations: Some(revocations),
        }
    }

    /// The participant the call's certificate names (`None` on plaintext connections).
    /// Every handler starts here, so it also refuses calls once the state could not be saved.
    fn certified<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        self.shared.check_healthy()?;
        let Some(revocations) = &self.revocations else {
            return Ok(None);
        };
        let Some(peer) = request.extensions().get::<PeerCertificate>() else {
            return Err(Status::unauthenticated(
                "this aggregator requires a participant certificate (mutual TLS)",
            ));
        };
        // The handshake checked the list of its day; a connection can outlive it.
        if revocations.borrow().is_revoked(&peer.serial) {
            warn!(participant = %peer.participant, peer = %peer.remote_addr, "call on a connection whose certificate has since been revoked");
            return Err(Status::permission_denied(format!(
                "the certificate of {:?} has been revoked",
                peer.participant
            )));
        }
        check_unexpired(peer, unix_now_s())?;
        Ok(Some(peer.participant.clone()))
    }
}

/// Seconds since the Unix epoch, by the system clock (certificates' validity is in it).
fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The handshake checked the certificate's validity at its time; a connection can outlive
/// it, so every call checks again, as for revocation.
fn check_unexpired(peer: &PeerCertificate, now_unix_s: i64) -> Result<(), Status> {
    if peer.expired_at(now_unix_s) {
        warn!(participant = %peer.participant, peer = %peer.remote_addr, "call on a connection whose certificate has since expired");
        return Err(Status::permission_denied(format!(
            "the certificate of {:?} expired {} s ago; the lab needs a renewed certificate (`fedaggregator provision`) and a new connection",
            peer.participant,
            now_unix_s - peer.not_after_unix_s
        )));
    }
    Ok(())
}

/// The one membership check every call with a participant id goes through, before
/// anything of the call is buffered or a shared slot is taken: the id must be one a join
/// handed out (an unknown id is refused, so a caller cannot park data under fresh random
/// ids), and it must belong to the participant the connection's certificate names (a
/// leaked id is of no use without that participant's certificate).
fn check_owner(c: &Coordinator, token: &str, certified: Option<&str>) -> Result<(), Status> {
    let Some((name, _)) = c.participant(token) else {
        return Err(status_for(&fedcore::RoundError::UnknownParticipant(
            fedcore::roster::shown_input(token),
        )));
    };
    if let Some(cert) = certified
        && name != cert
    {
        warn!(certificate = %cert, participant = %name, "call with another participant's id refused");
        return Err(Status::permission_denied(format!(
            "this participant id belongs to {name:?}, not to {cert:?} whose certificate this connection carries"
        )));
    }
    Ok(())
}

/// Refuses a member that left the federation: it takes no part in this run again, so it is
/// served neither later global adapters nor metrics reports (the coordinator refuses it
/// everything else itself).
fn check_present(c: &Coordinator, token: &str) -> Result<(), Status> {
    if let Some((name, _)) = c.participant(token)
        && let Some(departure) = c.departures().get(name)
    {
        return Err(status_for(&fedcore::RoundError::Left {
            name: name.to_string(),
            departure: *departure,
        }));
    }
    Ok(())
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

#[tonic::async_trait]
impl Federation for FederationService {
    async fn join(
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

    async fn fetch_task(
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

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let certified = self.certified(&request)?;
        self.accept_update(certified, request.into_inner())
    }

    async fn submit_update_stream(
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

    async fn update_received(
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

    async fn secure_aggregate(
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

    async fn submit_masked(
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

    async fn round_status(
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

    async fn report_metrics(
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

    async fn masked_received(
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

    type DownloadAdapterStream = std::pin::Pin<
        Box<dyn tokio_stream::Stream<Item = Result<pb::AdapterChunk, Status>> + Send + 'static>,
    >;

    async fn download_adapter(
        &self,
        request: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let encoded = {
            let c = self.shared.lock();
            check_owner(&c, &req.participant_id, certified.as_deref())?;
            check_present(&c, &req.participant_id)?;
            self.shared.seen(&c, &req.participant_id);
            if req.content_hash != c.global_hash() {
                return Err(Status::failed_precondition(format!(
                    "adapter {} is not the current global adapter ({}); fetch the task again",
                    req.content_hash,
                    c.global_hash()
                )));
            }
            self.shared.adapters.encoded(c.global(), c.global_hash())
        };
        let chunks = crate::download::chunks(encoded, req.offset)?;
        Ok(Response::new(Box::pin(chunks)))
    }

    async fn leave(
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

fn participant_name(c: &Coordinator, token: &str) -> String {
    c.participant(token)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| "<unknown>".into())
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::AggregatorConfig;
    use crate::db::StateDb;

    /// A connection that outlives its certificate is refused on its next call.
    #[test]
    fn a_call_after_the_certificate_expired_is_refused() {
        let peer = PeerCertificate {
            remote_addr: "127.0.0.1:9".parse().unwrap(),
            participant: "lab-a".into(),
            serial: vec![1],
            not_after_unix_s: 1_000,
        };
        assert!(check_unexpired(&peer, 999).is_ok());
        assert!(check_unexpired(&peer, 1_000).is_ok());
        let refused = check_unexpired(&peer, 1_061).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("\"lab-a\" expired 61 s ago"),
            "{refused}"
        );
    }

    /// `transact`: a change that fails commits nothing and wakes nobody; one that succeeds
    /// is on disk before its answer is built, and long-polls wake only after that.
    #[test]
    fn a_transaction_commits_before_it_answers_and_tells() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let plan = AggregatorConfig::example().plan;
        let (db, _) = StateDb::open(&path, &plan, 0).unwrap();
        let shared = Shared::with_db(
            Coordinator::new(plan.clone(), [7; 32]).unwrap(),
            AdapterStore::new(dir.path()),
            db,
            AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
            LimitsSection::default(),
        )
        .unwrap();
        let mut changes = shared.subscribe();
        changes.borrow_and_update();
        let refused = shared
            .transact(
                |c| {
                    let events = c
                        .join("t-x".into(), "not a valid name!", "lo", 0)
                        .map_err(|e| status_for(&e))?;
                    Ok(((), events))
                },
                |_, ()| unreachable!("a failed change has no answer"),
            )
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(!changes.has_changed().unwrap(), "nobody is woken");

        let joined = shared
            .transact(
                |c| Ok(((), c.join("t-a".into(), "lab-a", "lo", 0).unwrap())),
                |c, ()| {
                    // Built from the committed state, before anyone is told.
                    assert!(!changes.has_changed().unwrap());
                    c.participant("t-a").map(|(name, _)| name.to_string())
                },
            )
            .unwrap();
        assert_eq!(joined.as_deref(), Some("lab-a"));
        assert!(
            changes.has_changed().unwrap(),
            "long-polls wake after the commit"
        );

        drop(shared);
        let (_, saved) = StateDb::open(&path, &plan, 0).unwrap();
        let saved = saved.unwrap();
        let (c, _) = saved.restore(plan, 0).unwrap();
        assert_eq!(c.participant("t-a"), Some(("lab-a", "lo")));
        assert_eq!(c.participant("t-x"), None);
    }

    /// A commit that fails (here: another process holds the database's write lock past the
    /// busy timeout) stops the service taking calls, and the state on disk is the last
    /// good one.
    #[test]
    fn a_state_change_that_cannot_be_committed_stops_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let plan = AggregatorConfig::example().plan;
        let (db, _) = StateDb::open(&path, &plan, 0).unwrap();
        let shared = Shared::with_db(
            Coordinator::new(plan.clone(), [7; 32]).unwrap(),
            AdapterStore::new(dir.path()),
            db.with_busy_timeout(Duration::from_millis(50)),
            AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
            LimitsSection::default(),
        )
        .unwrap();
        {
            let mut c = shared.lock();
            let events = c.join("t-a".into(), "lab-a", "lo", 0).unwrap();
            shared.settle(&c, events).unwrap();
        }
        assert!(!shared.failed());

        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE;").unwrap();
        {
            let mut c = shared.lock();
            let events = c.join("t-b".into(), "lab-b", "km", 0).unwrap();
            let refused = shared.settle(&c, events).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable);
            assert!(refused.message().contains("state.sqlite"), "{refused}");
        }
        assert!(shared.failed());
        let refused = shared.check_healthy().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        other.execute_batch("ROLLBACK;").unwrap();
        drop(other);

        // What a restart finds: lab-a, not the join that could not be committed.
        drop(shared);
        let (_, saved) = StateDb::open(&path, &plan, 0).unwrap();
        let saved = saved.unwrap();
        let (c, _) = saved.restore(plan, 0).unwrap();
        assert_eq!(c.participant("t-a"), Some(("lab-a", "lo")));
        assert_eq!(c.participant("t-b"), None);
    }
}
