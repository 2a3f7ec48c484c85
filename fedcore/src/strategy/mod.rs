//! Aggregation strategies: what a participant uploads, and how the server turns the
//! weighted SUM of the uploads into the next global adapter.
//!
//! Averaging A and B separately is not averaging the update (`shared/research/
//! federated-lora.md`): `mean(B_i A_i) − B̄Ā = Σ p_i (B_i − B̄)(A_i − Ā)`. The modes here are
//! the ones the literature compares; each declares whether it is *sum-only*, i.e. whether
//! `Σ w_i x_i` and `Σ w_i` (all that secure aggregation reveals) are enough:
//!
//! | mode | uploads | server rule | exact | sum-only |
//! |---|---|---|---|---|
//! | FFA-LoRA (arXiv 2403.12313), default | ΔB | `B ← B̄`, A frozen from the seed | yes | yes |
//! | FedSVD (arXiv 2505.12805) | ΔB | `B̄A = UΣVᵀ`, `A ← Vᵀ`, `B ← UΣ` | yes | yes |
//! | FedIT (arXiv 2305.05644) | ΔA, ΔB | `Ā`, `B̄` | no | yes |
//! | HetLoRA (arXiv 2401.06432) | ΔA, ΔB padded, coverage | zero-padded mean | no | yes |
//! | FedSA-LoRA (ICLR 2025, arXiv 2410.01463) | ΔA | `Ā`, B personal | personal | yes |
//! | RoLoRA (arXiv 2409.02346) | ΔB / ΔA alternately | mean of the trained factor | yes | yes |
//! | FedEx-LoRA (arXiv 2410.09432) | ΔA, ΔB, Δ(BA) | `Ā`, `B̄`, `W₀ += (α/r)[mean(BA) − B̄Ā]` | yes | yes (dense) |
//! | FLoRA (arXiv 2409.05976) | ΔA, ΔB | stack all blocks, merge `Σ p_i B_i A_i` | yes | **no** |
//! | `group_b` ([`groups`]) | ΔA, ΔB in its group's slot, group weight | `Ā`, `B̄` per group | per group | yes |
//!
//! Invariant: a mode that is not sum-only cannot be configured with secure aggregation on
//! ([`StrategySpec::validate`] refuses it by name), and [`Strategy::aggregate`] (the sum
//! path) refuses it too.
//!
//! The seam is split in two halves that share only the [`UploadLayout`]:
//! - participant: [`Strategy::download`] (what it starts from: HetLoRA truncates the rank,
//!   FedSA keeps its personal B), [`Strategy::trains`] (which factors it trains), and
//!   [`Strategy::upload`] (its trained adapter minus the download, laid out);
//! - server: [`Strategy::aggregate`] from an [`AggregatedUpload`] (the weighted mean and
//!   total weight), through the server optimizer ([`optimizer`]), to a [`RoundOutcome`].
//!
//! Server state (the round counter that drives RoLoRA's phase, the optimizer's moments) is
//! the explicit, serialisable [`ServerState`]; `aggregate` takes it by reference and
//! returns the next one, so a refused aggregation changes nothing.

pub mod config;
pub mod fedex;
pub mod fedsvd;
pub mod flora;
pub mod global;
pub mod groups;
pub mod hetlora;
pub mod layout;
pub mod linalg;
pub mod optimizer;
pub mod prox;
pub mod sampling;

#[cfg(test)]
mod groups_tests;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;

use ndarray::Array2;
use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::adapter::LoraSpec;
use crate::adapter::{LoraAdapter, ModuleShape};
use crate::aggregate::WeightedSum;
use crate::error::ConfigError;
use crate::manifest::{LayoutManifest, TensorSlot};

pub use config::{AggregationMode, FedExSpec, HetLoraSpec, StrategySpec};
pub use global::GlobalModel;
pub use groups::GroupSpec;
pub use layout::{AggregatedUpload, SlotKind, UploadLayout, UploadParts, participant_upload};
pub use linalg::LinalgError;
pub use optimizer::{
    AdaptiveSpec, FedAvgMSpec, FedAvgSpec, InitialV, OptimizerError, OptimizerState,
    ServerOptimizerSpec,
};
pub use prox::{FedProxSpec, add_proximal_gradient, proximal_penalty};
pub use sampling::{SamplingSpec, sample_participants};

/// Why a strategy step failed; each names what is wrong. A failed step changes nothing.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum StrategyError {
    #[error("the upload has {got} values, the round's layout {layout} expects {expected}")]
    Length {
        got: usize,
        expected: usize,
        layout: String,
    },
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("upload value {index} is not finite")]
    NonFinite { index: usize },
    #[error("total weight {0} is not a positive number")]
    Weight(f64),
    #[error("no uploads to aggregate")]
    Empty,
    #[error(
        "`{mode}` is not sum-only: it needs every participant's upload (aggregate_individual), \
         which secure aggregation never reveals"
    )]
    NotSumOnly { mode: &'static str },
    #[error(transparent)]
    Linalg(#[from] LinalgError),
    #[error(transparent)]
    Optimizer(#[from] OptimizerError),
}

/// Server-side state across rounds, serialisable so an aggregator can persist it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServerState {
    /// Rounds aggregated so far; RoLoRA's phase is its parity.
    pub round: u64,
    /// The server optimizer's moments.
    pub optimizer: OptimizerState,
}

/// Which factors participants train in a round.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrainedFactors {
    pub a: bool,
    pub b: bool,
}

/// One aggregated round.
#[derive(Debug, Clone, PartialEq)]
pub struct RoundOutcome {
    pub global: GlobalModel,
    pub state: ServerState,
}

/// A validated strategy: the configuration plus the LoRA layout it applies to.
#[derive(Debug, Clone, PartialEq)]
pub struct Strategy {
    spec: StrategySpec,
    lora: LoraSpec,
}

impl Strategy {
    /// Validates `spec` (see [`StrategySpec::validate`]) and builds the strategy.
    pub fn new(
        spec: StrategySpec,
        lora: &LoraSpec,
        modules: &[ModuleShape],
        secure_aggregation: bool,
    ) -> Result<Self, ConfigError> {
        spec.validate(lora, modules, secure_aggregation)?;
        Ok(Strategy {
            spec,
            lora: lora.clone(),
        })
    }

    pub fn spec(&self) -> &StrategySpec {
        &self.spec
    }

    pub fn mode(&self) -> AggregationMode {
        self.spec.mode
    }

    /// See [`AggregationMode::sum_only`].
    pub fn sum_only(&self) -> bool {
        self.spec.mode.sum_only()
    }

    /// Which factors participants train in the round after `state`.
    pub fn trains(&self, state: &ServerState) -> TrainedFactors {
        match self.spec.mode {
            AggregationMode::FfaLora | AggregationMode::FedSvd => {
                TrainedFactors { a: false, b: true }
            }
            AggregationMode::RoLora => {
                let b_phase = state.round.is_multiple_of(2);
                TrainedFactors {
                    a: !b_phase,
                    b: b_phase,
                }
            }
            AggregationMode::FedIt
            | AggregationMode::HetLora
            | AggregationMode::FedSaLora
            | AggregationMode::FedExLora
            | AggregationMode::Flora
            | AggregationMode::GroupB => TrainedFactors { a: true, b: true },
        }
    }

    /// The round's upload layout.
    pub fn upload_layout(&self, global: &GlobalModel, state: &ServerState) -> UploadLayout {
        let trains = self.trains(state);
        if self.spec.mode == AggregationMode::GroupB {
            let groups: Vec<String> = global.group_b.keys().cloned().collect();
            return UploadLayout::grouped(&global.adapter, &groups);
        }
        let parts = match self.spec.mode {
            AggregationMode::FedSaLora => UploadParts {
                a: true,
                b: false,
                dense: false,
                coverage: false,
            },
            mode => UploadParts {
                a: trains.a,
                b: trains.b,
                dense: mode == AggregationMode::FedExLora,
                coverage: mode == AggregationMode::HetLora,
            },
        };
        UploadLayout::new(&global.adapter, parts)
    }

    /// What `participant` starts local training from: the global adapter, truncated to its
    /// rank under HetLoRA, with its own `personal` B (zeros before its first round) under
    /// FedSA-LoRA, with its group's B under `group_b`.
    pub fn download(
        &self,
        global: &GlobalModel,
        participant: &str,
        personal: Option<&LoraAdapter>,
    ) -> Result<LoraAdapter, StrategyError> {
        match self.spec.mode {
            AggregationMode::HetLora => hetlora::truncate(
                &global.adapter,
                self.spec.participant_rank(&self.lora, participant),
            ),
            AggregationMode::FedSaLora => personalise(&global.adapter, personal),
            AggregationMode::GroupB => {
                let group = self.spec.participant_group(participant).ok_or_else(|| {
                    StrategyError::Shape(format!("participant {participant} is in no group"))
                })?;
                groups::download(global, group)
            }
            _ => Ok(global.adapter.clone()),
        }
    }

    /// `participant`'s upload: see [`participant_upload`].
    pub fn upload(
        &self,
        layout: &UploadLayout,
        participant: &str,
        download: &LoraAdapter,
        trained: &LoraAdapter,
    ) -> Result<Vec<f32>, StrategyError> {
        participant_upload(
            layout,
            self.spec.participant_group(participant),
            download,
            trained,
        )
    }

    /// The next global from the weighted mean of the round's uploads (sum-only modes).
    pub fn aggregate(
        &self,
        global: &GlobalModel,
        state: &ServerState,
        upload: &AggregatedUpload,
    ) -> Result<RoundOutcome, StrategyError> {
        let mode = self.spec.mode;
        if !mode.sum_only() {
            return Err(StrategyError::NotSumOnly { mode: mode.name() });
        }
        let layout = self.upload_layout(global, state);
        let means = layout::mean_tensors(&layout, &global.adapter, upload)?;
        let mut next_state = state.clone();
        let stepped = self.optimizer_step(&layout, global, &means, &mut next_state)?;
        let mut adapter = global.adapter.clone();
        let mut base_delta = global.base_delta.clone();
        let mut group_b = global.group_b.clone();
        match mode {
            AggregationMode::GroupB => {
                write_factors(&mut adapter, &stepped)?;
                let (next, shares) = groups::aggregate_groups(&layout, global, upload)?;
                groups::blended_b(&mut adapter, &next, &shares)?;
                group_b = next;
            }
            AggregationMode::FedSvd => fedsvd::refactorise(&mut adapter, &stepped)?,
            AggregationMode::FedExLora => {
                write_factors(&mut adapter, &stepped)?;
                fedex::merge_residual(&mut base_delta, &adapter, &means)?;
            }
            _ => write_factors(&mut adapter, &stepped)?,
        }
        next_state.round += 1;
        Ok(RoundOutcome {
            global: GlobalModel {
                adapter,
                base_delta,
                group_b,
            },
            state: next_state,
        })
    }

    /// The next global from each participant's upload and sample weight. Only modes that
    /// are not sum-only need this (FLoRA, with secure aggregation off); sum-only modes fold
    /// the uploads into a [`WeightedSum`] and [`Self::aggregate`] them.
    pub fn aggregate_individual(
        &self,
        global: &GlobalModel,
        state: &ServerState,
        uploads: &[(u64, Vec<f32>)],
    ) -> Result<RoundOutcome, StrategyError> {
        if uploads.is_empty() {
            return Err(StrategyError::Empty);
        }
        let layout = self.upload_layout(global, state);
        if self.spec.mode == AggregationMode::Flora {
            let fresh_seed = flora::next_a_seed(self.lora.a_seed, state.round + 1);
            let global = flora::stack_and_merge(&layout, global, uploads, fresh_seed)?;
            let mut next_state = state.clone();
            next_state.round += 1;
            return Ok(RoundOutcome {
                global,
                state: next_state,
            });
        }
        let mut sum = WeightedSum::new(layout.len());
        for (weight, vector) in uploads {
            sum.add(*weight, vector).map_err(|e| match e {
                crate::aggregate::AggregateError::Length { got, expected } => {
                    StrategyError::Length {
                        got,
                        expected,
                        layout: layout.manifest().short_hash(),
                    }
                }
                _ => StrategyError::Weight(*weight as f64),
            })?;
        }
        self.aggregate(global, state, &AggregatedUpload::from_weighted_sum(&sum)?)
    }

    /// The server optimizer applied to every trained factor in the layout:
    /// `x_{t+1} = opt(x_t, mean − x_t)`. Returns slot name → next values.
    fn optimizer_step(
        &self,
        layout: &UploadLayout,
        global: &GlobalModel,
        means: &layout::MeanTensors,
        state: &mut ServerState,
    ) -> Result<BTreeMap<String, Array2<f64>>, StrategyError> {
        let mut out = BTreeMap::new();
        for (slot, kind) in layout.slots() {
            let (name, is_a) = match kind {
                SlotKind::A(name) => (name, true),
                SlotKind::B(name) => (name, false),
                _ => continue,
            };
            let m = global
                .adapter
                .module(name)
                .ok_or_else(|| StrategyError::Shape(format!("the global has no module {name}")))?;
            let current = linalg::to_array(if is_a { &m.a } else { &m.b });
            let mean = &means.tensors[&slot.name];
            if self.spec.optimizer.is_plain_average() {
                // x + 1·(mean − x) is the mean; taking it directly keeps the result the
                // weighted mean rounded once, bit for bit.
                out.insert(slot.name.clone(), mean.clone());
                continue;
            }
            let x: Vec<f64> = current.iter().copied().collect();
            let delta: Vec<f64> = mean.iter().zip(&x).map(|(m, x)| m - x).collect();
            let next = self
                .spec
                .optimizer
                .step(&mut state.optimizer, &slot.name, &x, &delta)?;
            let next = Array2::from_shape_vec(current.dim(), next)
                .expect("the optimizer keeps the length");
            out.insert(slot.name.clone(), next);
        }
        Ok(out)
    }
}

/// Writes stepped factors (slot name → values) into `adapter`, rounding once to f32. All
/// slots are checked before any is written.
fn write_factors(
    adapter: &mut LoraAdapter,
    stepped: &BTreeMap<String, Array2<f64>>,
) -> Result<(), StrategyError> {
    let slots: Vec<TensorSlot> = stepped
        .iter()
        .map(|(name, v)| TensorSlot::new(name.clone(), [v.nrows(), v.ncols()]))
        .collect();
    let manifest = LayoutManifest::new(slots);
    let values: Vec<f32> = stepped
        .values()
        .flat_map(|v| v.iter().map(|x| *x as f32))
        .collect();
    adapter
        .unflatten(&manifest, &values)
        .map_err(|e| StrategyError::Shape(e.to_string()))
}

/// FedSA-LoRA's start: the global A with the participant's own B.
fn personalise(
    global: &LoraAdapter,
    personal: Option<&LoraAdapter>,
) -> Result<LoraAdapter, StrategyError> {
    let b_manifest = global.b_manifest();
    let b = match personal {
        Some(p) => p
            .flatten(&b_manifest)
            .map_err(|e| StrategyError::Shape(format!("personal B: {e}")))?,
        None => vec![0.0; b_manifest.len()],
    };
    let mut out = global.clone();
    out.unflatten(&b_manifest, &b)
        .map_err(|e| StrategyError::Shape(e.to_string()))?;
    Ok(out)
}
