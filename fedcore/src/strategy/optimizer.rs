//! Server optimizers on the aggregated update (Reddi et al., "Adaptive Federated
//! Optimization", arXiv 2003.00295; see `shared/research/federated-lora.md`).
//!
//! With `x_t` the current global values of a tensor and `Δ_t = x̄ − x_t` the aggregated
//! update (the new weighted mean minus the current global):
//!
//! - FedAvg: `x_{t+1} = x_t + η Δ_t` (`η = 1` is plain averaging, the default).
//! - FedAvgM (Hsu et al., arXiv 1909.06335): `m_t = β m_{t−1} + Δ_t`, `x_{t+1} = x_t + η m_t`.
//! - FedAdam, FedYogi, FedAdagrad: `m_t = β₁ m_{t−1} + (1−β₁) Δ_t` and
//!   - FedAdam:    `v_t = β₂ v_{t−1} + (1−β₂) Δ_t²`
//!   - FedYogi:    `v_t = v_{t−1} − (1−β₂) Δ_t² · sign(v_{t−1} − Δ_t²)`
//!   - FedAdagrad: `v_t = v_{t−1} + Δ_t²`
//!
//!   then `x_{t+1} = x_t + η m_t / (√v_t + τ)`, with no bias correction (as in the paper).
//!
//! `m_{−1} = 0`. The initial `v_{−1}` is a choice peers make differently: Reddi et al.'s
//! Algorithm 2 and OpenFedLLM start from `τ²`, Flower from 0. Mekong pins `τ²`
//! ([`InitialV::TauSquared`], the default) so that the first step is `η·(1−β₁)Δ/(√(τ²+…)+τ)`
//! and never divides a tiny update by a tiny denominator; `initial_v = "zero"` reproduces
//! Flower. Moments are kept per tensor (by slot name) in [`OptimizerState`], which
//! serialises, so a restarted aggregator can resume them.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::error::ConfigError;

/// The server optimizer, as configured (`[strategy.optimizer]`, tagged by `kind`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ServerOptimizerSpec {
    /// `x ← x + η Δ`.
    FedAvg(FedAvgSpec),
    /// Server momentum on `Δ`.
    FedAvgM(FedAvgMSpec),
    FedAdam(AdaptiveSpec),
    FedYogi(AdaptiveSpec),
    /// FedAdagrad: `β₂` is not used.
    FedAdagrad(AdaptiveSpec),
}

impl Default for ServerOptimizerSpec {
    fn default() -> Self {
        ServerOptimizerSpec::FedAvg(FedAvgSpec::default())
    }
}

/// Plain averaging with a server learning rate.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAvgSpec {
    /// Server learning rate; 1 (the default) makes the new global the weighted mean.
    pub eta: f64,
}

impl Default for FedAvgSpec {
    fn default() -> Self {
        FedAvgSpec { eta: 1.0 }
    }
}

/// Server momentum.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedAvgMSpec {
    /// Server learning rate (default 1).
    pub eta: f64,
    /// Momentum β (default 0.9, Hsu et al.).
    pub momentum: f64,
}

impl Default for FedAvgMSpec {
    fn default() -> Self {
        FedAvgMSpec {
            eta: 1.0,
            momentum: 0.9,
        }
    }
}

/// What `v` starts from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InitialV {
    /// `v_{−1} = τ²` (Reddi et al., OpenFedLLM): Mekong's default.
    #[default]
    TauSquared,
    /// `v_{−1} = 0` (Flower).
    Zero,
}

/// FedAdam, FedYogi and FedAdagrad's parameters.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdaptiveSpec {
    /// Server learning rate η (default 1e-2, within the range Reddi et al. found best).
    pub eta: f64,
    /// β₁ (default 0.9).
    pub beta1: f64,
    /// β₂ (default 0.99); unused by FedAdagrad.
    pub beta2: f64,
    /// Adaptivity τ (default 1e-3, Reddi et al.).
    pub tau: f64,
    /// `v_{−1}` (default τ²).
    pub initial_v: InitialV,
}

impl Default for AdaptiveSpec {
    fn default() -> Self {
        AdaptiveSpec {
            eta: 1e-2,
            beta1: 0.9,
            beta2: 0.99,
            tau: 1e-3,
            initial_v: InitialV::TauSquared,
        }
    }
}

impl AdaptiveSpec {
    fn v0(&self) -> f64 {
        match self.initial_v {
            InitialV::TauSquared => self.tau * self.tau,
            InitialV::Zero => 0.0,
        }
    }
}

/// One tensor's moments.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Moments {
    /// First moment (FedAvgM's momentum buffer); empty until the first step.
    pub m: Vec<f64>,
    /// Second moment; empty for FedAvg and FedAvgM.
    pub v: Vec<f64>,
}

/// The optimizer's state across rounds, per tensor slot name.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct OptimizerState {
    pub slots: BTreeMap<String, Moments>,
}

/// A step that cannot be taken.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum OptimizerError {
    #[error("{slot}: current values have {got} entries, the update {expected}")]
    Length {
        slot: String,
        got: usize,
        expected: usize,
    },
    #[error("{slot}: the saved moments hold {got} entries, the tensor {expected}")]
    Moments {
        slot: String,
        got: usize,
        expected: usize,
    },
}

impl ServerOptimizerSpec {
    /// The configuration name (`fedavg`, `fedadam`, ...).
    pub fn name(&self) -> &'static str {
        match self {
            ServerOptimizerSpec::FedAvg(_) => "fedavg",
            ServerOptimizerSpec::FedAvgM(_) => "fedavgm",
            ServerOptimizerSpec::FedAdam(_) => "fedadam",
            ServerOptimizerSpec::FedYogi(_) => "fedyogi",
            ServerOptimizerSpec::FedAdagrad(_) => "fedadagrad",
        }
    }

    /// True for FedAvg with `η = 1`: the new global is exactly the weighted mean.
    pub fn is_plain_average(&self) -> bool {
        matches!(self, ServerOptimizerSpec::FedAvg(FedAvgSpec { eta }) if *eta == 1.0)
    }

    /// Checks every parameter; errors name `strategy.optimizer.<field>`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let positive = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(ConfigError::field(
                    &format!("strategy.optimizer.{field}"),
                    format!("must be a positive number, got {v}"),
                ))
            }
        };
        let fraction = |field: &str, v: f64| {
            if v.is_finite() && (0.0..1.0).contains(&v) {
                Ok(())
            } else {
                Err(ConfigError::field(
                    &format!("strategy.optimizer.{field}"),
                    format!("must be in [0, 1), got {v}"),
                ))
            }
        };
        match self {
            ServerOptimizerSpec::FedAvg(s) => positive("eta", s.eta),
            ServerOptimizerSpec::FedAvgM(s) => {
                positive("eta", s.eta)?;
                fraction("momentum", s.momentum)
            }
            ServerOptimizerSpec::FedAdam(s)
            | ServerOptimizerSpec::FedYogi(s)
            | ServerOptimizerSpec::FedAdagrad(s) => {
                positive("eta", s.eta)?;
                fraction("beta1", s.beta1)?;
                fraction("beta2", s.beta2)?;
                positive("tau", s.tau)
            }
        }
    }

    /// `x_{t+1}` for one tensor from its current values `x` and aggregated update `delta`,
    /// updating that tensor's moments in `state`. Everything is checked before `state`
    /// changes.
    pub fn step(
        &self,
        state: &mut OptimizerState,
        slot: &str,
        x: &[f64],
        delta: &[f64],
    ) -> Result<Vec<f64>, OptimizerError> {
        let n = delta.len();
        if x.len() != n {
            return Err(OptimizerError::Length {
                slot: slot.to_string(),
                got: x.len(),
                expected: n,
            });
        }
        let saved = state.slots.get(slot).cloned().unwrap_or_default();
        for got in [saved.m.len(), saved.v.len()] {
            if got != 0 && got != n {
                return Err(OptimizerError::Moments {
                    slot: slot.to_string(),
                    got,
                    expected: n,
                });
            }
        }
        let prev_m = |i: usize| saved.m.get(i).copied().unwrap_or(0.0);
        let (next, moments) = match self {
            ServerOptimizerSpec::FedAvg(s) => {
                let next = (0..n).map(|i| x[i] + s.eta * delta[i]).collect();
                (next, None)
            }
            ServerOptimizerSpec::FedAvgM(s) => {
                let m: Vec<f64> = (0..n).map(|i| s.momentum * prev_m(i) + delta[i]).collect();
                let next = (0..n).map(|i| x[i] + s.eta * m[i]).collect();
                (next, Some(Moments { m, v: Vec::new() }))
            }
            ServerOptimizerSpec::FedAdam(s)
            | ServerOptimizerSpec::FedYogi(s)
            | ServerOptimizerSpec::FedAdagrad(s) => {
                let v0 = s.v0();
                let prev_v = |i: usize| saved.v.get(i).copied().unwrap_or(v0);
                let m: Vec<f64> = (0..n)
                    .map(|i| s.beta1 * prev_m(i) + (1.0 - s.beta1) * delta[i])
                    .collect();
                let v: Vec<f64> = (0..n)
                    .map(|i| {
                        let d2 = delta[i] * delta[i];
                        let pv = prev_v(i);
                        match self {
                            ServerOptimizerSpec::FedAdam(_) => s.beta2 * pv + (1.0 - s.beta2) * d2,
                            ServerOptimizerSpec::FedYogi(_) => {
                                pv - (1.0 - s.beta2) * d2 * sign(pv - d2)
                            }
                            _ => pv + d2,
                        }
                    })
                    .collect();
                let next = (0..n)
                    .map(|i| x[i] + s.eta * m[i] / (v[i].max(0.0).sqrt() + s.tau))
                    .collect();
                (next, Some(Moments { m, v }))
            }
        };
        if let Some(moments) = moments {
            state.slots.insert(slot.to_string(), moments);
        }
        Ok(next)
    }
}

/// The sign function with `sign(0) = 0` (`f64::signum` gives 1 for +0).
fn sign(v: f64) -> f64 {
    if v > 0.0 {
        1.0
    } else if v < 0.0 {
        -1.0
    } else {
        0.0
    }
}
