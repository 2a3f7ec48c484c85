//! HetLoRA (Cho et al., arXiv 2401.06432): participants train LoRA of different ranks
//! `r_i ≤ r`. The global adapter has the largest rank `r`; participant `i` downloads its
//! first `r_i` components (the first `r_i` rows of A and columns of B), and uploads its
//! factors zero-padded back to `r`. The server's weighted mean of the padded factors is
//! `Σ p_i pad(x_i)`, recovered from the sum alone with the coverage slot (see
//! [`crate::strategy::layout`]). As in the paper's plain zero-padding, a component only the
//! high-rank participants train is pulled toward zero by the others' zeros.
//!
//! The downloaded adapter keeps the global scaling: its alpha is `α·r_i/r`, so
//! `(alpha_i/r_i)·B·A` is the same update per component at every rank, and truncation is
//! a pure truncation of the global product.

use crate::adapter::{AdapterConfig, LoraAdapter, LoraModule, Matrix};
use crate::strategy::StrategyError;

/// The first `rank` components of `global`.
pub fn truncate(global: &LoraAdapter, rank: usize) -> Result<LoraAdapter, StrategyError> {
    let full = global.config().rank;
    if rank == 0 || rank > full {
        return Err(StrategyError::Shape(format!(
            "participant rank {rank} must be between 1 and the global rank {full}"
        )));
    }
    if rank == full {
        return Ok(global.clone());
    }
    let config = AdapterConfig {
        rank,
        alpha: global.config().alpha * rank as f32 / full as f32,
        ..global.config().clone()
    };
    let modules = global
        .modules()
        .iter()
        .map(|(name, m)| {
            let k = m.a.cols();
            let a =
                Matrix::new(rank, k, m.a.data()[..rank * k].to_vec()).expect("the first rows of A");
            let d = m.b.rows();
            let b_data = (0..d)
                .flat_map(|i| (0..rank).map(move |j| (i, j)))
                .map(|(i, j)| m.b.get(i, j))
                .collect();
            let b = Matrix::new(d, rank, b_data).expect("the first columns of B");
            (name.clone(), LoraModule { a, b })
        })
        .collect();
    LoraAdapter::new(config, modules).map_err(|e| StrategyError::Shape(e.to_string()))
}

/// `global` with every rank component from `rank` on set to zero (rows of A, columns of B),
/// at the global rank and alpha: what a participant of rank `rank` trains at the global rank.
/// A zero component receives no gradient (∂/∂A_j ∝ B_{:,j} = 0, ∂/∂B_{:,j} ∝ A_j = 0), so it
/// stays zero under SGD and AdamW alike, and training this adapter is training
/// [`truncate`]`(global, rank)`: the scaling `alpha/r` per component is the same.
pub fn zero_beyond(global: &LoraAdapter, rank: usize) -> Result<LoraAdapter, StrategyError> {
    let full = global.config().rank;
    if rank == 0 || rank > full {
        return Err(StrategyError::Shape(format!(
            "participant rank {rank} must be between 1 and the global rank {full}"
        )));
    }
    let modules = global
        .modules()
        .iter()
        .map(|(name, m)| {
            let mut a = m.a.clone();
            let k = a.cols();
            a.data_mut()[rank * k..].iter_mut().for_each(|v| *v = 0.0);
            let mut b = m.b.clone();
            let cols = b.cols();
            for (i, v) in b.data_mut().iter_mut().enumerate() {
                if i % cols >= rank {
                    *v = 0.0;
                }
            }
            (name.clone(), LoraModule { a, b })
        })
        .collect();
    LoraAdapter::new(global.config().clone(), modules)
        .map_err(|e| StrategyError::Shape(e.to_string()))
}
