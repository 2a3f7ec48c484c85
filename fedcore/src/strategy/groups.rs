//! `group_b`: A shared by every lab, B shared within each lab's group (its language),
//! carried through one sum.
//!
//! FedSA-LoRA (arXiv 2410.01463) found that A learns what all clients share and B what is
//! specific to each; it keeps B with each client. In a federation of national labs the
//! specific part is the language, and a language has several labs (a ministry, a
//! university, a hospital), each with too little text to train B well alone. This mode
//! averages A over every lab and B over the labs of each group, from the one weighted sum
//! that secure aggregation reveals:
//!
//! - the upload has every module's `ΔA`, then one `ΔB` slot per group and module, then the
//!   group-weight slot `[1, G]`. A lab fills its own group's `ΔB` slots and a 1 at its
//!   group's position; every other group's slots are zeros;
//! - the weighted mean of the weight slot is `c_g = Σ_{i∈g} w_i / Σ w_i`, the share of the
//!   round's weight that group `g` holds, so the group's weighted mean update is its slot's
//!   mean divided by `c_g` (the same trick as HetLoRA's rank coverage). A group with
//!   `c_g = 0` took no part and keeps its B.
//!
//! What the server learns is one sum per group, so a group must never be smaller than the
//! sums secure aggregation protects: [`GroupSpec::min_labs`] labs (validated against the
//! roster), and at least `max_colluding + 2` with secure aggregation on, so that the center
//! and the colluders together still see the sum of two honest labs at least.

use std::collections::{BTreeMap, BTreeSet};

use ndarray::Array2;
use serde::{Deserialize, Serialize};

use crate::adapter::{LoraAdapter, Matrix};
use crate::error::ConfigError;
use crate::strategy::layout::{AggregatedUpload, SlotKind, UploadLayout};
use crate::strategy::linalg::to_array;
use crate::strategy::{GlobalModel, StrategyError};

/// The name of the group-weight slot.
pub const GROUP_WEIGHT_SLOT: &str = "groups.weight";

/// `[strategy.groups]`: which labs share B.
///
/// ```toml
/// [strategy]
/// mode = "group_b"
///
/// [strategy.groups]
/// min_labs = 3
/// members = { lab-lo-ministry = "lo", lab-lo-university = "lo", lab-lo-hospital = "lo" }
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupSpec {
    /// Each lab's group by participant name (a language code, or any other name of 1 to 32
    /// letters, digits, `-` or `_`).
    pub members: BTreeMap<String, String>,
    /// Fewest labs a group may have (default 3).
    #[serde(default = "default_min_labs")]
    pub min_labs: usize,
}

fn default_min_labs() -> usize {
    3
}

impl GroupSpec {
    /// The group names, sorted: the order of the group slots in an upload.
    pub fn groups(&self) -> Vec<String> {
        self.members
            .values()
            .cloned()
            .collect::<BTreeSet<_>>()
            .into_iter()
            .collect()
    }

    /// The group `participant` belongs to.
    pub fn group_of(&self, participant: &str) -> Option<&str> {
        self.members.get(participant).map(String::as_str)
    }

    /// Labs per group.
    pub fn sizes(&self) -> BTreeMap<&str, usize> {
        let mut out = BTreeMap::new();
        for g in self.members.values() {
            *out.entry(g.as_str()).or_insert(0) += 1;
        }
        out
    }

    /// Checks names and sizes. With secure aggregation on, groups need at least
    /// `max_colluding + 2` labs (see the module docs); errors name the field.
    pub fn validate(&self, secure_aggregation: Option<usize>) -> Result<(), ConfigError> {
        if self.members.is_empty() {
            return Err(ConfigError::field(
                "strategy.groups.members",
                "lists no lab; mode = \"group_b\" needs every lab's group",
            ));
        }
        if self.min_labs == 0 {
            return Err(ConfigError::field(
                "strategy.groups.min_labs",
                "must be at least 1",
            ));
        }
        for (lab, group) in &self.members {
            if !valid_group_name(group) {
                return Err(ConfigError::field(
                    &format!("strategy.groups.members.{lab}"),
                    format!("{group:?} is not 1 to 32 letters, digits, '-' or '_'"),
                ));
            }
        }
        if let Some(max_colluding) = secure_aggregation {
            let floor = max_colluding + 2;
            if self.min_labs < floor {
                return Err(ConfigError::field(
                    "strategy.groups.min_labs",
                    format!(
                        "{} is too small with secure aggregation: the center learns each \
                         group's sum, so with up to {max_colluding} colluding lab(s) a group \
                         needs at least {floor} labs to hide every honest lab's update",
                        self.min_labs
                    ),
                ));
            }
        }
        for (group, n) in self.sizes() {
            if n < self.min_labs {
                return Err(ConfigError::field(
                    "strategy.groups.members",
                    format!(
                        "group {group:?} has {n} lab(s), fewer than min_labs = {}: the center \
                         would learn a sum over too few labs",
                        self.min_labs
                    ),
                ));
            }
        }
        Ok(())
    }

    /// Checks that the members are exactly the roster's labs.
    pub fn check_roster<'a>(
        &self,
        roster: impl IntoIterator<Item = &'a str>,
    ) -> Result<(), ConfigError> {
        let roster: BTreeSet<&str> = roster.into_iter().collect();
        if let Some(lab) = roster.iter().find(|n| !self.members.contains_key(**n)) {
            return Err(ConfigError::field(
                "strategy.groups.members",
                format!("lab {lab} is on the roster but in no group"),
            ));
        }
        if let Some(lab) = self.members.keys().find(|n| !roster.contains(n.as_str())) {
            return Err(ConfigError::field(
                &format!("strategy.groups.members.{lab}"),
                "is not on the roster",
            ));
        }
        Ok(())
    }
}

fn valid_group_name(name: &str) -> bool {
    (1..=32).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// The slot name of group `group`'s B of `module`.
pub fn group_b_slot(group: &str, module: &str) -> String {
    format!("group.{group}.{module}.lora_B")
}

/// Zero B for every group and module of `adapter`: the group part of the initial global.
pub fn zero_group_b(
    adapter: &LoraAdapter,
    groups: &[String],
) -> BTreeMap<String, BTreeMap<String, Matrix>> {
    groups
        .iter()
        .map(|g| {
            let bs = adapter
                .modules()
                .iter()
                .map(|(name, m)| (name.clone(), Matrix::zeros(m.b.rows(), m.b.cols())))
                .collect();
            (g.clone(), bs)
        })
        .collect()
}

/// What a lab of `group` starts from: the global A with its group's B.
pub fn download(global: &GlobalModel, group: &str) -> Result<LoraAdapter, StrategyError> {
    let bs = global
        .group_b
        .get(group)
        .ok_or_else(|| StrategyError::Shape(format!("the global has no B for group {group:?}")))?;
    let mut out = global.adapter.clone();
    for (name, m) in out.modules_mut() {
        let b = bs
            .get(name)
            .ok_or_else(|| StrategyError::Shape(format!("group {group:?} has no B for {name}")))?;
        if b.shape() != m.b.shape() {
            return Err(StrategyError::Shape(format!(
                "group {group:?}'s B of {name} is {:?}, the adapter's is {:?}",
                b.shape(),
                m.b.shape()
            )));
        }
        m.b = b.clone();
    }
    Ok(out)
}

/// Each group's B after the round: `B_g + mean(ΔB slot of g) / c_g` for every group that
/// took part (`c_g > 0`), unchanged otherwise; and the share `c_g` of every group.
#[allow(clippy::type_complexity)]
pub fn aggregate_groups(
    layout: &UploadLayout,
    global: &GlobalModel,
    upload: &AggregatedUpload,
) -> Result<
    (
        BTreeMap<String, BTreeMap<String, Matrix>>,
        Vec<(String, f64)>,
    ),
    StrategyError,
> {
    let (weight_slot, _) = layout
        .slots()
        .find(|(_, k)| **k == SlotKind::GroupWeight)
        .ok_or_else(|| StrategyError::Shape("the layout has no group-weight slot".into()))?;
    let groups: Vec<String> = global.group_b.keys().cloned().collect();
    if weight_slot.shape != [1, groups.len()] {
        return Err(StrategyError::Shape(format!(
            "{GROUP_WEIGHT_SLOT} is {:?} but the global has {} groups",
            weight_slot.shape,
            groups.len()
        )));
    }
    let shares: Vec<(String, f64)> = groups
        .iter()
        .enumerate()
        .map(|(j, g)| (g.clone(), upload.mean[weight_slot.offset + j]))
        .collect();
    let mut next = global.group_b.clone();
    for (slot, kind) in layout.slots() {
        let SlotKind::GroupB { group, module } = kind else {
            continue;
        };
        let j = groups
            .iter()
            .position(|g| g == group)
            .ok_or_else(|| StrategyError::Shape(format!("the global has no group {group:?}")))?;
        let share = shares[j].1;
        // A share this small is no lab at all: the weights are integers ≥ 1, so a group
        // that took part holds at least 1 / Σw of the round's weight.
        if share <= 0.5 / upload.total_weight {
            continue;
        }
        let b = next
            .get_mut(group)
            .and_then(|bs| bs.get_mut(module))
            .ok_or_else(|| {
                StrategyError::Shape(format!("group {group:?} has no B for {module}"))
            })?;
        if b.shape() != slot.shape {
            return Err(StrategyError::Shape(format!(
                "{} is {:?} in the layout but {:?} in the global",
                slot.name,
                slot.shape,
                b.shape()
            )));
        }
        let mean = &upload.mean[slot.offset..slot.offset + slot.numel()];
        for (v, d) in b.data_mut().iter_mut().zip(mean) {
            *v = (f64::from(*v) + d / share) as f32;
        }
    }
    Ok((next, shares))
}

/// The global adapter's B after the round: the weighted mean of every lab's B, `Σ_g c_g B_g`
/// (what a lab outside every group would start from).
pub fn blended_b(
    adapter: &mut LoraAdapter,
    group_b: &BTreeMap<String, BTreeMap<String, Matrix>>,
    shares: &[(String, f64)],
) -> Result<(), StrategyError> {
    let total: f64 = shares.iter().map(|(_, c)| c).sum();
    if total <= 0.0 {
        return Ok(());
    }
    for (name, m) in adapter.modules_mut() {
        let mut acc = Array2::<f64>::zeros((m.b.rows(), m.b.cols()));
        for (g, c) in shares {
            let b = group_b
                .get(g)
                .and_then(|bs| bs.get(name))
                .ok_or_else(|| StrategyError::Shape(format!("group {g:?} has no B for {name}")))?;
            acc = acc + to_array(b) * (c / total);
        }
        for (v, a) in m.b.data_mut().iter_mut().zip(acc.iter()) {
            *v = *a as f32;
        }
    }
    Ok(())
}
