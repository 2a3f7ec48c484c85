//! A lab's durable record of the updates it has unmasked: the guard that keeps a cheating
//! aggregator from learning one lab's update as the difference of two sums.
//!
//! # The attack it stops
//!
//! Secure aggregation gives the aggregator the sum over the survivors of one attempt. If
//! the same update (or one trained again from the same starting model, which deterministic
//! local training makes nearly identical) is summed twice over two different survivor sets,
//! the difference of the two sums is what the sets do not share. An aggregator can try that
//! by restarting an attempt after it learned a sum, by sending the same global model again
//! under a new round number, or by replaying an older round after the lab restarted.
//!
//! # The rule
//!
//! Under one plan (keyed by its fingerprint) a lab reveals shares
//! - at most once per starting global model (its content hash), and
//! - only for strictly increasing round numbers,
//!
//! and it records each reveal durably *before* its shares leave ([`RevealLog::record`],
//! then [`write_file`], which syncs the file and its directory). A lab process that
//! restarts reads the record back ([`read_file`]), so forgetting is not a way around it.
//!
//! Why the reveal, and not the masked input: the aggregator only learns a sum when enough
//! labs reveal shares, and each honest lab reveals once per update. With the threshold
//! bound of [`crate::secagg::spec::SecureAggregationSpec::collusion_bound`], two different
//! sums over one update would need more honest reveals than there are honest labs.
//!
//! Each reveal is recorded with the session (the run) it was made in. The same round and
//! model asked again in the same session is an attempt restarted after this lab revealed:
//! the lab stays out of it (an honest aggregator counts it as a dropout and goes on). Asked
//! in another session, it is a new run of the same plan, which starts from the same initial
//! model: refused, since to the lab it is indistinguishable from a center replaying the
//! round. To run a plan again, change it (its seed or name), which changes its fingerprint.
//! The codec is JSON (small, readable by an operator who needs to see why a lab refuses).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::privacy::ddg::DistributedDiscreteGaussian;

/// Format version of the record.
const VERSION: u32 = 1;

/// Why a task was refused by the guard, or the record could not be used.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum GuardError {
    #[error(
        "round {round}: this lab already revealed its shares for round {last} of this plan, and rounds must strictly increase; the aggregator is replaying or reordering rounds, so this lab refuses"
    )]
    RoundNotIncreasing { round: u64, last: u64 },
    #[error(
        "round {round}: the aggregator sent again the global model {global_hash}, from which this lab already trained and revealed in round {first}; taking part again would let it difference two sums, so this lab refuses"
    )]
    GlobalReused {
        round: u64,
        first: u64,
        global_hash: String,
    },
    #[error(
        "round {round}: a new run of this plan (another session) asks this lab to train from the global model {global_hash} again, from which it already revealed an update in an earlier run; a lab never does that twice: to run the plan again, change it (e.g. training.seed), which changes its fingerprint"
    )]
    RunRepeated { round: u64, global_hash: String },
    #[error("{path}: {message}")]
    File { path: String, message: String },
}

/// One plan's record of reveals (see the module docs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevealLog {
    version: u32,
    /// The fingerprint of the plan this record belongs to.
    plan_sha256: String,
    /// The highest round whose shares this lab revealed (0: none yet).
    last_round: u64,
    /// Global models (content hash) this lab trained from and revealed, with the round and
    /// the session.
    globals: BTreeMap<String, Revealed>,
}

/// Where one reveal happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Revealed {
    round: u64,
    /// Hex of the 32-byte session id of the run.
    session: String,
    /// Under `[privacy]`: the noised sum the reveal let the center unmask (what it cost
    /// this lab's privacy budget, see [`RevealLog::spent`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    spent: Option<DistributedDiscreteGaussian>,
}

/// What the guard says about a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing revealed for this round or model yet: take part.
    Fresh,
    /// This very round and model were revealed already (an attempt restarted after this
    /// lab revealed): stay out of it, which an honest aggregator counts as a dropout.
    AlreadyRevealed,
}

impl RevealLog {
    /// An empty record for the plan with fingerprint `plan_sha256`.
    pub fn new(plan_sha256: &str) -> Self {
        RevealLog {
            version: VERSION,
            plan_sha256: plan_sha256.to_ascii_lowercase(),
            last_round: 0,
            globals: BTreeMap::new(),
        }
    }

    /// The plan this record belongs to.
    pub fn plan(&self) -> &str {
        &self.plan_sha256
    }

    /// The highest round revealed (0: none).
    pub fn last_round(&self) -> u64 {
        self.last_round
    }

    /// Whether a task of session `session` for `round` starting from `global_hash` may be
    /// trained and revealed. Refuses (with the deviation named) a model revealed before
    /// under another round or in another session, and a round at or below the last revealed
    /// one; a repeat of a revealed round and model in the same session is
    /// [`Verdict::AlreadyRevealed`].
    pub fn check(
        &self,
        round: u64,
        global_hash: &str,
        session: &[u8; 32],
    ) -> Result<Verdict, GuardError> {
        if let Some(first) = self.globals.get(&global_hash.to_ascii_lowercase()) {
            if first.round != round {
                return Err(GuardError::GlobalReused {
                    round,
                    first: first.round,
                    global_hash: global_hash.to_string(),
                });
            }
            if first.session != hex::encode(session) {
                return Err(GuardError::RunRepeated {
                    round,
                    global_hash: global_hash.to_string(),
                });
            }
            return Ok(Verdict::AlreadyRevealed);
        }
        if round <= self.last_round {
            return Err(GuardError::RoundNotIncreasing {
                round,
                last: self.last_round,
            });
        }
        Ok(Verdict::Fresh)
    }

    /// Records that this lab is about to reveal shares for `round` and `global_hash`, and
    /// under `[privacy]` the noised sum they unmask (`spent`); refuses what [`Self::check`]
    /// refuses. Persist the record before the shares leave.
    pub fn record(
        &mut self,
        round: u64,
        global_hash: &str,
        session: &[u8; 32],
        spent: Option<DistributedDiscreteGaussian>,
    ) -> Result<(), GuardError> {
        match self.check(round, global_hash, session)? {
            Verdict::AlreadyRevealed => Ok(()),
            Verdict::Fresh => {
                self.last_round = round;
                self.globals.insert(
                    global_hash.to_ascii_lowercase(),
                    Revealed {
                        round,
                        session: hex::encode(session),
                        spent,
                    },
                );
                Ok(())
            }
        }
    }

    /// How many updates this lab revealed (each let the center unmask one sum).
    pub fn reveals(&self) -> u64 {
        self.globals.len() as u64
    }

    /// The noised sums this lab's updates entered under this plan (the privacy it spent).
    pub fn spent(&self) -> Vec<DistributedDiscreteGaussian> {
        self.globals
            .values()
            .filter_map(|r| r.spent.clone())
            .collect()
    }

    /// The record as bytes (JSON).
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("the record serialises");
        out.push(b'\n');
        out
    }

    /// Reads a record, refusing one of another plan or another version; `what` names
    /// the source in errors.
    pub fn from_bytes(bytes: &[u8], plan_sha256: &str, what: &str) -> Result<Self, GuardError> {
        let bad = |message: String| GuardError::File {
            path: what.to_string(),
            message,
        };
        let log: RevealLog =
            serde_json::from_slice(bytes).map_err(|e| bad(format!("not a reveal record: {e}")))?;
        if log.version != VERSION {
            return Err(bad(format!(
                "reveal record version {} is not the supported {VERSION}",
                log.version
            )));
        }
        if !log.plan_sha256.eq_ignore_ascii_case(plan_sha256) {
            return Err(bad(format!(
                "the record belongs to plan {}, not {plan_sha256}",
                log.plan_sha256
            )));
        }
        if log.globals.values().any(|r| r.round > log.last_round) {
            return Err(bad("a revealed round is above the last round".into()));
        }
        Ok(log)
    }
}

/// Where a lab keeps the record of plan `plan_sha256` inside its state directory.
pub fn file_in(dir: &Path, plan_sha256: &str) -> PathBuf {
    let short: String = plan_sha256.chars().take(16).collect();
    dir.join(format!("reveals-{}.json", short.to_ascii_lowercase()))
}

/// Reads the record at `path`, or an empty one when the file does not exist yet.
pub fn read_file(path: &Path, plan_sha256: &str) -> Result<RevealLog, GuardError> {
    match std::fs::read(path) {
        Ok(bytes) => RevealLog::from_bytes(&bytes, plan_sha256, &path.display().to_string()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(RevealLog::new(plan_sha256)),
        Err(e) => Err(GuardError::File {
            path: path.display().to_string(),
            message: e.to_string(),
        }),
    }
}

/// Writes the record durably: a temporary file synced to disk, renamed over `path`, and
/// the directory synced, so that after a crash the file holds the old or the new record,
/// never neither.
pub fn write_file(path: &Path, log: &RevealLog) -> Result<(), GuardError> {
    use std::io::Write;
    let err = |p: &Path, e: std::io::Error| GuardError::File {
        path: p.display().to_string(),
        message: e.to_string(),
    };
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
    if let Some(dir) = dir {
        std::fs::create_dir_all(dir).map_err(|e| err(dir, e))?;
    }
    let tmp = path.with_extension("json.partial");
    let mut f = std::fs::File::create(&tmp).map_err(|e| err(&tmp, e))?;
    f.write_all(&log.to_bytes()).map_err(|e| err(&tmp, e))?;
    f.sync_all().map_err(|e| err(&tmp, e))?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(|e| err(path, e))?;
    if let Some(dir) = dir {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| err(dir, e))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_model_is_revealed_once_and_rounds_only_increase() {
        const S: &[u8; 32] = &[7; 32];
        let mut log = RevealLog::new("AB");
        assert_eq!(log.check(1, "g1", S), Ok(Verdict::Fresh));
        log.record(1, "g1", S, None).unwrap();
        // The same round and model again: an attempt restarted after this lab revealed.
        assert_eq!(log.check(1, "G1", S), Ok(Verdict::AlreadyRevealed));
        // The same model under a new round: the difference attack.
        let err = log.check(2, "g1", S).unwrap_err();
        assert!(matches!(
            err,
            GuardError::GlobalReused {
                round: 2,
                first: 1,
                ..
            }
        ));
        assert!(err.to_string().contains("round 2"), "{err}");
        // The same round and model in another run (session).
        let err = log.check(1, "g1", &[8; 32]).unwrap_err();
        assert!(
            matches!(err, GuardError::RunRepeated { round: 1, .. }),
            "{err}"
        );
        // A new model under an old round: a replay.
        log.record(3, "g3", S, None).unwrap();
        assert_eq!(
            log.check(2, "g2", S),
            Err(GuardError::RoundNotIncreasing { round: 2, last: 3 })
        );
        assert_eq!(
            log.check(3, "g4", S),
            Err(GuardError::RoundNotIncreasing { round: 3, last: 3 })
        );
        assert_eq!(log.check(4, "g4", S), Ok(Verdict::Fresh));
        assert!(log.record(2, "g1", S, None).is_err());
        assert_eq!(log.last_round(), 3);
    }

    #[test]
    fn the_record_survives_a_restart_and_belongs_to_one_plan() {
        let dir = tempfile::tempdir().unwrap();
        let path = file_in(dir.path(), "abcdef0123456789ffff");
        assert!(path.ends_with("reveals-abcdef0123456789.json"));
        let mut log = read_file(&path, "abcdef0123456789ffff").unwrap();
        assert_eq!(log, RevealLog::new("abcdef0123456789ffff"));
        log.record(2, "g2", &[1; 32], None).unwrap();
        write_file(&path, &log).unwrap();
        let back = read_file(&path, "ABCDEF0123456789FFFF").unwrap();
        assert_eq!(back, log);
        assert!(back.check(2, "g2b", &[1; 32]).is_err());
        let other = read_file(&path, "ffff").unwrap_err().to_string();
        assert!(other.contains("belongs to plan"), "{other}");
        std::fs::write(&path, b"{").unwrap();
        let bad = read_file(&path, "abcdef0123456789ffff")
            .unwrap_err()
            .to_string();
        assert!(
            bad.contains("not a reveal record") && bad.contains("reveals-"),
            "{bad}"
        );
    }
}
