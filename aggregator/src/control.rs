//! The operator's pause, resume and stop of a running federation, through the state
//! database and never the network.
//!
//! `fedaggregator pause|resume|stop --config aggregator.toml` inserts a request into the
//! `control` table of the configuration's state database ([`send`]) and waits a few seconds
//! for it to be marked done. The running server polls the table from its deadline ticker
//! ([`apply_pending`]), applies each request to the coordinator
//! (`fedcore::Coordinator::command`), and commits the new state together with the request's
//! outcome in one transaction, so a crash neither loses an applied request nor applies it
//! twice. A refused request (e.g. resume of a run that is not paused) is marked refused with
//! the coordinator's reason and changes nothing. With no server running, a request stays
//! pending and is applied when the server next starts.
//!
//! Authorisation is the database file's permissions (0600, the center's operator account):
//! whoever can write the file can already do anything to the run, and the admin HTTP port
//! stays read-only and unauthenticated.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use fedcore::round::Command;
use fedcore::{Coordinator, Event};
use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use thiserror::Error;
use tracing::{info, warn};

use crate::db::{DbError, SameTransaction, StateDb};

/// How long the command and the server wait for each other's lock on the database.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Applied,
    Refused,
}

impl Outcome {
    fn name(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Refused => "refused",
        }
    }
}

/// A request marked done, in the transaction that commits its effect.
#[derive(Debug, Clone, Copy)]
pub struct Done<'a> {
    pub id: i64,
    pub outcome: Outcome,
    pub message: &'a str,
}

/// Why an operator request could not be sent. Each names the database file.
#[derive(Debug, Error)]
pub enum ControlError {
    #[error(
        "{0}: no state database there: the federation has not been started with this configuration (`fedaggregator serve` creates it)"
    )]
    Missing(PathBuf),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{path}: {what}: {source}")]
    Sql {
        path: String,
        what: &'static str,
        #[source]
        source: rusqlite::Error,
    },
}

/// What became of a sent request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sent {
    /// The request's row in the `control` table.
    pub id: i64,
    /// The server's outcome and message, if it marked the request done within the wait.
    pub done: Option<(Outcome, String)>,
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Records `done` (see [`Done`]).
pub(crate) fn mark(conn: &Connection, done: Done<'_>) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE control SET done_unix_ms = ?1, outcome = ?2, message = ?3 WHERE id = ?4",
        params![unix_ms(), done.outcome.name(), done.message, done.id],
    )?;
    Ok(())
}

/// Writes a `command` request into the state database at `path` and waits up to `wait`
/// for a running server to mark it done.
pub fn send(path: &Path, command: Command, wait: Duration) -> Result<Sent, ControlError> {
    if !path.is_file() {
        return Err(ControlError::Missing(path.to_path_buf()));
    }
    let shown = path.display().to_string();
    let sql = |what: &'static str| {
        let path = shown.clone();
        move |source| ControlError::Sql { path, what, source }
    };
    // Never create: a missing file is an error above, not a new empty database.
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| DbError::Open {
        path: shown.clone(),
        source,
    })?;
    conn.busy_timeout(BUSY_TIMEOUT)
        .map_err(sql("setting the busy timeout"))?;
    crate::db::upgrade(&mut conn, path)?;
    conn.execute(
        "INSERT INTO control (command, requested_unix_ms) VALUES (?1, ?2)",
        params![command.name(), unix_ms()],
    )
    .map_err(sql("writing the request"))?;
    let id = conn.last_insert_rowid();
    let give_up = Instant::now() + wait;
    loop {
        let done: Option<(Option<String>, Option<String>)> = conn
            .query_row(
                "SELECT outcome, message FROM control WHERE id = ?1 AND done_unix_ms IS NOT NULL",
                params![id],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql("reading the request's outcome"))?;
        if let Some((outcome, message)) = done {
            let outcome = match outcome.as_deref() {
                Some("applied") => Outcome::Applied,
                _ => Outcome::Refused,
            };
            return Ok(Sent {
                id,
                done: Some((outcome, message.unwrap_or_default())),
            });
        }
        if Instant::now() >= give_up {
            return Ok(Sent { id, done: None });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A request not yet done.
struct Pending {
    id: i64,
    command: String,
}

fn pending(conn: &Connection) -> rusqlite::Result<Vec<Pending>> {
    let mut stmt =
        conn.prepare("SELECT id, command FROM control WHERE done_unix_ms IS NULL ORDER BY id")?;
    let rows = stmt.query_map([], |r| {
        Ok(Pending {
            id: r.get(0)?,
            command: r.get(1)?,
        })
    })?;
    rows.collect()
}

/// Applies the pending requests to `c` in the order they were made, committing each
/// applied one with the coordinator's new state (see the module docs). Returns the
/// coordinator's events to act on. An error is a failed commit: the caller stops the
/// service (fail-stop), as for any other state change. A table that cannot be read (the
/// command holding a long lock) is retried at the next poll.
pub(crate) fn apply_pending(
    db: &mut StateDb,
    c: &mut Coordinator,
    now_ms: u64,
) -> Result<Vec<Event>, DbError> {
    let requests = match pending(db.conn()) {
        Ok(r) => r,
        Err(e) => {
            warn!(database = %db.path().display(), error = %e, "cannot read operator requests; retrying");
            return Ok(Vec::new());
        }
    };
    let mut events = Vec::new();
    for request in requests {
        let applied = match Command::from_name(&request.command) {
            // The table's CHECK admits only known names; a newer build's command is refused.
            None => Err(format!("unknown command {:?}", request.command)),
            Some(command) => c.command(command, now_ms).map_err(|e| e.to_string()),
        };
        match applied {
            Ok(applied) => {
                info!(request = request.id, command = %request.command, outcome = %applied.message, "operator request applied");
                let done = Done {
                    id: request.id,
                    outcome: Outcome::Applied,
                    message: &applied.message,
                };
                db.save_with(
                    c,
                    Some(SameTransaction {
                        what: "marking the operator request done",
                        write: |conn: &rusqlite::Connection| mark(conn, done),
                    }),
                )?;
                events.extend(applied.events);
            }
            Err(reason) => {
                warn!(request = request.id, command = %request.command, %reason, "operator request refused");
                let done = Done {
                    id: request.id,
                    outcome: Outcome::Refused,
                    message: &reason,
                };
                if let Err(e) = mark(db.conn(), done) {
                    // Nothing changed; the request is tried again at the next poll.
                    warn!(request = request.id, error = %e, "cannot mark the refused request");
                }
            }
        }
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fedcore::FederationPlan;
    use fedcore::round::Stage;

    fn plan() -> FederationPlan {
        let mut p = crate::config::AggregatorConfig::example().plan;
        p.roster.clear();
        p.secure_aggregation.enabled = false;
        p.rounds.rounds = 3;
        p.rounds.participants = 1;
        p.rounds.min_updates = 1;
        p
    }

    fn outcome(path: &Path, id: i64) -> (Option<String>, Option<String>) {
        let conn = Connection::open(path).unwrap();
        conn.query_row(
            "SELECT outcome, message FROM control WHERE id = ?1",
            params![id],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap()
    }

    #[test]
    fn requests_are_applied_once_committed_with_the_state_and_refusals_are_recorded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let missing = send(&path, Command::Pause, Duration::ZERO).unwrap_err();
        assert!(matches!(missing, ControlError::Missing(_)), "{missing}");
        assert!(missing.to_string().contains("state.sqlite"), "{missing}");
        assert!(!path.exists(), "a command must not create the database");

        let (mut db, _) = StateDb::open(&path, &plan(), 0).unwrap();
        let mut c = Coordinator::new(plan(), [1; 32]).unwrap();
        c.join("t0".into(), "p0", "lo", 0).unwrap();
        db.save(&c).unwrap();

        // No server polls: the request stays pending.
        let sent = send(&path, Command::Pause, Duration::from_millis(150)).unwrap();
        assert_eq!(sent.done, None);
        let resume = send(&path, Command::Resume, Duration::ZERO).unwrap();
        let events = apply_pending(&mut db, &mut c, 10).unwrap();
        assert!(events.is_empty());
        let (o, m) = outcome(&path, sent.id);
        assert_eq!(o.as_deref(), Some("applied"));
        assert!(m.unwrap().contains("round 1 finishes"));
        // The resume came after the pause in the same poll, so it applied too.
        assert_eq!(outcome(&path, resume.id).0.as_deref(), Some("applied"));
        assert!(!c.control().paused);

        // A refusal names the state and changes nothing; done requests are not re-applied.
        let again = send(&path, Command::Resume, Duration::ZERO).unwrap();
        let before = c.encode_state();
        apply_pending(&mut db, &mut c, 20).unwrap();
        assert_eq!(c.encode_state(), before);
        let (o, m) = outcome(&path, again.id);
        assert_eq!(o.as_deref(), Some("refused"));
        assert!(m.unwrap().contains("not paused"));

        // The applied state is what a restart reads.
        send(&path, Command::Stop, Duration::ZERO).unwrap();
        apply_pending(&mut db, &mut c, 30).unwrap();
        drop(db);
        let (_, saved) = StateDb::open(&path, &plan(), 0).unwrap();
        let saved = saved.unwrap();
        let (restored, _) = saved.restore(plan(), 0).unwrap();
        assert!(restored.control().stop_requested);
        assert_eq!(restored.status().stage, Stage::Training);
    }

    #[test]
    fn a_version_1_database_is_upgraded_by_the_first_command() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        drop(StateDb::open(&path, &plan(), 0).unwrap());
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch("DROP TABLE control; PRAGMA user_version = 1;")
                .unwrap();
        }
        let sent = send(&path, Command::Stop, Duration::ZERO).unwrap();
        assert_eq!(sent.done, None);
        let conn = Connection::open(&path).unwrap();
        let version: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(version, crate::db::SCHEMA_VERSION);
        // And the server opens it as its own.
        StateDb::open(&path, &plan(), 0).unwrap();

        conn.execute_batch("PRAGMA user_version = 7;").unwrap();
        let err = send(&path, Command::Stop, Duration::ZERO).unwrap_err();
        assert!(err.to_string().contains("schema version 7"), "{err}");
    }
}
