//! The upload seam: which tensors a participant uploads in a round (an [`UploadLayout`], a
//! hashed [`LayoutManifest`] plus what each slot holds), how it turns its trained adapter
//! into that flat vector, and how the server turns the weighted mean of the vectors back
//! into tensors.
//!
//! Every upload is a difference from what the participant downloaded, as Mekong's secure
//! aggregation expects (small values, clipped and quantised). Because the server knows what
//! it handed out, `reference + mean(Δ_i)` recovers the weighted mean of the participants'
//! absolute values from the sum alone:
//! - `{module}.lora_A` `[r, in]` and `{module}.lora_B` `[out, r]`: the trained factor minus
//!   the downloaded one. With HetLoRA both are zero-padded to the global rank `r`.
//! - `{module}.dense` `[out, in]` (FedEx-LoRA): `B_i·A_i − B_g·A_g`.
//! - `hetlora.rank_coverage` `[1, r]` (HetLoRA): `1` for the rank components the participant
//!   has, `0` beyond. Its weighted mean `c_j = Σ_{i: r_i > j} p_i` is what the server needs
//!   to know how much of the global's component `j` the padded downloads held, without
//!   learning any participant's weight.

use std::collections::BTreeMap;

use ndarray::Array2;

use crate::adapter::{LoraAdapter, Matrix};
use crate::aggregate::WeightedSum;
use crate::manifest::{LayoutManifest, TensorSlot};
use crate::secagg::spec::DecodedSum;
use crate::strategy::StrategyError;
use crate::strategy::groups::{GROUP_WEIGHT_SLOT, group_b_slot};
use crate::strategy::linalg::{product, to_array};

/// The name of HetLoRA's rank-coverage slot.
pub const COVERAGE_SLOT: &str = "hetlora.rank_coverage";

/// What one slot of an upload holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SlotKind {
    /// `ΔA` of the named module.
    A(String),
    /// `ΔB` of the named module.
    B(String),
    /// `Δ(B·A)` of the named module.
    Dense(String),
    /// HetLoRA's rank coverage.
    Coverage,
    /// `group_b`: `ΔB` of the named module for the labs of `group` (zeros from any other
    /// lab).
    GroupB { group: String, module: String },
    /// `group_b`: a 1 at the uploading lab's group, in the order of the group names.
    GroupWeight,
}

/// Which tensors an upload carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UploadParts {
    pub a: bool,
    pub b: bool,
    pub dense: bool,
    pub coverage: bool,
}

/// A round's upload layout: the manifest (hashed, checked on every update) and the meaning
/// of each slot.
#[derive(Debug, Clone, PartialEq)]
pub struct UploadLayout {
    manifest: LayoutManifest,
    kinds: Vec<SlotKind>,
}

impl UploadLayout {
    /// The layout of `parts` over the global adapter's modules, in canonical module order: A,
    /// B, dense per module, the coverage slot last. B alone is exactly
    /// [`LoraAdapter::b_manifest`], the FFA-LoRA layout the coordinator already uses.
    pub fn new(global: &LoraAdapter, parts: UploadParts) -> Self {
        let rank = global.config().rank;
        let mut slots = Vec::new();
        let mut kinds = Vec::new();
        for (name, m) in global.modules() {
            if parts.a {
                slots.push(TensorSlot::new(format!("{name}.lora_A"), m.a.shape()));
                kinds.push(SlotKind::A(name.clone()));
            }
            if parts.b {
                slots.push(TensorSlot::new(format!("{name}.lora_B"), m.b.shape()));
                kinds.push(SlotKind::B(name.clone()));
            }
            if parts.dense {
                slots.push(TensorSlot::new(
                    format!("{name}.dense"),
                    [m.b.rows(), m.a.cols()],
                ));
                kinds.push(SlotKind::Dense(name.clone()));
            }
        }
        if parts.coverage {
            slots.push(TensorSlot::new(COVERAGE_SLOT.to_string(), [1, rank]));
            kinds.push(SlotKind::Coverage);
        }
        UploadLayout {
            manifest: LayoutManifest::new(slots),
            kinds,
        }
    }

    /// The `group_b` layout (see [`crate::strategy::groups`]): every module's A, then each
    /// group's B of every module (groups in the given order), then the group-weight slot.
    pub fn grouped(global: &LoraAdapter, groups: &[String]) -> Self {
        let mut slots = Vec::new();
        let mut kinds = Vec::new();
        for (name, m) in global.modules() {
            slots.push(TensorSlot::new(format!("{name}.lora_A"), m.a.shape()));
            kinds.push(SlotKind::A(name.clone()));
        }
        for group in groups {
            for (name, m) in global.modules() {
                slots.push(TensorSlot::new(group_b_slot(group, name), m.b.shape()));
                kinds.push(SlotKind::GroupB {
                    group: group.clone(),
                    module: name.clone(),
                });
            }
        }
        slots.push(TensorSlot::new(GROUP_WEIGHT_SLOT.into(), [1, groups.len()]));
        kinds.push(SlotKind::GroupWeight);
        UploadLayout {
            manifest: LayoutManifest::new(slots),
            kinds,
        }
    }

    pub fn manifest(&self) -> &LayoutManifest {
        &self.manifest
    }

    /// The groups of a `group_b` layout, in slot order (empty for every other layout).
    pub fn groups(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        for kind in &self.kinds {
            if let SlotKind::GroupB { group, .. } = kind
                && out.last() != Some(&group.as_str())
            {
                out.push(group);
            }
        }
        out
    }

    /// Number of values.
    pub fn len(&self) -> usize {
        self.manifest.len()
    }

    /// True when the layout carries no values.
    pub fn is_empty(&self) -> bool {
        self.manifest.is_empty()
    }

    /// Slots with their meaning.
    pub fn slots(&self) -> impl Iterator<Item = (&TensorSlot, &SlotKind)> {
        self.manifest.slots().iter().zip(&self.kinds)
    }
}

/// The weighted mean of the uploads and its total weight: all the server learns from
/// secure aggregation, and all a sum-only mode may use.
#[derive(Debug, Clone, PartialEq)]
pub struct AggregatedUpload {
    /// `Σ w_i x_i / Σ w_i`, in f64.
    pub mean: Vec<f64>,
    /// `Σ w_i`.
    pub total_weight: f64,
}

impl AggregatedUpload {
    /// From the raw sums `Σ w_i x_i` and `Σ w_i`.
    pub fn from_sum(sum: &[f64], total_weight: f64) -> Result<Self, StrategyError> {
        if !(total_weight.is_finite() && total_weight > 0.0) {
            return Err(StrategyError::Weight(total_weight));
        }
        Ok(AggregatedUpload {
            mean: sum.iter().map(|s| s / total_weight).collect(),
            total_weight,
        })
    }

    /// From a plaintext running sum.
    pub fn from_weighted_sum(sum: &WeightedSum) -> Result<Self, StrategyError> {
        let mean = sum.mean_f64().map_err(|_| StrategyError::Empty)?;
        Ok(AggregatedUpload {
            mean,
            total_weight: sum.total_weight() as f64,
        })
    }

    /// From a decoded secure-aggregation sum.
    pub fn from_decoded(sum: &DecodedSum) -> Self {
        AggregatedUpload {
            mean: sum.mean_update.clone(),
            total_weight: sum.total_weight as f64,
        }
    }
}

/// A participant's upload: its trained adapter minus what it downloaded, in `layout`
/// (see the module docs). `group` is the participant's group under `group_b` (ignored by
/// every other layout). Shapes are checked; nothing panics on a mismatched adapter.
pub fn participant_upload(
    layout: &UploadLayout,
    group: Option<&str>,
    download: &LoraAdapter,
    trained: &LoraAdapter,
) -> Result<Vec<f32>, StrategyError> {
    let mut out = Vec::with_capacity(layout.len());
    let groups = layout.groups();
    if !groups.is_empty() && !group.is_some_and(|g| groups.contains(&g)) {
        return Err(StrategyError::Shape(format!(
            "the layout has B slots for groups {groups:?} but this participant's group is {group:?}"
        )));
    }
    for (slot, kind) in layout.slots() {
        match kind {
            SlotKind::GroupB { group: g, module } => {
                if Some(g.as_str()) != group {
                    out.extend(std::iter::repeat_n(0.0, slot.numel()));
                    continue;
                }
                let pick = |adapter: &LoraAdapter| -> Result<Matrix, StrategyError> {
                    let m = adapter.module(module).ok_or_else(|| {
                        StrategyError::Shape(format!("the adapter has no module {module}"))
                    })?;
                    pad(&m.b, slot.shape, false, &slot.name)
                };
                let (t, d) = (pick(trained)?, pick(download)?);
                out.extend(t.data().iter().zip(d.data()).map(|(t, d)| t - d));
            }
            SlotKind::GroupWeight => {
                out.extend(
                    groups
                        .iter()
                        .map(|g| if Some(*g) == group { 1.0 } else { 0.0 }),
                );
            }
            SlotKind::A(name) | SlotKind::B(name) => {
                let is_a = matches!(kind, SlotKind::A(_));
                let pick = |adapter: &LoraAdapter| -> Result<Matrix, StrategyError> {
                    let m = adapter.module(name).ok_or_else(|| {
                        StrategyError::Shape(format!("the adapter has no module {name}"))
                    })?;
                    let t = if is_a { &m.a } else { &m.b };
                    pad(t, slot.shape, is_a, &slot.name)
                };
                let (t, d) = (pick(trained)?, pick(download)?);
                out.extend(t.data().iter().zip(d.data()).map(|(t, d)| t - d));
            }
            SlotKind::Dense(name) => {
                let dense = |adapter: &LoraAdapter| -> Result<Array2<f64>, StrategyError> {
                    let m = adapter.module(name).ok_or_else(|| {
                        StrategyError::Shape(format!("the adapter has no module {name}"))
                    })?;
                    Ok(product(&to_array(&m.b), &to_array(&m.a))?)
                };
                let (t, d) = (dense(trained)?, dense(download)?);
                if t.dim() != (slot.shape[0], slot.shape[1]) || d.dim() != t.dim() {
                    return Err(StrategyError::Shape(format!(
                        "{} is {:?} in the layout but {:?} in the adapter",
                        slot.name,
                        slot.shape,
                        t.dim()
                    )));
                }
                out.extend(t.iter().zip(d.iter()).map(|(t, d)| (t - d) as f32));
            }
            SlotKind::Coverage => {
                let rank = trained.config().rank;
                if rank > slot.shape[1] {
                    return Err(StrategyError::Shape(format!(
                        "rank {rank} exceeds the global rank {}",
                        slot.shape[1]
                    )));
                }
                out.extend((0..slot.shape[1]).map(|j| if j < rank { 1.0 } else { 0.0 }));
            }
        }
    }
    if let Some(index) = out.iter().position(|v| !v.is_finite()) {
        return Err(StrategyError::NonFinite { index });
    }
    Ok(out)
}

/// `t` zero-padded to `shape`: extra rows for A (`[r_i, in]` → `[r, in]`), extra columns
/// for B (`[out, r_i]` → `[out, r]`). Anything else is a shape error.
fn pad(t: &Matrix, shape: [usize; 2], is_a: bool, slot: &str) -> Result<Matrix, StrategyError> {
    let fits = if is_a {
        t.cols() == shape[1] && t.rows() <= shape[0]
    } else {
        t.rows() == shape[0] && t.cols() <= shape[1]
    };
    if !fits {
        return Err(StrategyError::Shape(format!(
            "{slot} is {:?} in the adapter, which does not pad to {:?}",
            t.shape(),
            shape
        )));
    }
    let mut out = Matrix::zeros(shape[0], shape[1]);
    let cols = shape[1];
    for i in 0..t.rows() {
        for j in 0..t.cols() {
            out.data_mut()[i * cols + j] = t.get(i, j);
        }
    }
    Ok(out)
}

/// The server's view of one round: the weighted mean of the participants' absolute values
/// per slot (`reference + mean Δ`), and HetLoRA's coverage.
#[derive(Debug, Clone, PartialEq)]
pub struct MeanTensors {
    /// Slot name → weighted mean, shaped as the slot.
    pub tensors: BTreeMap<String, Array2<f64>>,
    /// `c_j = Σ_{i: r_i > j} p_i`, when the layout has the coverage slot.
    pub coverage: Option<Vec<f64>>,
}

/// Turns the weighted mean of the uploads back into tensors (see the module docs).
pub fn mean_tensors(
    layout: &UploadLayout,
    global: &LoraAdapter,
    upload: &AggregatedUpload,
) -> Result<MeanTensors, StrategyError> {
    if upload.mean.len() != layout.len() {
        return Err(StrategyError::Length {
            got: upload.mean.len(),
            expected: layout.len(),
            layout: layout.manifest().short_hash(),
        });
    }
    if let Some(index) = upload.mean.iter().position(|v| !v.is_finite()) {
        return Err(StrategyError::NonFinite { index });
    }
    let values = |slot: &TensorSlot| {
        Array2::from_shape_vec(
            (slot.shape[0], slot.shape[1]),
            upload.mean[slot.offset..slot.offset + slot.numel()].to_vec(),
        )
        .expect("a slot's length is its shape's product")
    };
    let coverage = layout
        .slots()
        .find(|(_, k)| **k == SlotKind::Coverage)
        .map(|(slot, _)| upload.mean[slot.offset..slot.offset + slot.numel()].to_vec());
    let mut tensors = BTreeMap::new();
    for (slot, kind) in layout.slots() {
        let module = |name: &str| {
            global
                .module(name)
                .ok_or_else(|| StrategyError::Shape(format!("the global has no module {name}")))
        };
        let reference = match kind {
            SlotKind::A(name) => {
                let mut a = to_array(&module(name)?.a);
                if let Some(c) = &coverage {
                    for (j, mut row) in a.rows_mut().into_iter().enumerate() {
                        row *= c[j];
                    }
                }
                a
            }
            SlotKind::B(name) => {
                let mut b = to_array(&module(name)?.b);
                if let Some(c) = &coverage {
                    for (j, mut col) in b.columns_mut().into_iter().enumerate() {
                        col *= c[j];
                    }
                }
                b
            }
            SlotKind::Dense(name) => {
                let m = module(name)?;
                product(&to_array(&m.b), &to_array(&m.a))?
            }
            SlotKind::Coverage | SlotKind::GroupB { .. } | SlotKind::GroupWeight => continue,
        };
        if reference.dim() != (slot.shape[0], slot.shape[1]) {
            return Err(StrategyError::Shape(format!(
                "{} is {:?} in the layout but {:?} in the global",
                slot.name,
                slot.shape,
                reference.dim()
            )));
        }
        tensors.insert(slot.name.clone(), reference + values(slot));
    }
    Ok(MeanTensors { tensors, coverage })
}
