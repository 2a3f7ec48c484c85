//! FedSVD (arXiv 2505.12805): participants train B only on a shared A; the server forms the
//! averaged product `B̄·A` (rank ≤ r) and re-factorises it by SVD, `B̄A = UΣVᵀ`, into
//! `A ← Vᵀ` (orthonormal rows) and `B ← UΣ` for the next round. The product is unchanged
//! (lossless), so a round is as exact as FFA-LoRA, but A keeps adapting to the data
//! instead of staying at its random draw. Under secure aggregation this is pure
//! post-processing of the sum.
//!
//! With a server optimizer other than plain FedAvg, the optimizer steps B first and the
//! SVD follows. B's moments then live in a basis that rotates each round: a known
//! approximation, documented rather than hidden.

use std::collections::BTreeMap;

use ndarray::Array2;

use crate::adapter::LoraAdapter;
use crate::strategy::linalg::{refactorise_low_rank, to_array};
use crate::strategy::{StrategyError, write_factors};

/// Re-factorises every module of `adapter` from its stepped B (`{module}.lora_B` in
/// `stepped`) and its current A, writing both. Nothing is written unless every module
/// succeeds.
pub fn refactorise(
    adapter: &mut LoraAdapter,
    stepped: &BTreeMap<String, Array2<f64>>,
) -> Result<(), StrategyError> {
    let mut next = BTreeMap::new();
    for (name, m) in adapter.modules() {
        let b_slot = format!("{name}.lora_B");
        let b = stepped
            .get(&b_slot)
            .ok_or_else(|| StrategyError::Shape(format!("no aggregated {b_slot}")))?;
        let r = refactorise_low_rank(b, &to_array(&m.a), name)?;
        next.insert(b_slot, r.b);
        next.insert(format!("{name}.lora_A"), r.a);
    }
    write_factors(adapter, &next)
}
