//! LoRA adapters: named target modules, each with A (r×k) and B (d×r), a rank and an alpha.
//!
//! Matrices are stored row-major exactly as PEFT stores them (`lora_A.weight` is `[r, in]`,
//! `lora_B.weight` is `[out, r]`), so the exchange format needs no transposes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{AdapterError, ConfigError};
use crate::manifest::{LayoutManifest, TensorSlot};

/// A linear layer of a Llama-family decoder that LoRA can adapt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum TargetModule {
    #[serde(rename = "q_proj")]
    Q,
    #[serde(rename = "k_proj")]
    K,
    #[serde(rename = "v_proj")]
    V,
    #[serde(rename = "o_proj")]
    O,
    #[serde(rename = "gate_proj")]
    Gate,
    #[serde(rename = "up_proj")]
    Up,
    #[serde(rename = "down_proj")]
    Down,
}

impl TargetModule {
    /// Every target, in the order the modules appear inside one decoder layer.
    pub const ALL: [TargetModule; 7] = [
        TargetModule::Q,
        TargetModule::K,
        TargetModule::V,
        TargetModule::O,
        TargetModule::Gate,
        TargetModule::Up,
        TargetModule::Down,
    ];

    /// The name PEFT uses in `target_modules` (`q_proj`, ...).
    pub fn peft_name(self) -> &'static str {
        match self {
            TargetModule::Q => "q_proj",
            TargetModule::K => "k_proj",
            TargetModule::V => "v_proj",
            TargetModule::O => "o_proj",
            TargetModule::Gate => "gate_proj",
            TargetModule::Up => "up_proj",
            TargetModule::Down => "down_proj",
        }
    }

    /// The module path inside a decoder layer (`self_attn.q_proj`, `mlp.up_proj`).
    pub fn path_suffix(self) -> &'static str {
        match self {
            TargetModule::Q => "self_attn.q_proj",
            TargetModule::K => "self_attn.k_proj",
            TargetModule::V => "self_attn.v_proj",
            TargetModule::O => "self_attn.o_proj",
            TargetModule::Gate => "mlp.gate_proj",
            TargetModule::Up => "mlp.up_proj",
            TargetModule::Down => "mlp.down_proj",
        }
    }

    /// Parses a PEFT target name.
    pub fn from_peft_name(name: &str) -> Option<Self> {
        TargetModule::ALL
            .into_iter()
            .find(|t| t.peft_name() == name)
    }
}

/// Name and shape of one adapted linear layer (`out_features × in_features`, like its weight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ModuleShape {
    /// Hugging Face module path, e.g. `model.layers.0.self_attn.q_proj`.
    pub name: String,
    pub out_features: usize,
    pub in_features: usize,
}

/// A dense row-major f32 matrix.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// Wraps row-major data; the length must be `rows * cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self, AdapterError> {
        if data.len() != rows * cols {
            return Err(AdapterError::Shape(format!(
                "matrix data has {} values, expected {rows}×{cols} = {}",
                data.len(),
                rows * cols
            )));
        }
        Ok(Matrix { rows, cols, data })
    }

    /// An all-zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    pub fn rows(&self) -> usize {
        self.rows
    }

    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn shape(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Row-major values.
    pub fn data(&self) -> &[f32] {
        &self.data
    }

    /// Row-major values, mutable.
    pub fn data_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// Consumes the matrix, returning its row-major values.
    pub fn into_data(self) -> Vec<f32> {
        self.data
    }

    /// Value at `(row, col)`.
    pub fn get(&self, row: usize, col: usize) -> f32 {
        self.data[row * self.cols + col]
    }

    /// Matrix product `self · other`, accumulated in f64.
    pub fn matmul(&self, other: &Matrix) -> Result<Matrix, AdapterError> {
        if self.cols != other.rows {
            return Err(AdapterError::Shape(format!(
                "cannot multiply {}×{} by {}×{}",
                self.rows, self.cols, other.rows, other.cols
            )));
        }
        let mut out = vec![0.0f32; self.rows * other.cols];
        for i in 0..self.rows {
            for j in 0..other.cols {
                let mut acc = 0.0f64;
                for k in 0..self.cols {
                    acc += self.get(i, k) as f64 * other.get(k, j) as f64;
                }
                out[i * other.cols + j] = acc as f32;
            }
        }
        Matrix::new(self.rows, other.cols, out)
    }
}

/// One adapted module: `ΔW = (alpha / r) · B · A`.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraModule {
    /// `[r, in_features]`.
    pub a: Matrix,
    /// `[out_features, r]`.
    pub b: Matrix,
}

impl LoraModule {
    /// The dense update `(scaling) · B · A`, `[out_features, in_features]`.
    pub fn delta(&self, scaling: f32) -> Result<Matrix, AdapterError> {
        let mut d = self.b.matmul(&self.a)?;
        for v in d.data_mut() {
            *v *= scaling;
        }
        Ok(d)
    }
}

/// Metadata PEFT records in `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct AdapterConfig {
    pub rank: usize,
    pub alpha: f32,
    /// The adapted modules. A set, as in PEFT: order carries no meaning, and
    /// [`crate::peft::decode_config`] returns it in [`TargetModule::ALL`] order.
    pub target_modules: Vec<TargetModule>,
    /// `base_model_name_or_path`.
    pub base_model: String,
    /// PEFT's `lora_dropout`: dropout on the LoRA branch's input while training. It does not
    /// change the weights' meaning, but it is recorded so that PEFT (or a later round) resumes
    /// training the adapter the way it was trained; 0 when an older config does not say.
    pub dropout: f32,
}

impl AdapterConfig {
    /// `alpha / rank`.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.rank as f32
    }
}

/// A LoRA adapter: its config and its modules in a canonical order (layer index numerically,
/// then module position within the layer), so that two equal adapters flatten identically.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraAdapter {
    config: AdapterConfig,
    modules: Vec<(String, LoraModule)>,
}

impl LoraAdapter {
    /// Builds an adapter, checking every module against the config's rank and putting the
    /// modules in canonical order.
    pub fn new(
        config: AdapterConfig,
        mut modules: Vec<(String, LoraModule)>,
    ) -> Result<Self, AdapterError> {
        if config.rank == 0 {
            return Err(AdapterError::Shape("rank must be at least 1".into()));
        }
        if modules.is_empty() {
            return Err(AdapterError::Shape(
                "an adapter needs at least one module".into(),
            ));
        }
        for (name, m) in &modules {
            if m.a.rows() != config.rank || m.b.cols() != config.rank {
                return Err(AdapterError::Shape(format!(
                    "module {name}: lora_A is {}×{} and lora_B is {}×{}, but the rank is {}",
                    m.a.rows(),
                    m.a.cols(),
                    m.b.rows(),
                    m.b.cols(),
                    config.rank
                )));
            }
        }
        modules.sort_by_cached_key(|(name, _)| natural_key(name));
        for pair in modules.windows(2) {
            if pair[0].0 == pair[1].0 {
                return Err(AdapterError::Shape(format!(
                    "module {} appears twice",
                    pair[0].0
                )));
            }
        }
        Ok(LoraAdapter { config, modules })
    }

    /// FFA-LoRA initialisation: A drawn from the shared `a_seed` exactly as every participant
    /// draws it (Kaiming-uniform, bound 1/√in, as PEFT initialises `lora_A`), B all zeros, so
    /// the adapter starts as the identity update.
    pub fn init_ffa(config: AdapterConfig, shapes: &[ModuleShape], a_seed: u64) -> Self {
        let modules = shapes
            .iter()
            .map(|s| {
                (
                    s.name.clone(),
                    LoraModule {
                        a: seeded_a(a_seed, &s.name, config.rank, s.in_features),
                        b: Matrix::zeros(s.out_features, config.rank),
                    },
                )
            })
            .collect();
        LoraAdapter::new(config, modules).expect("shapes from a plan are consistent")
    }

    pub fn config(&self) -> &AdapterConfig {
        &self.config
    }

    /// Modules in canonical order.
    pub fn modules(&self) -> &[(String, LoraModule)] {
        &self.modules
    }

    /// Modules in canonical order, mutable (shapes must not change).
    pub fn modules_mut(&mut self) -> impl Iterator<Item = (&str, &mut LoraModule)> {
        self.modules.iter_mut().map(|(n, m)| (n.as_str(), m))
    }

    /// One module by its Hugging Face path.
    pub fn module(&self, name: &str) -> Option<&LoraModule> {
        self.modules.iter().find(|(n, _)| n == name).map(|(_, m)| m)
    }

    /// Layout of every A and B tensor, in canonical order: A then B per module.
    pub fn full_manifest(&self) -> LayoutManifest {
        let mut slots = Vec::with_capacity(self.modules.len() * 2);
        for (name, m) in &self.modules {
            slots.push(TensorSlot::new(format!("{name}.lora_A"), m.a.shape()));
            slots.push(TensorSlot::new(format!("{name}.lora_B"), m.b.shape()));
        }
        LayoutManifest::new(slots)
    }

    /// Layout of the B tensors only: what an FFA-LoRA participant uploads.
    pub fn b_manifest(&self) -> LayoutManifest {
        LayoutManifest::new(
            self.modules
                .iter()
                .map(|(name, m)| TensorSlot::new(format!("{name}.lora_B"), m.b.shape()))
                .collect(),
        )
    }

    /// Flattens the tensors a manifest names (from this adapter) into one vector.
    pub fn flatten(&self, manifest: &LayoutManifest) -> Result<Vec<f32>, AdapterError> {
        let mut out = Vec::with_capacity(manifest.len());
        for slot in manifest.slots() {
            out.extend_from_slice(self.slot_tensor(slot)?.data());
        }
        Ok(out)
    }

    /// Writes a flat vector laid out by `manifest` back into this adapter's tensors. Every
    /// slot is checked before any value is written, so a refused vector changes nothing.
    pub fn unflatten(
        &mut self,
        manifest: &LayoutManifest,
        vector: &[f32],
    ) -> Result<(), AdapterError> {
        if vector.len() != manifest.len() {
            return Err(AdapterError::Shape(format!(
                "vector has {} values, the layout {} expects {}",
                vector.len(),
                manifest.short_hash(),
                manifest.len()
            )));
        }
        for slot in manifest.slots() {
            self.slot_tensor(slot)?;
        }
        for slot in manifest.slots() {
            let values = &vector[slot.offset..slot.offset + slot.numel()];
            self.tensor_mut(&slot.name)?
                .data_mut()
                .copy_from_slice(values);
        }
        Ok(())
    }

    /// The tensor a slot names, checked against the slot's shape.
    fn slot_tensor(&self, slot: &TensorSlot) -> Result<&Matrix, AdapterError> {
        let tensor = self.tensor(&slot.name)?;
        if tensor.shape() != slot.shape {
            return Err(AdapterError::Shape(format!(
                "{} is {:?} in the adapter but {:?} in the manifest",
                slot.name,
                tensor.shape(),
                slot.shape
            )));
        }
        Ok(tensor)
    }

    /// SHA-256 over the full layout and every value: identifies the exact global adapter a
    /// participant trained on.
    pub fn content_hash(&self) -> String {
        let manifest = self.full_manifest();
        let mut h = Sha256::new();
        h.update(manifest.hash());
        h.update(self.config.rank.to_le_bytes());
        h.update(self.config.alpha.to_le_bytes());
        for (_, m) in &self.modules {
            for v in m.a.data().iter().chain(m.b.data()) {
                h.update(v.to_le_bytes());
            }
        }
        hex::encode(h.finalize())
    }

    fn tensor(&self, slot_name: &str) -> Result<&Matrix, AdapterError> {
        let (module, is_a) = split_slot_name(slot_name)?;
        let m = self
            .module(module)
            .ok_or_else(|| AdapterError::MissingTensor(slot_name.to_string()))?;
        Ok(if is_a { &m.a } else { &m.b })
    }

    fn tensor_mut(&mut self, slot_name: &str) -> Result<&mut Matrix, AdapterError> {
        let (module, is_a) = split_slot_name(slot_name)?;
        let m = self
            .modules
            .iter_mut()
            .find(|(n, _)| n == module)
            .map(|(_, m)| m)
            .ok_or_else(|| AdapterError::MissingTensor(slot_name.to_string()))?;
        Ok(if is_a { &mut m.a } else { &mut m.b })
    }
}

fn split_slot_name(slot_name: &str) -> Result<(&str, bool), AdapterError> {
    if let Some(m) = slot_name.strip_suffix(".lora_A") {
        Ok((m, true))
    } else if let Some(m) = slot_name.strip_suffix(".lora_B") {
        Ok((m, false))
    } else {
        Err(AdapterError::MissingTensor(slot_name.to_string()))
    }
}

/// Sort key that orders `layers.10` after `layers.9`, attention before the MLP, and modules
/// within a block in the order of [`TargetModule::ALL`].
fn natural_key(name: &str) -> Vec<(u64, String)> {
    name.split('.')
        .map(|part| {
            if let Ok(n) = part.parse::<u64>() {
                (n, String::new())
            } else if part == "self_attn" {
                (0, String::new())
            } else if part == "mlp" {
                (1, String::new())
            } else if let Some(t) = TargetModule::from_peft_name(part) {
                (
                    TargetModule::ALL.iter().position(|x| *x == t).unwrap_or(0) as u64,
                    String::new(),
                )
            } else {
                (u64::MAX, part.to_string())
            }
        })
        .collect()
}

/// The frozen A of one module, reproducible from the shared seed and the module's name alone.
fn seeded_a(a_seed: u64, module: &str, rank: usize, in_features: usize) -> Matrix {
    let mut h = Sha256::new();
    h.update(b"mekong/ffa-lora/A/v1");
    h.update(a_seed.to_le_bytes());
    h.update(module.as_bytes());
    let seed: [u8; 32] = h.finalize().into();
    let mut rng = ChaCha8Rng::from_seed(seed);
    let bound = 1.0 / (in_features as f32).sqrt();
    let data = (0..rank * in_features)
        .map(|_| rng.random_range(-bound..bound))
        .collect();
    Matrix::new(rank, in_features, data).expect("length matches")
}

/// Rank, scaling and placement of the LoRA adapters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraSpec {
    pub rank: usize,
    pub alpha: f32,
    pub target_modules: Vec<TargetModule>,
    /// FFA-LoRA: every participant derives the same frozen A matrices from this seed.
    pub a_seed: u64,
    /// Dropout on the LoRA branch's input during training (PEFT's `lora_dropout`); 0 = off.
    #[serde(default)]
    pub dropout: f32,
}

impl Default for LoraSpec {
    fn default() -> Self {
        LoraSpec {
            rank: 8,
            alpha: 16.0,
            target_modules: TargetModule::ALL.to_vec(),
            a_seed: 2024,
            dropout: 0.0,
        }
    }
}

impl LoraSpec {
    /// `alpha / rank`, the factor applied to `B·A`.
    pub fn scaling(&self) -> f32 {
        self.alpha / self.rank as f32
    }

    /// The PEFT metadata of adapters with this layout on the model named `base_model`. Targets come out in
    /// [`TargetModule::ALL`] order (they are a set), the order [`crate::peft::decode_config`]
    /// reads them back in, so an adapter written and read again compares equal.
    pub fn adapter_config(&self, base_model: &str) -> AdapterConfig {
        AdapterConfig {
            rank: self.rank,
            alpha: self.alpha,
            target_modules: TargetModule::ALL
                .into_iter()
                .filter(|t| self.target_modules.contains(t))
                .collect(),
            base_model: base_model.to_string(),
            dropout: self.dropout,
        }
    }

    /// Checks rank, alpha and targets; errors name the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.rank == 0 {
            return Err(ConfigError::field("lora.rank", "must be at least 1"));
        }
        if !(self.alpha.is_finite() && self.alpha > 0.0) {
            return Err(ConfigError::field(
                "lora.alpha",
                "must be a positive number",
            ));
        }
        if !(self.dropout.is_finite() && (0.0..1.0).contains(&self.dropout)) {
            return Err(ConfigError::field(
                "lora.dropout",
                format!("must be in [0, 1), got {}", self.dropout),
            ));
        }
        if self.target_modules.is_empty() {
            return Err(ConfigError::field(
                "lora.target_modules",
                "must name at least one of q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
            ));
        }
        let mut seen = Vec::new();
        for t in &self.target_modules {
            if seen.contains(t) {
                return Err(ConfigError::field(
                    "lora.target_modules",
                    format!("{} is listed twice", t.peft_name()),
                ));
            }
            seen.push(*t);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn config(rank: usize) -> AdapterConfig {
        AdapterConfig {
            rank,
            alpha: 16.0,
            target_modules: vec![TargetModule::Q, TargetModule::V],
            base_model: "test/base".into(),
            dropout: 0.0,
        }
    }

    fn shapes() -> Vec<ModuleShape> {
        (0..12)
            .flat_map(|l| {
                [
                    ModuleShape {
                        name: format!("model.layers.{l}.self_attn.q_proj"),
                        out_features: 6,
                        in_features: 5,
                    },
                    ModuleShape {
                        name: format!("model.layers.{l}.self_attn.v_proj"),
                        out_features: 3,
                        in_features: 5,
                    },
                ]
            })
            .collect()
    }

    #[test]
    fn ffa_init_is_reproducible_and_b_is_zero() {
        let a = LoraAdapter::init_ffa(config(4), &shapes(), 9);
        let b = LoraAdapter::init_ffa(config(4), &shapes(), 9);
        let c = LoraAdapter::init_ffa(config(4), &shapes(), 10);
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert!(
            a.modules()
                .iter()
                .all(|(_, m)| m.b.data().iter().all(|v| *v == 0.0))
        );
        let bound = 1.0 / 5f32.sqrt();
        assert!(
            a.modules()
                .iter()
                .all(|(_, m)| m.a.data().iter().all(|v| v.abs() <= bound))
        );
    }

    #[test]
    fn modules_are_in_natural_order() {
        let mut s = shapes();
        s.reverse();
        let a = LoraAdapter::init_ffa(config(2), &s, 1);
        let names: Vec<_> = a.modules().iter().map(|(n, _)| n.as_str()).collect();
        assert_eq!(names[0], "model.layers.0.self_attn.q_proj");
        assert_eq!(names[1], "model.layers.0.self_attn.v_proj");
        assert_eq!(names[20], "model.layers.10.self_attn.q_proj");
        // The canonical order is the model's own order: attention q,k,v,o then MLP gate,up,down.
        let model_order = crate::plan::ModelSpec::tiny().lora_modules(&TargetModule::ALL);
        let adapter = LoraAdapter::init_ffa(config(2), &model_order, 1);
        let names: Vec<_> = adapter.modules().iter().map(|(n, _)| n.clone()).collect();
        let expected: Vec<_> = model_order.into_iter().map(|m| m.name).collect();
        assert_eq!(names, expected);
    }

    #[test]
    fn flatten_and_unflatten_round_trip() {
        let mut a = LoraAdapter::init_ffa(config(3), &shapes(), 5);
        let full = a.full_manifest();
        let v = a.flatten(&full).unwrap();
        assert_eq!(v.len(), full.len());
        let b_manifest = a.b_manifest();
        let new_b: Vec<f32> = (0..b_manifest.len()).map(|i| i as f32 * 0.5).collect();
        a.unflatten(&b_manifest, &new_b).unwrap();
        assert_eq!(a.flatten(&b_manifest).unwrap(), new_b);
        // A untouched.
        let a_again = a.flatten(&full).unwrap();
        assert_eq!(a_again[..15], v[..15]);
        assert!(a.unflatten(&b_manifest, &new_b[1..]).is_err());
    }

    #[test]
    fn rank_mismatch_is_refused() {
        let m = LoraModule {
            a: Matrix::zeros(2, 4),
            b: Matrix::zeros(3, 3),
        };
        let err = LoraAdapter::new(config(2), vec![("x.q_proj".into(), m)]).unwrap_err();
        assert!(err.to_string().contains("x.q_proj"));
    }
}
