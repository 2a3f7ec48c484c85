//! FedEx-LoRA (arXiv 2410.09432): participants upload A, B and their dense product
//! `B_i·A_i`; the server averages A and B as FedIT does and merges the part FedIT loses,
//! the residual `mean(B_i A_i) − B̄Ā`, into the base weights:
//! `W₀ ← W₀ + (α/r)[mean(B_i A_i) − B̄Ā]`. The global model is then exactly the weighted mean
//! of the participants' models. The dense upload is linear in what each participant holds,
//! so the mode stays sum-only, at the price of `out × in` values per module per participant
//! (bounded by `strategy.fedex.max_dense_values` at configuration time).

use std::collections::BTreeMap;

use crate::adapter::{LoraAdapter, Matrix};
use crate::strategy::StrategyError;
use crate::strategy::layout::MeanTensors;
use crate::strategy::linalg::{product, to_array, to_matrix};

/// Adds `(α/r)[mean(B_i A_i) − B'A']` to every module's `base_delta`, where `B'`, `A'` are
/// the new global factors as stored (already rounded to f32), so that
/// `base_delta + (α/r)B'A'` equals the mean of the participants' models up to one f32
/// rounding of the residual. Nothing is written unless every module succeeds.
pub fn merge_residual(
    base_delta: &mut BTreeMap<String, Matrix>,
    adapter: &LoraAdapter,
    means: &MeanTensors,
) -> Result<(), StrategyError> {
    let scaling = adapter.config().scaling() as f64;
    let mut next = Vec::new();
    for (name, m) in adapter.modules() {
        let slot = format!("{name}.dense");
        let mean_dense = means
            .tensors
            .get(&slot)
            .ok_or_else(|| StrategyError::Shape(format!("no aggregated {slot}")))?;
        let product = product(&to_array(&m.b), &to_array(&m.a))?;
        if product.dim() != mean_dense.dim() {
            return Err(StrategyError::Shape(format!(
                "{slot} is {:?}, B·A is {:?}",
                mean_dense.dim(),
                product.dim()
            )));
        }
        let mut delta = (mean_dense - &product) * scaling;
        if let Some(old) = base_delta.get(name) {
            if old.shape() != [delta.nrows(), delta.ncols()] {
                return Err(StrategyError::Shape(format!(
                    "the merged correction of {name} is {:?}, the module {:?}",
                    old.shape(),
                    delta.dim()
                )));
            }
            delta += &to_array(old);
        }
        next.push((name.clone(), to_matrix(&delta)));
    }
    base_delta.extend(next);
    Ok(())
}
