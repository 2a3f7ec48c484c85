//! FedProx's proximal term (Li et al., arXiv 1812.06127), computed on the participant.
//!
//! Each participant minimises `f_i(w) + (μ/2)‖w − w_t‖²`, where `w_t` is the round's global
//! (the trained LoRA factors as downloaded). The term keeps heterogeneous labs (different
//! languages) from drifting far from the global within a round. Typical `μ`: 0.001 to 1.
//! These are pure functions over flat vectors; the client adds the gradient term to its
//! LoRA gradients before the optimizer step.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;

/// `[strategy.fedprox]`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FedProxSpec {
    /// `μ ≥ 0`; 0 (the default) turns the term off.
    pub mu: f64,
}

impl FedProxSpec {
    /// Checks `μ`; the error names `strategy.fedprox.mu`.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.mu.is_finite() && self.mu >= 0.0 {
            Ok(())
        } else {
            Err(ConfigError::field(
                "strategy.fedprox.mu",
                format!("must be zero or a positive number, got {}", self.mu),
            ))
        }
    }
}

/// Vectors of different lengths cannot be combined.
#[derive(Debug, thiserror::Error, Clone, PartialEq)]
#[error("FedProx: the {what} has {got} values, the local weights {expected}")]
pub struct ProxLengthError {
    /// `global vector` or `gradient`.
    pub what: &'static str,
    pub got: usize,
    pub expected: usize,
}

/// `(μ/2)‖w − w_t‖²`, accumulated in f64.
pub fn proximal_penalty(local: &[f32], global: &[f32], mu: f64) -> Result<f64, ProxLengthError> {
    check(local, global)?;
    let sq: f64 = local
        .iter()
        .zip(global)
        .map(|(w, g)| {
            let d = *w as f64 - *g as f64;
            d * d
        })
        .sum();
    Ok(0.5 * mu * sq)
}

/// Adds the penalty's gradient `μ(w − w_t)` to `grad` in place.
pub fn add_proximal_gradient(
    grad: &mut [f32],
    local: &[f32],
    global: &[f32],
    mu: f64,
) -> Result<(), ProxLengthError> {
    check(local, global)?;
    if grad.len() != local.len() {
        return Err(ProxLengthError {
            what: "gradient",
            got: grad.len(),
            expected: local.len(),
        });
    }
    for ((g, w), w_t) in grad.iter_mut().zip(local).zip(global) {
        *g = (*g as f64 + mu * (*w as f64 - *w_t as f64)) as f32;
    }
    Ok(())
}

fn check(local: &[f32], global: &[f32]) -> Result<(), ProxLengthError> {
    if local.len() == global.len() {
        Ok(())
    } else {
        Err(ProxLengthError {
            what: "global vector",
            got: global.len(),
            expected: local.len(),
        })
    }
}
