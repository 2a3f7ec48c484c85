//! The state the gRPC handlers and the deadline ticker share, and the one transaction
//! path every change of the coordinator takes: nothing is told before it is on disk.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::path::PathBuf;

use fedcore::{Coordinator, Event};
use tokio::sync::watch;
use tonic::Status;
use tracing::{info, warn};

use crate::download::AdapterCache;
use crate::held::HeldInputs;
use crate::limits::LimitsSection;
use crate::partial_update::PartialUpdates;
use crate::store::AdapterStore;

/// Participant ids with a stream in flight; a claim lasts until its guard is dropped (the
/// stream ended, however it ended).
#[derive(Default)]
pub(super) struct InFlight(Arc<Mutex<std::collections::HashSet<String>>>);

/// One participant's claim on [`InFlight`].
pub(super) struct InFlightClaim {
    set: Arc<Mutex<std::collections::HashSet<String>>>,
    token: String,
}

impl InFlight {
    /// Claims `token`, or `None` while an earlier claim on it is held.
    pub(super) fn claim(&self, token: &str) -> Option<InFlightClaim> {
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
    pub(super) store: AdapterStore,
    /// Where masked-input streams keep their undo logs.
    pub(super) spool_dir: PathBuf,
    /// What one caller can make the service hold (`[limits]`).
    pub(super) limits: LimitsSection,
    /// Reading slots for masked-input streams (`limits.masked_streams`). Each holds about
    /// one chunk in transit, so this bounds the memory for masked inputs at a constant,
    /// whatever the number of labs; the rest wait their turn (within the stage deadline)
    /// with only flow-control windows buffered.
    pub(super) masked_slots: tokio::sync::Semaphore,
    /// Participants with a masked-input stream in flight (one each).
    pub(super) masked_in_flight: InFlight,
    /// Participants with a plaintext update stream in flight (one each).
    pub(super) update_in_flight: InFlight,
    /// Masked inputs whose stream broke, held for their participants to resume.
    pub(super) held: HeldInputs,
    /// Plaintext update streams that broke, held for their participants to resume.
    pub(super) partial_updates: PartialUpdates,
    started: Instant,
    /// Bumped after every state change; long-polls wait on it.
    changes: watch::Sender<u64>,
    /// The operator's record (admin port).
    pub(crate) telemetry: crate::admin::Telemetry,
    /// The global adapter's wire form, encoded once per content hash.
    pub(super) adapters: AdapterCache,
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
    pub(super) fn check_healthy(&self) -> Result<(), Status> {
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
    pub(super) fn instant_at(&self, ms: u64) -> tokio::time::Instant {
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
