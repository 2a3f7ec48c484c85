//! FLoRA (arXiv 2409.05976): the server stacks every participant's blocks,
//! `B_stack = [p_1 B_1 … p_n B_n]` and `A_stack = [A_1; …; A_n]`, so that
//! `B_stack·A_stack = Σ p_i B_i A_i` exactly, even with heterogeneous ranks. Participants
//! merge the stacked product into their base weights and restart LoRA from a fresh A and a
//! zero B; the server here merges it into the global's `base_delta` directly.
//!
//! `Σ p_i B_i A_i` is not a linear function of the uploads, so FLoRA needs each
//! participant's upload: it is the one mode that is not sum-only, and it cannot run with
//! secure aggregation on.

use ndarray::{Array2, Axis, concatenate};
use sha2::{Digest, Sha256};

use crate::adapter::{LoraAdapter, ModuleShape};
use crate::strategy::layout::{SlotKind, UploadLayout};
use crate::strategy::linalg::{product, to_array, to_matrix};
use crate::strategy::{GlobalModel, StrategyError};

/// The seed of the fresh A that LoRA restarts from in `round`.
pub fn next_a_seed(a_seed: u64, round: u64) -> u64 {
    let mut h = Sha256::new();
    h.update(b"mekong/flora/A/v1");
    h.update(a_seed.to_le_bytes());
    h.update(round.to_le_bytes());
    let d = h.finalize();
    u64::from_le_bytes(d[..8].try_into().expect("8 bytes"))
}

/// The next global: `base_delta += (α/r)·B_stack·A_stack` per module, and a fresh adapter
/// (A from `fresh_seed`, B zero). Uploads are `(weight, ΔA and ΔB in layout)`.
pub fn stack_and_merge(
    layout: &UploadLayout,
    global: &GlobalModel,
    uploads: &[(u64, Vec<f32>)],
    fresh_seed: u64,
) -> Result<GlobalModel, StrategyError> {
    let total: f64 = uploads.iter().map(|(w, _)| *w as f64).sum();
    for (w, v) in uploads {
        if *w == 0 {
            return Err(StrategyError::Weight(0.0));
        }
        if v.len() != layout.len() {
            return Err(StrategyError::Length {
                got: v.len(),
                expected: layout.len(),
                layout: layout.manifest().short_hash(),
            });
        }
        if let Some(index) = v.iter().position(|x| !x.is_finite()) {
            return Err(StrategyError::NonFinite { index });
        }
    }
    let scaling = global.adapter.config().scaling() as f64;
    let mut base_delta = global.base_delta.clone();
    let mut shapes = Vec::new();
    for (name, m) in global.adapter.modules() {
        let slot_of = |want_a: bool| {
            layout
                .slots()
                .find(|(_, k)| match k {
                    SlotKind::A(n) => want_a && n == name,
                    SlotKind::B(n) => !want_a && n == name,
                    _ => false,
                })
                .map(|(s, _)| s.clone())
                .ok_or_else(|| StrategyError::Shape(format!("the layout lacks {name}")))
        };
        let (a_slot, b_slot) = (slot_of(true)?, slot_of(false)?);
        let (a_g, b_g) = (to_array(&m.a), to_array(&m.b));
        let view = |v: &[f32], slot: &crate::manifest::TensorSlot| {
            Array2::from_shape_fn((slot.shape[0], slot.shape[1]), |(i, j)| {
                v[slot.offset + i * slot.shape[1] + j] as f64
            })
        };
        let mut a_blocks = Vec::new();
        let mut b_blocks = Vec::new();
        for (w, v) in uploads {
            a_blocks.push(&a_g + &view(v, &a_slot));
            b_blocks.push((&b_g + &view(v, &b_slot)) * (*w as f64 / total));
        }
        let a_views: Vec<_> = a_blocks.iter().map(|a| a.view()).collect();
        let b_views: Vec<_> = b_blocks.iter().map(|b| b.view()).collect();
        let a_stack = concatenate(Axis(0), &a_views)
            .map_err(|e| StrategyError::Shape(format!("{name}: {e}")))?;
        let b_stack = concatenate(Axis(1), &b_views)
            .map_err(|e| StrategyError::Shape(format!("{name}: {e}")))?;
        let mut merged = product(&b_stack, &a_stack)? * scaling;
        if let Some(old) = base_delta.get(name) {
            merged += &to_array(old);
        }
        base_delta.insert(name.clone(), to_matrix(&merged));
        shapes.push(ModuleShape {
            name: name.clone(),
            out_features: m.b.rows(),
            in_features: m.a.cols(),
        });
    }
    let adapter = LoraAdapter::init_ffa(global.adapter.config().clone(), &shapes, fresh_seed);
    Ok(GlobalModel {
        adapter,
        base_delta,
        group_b: Default::default(),
    })
}
