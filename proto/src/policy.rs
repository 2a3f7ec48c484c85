//! A lab's own side of `participant.toml`: its local policy (`[policy]`), which its
//! participant runtime enforces whatever the aggregator asks, and its local setup
//! (`[local]`: data, base model, device), which never leaves the lab.
//!
//! The participant runtime sends masked vectors, public keys, signatures and encrypted
//! shares because the protocol needs them; everything else it could tell the aggregator is
//! an opt-in, listed here by name. The lab's `participant.toml` (`[policy] share_metrics =
//! [...]`) or `fedclient join --share-metrics` says which; the default is nothing.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use fedcore::secagg::protocol::MIN_PEERS_FLOOR;
use serde::{Deserialize, Serialize};

/// `[policy]` of participant.toml: the lab's rules, checked by its own runtime.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalPolicy {
    /// Fewest peers this lab accepts in a secure-aggregation round: a smaller round would
    /// let the sum reveal too much about each lab. Never below 3.
    #[serde(default = "default_min_peers")]
    pub min_peers: usize,
    /// Most rounds this lab contributes to; it then leaves the federation on its own.
    /// Missing: as many as the plan runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_rounds: Option<u64>,
    /// The most ε (at the plan's `[privacy] delta`) this lab's data may spend in the
    /// federation. Set: the lab refuses a plan without differential-privacy noise, and
    /// leaves before a round that could take it past the limit. Missing: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_epsilon: Option<f64>,
    /// Aggregate metrics the lab reports for the operator's status page. Empty: none.
    #[serde(default)]
    pub share_metrics: Vec<SharedMetric>,
    /// The plan fingerprint the labs agreed on (`fedaggregator check-config` prints it);
    /// any other plan is refused. Missing: the plan is trusted on first use, with a warning.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_sha256: Option<String>,
}

fn default_min_peers() -> usize {
    MIN_PEERS_FLOOR
}

impl Default for LocalPolicy {
    fn default() -> Self {
        LocalPolicy {
            min_peers: MIN_PEERS_FLOOR,
            max_rounds: None,
            max_epsilon: None,
            share_metrics: Vec::new(),
            plan_sha256: None,
        }
    }
}

/// A `[policy]` value the runtime cannot enforce.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PolicyError {
    #[error("policy.min_peers = {0}: secure aggregation needs at least {MIN_PEERS_FLOOR} peers")]
    MinPeers(usize),
    #[error("policy.max_rounds = 0: a lab that takes part in no round need not join")]
    MaxRounds,
    #[error("policy.max_epsilon = {0}: expected a positive number (8 is a common budget)")]
    MaxEpsilon(f64),
    #[error("policy.plan_sha256 = {0:?}: expected 64 hexadecimal digits")]
    PlanSha256(String),
}

impl LocalPolicy {
    /// Checks each field; the error names the field and the value.
    pub fn validate(&self) -> Result<(), PolicyError> {
        if self.min_peers < MIN_PEERS_FLOOR {
            return Err(PolicyError::MinPeers(self.min_peers));
        }
        if self.max_rounds == Some(0) {
            return Err(PolicyError::MaxRounds);
        }
        if let Some(e) = self.max_epsilon
            && !(e.is_finite() && e > 0.0)
        {
            return Err(PolicyError::MaxEpsilon(e));
        }
        if let Some(h) = &self.plan_sha256
            && (h.len() != 64 || !h.bytes().all(|b| b.is_ascii_hexdigit()))
        {
            return Err(PolicyError::PlanSha256(h.clone()));
        }
        Ok(())
    }
}

/// `[local]` of participant.toml: the lab's own machine. Read by `fedclient join
/// --config`; nothing of it is sent. Paths are relative to the file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LocalSetup {
    /// UTF-8 text, one paragraph per line.
    pub data: PathBuf,
    /// The pretrained base model when the plan pins one (GGUF file or Hugging Face
    /// directory). Missing: the plan's seeded byte-level model.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<PathBuf>,
    /// Fraction of paragraphs held out for evaluation.
    #[serde(default = "default_heldout")]
    pub heldout: f64,
    /// `auto` (wgpu when a GPU is present, else the CPU), `cpu` or `wgpu`.
    #[serde(default = "default_device")]
    pub device: String,
}

fn default_heldout() -> f64 {
    0.1
}

fn default_device() -> String {
    "auto".to_string()
}

/// An aggregate number a lab may agree to report (`ReportMetrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedMetric {
    /// Mean held-out loss before and after each round's local training, and the number of
    /// held-out tokens it averages over. Feeds the operator's per-language loss curves.
    HeldoutLoss,
    /// Each round's wall time at the lab and the seconds of it spent training, evaluating,
    /// downloading, in secure aggregation, uploading and waiting: how fast the lab's
    /// hardware is and how long the center keeps it idle. Feeds `/metrics`
    /// (`mekong_lab_phase_seconds`) and the status page.
    RoundTiming,
}

impl SharedMetric {
    /// Every metric a lab can share.
    pub const ALL: [SharedMetric; 2] = [SharedMetric::HeldoutLoss, SharedMetric::RoundTiming];

    /// The name used in `participant.toml` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SharedMetric::HeldoutLoss => "heldout_loss",
            SharedMetric::RoundTiming => "round_timing",
        }
    }
}

impl fmt::Display for SharedMetric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown metric name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric {given:?} to share; known: {known}")]
pub struct UnknownMetric {
    pub given: String,
    pub known: String,
}

impl FromStr for SharedMetric {
    type Err = UnknownMetric;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SharedMetric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| UnknownMetric {
                given: s.to_string(),
                known: SharedMetric::ALL.map(SharedMetric::name).join(", "),
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_defaults_and_bad_fields_are_named() {
        let p: LocalPolicy = toml::from_str("").unwrap();
        assert_eq!(p, LocalPolicy::default());
        assert_eq!(p.min_peers, 3);
        p.validate().unwrap();
        let p: LocalPolicy = toml::from_str("min_peers = 2").unwrap();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.min_peers = 2")
        );
        let p: LocalPolicy = toml::from_str("max_rounds = 0").unwrap();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.max_rounds = 0")
        );
        let p: LocalPolicy = toml::from_str("plan_sha256 = \"abc\"").unwrap();
        assert!(
            p.validate()
                .unwrap_err()
                .to_string()
                .contains("policy.plan_sha256")
        );
        let err = toml::from_str::<LocalPolicy>("max_round = 3")
            .unwrap_err()
            .to_string();
        assert!(err.contains("max_round"), "{err}");
        let err = toml::from_str::<LocalPolicy>("share_metrics = [\"train_text\"]")
            .unwrap_err()
            .to_string();
        assert!(err.contains("train_text"), "{err}");
    }

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for m in SharedMetric::ALL {
            assert_eq!(m.name().parse::<SharedMetric>().unwrap(), m);
        }
        let err = "train_text"
            .parse::<SharedMetric>()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("\"train_text\"") && err.contains("heldout_loss"),
            "{err}"
        );
    }
}
