//! The global model a strategy maintains: the LoRA adapter and, under FedEx-LoRA, the dense
//! corrections merged into the base weights (`W = W₀ + base_delta + (α/r)·B·A`).
//!
//! One type carries both so that everything that names "the global" names both: the wire
//! form participants download ([`GlobalModel::manifest`], [`GlobalModel::flatten`]), the
//! content hash updates name and consistency signatures bind ([`GlobalModel::content_hash`]),
//! the aggregator's durable copy ([`encode_stored`]) and the directories operators hand to
//! users ([`write_dir`]).
//!
//! A model without corrections is exactly its adapter in every form: the same wire layout,
//! the same content hash, the same stored bytes, the same PEFT directory. Under FedEx-LoRA
//! the corrections are present from round 0 (zeros, [`GlobalModel::with_zero_corrections`]),
//! so a plan has one global layout for the whole run.
//!
//! File forms of the corrections:
//! - in a directory, `base_delta.safetensors` beside the PEFT adapter, one F32 tensor per
//!   adapted module keyed by the base weight it corrects (`model.layers.0.self_attn.q_proj.
//!   weight`, `[out, in]`, already scaled): add it to the checkpoint's tensor of the same name
//!   to merge it;
//! - in the aggregator's database, one safetensors blob: the PEFT tensors and the corrections
//!   under `mekong.base_delta.{module}.weight`.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use ndarray::Array2;
use safetensors::tensor::{SafeTensors, TensorView};
use sha2::{Digest, Sha256};

use crate::adapter::{AdapterConfig, LoraAdapter, Matrix};
use crate::error::AdapterError;
use crate::manifest::{LayoutManifest, TensorSlot};
use crate::peft::{self, OwnedTensor};
use crate::strategy::{StrategyError, linalg};

/// File name of the merged corrections inside an adapter directory.
pub const BASE_DELTA_FILE: &str = "base_delta.safetensors";

/// Slot-name suffix of a module's correction in the wire layout.
const SLOT_SUFFIX: &str = ".base_delta";
/// Key prefix of a correction inside the aggregator's stored blob.
const STORED_PREFIX: &str = "mekong.base_delta.";
/// Key prefix of a group's B inside the aggregator's stored blob:
/// `mekong.group_b.{group}.{module}.lora_B.weight`.
const STORED_GROUP_PREFIX: &str = "mekong.group_b.";
/// Sub-directory of an adapter directory holding one PEFT adapter per group (`group_b`).
pub const GROUPS_DIR: &str = "groups";

/// The global model a strategy maintains.
#[derive(Debug, Clone, PartialEq)]
pub struct GlobalModel {
    /// The global LoRA adapter (at the global rank).
    pub adapter: LoraAdapter,
    /// Dense corrections merged into the base weights, already scaled by `α/r`, by module
    /// name, each `[out, in]`: a module's effective weight is `W₀ + base_delta + (α/r)·B·A`.
    /// Empty except under FedEx-LoRA and FLoRA; participants add it to their base before
    /// training.
    pub base_delta: BTreeMap<String, Matrix>,
    /// `group_b` only: each group's B, by group and module name (`[out, r]`). Every group of
    /// the plan is present from round 0 (zeros), so the layout is fixed for the run.
    pub group_b: BTreeMap<String, BTreeMap<String, Matrix>>,
}

impl GlobalModel {
    /// A global with no merged corrections.
    pub fn new(adapter: LoraAdapter) -> Self {
        GlobalModel {
            adapter,
            base_delta: BTreeMap::new(),
            group_b: BTreeMap::new(),
        }
    }

    /// A `group_b` global: `adapter` with a zero B for every one of `groups`.
    pub fn with_groups(adapter: LoraAdapter, groups: &[String]) -> Self {
        let group_b = crate::strategy::groups::zero_group_b(&adapter, groups);
        GlobalModel {
            adapter,
            base_delta: BTreeMap::new(),
            group_b,
        }
    }

    /// `group_b`: what a lab of `group` uses, the global A with its group's B.
    pub fn for_group(&self, group: &str) -> Result<LoraAdapter, StrategyError> {
        crate::strategy::groups::download(self, group)
    }

    /// The group B slots, in wire order: group, then module in the adapter's order.
    fn group_slots(&self) -> impl Iterator<Item = (String, &Matrix)> {
        self.group_b.iter().flat_map(move |(g, bs)| {
            self.adapter.modules().iter().filter_map(move |(name, _)| {
                bs.get(name)
                    .map(|b| (crate::strategy::groups::group_b_slot(g, name), b))
            })
        })
    }

    /// A global whose every adapted module carries a zero correction: FedEx-LoRA's round 0.
    pub fn with_zero_corrections(adapter: LoraAdapter) -> Self {
        let base_delta = adapter
            .modules()
            .iter()
            .map(|(name, m)| (name.clone(), Matrix::zeros(m.b.rows(), m.a.cols())))
            .collect();
        GlobalModel {
            adapter,
            base_delta,
            group_b: BTreeMap::new(),
        }
    }

    /// Whether dense corrections travel with the adapter.
    pub fn has_corrections(&self) -> bool {
        !self.base_delta.is_empty()
    }

    /// Whether anything beyond the adapter travels (corrections or group Bs).
    fn has_extras(&self) -> bool {
        self.has_corrections() || !self.group_b.is_empty()
    }

    /// The module's whole update on top of `W₀`: `base_delta + (α/r)·B·A`, in f64.
    pub fn effective_delta(&self, module: &str) -> Result<Array2<f64>, StrategyError> {
        let m = self
            .adapter
            .module(module)
            .ok_or_else(|| StrategyError::Shape(format!("no module {module}")))?;
        let scaling = self.adapter.config().scaling() as f64;
        let mut d = linalg::product(&linalg::to_array(&m.b), &linalg::to_array(&m.a))? * scaling;
        if let Some(base) = self.base_delta.get(module) {
            d += &linalg::to_array(base);
        }
        Ok(d)
    }

    /// The wire layout: the adapter's (every module's A then B), then every correction as
    /// `{module}.base_delta` `[out, in]`.
    pub fn manifest(&self) -> LayoutManifest {
        let mut slots = self.adapter.full_manifest().slots().to_vec();
        slots.extend(
            self.base_delta
                .iter()
                .map(|(name, d)| TensorSlot::new(format!("{name}{SLOT_SUFFIX}"), d.shape())),
        );
        slots.extend(
            self.group_slots()
                .map(|(name, b)| TensorSlot::new(name, b.shape())),
        );
        LayoutManifest::new(slots)
    }

    /// Every value in [`Self::manifest`]'s order.
    pub fn flatten(&self) -> Vec<f32> {
        let mut values = self
            .adapter
            .flatten(&self.adapter.full_manifest())
            .expect("an adapter flattens by its own manifest");
        for d in self.base_delta.values() {
            values.extend_from_slice(d.data());
        }
        for (_, b) in self.group_slots() {
            values.extend_from_slice(b.data());
        }
        values
    }

    /// Overwrites every value from `values`, laid out as [`Self::manifest`] (of this model's
    /// own names and shapes: `self` is the template). Nothing is written unless the length
    /// matches.
    pub fn unflatten(&mut self, values: &[f32]) -> Result<(), AdapterError> {
        let adapter_manifest = self.adapter.full_manifest();
        let expected = adapter_manifest.len()
            + self.base_delta.values().map(numel).sum::<usize>()
            + self.group_slots().map(|(_, b)| numel(b)).sum::<usize>();
        if values.len() != expected {
            return Err(AdapterError::Shape(format!(
                "the global model has {expected} values, got {}",
                values.len()
            )));
        }
        let (adapter_values, mut rest) = values.split_at(adapter_manifest.len());
        self.adapter.unflatten(&adapter_manifest, adapter_values)?;
        for d in self.base_delta.values_mut() {
            let (head, tail) = rest.split_at(numel(d));
            d.data_mut().copy_from_slice(head);
            rest = tail;
        }
        let modules: Vec<String> = self
            .adapter
            .modules()
            .iter()
            .map(|(n, _)| n.clone())
            .collect();
        for bs in self.group_b.values_mut() {
            for name in &modules {
                if let Some(b) = bs.get_mut(name) {
                    let (head, tail) = rest.split_at(numel(b));
                    b.data_mut().copy_from_slice(head);
                    rest = tail;
                }
            }
        }
        Ok(())
    }

    /// Hex SHA-256 naming this model: the adapter's [`LoraAdapter::content_hash`] when there
    /// are no corrections and no group Bs; otherwise over a versioned tag, the layout hash, rank, alpha and
    /// every value in layout order.
    pub fn content_hash(&self) -> String {
        if !self.has_extras() {
            return self.adapter.content_hash();
        }
        let mut h = Sha256::new();
        h.update(b"mekong/global-model/v1");
        h.update(self.manifest().hash());
        h.update(self.adapter.config().rank.to_le_bytes());
        h.update(self.adapter.config().alpha.to_le_bytes());
        for v in self.flatten() {
            h.update(v.to_le_bytes());
        }
        hex::encode(h.finalize())
    }
}

fn numel(m: &Matrix) -> usize {
    m.rows() * m.cols()
}

/// The safetensors key of a module's correction in a directory's `base_delta.safetensors`:
/// the base weight it corrects.
pub fn base_delta_key(module: &str) -> String {
    format!("{module}.weight")
}

/// `base_delta.safetensors`: one F32 `[out, in]` tensor per module (see the module docs).
pub fn encode_base_delta(base_delta: &BTreeMap<String, Matrix>) -> Vec<u8> {
    let owned: Vec<OwnedTensor> = base_delta
        .iter()
        .map(|(name, d)| (base_delta_key(name), d.shape().to_vec(), peft::f32_bytes(d)))
        .collect();
    peft::serialize_f32(&owned)
}

/// Reads corrections for exactly the modules of `adapter`, each `[out, in]`; a missing,
/// foreign or misshapen tensor is refused by name.
pub fn decode_base_delta(
    bytes: &[u8],
    adapter: &LoraAdapter,
) -> Result<BTreeMap<String, Matrix>, AdapterError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    decode_corrections(
        st.iter()
            .map(|(key, view)| (key, key.strip_suffix(".weight"), view)),
        adapter,
    )
}

fn decode_corrections<'a>(
    tensors: impl Iterator<Item = (&'a str, Option<&'a str>, TensorView<'a>)>,
    adapter: &LoraAdapter,
) -> Result<BTreeMap<String, Matrix>, AdapterError> {
    let mut out = BTreeMap::new();
    for (key, module, view) in tensors {
        let m = module
            .and_then(|name| adapter.module(name).map(|m| (name, m)))
            .ok_or_else(|| AdapterError::UnexpectedTensor(key.to_string()))?;
        let (name, lora) = m;
        let expected = [lora.b.rows(), lora.a.cols()];
        if view.shape() != expected {
            return Err(AdapterError::Shape(format!(
                "{key} is {:?}, the module's base weight is {expected:?}",
                view.shape()
            )));
        }
        let values = peft::decode_floats(key, view.dtype(), view.data())?;
        out.insert(
            name.to_string(),
            Matrix::new(expected[0], expected[1], values)?,
        );
    }
    if let Some((name, _)) = adapter
        .modules()
        .iter()
        .find(|(name, _)| !out.contains_key(name))
    {
        return Err(AdapterError::MissingTensor(base_delta_key(name)));
    }
    Ok(out)
}

/// The aggregator's durable form: exactly [`peft::encode_weights`] without corrections,
/// else the PEFT tensors plus `mekong.base_delta.{module}.weight`.
pub fn encode_stored(model: &GlobalModel) -> Vec<u8> {
    let mut owned = peft::weight_tensors(&model.adapter);
    owned.extend(model.base_delta.iter().map(|(name, d)| {
        (
            format!("{STORED_PREFIX}{}", base_delta_key(name)),
            d.shape().to_vec(),
            peft::f32_bytes(d),
        )
    }));
    for (g, bs) in &model.group_b {
        owned.extend(bs.iter().map(|(name, b)| {
            (
                format!("{STORED_GROUP_PREFIX}{g}.{name}.lora_B.weight"),
                b.shape().to_vec(),
                peft::f32_bytes(b),
            )
        }));
    }
    peft::serialize_f32(&owned)
}

/// Reads [`encode_stored`]'s form with the plan's adapter `config`.
pub fn decode_stored(bytes: &[u8], config: AdapterConfig) -> Result<GlobalModel, AdapterError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    let (groups, rest): (Vec<_>, Vec<_>) = st
        .iter()
        .partition(|(key, _)| key.starts_with(STORED_GROUP_PREFIX));
    let (corrections, weights): (Vec<_>, Vec<_>) = rest
        .into_iter()
        .partition(|(key, _)| key.starts_with(STORED_PREFIX));
    let adapter = peft::decode_weight_tensors(weights.into_iter(), config)?;
    let mut group_b: BTreeMap<String, BTreeMap<String, Matrix>> = BTreeMap::new();
    for (key, view) in groups {
        let parsed = key
            .strip_prefix(STORED_GROUP_PREFIX)
            .and_then(|k| k.strip_suffix(".lora_B.weight"))
            .and_then(|k| k.split_once('.'));
        let Some((group, module)) = parsed else {
            return Err(AdapterError::UnexpectedTensor(key.to_string()));
        };
        let m = adapter
            .module(module)
            .ok_or_else(|| AdapterError::UnexpectedTensor(key.to_string()))?;
        if view.shape() != m.b.shape() {
            return Err(AdapterError::Shape(format!(
                "{key} is {:?}, the module's B is {:?}",
                view.shape(),
                m.b.shape()
            )));
        }
        let values = peft::decode_floats(key, view.dtype(), view.data())?;
        group_b.entry(group.to_string()).or_default().insert(
            module.to_string(),
            Matrix::new(m.b.rows(), m.b.cols(), values)?,
        );
    }
    for (group, bs) in &group_b {
        if let Some((name, _)) = adapter.modules().iter().find(|(n, _)| !bs.contains_key(n)) {
            return Err(AdapterError::MissingTensor(format!(
                "{STORED_GROUP_PREFIX}{group}.{name}.lora_B.weight"
            )));
        }
    }
    let base_delta = if corrections.is_empty() {
        BTreeMap::new()
    } else {
        decode_corrections(
            corrections.into_iter().map(|(key, view)| {
                let module = key
                    .strip_prefix(STORED_PREFIX)
                    .and_then(|k| k.strip_suffix(".weight"));
                (key, module, view)
            }),
            &adapter,
        )?
    };
    Ok(GlobalModel {
        adapter,
        base_delta,
        group_b,
    })
}

/// Writes the adapter as a PEFT directory and, when there are corrections,
/// `base_delta.safetensors` beside it (each file written under a temporary name and
/// renamed). A directory written without corrections has no `base_delta.safetensors`.
pub fn write_dir(dir: &Path, model: &GlobalModel) -> Result<(), AdapterError> {
    // The corrections first and the PEFT directory (its config last) after, so a complete
    // `adapter_config.json` means a complete directory.
    fs::create_dir_all(dir).map_err(|source| peft::io_error(dir, source))?;
    let path = dir.join(BASE_DELTA_FILE);
    if model.has_corrections() {
        peft::write_atomically(&path, &encode_base_delta(&model.base_delta))?;
    } else if let Err(e) = fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        return Err(peft::io_error(&path, e));
    }
    // `group_b`: what each group's labs use, a complete PEFT adapter per group.
    for group in model.group_b.keys() {
        let adapter = model
            .for_group(group)
            .map_err(|e| AdapterError::Shape(e.to_string()))?;
        peft::write_dir(&dir.join(GROUPS_DIR).join(group), &adapter)?;
    }
    peft::write_dir(dir, &model.adapter)
}

/// Reads a directory [`write_dir`] wrote (or a plain PEFT directory: no corrections).
pub fn read_dir(dir: &Path) -> Result<GlobalModel, AdapterError> {
    let adapter = peft::read_dir(dir)?;
    let path = dir.join(BASE_DELTA_FILE);
    let base_delta = match fs::read(&path) {
        Ok(bytes) => {
            decode_base_delta(&bytes, &adapter).map_err(|e| peft::prefix_path(&path, e))?
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
        Err(e) => return Err(peft::io_error(&path, e)),
    };
    let mut group_b = BTreeMap::new();
    let groups_dir = dir.join(GROUPS_DIR);
    if groups_dir.is_dir() {
        let entries = fs::read_dir(&groups_dir).map_err(|e| peft::io_error(&groups_dir, e))?;
        for entry in entries {
            let entry = entry.map_err(|e| peft::io_error(&groups_dir, e))?;
            let group = entry.file_name().to_string_lossy().into_owned();
            let one = peft::read_dir(&entry.path())?;
            let mut bs = BTreeMap::new();
            for (name, m) in adapter.modules() {
                let b = one
                    .module(name)
                    .ok_or_else(|| {
                        AdapterError::MissingTensor(format!("{}: {name}", entry.path().display()))
                    })?
                    .b
                    .clone();
                if b.shape() != m.b.shape() {
                    return Err(AdapterError::Shape(format!(
                        "{}: B of {name} is {:?}, the global's is {:?}",
                        entry.path().display(),
                        b.shape(),
                        m.b.shape()
                    )));
                }
                bs.insert(name.clone(), b);
            }
            group_b.insert(group, bs);
        }
    }
    Ok(GlobalModel {
        adapter,
        base_delta,
        group_b,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::{ModuleShape, TargetModule};

    fn adapter() -> LoraAdapter {
        let config = AdapterConfig {
            rank: 2,
            alpha: 4.0,
            target_modules: vec![TargetModule::Q, TargetModule::V],
            base_model: "test".into(),
            dropout: 0.0,
        };
        let shapes = [
            ModuleShape {
                name: "model.layers.0.self_attn.q_proj".into(),
                out_features: 6,
                in_features: 4,
            },
            ModuleShape {
                name: "model.layers.0.self_attn.v_proj".into(),
                out_features: 3,
                in_features: 4,
            },
        ];
        let mut a = LoraAdapter::init_ffa(config, &shapes, 7);
        for (i, (_, m)) in a.modules_mut().enumerate() {
            for (j, v) in m.b.data_mut().iter_mut().enumerate() {
                *v = (i * 100 + j) as f32 * 0.01;
            }
        }
        a
    }

    fn with_corrections() -> GlobalModel {
        let mut g = GlobalModel::with_zero_corrections(adapter());
        for (i, d) in g.base_delta.values_mut().enumerate() {
            for (j, v) in d.data_mut().iter_mut().enumerate() {
                *v = (i as f32 + 1.0) * (j as f32 - 5.0) * 1e-3;
            }
        }
        g
    }

    #[test]
    fn a_model_without_corrections_is_its_adapter_in_every_form() {
        let a = adapter();
        let g = GlobalModel::new(a.clone());
        assert_eq!(g.content_hash(), a.content_hash());
        assert_eq!(g.manifest(), a.full_manifest());
        assert_eq!(g.flatten(), a.flatten(&a.full_manifest()).unwrap());
        assert_eq!(encode_stored(&g), peft::encode_weights(&a));
        let back = decode_stored(&encode_stored(&g), a.config().clone()).unwrap();
        assert_eq!(back, g);
    }

    #[test]
    fn corrections_travel_in_the_layout_the_hash_and_every_file_form() {
        let g = with_corrections();
        let manifest = g.manifest();
        assert_eq!(
            manifest.len(),
            g.adapter.full_manifest().len() + 6 * 4 + 3 * 4
        );
        assert_eq!(
            manifest.slots().last().unwrap().name,
            "model.layers.0.self_attn.v_proj.base_delta"
        );
        // The hash changes with any correction value, and differs from the adapter's.
        assert_ne!(g.content_hash(), g.adapter.content_hash());
        let mut h = g.clone();
        h.base_delta.values_mut().next().unwrap().data_mut()[3] += 1e-3;
        assert_ne!(h.content_hash(), g.content_hash());

        // Wire: flatten → unflatten into a zero template restores the model.
        let mut t = GlobalModel::with_zero_corrections(adapter());
        t.unflatten(&g.flatten()).unwrap();
        assert_eq!(t, g);
        let err = t.unflatten(&g.flatten()[1..]).unwrap_err().to_string();
        assert!(err.contains("values"), "{err}");

        // Database blob.
        let back = decode_stored(&encode_stored(&g), g.adapter.config().clone()).unwrap();
        assert_eq!(back, g);

        // Directory: PEFT files plus base_delta.safetensors keyed by base weight.
        let dir = std::env::temp_dir().join(format!("mekong-global-{}", std::process::id()));
        write_dir(&dir, &g).unwrap();
        assert_eq!(peft::read_dir(&dir).unwrap(), g.adapter);
        assert_eq!(read_dir(&dir).unwrap(), g);
        let st_bytes = fs::read(dir.join(BASE_DELTA_FILE)).unwrap();
        let st = SafeTensors::deserialize(&st_bytes).unwrap();
        let mut keys = st.names();
        keys.sort();
        assert_eq!(
            keys,
            [
                "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.v_proj.weight"
            ]
        );
        // Rewritten without corrections, the stale file goes.
        write_dir(&dir, &GlobalModel::new(g.adapter.clone())).unwrap();
        assert!(!dir.join(BASE_DELTA_FILE).exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_corrections_are_refused_by_name() {
        let g = with_corrections();
        let a = &g.adapter;
        let mut missing = g.base_delta.clone();
        missing.remove("model.layers.0.self_attn.v_proj");
        let err = decode_base_delta(&encode_base_delta(&missing), a).unwrap_err();
        assert!(
            err.to_string()
                .contains("model.layers.0.self_attn.v_proj.weight"),
            "{err}"
        );
        let mut foreign = g.base_delta.clone();
        foreign.insert("model.layers.9.mlp.up_proj".into(), Matrix::zeros(2, 2));
        let err = decode_base_delta(&encode_base_delta(&foreign), a).unwrap_err();
        assert!(err.to_string().contains("layers.9.mlp.up_proj"), "{err}");
        let mut misshapen = g.base_delta.clone();
        misshapen.insert(
            "model.layers.0.self_attn.q_proj".into(),
            Matrix::zeros(4, 6),
        );
        let err = decode_base_delta(&encode_base_delta(&misshapen), a).unwrap_err();
        assert!(err.to_string().contains("[6, 4]"), "{err}");
    }
}
