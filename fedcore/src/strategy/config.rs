//! `[strategy]`: the aggregation mode, the server optimizer, participant sampling and
//! FedProx, as one serde section for the aggregator's TOML config and the federation plan.
//!
//! ```toml
//! [strategy]
//! mode = "fedsvd"
//!
//! [strategy.optimizer]
//! kind = "fedadam"
//! eta = 0.01
//!
//! [strategy.sampling]
//! fraction = 0.2
//! min_participants = 3
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::adapter::LoraSpec;
use crate::adapter::ModuleShape;
use crate::error::ConfigError;
use crate::strategy::groups::GroupSpec;
use crate::strategy::optimizer::ServerOptimizerSpec;
use crate::strategy::prox::FedProxSpec;
use crate::strategy::sampling::SamplingSpec;

/// How participants' LoRA factors become the next global adapter. See the module docs of
/// [`crate::strategy`] for each mode's formula and source.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AggregationMode {
    /// FFA-LoRA (Sun et al., ICLR 2024, arXiv 2403.12313): A frozen from a shared seed,
    /// participants train and upload B only. Exact. The default.
    #[default]
    #[serde(rename = "ffa_lora")]
    FfaLora,
    /// FedSVD (arXiv 2505.12805): B only; the server re-factorises `B̄·A` by SVD into an
    /// orthonormal A and `B = UΣ` for the next round. Exact.
    #[serde(rename = "fedsvd")]
    FedSvd,
    /// FedIT (Zhang et al., arXiv 2305.05644): A and B averaged separately. Not exact; for
    /// comparison.
    #[serde(rename = "fedit")]
    FedIt,
    /// HetLoRA (Cho et al., arXiv 2401.06432): ranks differ per participant, factors are
    /// zero-padded to the largest rank and averaged, each participant gets its rank back.
    #[serde(rename = "hetlora")]
    HetLora,
    /// FedSA-LoRA (Guo et al., ICLR 2025, arXiv 2410.01463): A shared and averaged, B stays
    /// with each participant (personalised).
    #[serde(rename = "fedsa_lora")]
    FedSaLora,
    /// RoLoRA (arXiv 2409.02346): rounds alternate between training B only (rounds 0, 2,
    /// ... of [`crate::strategy::ServerState::round`]) and A only. Exact each round, since
    /// the update is linear in the one factor trained.
    #[serde(rename = "rolora")]
    RoLora,
    /// FedEx-LoRA (arXiv 2410.09432): A, B and the dense `B_i·A_i`; the residual
    /// `mean(B_i A_i) − B̄Ā` is merged into the base weights. Exact, sum-only through the
    /// dense upload.
    #[serde(rename = "fedex_lora")]
    FedExLora,
    /// FLoRA (arXiv 2409.05976): stacks every participant's blocks, which needs each
    /// participant's upload, not only their sum. Not sum-only: refused with secure
    /// aggregation.
    #[serde(rename = "flora")]
    Flora,
    /// Per-group B with a global A ([`crate::strategy::groups`]): A averaged over every lab,
    /// B over the labs of each group (a language's labs), through one weighted sum. Needs
    /// `[strategy.groups]`.
    #[serde(rename = "group_b")]
    GroupB,
}

impl AggregationMode {
    /// Every mode, in the order of the research note.
    pub const ALL: [AggregationMode; 9] = [
        AggregationMode::FfaLora,
        AggregationMode::FedSvd,
        AggregationMode::FedIt,
        AggregationMode::HetLora,
        AggregationMode::FedSaLora,
        AggregationMode::RoLora,
        AggregationMode::FedExLora,
        AggregationMode::Flora,
        AggregationMode::GroupB,
    ];

    /// The configuration name.
    pub fn name(self) -> &'static str {
        match self {
            AggregationMode::FfaLora => "ffa_lora",
            AggregationMode::FedSvd => "fedsvd",
            AggregationMode::FedIt => "fedit",
            AggregationMode::HetLora => "hetlora",
            AggregationMode::FedSaLora => "fedsa_lora",
            AggregationMode::RoLora => "rolora",
            AggregationMode::FedExLora => "fedex_lora",
            AggregationMode::Flora => "flora",
            AggregationMode::GroupB => "group_b",
        }
    }

    /// True when the server needs nothing but `Σ w_i x_i` and `Σ w_i` of the uploads: what
    /// secure aggregation reveals. A mode that is not sum-only needs each participant's
    /// upload and cannot run with secure aggregation on.
    pub fn sum_only(self) -> bool {
        !matches!(self, AggregationMode::Flora)
    }

    /// True when one round's new global equals the weighted mean of the participants'
    /// adapted models, `Σ p_i B_i A_i` (with FedAvg at η = 1).
    pub fn exact(self) -> bool {
        matches!(
            self,
            AggregationMode::FfaLora
                | AggregationMode::FedSvd
                | AggregationMode::RoLora
                | AggregationMode::FedExLora
                | AggregationMode::Flora
        )
    }
}

/// `[strategy.hetlora]`: each participant's rank (at most `lora.rank`, the global rank).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct HetLoraSpec {
    /// Rank per participant name.
    pub ranks: BTreeMap<String, usize>,
    /// Rank of a participant not listed; absent = `lora.rank`.
    pub default_rank: Option<usize>,
}

/// `[strategy.fedex]`: the dense upload's limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedExSpec {
    /// Largest number of dense values (`Σ out × in` over the adapted modules) a participant
    /// may be asked to upload. Default 2^24 (64 MiB of f32, plus A and B).
    pub max_dense_values: usize,
}

impl Default for FedExSpec {
    fn default() -> Self {
        FedExSpec {
            max_dense_values: 1 << 24,
        }
    }
}

/// `[strategy]`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StrategySpec {
    pub mode: AggregationMode,
    pub optimizer: ServerOptimizerSpec,
    pub sampling: SamplingSpec,
    pub fedprox: FedProxSpec,
    /// Required with `mode = "hetlora"`, refused otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub hetlora: Option<HetLoraSpec>,
    pub fedex: FedExSpec,
    /// Required with `mode = "group_b"`, refused otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub groups: Option<GroupSpec>,
}

impl StrategySpec {
    /// True for the default section (FFA-LoRA, FedAvg, everyone, no FedProx).
    pub fn is_default(&self) -> bool {
        *self == StrategySpec::default()
    }

    /// Checks the section against the LoRA layout, the adapted modules and whether secure
    /// aggregation is on. Errors name the bad field (`strategy.mode`, ...).
    pub fn validate(
        &self,
        lora: &LoraSpec,
        modules: &[ModuleShape],
        secure_aggregation: bool,
    ) -> Result<(), ConfigError> {
        if secure_aggregation && !self.mode.sum_only() {
            return Err(ConfigError::field(
                "strategy.mode",
                format!(
                    "`{}` needs every participant's upload, but secure aggregation \
                     (secure_aggregation.enabled = true) reveals only their sum; choose a \
                     sum-only mode ({}) or set secure_aggregation.enabled = false",
                    self.mode.name(),
                    AggregationMode::ALL
                        .iter()
                        .filter(|m| m.sum_only())
                        .map(|m| m.name())
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
        self.optimizer.validate()?;
        self.sampling.validate()?;
        self.fedprox.validate()?;
        let merges_dense = matches!(
            self.mode,
            AggregationMode::FedExLora | AggregationMode::Flora
        );
        if self.mode == AggregationMode::GroupB && !self.optimizer.is_plain_average() {
            return Err(ConfigError::field(
                "strategy.optimizer",
                format!(
                    "`group_b` averages each group's B directly, so a server optimizer would \
                     move A alone; use kind = \"fedavg\" with eta = 1 (got {})",
                    self.optimizer.name()
                ),
            ));
        }
        match (&self.groups, self.mode) {
            (Some(g), AggregationMode::GroupB) => g.validate(secure_aggregation.then_some(0))?,
            (None, AggregationMode::GroupB) => {
                return Err(ConfigError::field(
                    "strategy.groups",
                    "mode = \"group_b\" needs a [strategy.groups] section with every lab's group",
                ));
            }
            (Some(_), mode) => {
                return Err(ConfigError::field(
                    "strategy.groups",
                    format!(
                        "is only read with mode = \"group_b\", not `{}`",
                        mode.name()
                    ),
                ));
            }
            (None, _) => {}
        }
        if merges_dense && !self.optimizer.is_plain_average() {
            return Err(ConfigError::field(
                "strategy.optimizer",
                format!(
                    "`{}` merges an exact dense correction into the base weights, which is \
                     defined for plain averaging only; use kind = \"fedavg\" with eta = 1 \
                     (got {})",
                    self.mode.name(),
                    self.optimizer.name()
                ),
            ));
        }
        match (&self.hetlora, self.mode) {
            (Some(h), AggregationMode::HetLora) => {
                let bad = |field: String, rank: usize| {
                    ConfigError::field(
                        &field,
                        format!(
                            "rank {rank} must be between 1 and lora.rank = {}",
                            lora.rank
                        ),
                    )
                };
                if let Some(r) = h.default_rank
                    && !(1..=lora.rank).contains(&r)
                {
                    return Err(bad("strategy.hetlora.default_rank".into(), r));
                }
                for (name, r) in &h.ranks {
                    if !(1..=lora.rank).contains(r) {
                        return Err(bad(format!("strategy.hetlora.ranks.{name}"), *r));
                    }
                }
            }
            (None, AggregationMode::HetLora) => {
                return Err(ConfigError::field(
                    "strategy.hetlora",
                    "mode = \"hetlora\" needs a [strategy.hetlora] section with the participants' ranks",
                ));
            }
            (Some(_), mode) => {
                return Err(ConfigError::field(
                    "strategy.hetlora",
                    format!(
                        "is only read with mode = \"hetlora\", not `{}`",
                        mode.name()
                    ),
                ));
            }
            (None, _) => {}
        }
        if self.mode == AggregationMode::FedExLora {
            let dense: usize = modules
                .iter()
                .map(|m| m.out_features.saturating_mul(m.in_features))
                .fold(0usize, usize::saturating_add);
            if dense > self.fedex.max_dense_values {
                return Err(ConfigError::field(
                    "strategy.fedex.max_dense_values",
                    format!(
                        "FedEx-LoRA would upload {dense} dense values per participant, above the \
                         configured limit of {}; adapt fewer modules, raise the limit, or \
                         choose an exact low-rank mode (ffa_lora, fedsvd, rolora)",
                        self.fedex.max_dense_values
                    ),
                ));
            }
        }
        Ok(())
    }

    /// `group_b`: the group `participant` belongs to (`None` in every other mode).
    pub fn participant_group(&self, participant: &str) -> Option<&str> {
        match (&self.groups, self.mode) {
            (Some(g), AggregationMode::GroupB) => g.group_of(participant),
            _ => None,
        }
    }

    /// HetLoRA: `participant`'s rank (the global rank in every other mode).
    pub fn participant_rank(&self, lora: &LoraSpec, participant: &str) -> usize {
        match (&self.hetlora, self.mode) {
            (Some(h), AggregationMode::HetLora) => h
                .ranks
                .get(participant)
                .copied()
                .or(h.default_rank)
                .unwrap_or(lora.rank),
            _ => lora.rank,
        }
    }
}
