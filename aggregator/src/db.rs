//! The aggregator's crash-safe state: one SQLite file (WAL, `synchronous = FULL`) holding
//! the run (plan fingerprint, session id), the coordinator's state (members, tokens, the
//! open round and its secure-aggregation stage), every closed round's record, the current
//! global adapter
//! with the strategy's server state, the last `adapter_history` rounds' adapters, and a
//! secure attempt's running masked sum once its masked-input stage has closed.
//!
//! Every change is committed in one transaction before the call that caused it is
//! answered (and while the coordinator is still locked, so no participant can see a state
//! that is not on disk). Each part is written only when it changed: the state on every
//! change, the model once per closed round, the sum at its stage boundary (see
//! `fedcore::round::snapshot` for why that is enough to resume). `kill -9` at any moment
//! leaves the last committed transaction, which is a state the run can resume from.
//!
//! The schema is explicit and versioned: `application_id` marks the file as Mekong's and
//! `user_version` is [`SCHEMA_VERSION`]; a file that is not a SQLite database, belongs to
//! another program, has another schema version or holds a run of another plan is refused
//! with an error naming the file, never overwritten.

use std::path::{Path, PathBuf};

use fedcore::round::snapshot::{Resumed, Saved, SavedSum, SnapshotError};
use fedcore::strategy::{GlobalModel, global};
use fedcore::{Coordinator, FederationPlan, RoundRecord};
use rusqlite::{Connection, OptionalExtension, params};
use thiserror::Error;

/// Version of the schema below, kept in `PRAGMA user_version`. Version 2 added the
/// `control` table; a version 1 file is upgraded in place when opened ([`upgrade`]).
pub const SCHEMA_VERSION: i64 = 2;

/// `PRAGMA application_id` of a Mekong aggregator database ("MKNG").
pub const APPLICATION_ID: i64 = 0x4D4B_4E47;

const SCHEMA_V1: &str = "
CREATE TABLE run (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    federation TEXT NOT NULL,
    plan_sha256 TEXT NOT NULL,
    plan_json TEXT NOT NULL,
    session BLOB NOT NULL CHECK (length(session) = 32)
);
-- fedcore's Coordinator::encode_state: small, rewritten on every change.
CREATE TABLE coordinator (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    state BLOB NOT NULL
);
-- The current global adapter (PEFT safetensors bytes) and the strategy's server state.
CREATE TABLE model (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    rounds_closed INTEGER NOT NULL,
    adapter_hash TEXT NOT NULL,
    adapter BLOB NOT NULL,
    server_state BLOB NOT NULL
);
-- Every closed round's record (contributors, dropped, samples, adapter hash, strategy,
-- secure attempt), as JSON; written once, when the round closes.
CREATE TABLE rounds (
    round INTEGER PRIMARY KEY,
    record_json TEXT NOT NULL
);
-- Closed rounds' global adapters, the latest `adapter_history` kept.
CREATE TABLE adapters (
    round INTEGER PRIMARY KEY,
    adapter_hash TEXT NOT NULL,
    adapter BLOB NOT NULL
);
-- The open secure attempt's running masked sum, once its masked input has closed.
CREATE TABLE secure_sum (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    round INTEGER NOT NULL,
    attempt INTEGER NOT NULL,
    partial BLOB NOT NULL,
    words BLOB NOT NULL
);
";

/// Schema version 2: the operator's requests (`fedaggregator pause|resume|stop`), written
/// by the command and applied, then marked done, by the running server (see
/// `crate::control`, which uses this module, never the other way round).
const CONTROL_TABLE: &str = "
CREATE TABLE control (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    command TEXT NOT NULL CHECK (command IN ('pause', 'resume', 'stop')),
    requested_unix_ms INTEGER NOT NULL,
    done_unix_ms INTEGER,
    outcome TEXT CHECK (outcome IN ('applied', 'refused')),
    message TEXT
);
";

/// Why the state database could not be used. Each names the file.
#[derive(Debug, Error)]
pub enum DbError {
    #[error("{path}: cannot open the state database: {source}")]
    Open {
        path: String,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: cannot create the state database: {source}")]
    Create {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path}: not a Mekong aggregator state database (application_id {found:#x}, {tables} tables); refusing to use or overwrite it: set [state] database to another file"
    )]
    Foreign {
        path: String,
        found: i64,
        tables: i64,
    },
    #[error(
        "{path}: state database schema version {found}, but this aggregator reads version {SCHEMA_VERSION}"
    )]
    Schema { path: String, found: i64 },
    #[error(
        "{path}: holds the run of federation {federation:?} with plan {saved}, but the configuration's plan is {configured}; refusing to resume it under another plan (restore the configuration it was started with, or point [state] database at a new file to start a new run)"
    )]
    PlanMismatch {
        path: String,
        federation: String,
        saved: String,
        configured: String,
    },
    #[error("{path}: {what}: {source}")]
    Sql {
        path: String,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
    #[error("{path}: the state database is damaged: {message}")]
    Corrupt { path: String, message: String },
    #[error("{path}: the saved run cannot be resumed: {source}")]
    Snapshot {
        path: String,
        #[source]
        source: SnapshotError,
    },
}

/// What a database holds of a run, to restore the coordinator from
/// (`fedcore::Coordinator::restore`).
#[derive(Debug)]
pub struct SavedRun {
    pub session: [u8; 32],
    pub state: Vec<u8>,
    pub server_state: Vec<u8>,
    pub global: GlobalModel,
    pub history: Vec<RoundRecord>,
    pub sum: Option<SavedSum>,
}

impl SavedRun {
    /// The coordinator this run resumes as (fedcore's `Coordinator::restore`, at time
    /// `now_ms` of the new process).
    pub fn restore(
        self,
        plan: FederationPlan,
        now_ms: u64,
    ) -> Result<(Coordinator, Resumed), SnapshotError> {
        Coordinator::restore(
            plan,
            Saved {
                state: &self.state,
                server_state: &self.server_state,
                global: self.global,
                history: self.history,
                sum: self.sum,
            },
            now_ms,
        )
    }
}

/// What was last committed, so that unchanged parts are not written again.
#[derive(Default)]
struct Written {
    run: bool,
    state: Option<Vec<u8>>,
    rounds_closed: Option<u64>,
    sum: Option<(u64, u32, usize)>,
}

/// A write that commits with the coordinator's state or not at all
/// ([`StateDb::save_with`]); `what` names it in the error.
pub(crate) struct SameTransaction<F> {
    pub what: &'static str,
    pub write: F,
}

/// An open state database.
pub struct StateDb {
    conn: Connection,
    path: PathBuf,
    history: u64,
    written: Written,
}

impl std::fmt::Debug for StateDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StateDb")
            .field("path", &self.path)
            .field("history", &self.history)
            .finish_non_exhaustive()
    }
}

impl StateDb {
    /// Opens (or creates, 0600) the database at `path` for `plan`, keeping the latest
    /// `history` rounds' adapters (0: all). Returns the saved run when there is one.
    pub fn open(
        path: &Path,
        plan: &FederationPlan,
        history: u64,
    ) -> Result<(Self, Option<SavedRun>), DbError> {
        let shown = path.display().to_string();
        create_private(path).map_err(|source| DbError::Create {
            path: shown.clone(),
            source,
        })?;
        let conn = Connection::open(path).map_err(|source| DbError::Open {
            path: shown.clone(),
            source,
        })?;
        let mut db = StateDb {
            conn,
            path: path.to_path_buf(),
            history,
            written: Written::default(),
        };
        db.prepare_schema()?;
        let saved = db.load(plan)?;
        db.written.run = saved.is_some();
        Ok((db, saved))
    }

    /// How long a write waits for another connection's lock before it fails (SQLite's
    /// busy timeout; rusqlite's default is 5 s).
    pub fn with_busy_timeout(self, timeout: std::time::Duration) -> Self {
        // Setting a busy timeout on an open connection cannot fail.
        let _ = self.conn.busy_timeout(timeout);
        self
    }

    /// The connection, for the operator's requests (`crate::control`).
    pub(crate) fn conn(&self) -> &Connection {
        &self.conn
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn shown(&self) -> String {
        self.path.display().to_string()
    }

    fn sql(&self, what: &'static str) -> impl FnOnce(rusqlite::Error) -> DbError + '_ {
        move |source| DbError::Sql {
            path: self.shown(),
            what,
            source,
        }
    }

    /// Checks the file is ours and current, or lays the schema down in a new one; then
    /// WAL and full synchronisation.
    fn prepare_schema(&mut self) -> Result<(), DbError> {
        let pragma = |conn: &Connection, name: &str| -> Result<i64, rusqlite::Error> {
            conn.query_row(&format!("PRAGMA {name}"), [], |r| r.get(0))
        };
        // The first read is where a file that is not SQLite at all shows.
        let app = pragma(&self.conn, "application_id").map_err(|source| DbError::Open {
            path: self.shown(),
            source,
        })?;
        let version =
            pragma(&self.conn, "user_version").map_err(self.sql("reading user_version"))?;
        let tables: i64 = self
            .conn
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(self.sql("listing tables"))?;
        if app == 0 && version == 0 && tables == 0 {
            let tx = self.conn.transaction().map_err(|source| DbError::Sql {
                path: self.path.display().to_string(),
                what: "creating the schema",
                source,
            })?;
            tx.execute_batch(SCHEMA_V1)
                .and_then(|()| tx.execute_batch(CONTROL_TABLE))
                .and_then(|()| {
                    tx.execute_batch(&format!(
                        "PRAGMA application_id = {APPLICATION_ID}; PRAGMA user_version = {SCHEMA_VERSION};"
                    ))
                })
                .and_then(|()| tx.commit())
                .map_err(|source| DbError::Sql {
                    path: self.path.display().to_string(),
                    what: "creating the schema",
                    source,
                })?;
        } else {
            upgrade(&mut self.conn, &self.path)?;
        }
        let mode: String = self
            .conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(self.sql("switching to WAL"))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(DbError::Corrupt {
                path: self.shown(),
                message: format!("SQLite refused write-ahead logging (journal_mode {mode})"),
            });
        }
        // FULL: a commit survives power loss too, not only a killed process. secure_delete:
        // revealed shares of a finished attempt do not linger in free pages.
        self.conn
            .execute_batch("PRAGMA synchronous = FULL; PRAGMA secure_delete = ON;")
            .map_err(self.sql("setting synchronous = FULL"))?;
        Ok(())
    }

    /// The saved run, if any; refuses one of another plan.
    fn load(&self, plan: &FederationPlan) -> Result<Option<SavedRun>, DbError> {
        let run: Option<(String, String, Vec<u8>)> = self
            .conn
            .query_row(
                "SELECT federation, plan_sha256, session FROM run WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql("reading the run"))?;
        let Some((federation, saved, session)) = run else {
            return Ok(None);
        };
        let configured = plan.fingerprint();
        if saved != configured {
            return Err(DbError::PlanMismatch {
                path: self.shown(),
                federation,
                saved,
                configured,
            });
        }
        let corrupt = |message: String| DbError::Corrupt {
            path: self.shown(),
            message,
        };
        let session: [u8; 32] = session
            .as_slice()
            .try_into()
            .map_err(|_| corrupt(format!("the session id has {} bytes", session.len())))?;
        let state: Vec<u8> = self
            .conn
            .query_row("SELECT state FROM coordinator WHERE id = 1", [], |r| {
                r.get(0)
            })
            .optional()
            .map_err(self.sql("reading the coordinator state"))?
            .ok_or_else(|| corrupt("a run without a coordinator state".into()))?;
        let (hash, adapter, server_state): (String, Vec<u8>, Vec<u8>) = self
            .conn
            .query_row(
                "SELECT adapter_hash, adapter, server_state FROM model WHERE id = 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()
            .map_err(self.sql("reading the global adapter"))?
            .ok_or_else(|| corrupt("a run without a global adapter".into()))?;
        let global = decode_adapter(plan, &adapter)
            .map_err(|e| corrupt(format!("the global adapter does not decode: {e}")))?;
        if global.content_hash() != hash {
            return Err(corrupt(format!(
                "the global adapter's content hash is {}, the row says {hash}",
                global.content_hash()
            )));
        }
        let history = self.history()?;
        let sum = self
            .conn
            .query_row(
                "SELECT round, attempt, partial, words FROM secure_sum WHERE id = 1",
                [],
                |r| {
                    Ok(SavedSum {
                        round: r.get::<_, i64>(0)? as u64,
                        attempt: r.get::<_, i64>(1)? as u32,
                        partial: r.get(2)?,
                        words_le: r.get(3)?,
                    })
                },
            )
            .optional()
            .map_err(self.sql("reading the secure-aggregation sum"))?;
        Ok(Some(SavedRun {
            session,
            state,
            server_state,
            global,
            history,
            sum,
        }))
    }

    /// Every closed round's record, oldest first.
    fn history(&self) -> Result<Vec<RoundRecord>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round, record_json FROM rounds ORDER BY round")
            .map_err(self.sql("reading the rounds"))?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))
            .map_err(self.sql("reading the rounds"))?;
        let mut history = Vec::new();
        for row in rows {
            let (round, json) = row.map_err(self.sql("reading the rounds"))?;
            let record: RoundRecord =
                serde_json::from_str(&json).map_err(|e| DbError::Corrupt {
                    path: self.shown(),
                    message: format!("round {round}'s record does not decode: {e}"),
                })?;
            history.push(record);
        }
        Ok(history)
    }

    /// Commits whatever changed in `c` since the last call, in one transaction.
    pub fn save(&mut self, c: &Coordinator) -> Result<(), DbError> {
        self.save_with(
            c,
            None::<SameTransaction<fn(&Connection) -> rusqlite::Result<()>>>,
        )
    }

    /// [`StateDb::save`], with one more write in the same transaction (the operator's
    /// request marked done, see `crate::control`), so a crash can neither lose the change
    /// nor lose or repeat what goes with it.
    pub(crate) fn save_with<F>(
        &mut self,
        c: &Coordinator,
        also: Option<SameTransaction<F>>,
    ) -> Result<(), DbError>
    where
        F: FnOnce(&Connection) -> rusqlite::Result<()>,
    {
        let state = c.encode_state();
        let rounds = c.rounds_closed();
        let sum = c.durable_sum();
        let sum_key = sum.map(|s| s.key());
        if also.is_none()
            && self.written.run
            && self.written.state.as_deref() == Some(state.as_slice())
            && self.written.rounds_closed == Some(rounds)
            && self.written.sum == sum_key
        {
            return Ok(());
        }
        let path = self.shown();
        let sql = |what: &'static str| {
            let path = path.clone();
            move |source| DbError::Sql { path, what, source }
        };
        let tx = self
            .conn
            .transaction()
            .map_err(sql("starting a transaction"))?;
        if !self.written.run {
            let plan = c.plan();
            tx.execute(
                "INSERT INTO run (id, federation, plan_sha256, plan_json, session) VALUES (1, ?1, ?2, ?3, ?4)",
                params![plan.federation, plan.fingerprint(), plan.to_json(), c.session().to_vec()],
            )
            .map_err(sql("recording the run"))?;
        }
        if self.written.rounds_closed != Some(rounds) {
            let adapter = global::encode_stored(c.global());
            tx.execute(
                "INSERT OR REPLACE INTO model (id, rounds_closed, adapter_hash, adapter, server_state) VALUES (1, ?1, ?2, ?3, ?4)",
                params![rounds as i64, c.global_hash(), adapter, c.encode_server_state()],
            )
            .map_err(sql("saving the global adapter"))?;
            // Records of the rounds closed since the last commit (all of them on the first
            // commit of a process: idempotent).
            let since = self.written.rounds_closed.unwrap_or(0) as usize;
            for record in c.history().iter().skip(since) {
                let json = serde_json::to_string(record).expect("a round record serialises");
                tx.execute(
                    "INSERT OR REPLACE INTO rounds (round, record_json) VALUES (?1, ?2)",
                    params![record.round as i64, json],
                )
                .map_err(sql("saving the round's record"))?;
            }
            if let Some(record) = c.history().last() {
                tx.execute(
                    "INSERT OR REPLACE INTO adapters (round, adapter_hash, adapter) VALUES (?1, ?2, ?3)",
                    params![record.round as i64, record.adapter_hash, adapter],
                )
                .map_err(sql("saving the round's adapter"))?;
                if self.history > 0 && record.round > self.history {
                    tx.execute(
                        "DELETE FROM adapters WHERE round <= ?1",
                        params![(record.round - self.history) as i64],
                    )
                    .map_err(sql("pruning old adapters"))?;
                }
            }
        }
        if self.written.sum != sum_key {
            match sum {
                Some(s) => tx.execute(
                    "INSERT OR REPLACE INTO secure_sum (id, round, attempt, partial, words) VALUES (1, ?1, ?2, ?3, ?4)",
                    params![s.round as i64, s.attempt as i64, s.encode_partial(), s.words_le()],
                ),
                None => tx.execute("DELETE FROM secure_sum", []),
            }
            .map_err(sql("saving the secure-aggregation sum"))?;
        }
        tx.execute(
            "INSERT OR REPLACE INTO coordinator (id, state) VALUES (1, ?1)",
            params![state],
        )
        .map_err(sql("saving the coordinator state"))?;
        if let Some(also) = also {
            (also.write)(&tx).map_err(sql(also.what))?;
        }
        tx.commit().map_err(sql("committing"))?;
        self.written = Written {
            run: true,
            state: Some(state),
            rounds_closed: Some(rounds),
            sum: sum_key,
        };
        Ok(())
    }

    /// The rounds whose adapters the database keeps, oldest first.
    pub fn kept_rounds(&self) -> Result<Vec<u64>, DbError> {
        let mut stmt = self
            .conn
            .prepare("SELECT round FROM adapters ORDER BY round")
            .map_err(self.sql("listing adapters"))?;
        let rows = stmt
            .query_map([], |r| r.get::<_, i64>(0))
            .map_err(self.sql("listing adapters"))?;
        rows.map(|r| r.map(|v| v as u64))
            .collect::<Result<_, _>>()
            .map_err(self.sql("listing adapters"))
    }

    /// A kept round's global model (its adapter, and FedEx-LoRA's dense corrections).
    pub fn adapter(
        &self,
        plan: &FederationPlan,
        round: u64,
    ) -> Result<Option<GlobalModel>, DbError> {
        let bytes: Option<Vec<u8>> = self
            .conn
            .query_row(
                "SELECT adapter FROM adapters WHERE round = ?1",
                params![round as i64],
                |r| r.get(0),
            )
            .optional()
            .map_err(self.sql("reading a round's adapter"))?;
        bytes
            .map(|b| {
                decode_adapter(plan, &b).map_err(|e| DbError::Corrupt {
                    path: self.shown(),
                    message: format!("round {round}'s adapter does not decode: {e}"),
                })
            })
            .transpose()
    }
}

/// Checks that an existing file is a Mekong state database, and brings a version 1 schema
/// to version 2 (adds the `control` table) in one transaction. Refuses a foreign file, or a
/// schema version this build does not know, naming the file. Shared by the server and the
/// operator's commands, which may reach an old file first.
pub(crate) fn upgrade(conn: &mut Connection, path: &Path) -> Result<(), DbError> {
    let shown = path.display().to_string();
    let sql = |what: &'static str| {
        let path = shown.clone();
        move |source| DbError::Sql { path, what, source }
    };
    // IMMEDIATE: two processes upgrading at once serialise here, and the second sees 2.
    let tx = conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
        .map_err(|source| DbError::Open {
            path: shown.clone(),
            source,
        })?;
    let app: i64 = tx
        .query_row("PRAGMA application_id", [], |r| r.get(0))
        .map_err(sql("reading application_id"))?;
    let version: i64 = tx
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(sql("reading user_version"))?;
    if app != APPLICATION_ID {
        let tables: i64 = tx
            .query_row("SELECT count(*) FROM sqlite_master", [], |r| r.get(0))
            .map_err(sql("listing tables"))?;
        return Err(DbError::Foreign {
            path: shown.clone(),
            found: app,
            tables,
        });
    }
    match version {
        SCHEMA_VERSION => {}
        1 => {
            tx.execute_batch(CONTROL_TABLE)
                .and_then(|()| tx.execute_batch("PRAGMA user_version = 2;"))
                .map_err(sql("upgrading the schema from version 1 to 2"))?;
            tx.commit()
                .map_err(sql("upgrading the schema from version 1 to 2"))?;
            tracing::info!(database = %shown, "state database upgraded from schema version 1 to 2 (operator control requests)");
        }
        found => {
            return Err(DbError::Schema {
                path: shown.clone(),
                found,
            });
        }
    }
    Ok(())
}

/// A stored global model: the PEFT tensors, and FedEx-LoRA's corrections when the plan's
/// global carries them (a blob with corrections the plan does not expect, or without those
/// it does, is refused).
fn decode_adapter(
    plan: &FederationPlan,
    bytes: &[u8],
) -> Result<GlobalModel, fedcore::AdapterError> {
    let initial = plan.initial_model();
    let model = global::decode_stored(bytes, initial.adapter.config().clone())?;
    if model.has_corrections() != initial.has_corrections() {
        return Err(fedcore::AdapterError::Shape(format!(
            "the stored model {} dense corrections, the plan's strategy `{}` {} them",
            if model.has_corrections() {
                "has"
            } else {
                "has no"
            },
            plan.strategy.mode.name(),
            if initial.has_corrections() {
                "needs"
            } else {
                "has no use for"
            },
        )));
    }
    Ok(model)
}

/// Creates the file (and its directory) readable by the owner alone if it does not exist:
/// it holds the participants' bearer ids. SQLite gives its -wal and -shm files the same
/// permissions.
fn create_private(path: &Path) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(false);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    options.open(path).map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(rounds: u64) -> FederationPlan {
        let mut p = crate::config::AggregatorConfig::example().plan;
        p.roster.clear();
        p.secure_aggregation.enabled = false;
        p.rounds.rounds = rounds;
        p.rounds.participants = 2;
        p.rounds.min_updates = 2;
        p
    }

    fn submit_all(c: &mut Coordinator, fill: f32) {
        let round = c.status().round;
        for t in ["t0", "t1"] {
            let u = fedcore::SubmittedUpdate {
                round,
                layout_hash: c.upload_manifest().hash_hex(),
                base_adapter_hash: c.global_hash().to_string(),
                num_samples: 3,
                payload: fedcore::UpdatePayload::Plaintext(
                    vec![fill; c.upload_manifest().len()]
                        .iter()
                        .flat_map(|v| v.to_le_bytes())
                        .collect(),
                ),
            };
            c.submit(t, &u, 0).unwrap();
        }
    }

    fn restore(plan: &FederationPlan, saved: SavedRun) -> Coordinator {
        saved.restore(plan.clone(), 0).unwrap().0
    }

    #[test]
    fn reopened_database_resumes_the_run_and_keeps_the_last_adapters() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("nested/state.sqlite");
        let plan = plan(4);
        let (mut db, saved) = StateDb::open(&path, &plan, 2).unwrap();
        assert!(saved.is_none());
        let mut c = Coordinator::new(plan.clone(), [5; 32]).unwrap();
        db.save(&c).unwrap();
        c.join("t0".into(), "lab-a", "lo", 0).unwrap();
        db.save(&c).unwrap();
        c.join("t1".into(), "lab-b", "km", 0).unwrap();
        db.save(&c).unwrap();
        for fill in [0.5, 0.25, 0.125] {
            submit_all(&mut c, fill);
            db.save(&c).unwrap();
        }
        drop(db);
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600, "{mode:o}");
        }

        let (db, saved) = StateDb::open(&path, &plan, 2).unwrap();
        let saved = saved.expect("the run is there");
        assert_eq!(saved.session, [5; 32]);
        let back = restore(&plan, saved);
        assert_eq!(back.session(), [5; 32]);
        assert_eq!(back.global(), c.global());
        assert_eq!(back.history(), c.history());
        assert_eq!(back.participant("t1"), Some(("lab-b", "km")));
        assert_eq!(back.status().round, 4);
        // Only the last two rounds' adapters are kept, each the one that round closed with.
        assert_eq!(db.kept_rounds().unwrap(), vec![2, 3]);
        let round3 = db.adapter(&plan, 3).unwrap().unwrap();
        assert_eq!(round3.content_hash(), c.history()[2].adapter_hash);
        assert!(db.adapter(&plan, 1).unwrap().is_none());
    }

    /// FedEx-LoRA's dense corrections are part of the stored model: a restart resumes with
    /// them, and kept rounds return them.
    #[test]
    fn a_fedex_run_keeps_its_dense_corrections_across_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let mut plan = plan(3);
        plan.strategy.mode = fedcore::AggregationMode::FedExLora;
        plan.validate().unwrap();
        let (mut db, _) = StateDb::open(&path, &plan, 0).unwrap();
        let mut c = Coordinator::new(plan.clone(), [6; 32]).unwrap();
        c.join("t0".into(), "lab-a", "lo", 0).unwrap();
        c.join("t1".into(), "lab-b", "km", 0).unwrap();
        db.save(&c).unwrap();
        for fill in [0.5, 0.25] {
            submit_all(&mut c, fill);
            db.save(&c).unwrap();
        }
        assert!(
            c.global()
                .base_delta
                .values()
                .any(|d| d.data().iter().any(|v| *v != 0.0)),
            "two rounds merged non-zero corrections"
        );
        drop(db);
        let (db, saved) = StateDb::open(&path, &plan, 0).unwrap();
        let back = restore(&plan, saved.unwrap());
        assert_eq!(back.global(), c.global());
        assert_eq!(back.global_hash(), c.global().content_hash());
        let round1 = db.adapter(&plan, 1).unwrap().unwrap();
        assert!(round1.has_corrections());
        assert_eq!(round1.content_hash(), c.history()[0].adapter_hash);
    }

    #[test]
    fn a_database_of_another_plan_is_refused_and_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let (mut db, _) = StateDb::open(&path, &plan(3), 0).unwrap();
        db.save(&Coordinator::new(plan(3), [1; 32]).unwrap())
            .unwrap();
        drop(db);
        let before = std::fs::read(&path).unwrap();
        let err = StateDb::open(&path, &plan(5), 0).unwrap_err();
        assert!(matches!(err, DbError::PlanMismatch { .. }), "{err}");
        let message = err.to_string();
        assert!(message.contains("state.sqlite"), "{message}");
        assert!(message.contains(&plan(3).fingerprint()), "{message}");
        assert!(message.contains(&plan(5).fingerprint()), "{message}");
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn files_that_are_not_our_database_are_refused_with_their_name() {
        let dir = tempfile::tempdir().unwrap();
        // Not SQLite at all.
        let junk = dir.path().join("junk.sqlite");
        std::fs::write(&junk, vec![0x42u8; 8192]).unwrap();
        let err = StateDb::open(&junk, &plan(3), 0).unwrap_err();
        assert!(matches!(err, DbError::Open { .. }), "{err}");
        assert!(err.to_string().contains("junk.sqlite"), "{err}");
        assert_eq!(std::fs::read(&junk).unwrap(), vec![0x42u8; 8192]);

        // Another program's SQLite database.
        let foreign = dir.path().join("foreign.sqlite");
        Connection::open(&foreign)
            .unwrap()
            .execute_batch("CREATE TABLE notes (body TEXT); INSERT INTO notes VALUES ('keep me');")
            .unwrap();
        let err = StateDb::open(&foreign, &plan(3), 0).unwrap_err();
        assert!(matches!(err, DbError::Foreign { tables: 1, .. }), "{err}");
        assert!(err.to_string().contains("foreign.sqlite"), "{err}");
        let kept: String = Connection::open(&foreign)
            .unwrap()
            .query_row("SELECT body FROM notes", [], |r| r.get(0))
            .unwrap();
        assert_eq!(kept, "keep me");

        // Ours, but a schema from the future.
        let future = dir.path().join("future.sqlite");
        StateDb::open(&future, &plan(3), 0).unwrap();
        Connection::open(&future)
            .unwrap()
            .execute_batch("PRAGMA user_version = 99;")
            .unwrap();
        let err = StateDb::open(&future, &plan(3), 0).unwrap_err();
        assert!(matches!(err, DbError::Schema { found: 99, .. }), "{err}");

        // Ours, with a damaged global adapter.
        let damaged = dir.path().join("damaged.sqlite");
        let (mut db, _) = StateDb::open(&damaged, &plan(3), 0).unwrap();
        db.save(&Coordinator::new(plan(3), [1; 32]).unwrap())
            .unwrap();
        drop(db);
        Connection::open(&damaged)
            .unwrap()
            .execute_batch("UPDATE model SET adapter = x'00';")
            .unwrap();
        let err = StateDb::open(&damaged, &plan(3), 0).unwrap_err();
        assert!(matches!(err, DbError::Corrupt { .. }), "{err}");
        assert!(err.to_string().contains("global adapter"), "{err}");
    }
}
