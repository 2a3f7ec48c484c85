//! A lab's local policy on what it shares beyond the protocol's own messages.
//!
//! The participant runtime sends masked vectors, public keys, signatures and encrypted
//! shares because the protocol needs them; everything else it could tell the aggregator is
//! an opt-in, listed here by name. The lab's `participant.toml` (`share_metrics = [...]`)
//! or `fedclient join --share-metrics` says which; the default is nothing.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// An aggregate number a lab may agree to report (`ReportMetrics`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SharedMetric {
    /// Mean held-out loss before and after each round's local training, and the number of
    /// held-out tokens it averages over. Feeds the operator's per-language loss curves.
    HeldoutLoss,
}

impl SharedMetric {
    /// Every metric a lab can share.
    pub const ALL: [SharedMetric; 1] = [SharedMetric::HeldoutLoss];

    /// The name used in `participant.toml` and on the command line.
    pub fn name(self) -> &'static str {
        match self {
            SharedMetric::HeldoutLoss => "heldout_loss",
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
