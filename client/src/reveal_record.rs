//! Where a lab keeps its record of reveals ([`fedcore::round::guard`]) between processes:
//! one file per plan in the lab's state directory, written durably before any shares
//! leave. Without a state directory the record lives in memory only, which a restart of
//! the lab forgets; that is said loudly at start.

use std::path::{Path, PathBuf};

use fedcore::round::guard::{self, GuardError, RevealLog};
use tracing::warn;

/// The lab's reveal record for one plan, and where it is kept.
#[derive(Debug)]
pub struct RevealRecord {
    log: RevealLog,
    path: Option<PathBuf>,
}

impl RevealRecord {
    /// Opens the record of the plan with fingerprint `plan_sha256` in `state_dir` (made if
    /// missing), or an in-memory one when there is none.
    pub fn open(
        state_dir: Option<&Path>,
        plan_sha256: &str,
        lab: &str,
    ) -> Result<Self, GuardError> {
        match state_dir {
            Some(dir) => {
                let path = guard::file_in(dir, plan_sha256);
                let log = guard::read_file(&path, plan_sha256)?;
                Ok(RevealRecord {
                    log,
                    path: Some(path),
                })
            }
            None => {
                warn!(participant = %lab, "no state directory: this lab's record of what it unmasked is kept in memory only, so a restarted lab could be made to unmask an update twice; give it a state directory (`fedclient join --state-dir`)");
                Ok(RevealRecord {
                    log: RevealLog::new(plan_sha256),
                    path: None,
                })
            }
        }
    }

    /// Where the record is kept, if on disk.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// The record as it stands (what the lab's round machine starts from).
    pub fn log(&self) -> &RevealLog {
        &self.log
    }

    /// Keeps `next` (the record with a new reveal, from the lab's round machine) and, with a
    /// state directory, syncs it to disk before returning: call it before the shares are
    /// sent. On an error nothing may be sent.
    pub fn save(&mut self, next: RevealLog) -> Result<(), GuardError> {
        if let Some(path) = &self.path {
            guard::write_file(path, &next)?;
        }
        self.log = next;
        Ok(())
    }
}
