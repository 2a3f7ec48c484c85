//! The Hugging Face PEFT adapter format, as byte-level codecs plus thin file helpers.
//!
//! A PEFT LoRA adapter is a directory with `adapter_model.safetensors` (tensors named
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json`. Writing this format means a lab can load a Mekong adapter into
//! Python `peft` unchanged, and bring a PEFT adapter into a federation.
//!
//! The reference is what PEFT 0.21 writes: `fedcore/tests/fixtures/peft/` holds adapters saved
//! by PEFT itself (`scripts/make_peft_fixture.py`), and `fedcore/tests/peft_interop.rs` checks
//! that [`encode_weights`] and [`encode_config`] produce the same keys, shapes, dtypes,
//! metadata and config for the same model and targets, and that those adapters read back
//! exactly. `scripts/check_peft_loads.py` loads a Mekong export into PEFT.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::{Map, Value, json};

use crate::adapter::{AdapterConfig, LoraAdapter, LoraModule, Matrix, TargetModule};
use crate::error::AdapterError;

/// File name of the weights inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// File name of the configuration inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";

const KEY_PREFIX: &str = "base_model.model.";

/// The safetensors key PEFT uses for a module's A or B.
pub fn tensor_key(module: &str, is_a: bool) -> String {
    format!(
        "{KEY_PREFIX}{module}.{}.weight",
        if is_a { "lora_A" } else { "lora_B" }
    )
}

/// Encodes the adapter's tensors as a safetensors file the way PEFT's `save_pretrained` does
/// for an f32 model: PEFT's key names, F32, metadata `{"format": "pt"}`. Mekong keeps adapters
/// in f32 whatever the base model's dtype; PEFT would save a bf16 model's adapter in bf16, and
/// reads either.
pub fn encode_weights(adapter: &LoraAdapter) -> Vec<u8> {
    serialize_f32(&weight_tensors(adapter))
}

/// An f32 tensor ready to serialise: key, shape, little-endian bytes.
pub(crate) type OwnedTensor = (String, Vec<usize>, Vec<u8>);

/// The adapter's A and B under PEFT's key names.
pub(crate) fn weight_tensors(adapter: &LoraAdapter) -> Vec<OwnedTensor> {
    let mut owned = Vec::new();
    for (name, m) in adapter.modules() {
        for (is_a, t) in [(true, &m.a), (false, &m.b)] {
            owned.push((tensor_key(name, is_a), t.shape().to_vec(), f32_bytes(t)));
        }
    }
    owned
}

/// A matrix's values as little-endian f32 bytes.
pub(crate) fn f32_bytes(m: &Matrix) -> Vec<u8> {
    m.data().iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// Serialises f32 tensors as safetensors with metadata `{"format": "pt"}`.
pub(crate) fn serialize_f32(owned: &[OwnedTensor]) -> Vec<u8> {
    let views: Vec<(String, TensorView<'_>)> = owned
        .iter()
        .map(|(k, shape, bytes)| {
            let view = TensorView::new(Dtype::F32, shape.clone(), bytes)
                .expect("byte length matches the shape");
            (k.clone(), view)
        })
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).expect("F32 tensors always serialise")
}

/// Decodes a safetensors file into an adapter with the given config. Every module must have
/// both A and B, with the config's rank, and be one the config's `target_modules` covers (as
/// PEFT matches them: the module path's last component); keys that are not LoRA weights are
/// refused by name.
pub fn decode_weights(bytes: &[u8], config: AdapterConfig) -> Result<LoraAdapter, AdapterError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    decode_weight_tensors(st.iter(), config)
}

/// [`decode_weights`] over tensors already parsed (a file that holds other tensors too
/// passes only the adapter's).
pub(crate) fn decode_weight_tensors<'a>(
    tensors: impl Iterator<Item = (&'a str, TensorView<'a>)>,
    config: AdapterConfig,
) -> Result<LoraAdapter, AdapterError> {
    let mut halves: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
    for (key, view) in tensors {
        let (module, is_a) = parse_key(key)?;
        let target = module
            .rsplit('.')
            .next()
            .and_then(TargetModule::from_peft_name);
        if !target.is_some_and(|t| config.target_modules.contains(&t)) {
            return Err(AdapterError::UntargetedTensor {
                key: key.to_string(),
                targets: format!(
                    "{:?}",
                    config
                        .target_modules
                        .iter()
                        .map(|t| t.peft_name())
                        .collect::<Vec<_>>()
                ),
            });
        }
        let shape = view.shape();
        if shape.len() != 2 {
            return Err(AdapterError::Shape(format!(
                "{key} has {} dimensions, a LoRA matrix has 2",
                shape.len()
            )));
        }
        let values = decode_floats(key, view.dtype(), view.data())?;
        let matrix = Matrix::new(shape[0], shape[1], values)?;
        let entry = halves.entry(module.to_string()).or_default();
        if is_a {
            entry.0 = Some(matrix);
        } else {
            entry.1 = Some(matrix);
        }
    }
    let mut modules = Vec::with_capacity(halves.len());
    for (name, (a, b)) in halves {
        let a = a.ok_or_else(|| AdapterError::MissingTensor(tensor_key(&name, true)))?;
        let b = b.ok_or_else(|| AdapterError::MissingTensor(tensor_key(&name, false)))?;
        modules.push((name, LoraModule { a, b }));
    }
    LoraAdapter::new(config, modules)
}

fn parse_key(key: &str) -> Result<(&str, bool), AdapterError> {
    let rest = key
        .strip_prefix(KEY_PREFIX)
        .ok_or_else(|| AdapterError::UnexpectedTensor(key.to_string()))?;
    if let Some(module) = rest.strip_suffix(".lora_A.weight") {
        Ok((module, true))
    } else if let Some(module) = rest.strip_suffix(".lora_B.weight") {
        Ok((module, false))
    } else {
        Err(AdapterError::UnexpectedTensor(key.to_string()))
    }
}

pub(crate) fn decode_floats(
    key: &str,
    dtype: Dtype,
    data: &[u8],
) -> Result<Vec<f32>, AdapterError> {
    Ok(match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
            .collect(),
        other => {
            return Err(AdapterError::Dtype {
                name: key.to_string(),
                dtype: format!("{other:?}"),
            });
        }
    })
}

/// What `adapter_config.json` holds besides the adapter's own settings, as PEFT 0.21 writes
/// it: keys that do not change what the weights compute. They are environment (`revision`),
/// PEFT run-time state (`inference_mode`, which `save_pretrained` sets), or parameters of a
/// feature that is refused through another key (`loftq_config` only acts with
/// `init_lora_weights = "loftq"`, `qalora_group_size` only with `use_qalora`). Written with
/// PEFT's value, accepted with any value on read.
fn informational_keys() -> [(&'static str, Value); 11] {
    [
        ("auto_mapping", Value::Null),
        // Parameters of init_lora_weights = "corda", which is refused.
        ("corda_config", Value::Null),
        // Only acts on modules_to_save and trainable_token_indices, both refused.
        ("ensure_weight_tying", Value::Bool(false)),
        // EVA computes initial A from activations: initial values only.
        ("eva_config", Value::Null),
        ("inference_mode", Value::Bool(true)),
        // Only acts with layers_to_transform, which is refused.
        ("layers_pattern", Value::Null),
        ("loftq_config", json!({})),
        ("lora_ga_config", Value::Null),
        // The module megatron_config's layers come from; megatron_config is refused.
        ("megatron_core", Value::String("megatron.core".into())),
        ("qalora_group_size", Value::from(16)),
        ("revision", Value::Null),
    ]
}

/// Keys PEFT 0.21 writes for features Mekong does not implement, each with PEFT's default and
/// what the feature would change. Reading, a key must be absent, equal to that default, or a
/// value Python treats as false (`null`, `false`, `0`, `""`, `[]`, `{}`), which is how PEFT
/// itself decides whether a feature is on. Anything else is refused by name: loaded as plain
/// LoRA, such an adapter would silently compute a different model.
fn unsupported_keys() -> [(&'static str, Value, &'static str); 21] {
    [
        (
            "alora_invocation_tokens",
            Value::Null,
            "activated LoRA applies the adapter only after invocation tokens",
        ),
        ("alpha_pattern", json!({}), "per-module alpha"),
        ("arrow_config", Value::Null, "Arrow routing among adapters"),
        ("bias", Value::String("none".into()), "trained biases"),
        (
            "exclude_modules",
            Value::Null,
            "excluding modules from target_modules",
        ),
        (
            "fan_in_fan_out",
            Value::Bool(false),
            "transposed (Conv1D) weight layout",
        ),
        ("kasa_config", Value::Null, "the KaSA variant"),
        ("layer_replication", Value::Null, "replicated layers"),
        (
            "layers_to_transform",
            Value::Null,
            "adapting only some layers",
        ),
        ("lora_bias", Value::Bool(false), "a bias on lora_B"),
        ("megatron_config", Value::Null, "Megatron parallel layers"),
        (
            "modules_to_save",
            Value::Null,
            "fully trained extra modules",
        ),
        ("monteclora_config", Value::Null, "the MonteCLoRA variant"),
        ("rank_pattern", json!({}), "per-module rank"),
        (
            "target_parameters",
            Value::Null,
            "LoRA on bare parameters (mixture-of-experts weights)",
        ),
        (
            "trainable_token_indices",
            Value::Null,
            "trained token embeddings",
        ),
        ("use_bdlora", Value::Null, "the block-diagonal LoRA variant"),
        ("use_dora", Value::Bool(false), "DoRA's magnitude vector"),
        ("use_qalora", Value::Bool(false), "QA-LoRA's pooled input"),
        (
            "use_rslora",
            Value::Bool(false),
            "rsLoRA's alpha/sqrt(r) scaling",
        ),
        ("velora_config", Value::Null, "the VeLoRA variant"),
    ]
}

/// Initialisations after which the saved A and B mean the same as after PEFT's default: they
/// set only the adapter's starting values. The others (`pissa*`, `olora`, `corda`, `loftq`,
/// `lora_ga`) also rewrite the base weights, so the adapter only works on that rewritten base,
/// and `mica` is a variant with its own forward pass.
const PLAIN_INITIALISATIONS: [&str; 3] = ["gaussian", "eva", "orthogonal"];

/// Keys whose values become the [`AdapterConfig`] (or must name LoRA for a causal LM).
const READ_KEYS: [&str; 8] = [
    "base_model_name_or_path",
    "init_lora_weights",
    "lora_alpha",
    "lora_dropout",
    "peft_type",
    "r",
    "target_modules",
    "task_type",
];

/// Encodes the config as PEFT 0.21 writes it for the same LoRA settings: the same keys with
/// the same values, sorted, indented by two spaces.
///
/// Values that depend on the environment rather than the adapter: `base_model_name_or_path`
/// is the plan's model name, `revision` is `null` (the plan pins base weights by
/// `weights_sha256`, not by a Hub revision), and `peft_version`, which PEFT records as the
/// version that saved the file, is left out: no PEFT version was involved, and PEFT does not
/// need it to load a LoRA adapter (it fills in its own version when the key is absent).
/// `target_modules`, a set in PEFT, is written sorted. The adapter was initialised like PEFT's
/// default (Kaiming-uniform A, zero B), so `init_lora_weights` is `true`.
pub fn encode_config(config: &AdapterConfig) -> String {
    let mut targets: Vec<&str> = config
        .target_modules
        .iter()
        .map(|t| t.peft_name())
        .collect();
    targets.sort_unstable();
    targets.dedup();
    let mut json: BTreeMap<&str, Value> = informational_keys().into_iter().collect();
    json.extend(unsupported_keys().into_iter().map(|(k, v, _)| (k, v)));
    json.extend([
        (
            "base_model_name_or_path",
            Value::String(config.base_model.clone()),
        ),
        ("init_lora_weights", Value::Bool(true)),
        ("lora_alpha", number_like_peft(config.alpha)),
        ("lora_dropout", Value::from(shortest_f64(config.dropout))),
        ("peft_type", Value::String("LORA".into())),
        ("r", Value::from(config.rank)),
        ("target_modules", json!(targets)),
        ("task_type", Value::String("CAUSAL_LM".into())),
    ]);
    serde_json::to_string_pretty(&json).expect("config always serialises")
}

/// `lora_alpha` as PEFT writes it: an integer when it is one (PEFT types it `int`, and
/// `lora_alpha=16` is written `16`, not `16.0`), the float otherwise.
fn number_like_peft(x: f32) -> Value {
    if x.fract() == 0.0 && x.abs() < (1u32 << f32::MANTISSA_DIGITS) as f32 {
        Value::from(x as i64)
    } else {
        Value::from(shortest_f64(x))
    }
}

/// The f64 with the f32's shortest decimal form, so `0.05f32` is written `0.05` as Python
/// writes the float `0.05`, not `0.05000000074505806`.
fn shortest_f64(x: f32) -> f64 {
    x.to_string()
        .parse()
        .expect("an f32's decimal form parses as f64")
}

/// Decodes `adapter_config.json` as written by any PEFT version (keys it lacks take PEFT's
/// defaults), refusing by key what Mekong cannot reproduce exactly: another PEFT type or task,
/// a LoRA variant or feature (see [`unsupported_keys`]), an initialisation that rewrote the
/// base weights, or a key this version does not know set to anything but an off value.
/// Target modules come back in [`TargetModule::ALL`] order.
pub fn decode_config(json: &str) -> Result<AdapterConfig, AdapterError> {
    let map: Map<String, Value> =
        serde_json::from_str(json).map_err(|e| AdapterError::Config(e.to_string()))?;
    let get = |key: &str| map.get(key).unwrap_or(&Value::Null);

    match get("peft_type") {
        Value::String(t) if t == "LORA" => {}
        other => {
            return Err(key_error(
                "peft_type",
                format!("is {}, only \"LORA\" is supported", show(other)),
            ));
        }
    }
    match get("task_type") {
        Value::Null => {}
        Value::String(t) if t == "CAUSAL_LM" => {}
        other => {
            return Err(key_error(
                "task_type",
                format!(
                    "is {}, Mekong adapts causal language models (\"CAUSAL_LM\")",
                    show(other)
                ),
            ));
        }
    }
    let rank = match get("r").as_u64() {
        Some(r) if r >= 1 => r as usize,
        _ => {
            return Err(key_error(
                "r",
                format!("is {}, must be an integer of at least 1", show(get("r"))),
            ));
        }
    };
    let alpha = match get("lora_alpha").as_f64() {
        Some(a) if a.is_finite() && a > 0.0 && (a as f32).is_finite() => a as f32,
        _ => {
            return Err(key_error(
                "lora_alpha",
                format!("is {}, must be a positive number", show(get("lora_alpha"))),
            ));
        }
    };
    let dropout = match get("lora_dropout") {
        Value::Null => 0.0,
        v => match v.as_f64() {
            Some(d) if (0.0..1.0).contains(&d) => d as f32,
            _ => {
                return Err(key_error(
                    "lora_dropout",
                    format!("is {}, must be a number in [0, 1)", show(v)),
                ));
            }
        },
    };
    let target_modules = decode_targets(get("target_modules"))?;
    let base_model = match get("base_model_name_or_path") {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => {
            return Err(key_error(
                "base_model_name_or_path",
                format!("is {}, must be a string", show(other)),
            ));
        }
    };
    match get("init_lora_weights") {
        Value::Null | Value::Bool(_) => {}
        Value::String(s) if PLAIN_INITIALISATIONS.contains(&s.as_str()) => {}
        other => {
            return Err(key_error(
                "init_lora_weights",
                format!(
                    "is {}: that initialisation rewrites the base weights or is a LoRA variant; \
                     only true, false, \"gaussian\", \"eva\" and \"orthogonal\" leave the base as it was",
                    show(other)
                ),
            ));
        }
    }
    for (key, default, feature) in unsupported_keys() {
        if let Some(v) = map.get(key)
            && *v != default
            && !is_python_false(v)
        {
            return Err(key_error(
                key,
                format!(
                    "is {}: {feature} is not supported, Mekong reproduces plain LoRA only",
                    show(v)
                ),
            ));
        }
    }
    let informational = informational_keys();
    let unsupported = unsupported_keys();
    for (key, v) in &map {
        let known = READ_KEYS.contains(&key.as_str())
            || key == "peft_version"
            || informational.iter().any(|(k, _)| k == key)
            || unsupported.iter().any(|(k, _, _)| k == key);
        if !known && !is_python_false(v) {
            return Err(key_error(
                key,
                format!(
                    "is {}: Mekong does not know this setting (from a newer PEFT?) and accepts \
                     unknown keys only when they are off (null, false, 0, \"\", [] or {{}})",
                    show(v)
                ),
            ));
        }
    }
    Ok(AdapterConfig {
        rank,
        alpha,
        target_modules,
        base_model,
        dropout,
    })
}

/// `target_modules`: a non-empty list of known module names, a set (duplicates collapse).
/// PEFT also accepts one string, a regular expression matched against module paths; Mekong
/// does not interpret regular expressions.
fn decode_targets(v: &Value) -> Result<Vec<TargetModule>, AdapterError> {
    let names = match v {
        Value::Array(items) if !items.is_empty() => items,
        Value::String(s) => {
            return Err(key_error(
                "target_modules",
                format!(
                    "is the string {s:?}, which PEFT matches as a regular expression; Mekong reads only a list of module names"
                ),
            ));
        }
        other => {
            return Err(key_error(
                "target_modules",
                format!(
                    "is {}, must be a non-empty list of module names",
                    show(other)
                ),
            ));
        }
    };
    let mut targets = Vec::new();
    for name in names {
        let t = name
            .as_str()
            .and_then(TargetModule::from_peft_name)
            .ok_or_else(|| {
                key_error(
                    "target_modules",
                    format!(
                        "lists unknown target module {}; known: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj",
                        show(name)
                    ),
                )
            })?;
        targets.push(t);
    }
    Ok(TargetModule::ALL
        .into_iter()
        .filter(|t| targets.contains(t))
        .collect())
}

/// Whether Python would treat the value as false, as PEFT does when it tests a feature's key.
fn is_python_false(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// A JSON value for an error message, cut short if long.
fn show(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 80 {
        format!("{}...", s.chars().take(77).collect::<String>())
    } else {
        s
    }
}

fn key_error(key: &str, reason: String) -> AdapterError {
    AdapterError::ConfigKey {
        file: CONFIG_FILE.to_string(),
        key: key.to_string(),
        reason,
    }
}

/// Writes `adapter_model.safetensors` and `adapter_config.json` into `dir` (created if
/// needed). Each file is written to a temporary name and renamed, so a crash never leaves a
/// half-written adapter under the final name.
pub fn write_dir(dir: &Path, adapter: &LoraAdapter) -> Result<(), AdapterError> {
    fs::create_dir_all(dir).map_err(|source| io_error(dir, source))?;
    write_atomically(&dir.join(WEIGHTS_FILE), &encode_weights(adapter))?;
    write_atomically(
        &dir.join(CONFIG_FILE),
        encode_config(adapter.config()).as_bytes(),
    )
}

/// Reads an adapter directory written by Mekong or by Python PEFT.
pub fn read_dir(dir: &Path) -> Result<LoraAdapter, AdapterError> {
    let config_path = dir.join(CONFIG_FILE);
    let json = fs::read_to_string(&config_path).map_err(|source| io_error(&config_path, source))?;
    let config = decode_config(&json).map_err(|e| prefix_path(&config_path, e))?;
    let weights_path = dir.join(WEIGHTS_FILE);
    let bytes = fs::read(&weights_path).map_err(|source| io_error(&weights_path, source))?;
    decode_weights(&bytes, config).map_err(|e| prefix_path(&weights_path, e))
}

pub(crate) fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).map_err(|source| io_error(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io_error(path, source))
}

pub(crate) fn io_error(path: &Path, source: std::io::Error) -> AdapterError {
    AdapterError::Io {
        path: path.display().to_string(),
        source,
    }
}

pub(crate) fn prefix_path(path: &Path, e: AdapterError) -> AdapterError {
    match e {
        AdapterError::Safetensors(m) => {
            AdapterError::Safetensors(format!("{}: {m}", path.display()))
        }
        AdapterError::Config(m) => AdapterError::Config(format!("{}: {m}", path.display())),
        AdapterError::ConfigKey { key, reason, .. } => AdapterError::ConfigKey {
            file: path.display().to_string(),
            key,
            reason,
        },
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adapter::ModuleShape;

    fn adapter() -> LoraAdapter {
        let config = AdapterConfig {
            rank: 4,
            alpha: 8.0,
            target_modules: vec![TargetModule::Q, TargetModule::Down],
            base_model: "mekong/test".into(),
            dropout: 0.1,
        };
        let shapes: Vec<ModuleShape> = (0..3)
            .flat_map(|l| {
                [
                    ModuleShape {
                        name: format!("model.layers.{l}.self_attn.q_proj"),
                        out_features: 8,
                        in_features: 8,
                    },
                    ModuleShape {
                        name: format!("model.layers.{l}.mlp.down_proj"),
                        out_features: 8,
                        in_features: 12,
                    },
                ]
            })
            .collect();
        let mut a = LoraAdapter::init_ffa(config, &shapes, 3);
        let m = a.b_manifest();
        let b: Vec<f32> = (0..m.len()).map(|i| (i as f32).sin()).collect();
        a.unflatten(&m, &b).unwrap();
        a
    }

    #[test]
    fn write_then_read_gives_identical_tensors_and_config() {
        let dir = tempfile::tempdir().unwrap();
        let a = adapter();
        write_dir(dir.path(), &a).unwrap();
        let back = read_dir(dir.path()).unwrap();
        assert_eq!(back, a);
        assert_eq!(back.config(), a.config());
        assert_eq!(back.content_hash(), a.content_hash());
    }

    #[test]
    fn keys_and_config_follow_peft() {
        let a = adapter();
        let bytes = encode_weights(&a);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight";
        assert_eq!(st.tensor(key).unwrap().shape(), &[4, 8]);
        let key = "base_model.model.model.layers.2.mlp.down_proj.lora_B.weight";
        assert_eq!(st.tensor(key).unwrap().shape(), &[8, 4]);
        let json: serde_json::Value = serde_json::from_str(&encode_config(a.config())).unwrap();
        assert_eq!(json["peft_type"], "LORA");
        assert_eq!(json["r"], 4);
        assert_eq!(json["lora_alpha"], 8);
        assert_eq!(json["lora_dropout"], 0.1);
        // A set in PEFT; written sorted.
        assert_eq!(json["target_modules"], json!(["down_proj", "q_proj"]));
        assert_eq!(json["base_model_name_or_path"], "mekong/test");
    }

    #[test]
    fn truncated_weights_file_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        write_dir(dir.path(), &adapter()).unwrap();
        let path = dir.path().join(WEIGHTS_FILE);
        let bytes = fs::read(&path).unwrap();
        fs::write(&path, &bytes[..bytes.len() - 10]).unwrap();
        let err = read_dir(dir.path()).unwrap_err().to_string();
        assert!(err.contains(WEIGHTS_FILE), "{err}");
        assert!(err.contains("invalid safetensors"), "{err}");
        // A header cut short too.
        fs::write(&path, &bytes[..5]).unwrap();
        assert!(read_dir(dir.path()).is_err());
    }

    #[test]
    fn missing_half_and_foreign_keys_are_named() {
        let a = adapter();
        let bytes = encode_weights(&a);
        let st = SafeTensors::deserialize(&bytes).unwrap();
        let drop = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight";
        let kept: Vec<(String, TensorView<'_>)> = st
            .iter()
            .filter(|(k, _)| *k != drop)
            .map(|(k, v)| (k.to_string(), v))
            .collect();
        let partial = safetensors::serialize(kept, None).unwrap();
        let err = decode_weights(&partial, a.config().clone()).unwrap_err();
        assert!(err.to_string().contains(drop), "{err}");

        let zero = [0u8; 4];
        let foreign = safetensors::serialize(
            [(
                "model.embed_tokens.weight".to_string(),
                TensorView::new(Dtype::F32, vec![1, 1], &zero).unwrap(),
            )],
            None,
        )
        .unwrap();
        let err = decode_weights(&foreign, a.config().clone()).unwrap_err();
        assert!(
            err.to_string().contains("model.embed_tokens.weight"),
            "{err}"
        );
    }

    #[test]
    fn reads_bf16_and_peft_extra_fields() {
        let bits = half::bf16::from_f32(1.5).to_le_bytes();
        let data: Vec<u8> = bits.iter().copied().cycle().take(2 * 4).collect();
        let b_data: Vec<u8> = bits.iter().copied().cycle().take(2 * 2).collect();
        let bytes = safetensors::serialize(
            [
                (
                    tensor_key("model.layers.0.self_attn.q_proj", true),
                    TensorView::new(Dtype::BF16, vec![1, 4], &data).unwrap(),
                ),
                (
                    tensor_key("model.layers.0.self_attn.q_proj", false),
                    TensorView::new(Dtype::BF16, vec![2, 1], &b_data).unwrap(),
                ),
            ],
            None,
        )
        .unwrap();
        let json = r#"{"peft_type":"LORA","r":1,"lora_alpha":2,"target_modules":["q_proj"],
            "base_model_name_or_path":"x","revision":null,"modules_to_save":null,
            "rank_pattern":{},"alpha_pattern":{},"layers_to_transform":null}"#;
        let config = decode_config(json).unwrap();
        let a = decode_weights(&bytes, config).unwrap();
        assert_eq!(a.modules()[0].1.a.data(), &[1.5; 4]);
    }

    #[test]
    fn numbers_are_written_as_peft_writes_them() {
        let mut config = adapter().config().clone();
        for (alpha, dropout, alpha_text, dropout_text) in [
            (16.0, 0.0, "\"lora_alpha\": 16,", "\"lora_dropout\": 0.0,"),
            (0.5, 0.05, "\"lora_alpha\": 0.5,", "\"lora_dropout\": 0.05,"),
            (12.3, 0.1, "\"lora_alpha\": 12.3,", "\"lora_dropout\": 0.1,"),
        ] {
            config.alpha = alpha;
            config.dropout = dropout;
            let text = encode_config(&config);
            assert!(text.contains(alpha_text), "{text}");
            assert!(text.contains(dropout_text), "{text}");
            let back = decode_config(&text).unwrap();
            assert_eq!(back.alpha.to_bits(), alpha.to_bits());
            assert_eq!(back.dropout.to_bits(), dropout.to_bits());
        }
    }

    #[test]
    fn target_order_does_not_matter() {
        let mut config = adapter().config().clone();
        config.target_modules = vec![TargetModule::Down, TargetModule::Q, TargetModule::Down];
        let text = encode_config(&config);
        let json: serde_json::Value = serde_json::from_str(&text).unwrap();
        assert_eq!(json["target_modules"], json!(["down_proj", "q_proj"]));
        let back = decode_config(&text).unwrap();
        assert_eq!(
            back.target_modules,
            vec![TargetModule::Q, TargetModule::Down]
        );
    }

    #[test]
    fn tensors_of_modules_outside_target_modules_are_refused() {
        let a = adapter();
        let mut config = a.config().clone();
        config.target_modules = vec![TargetModule::Q];
        let err = decode_weights(&encode_weights(&a), config).unwrap_err();
        assert!(
            matches!(err, AdapterError::UntargetedTensor { .. }),
            "{err}"
        );
        assert!(err.to_string().contains("mlp.down_proj"), "{err}");
    }

    #[test]
    fn unsupported_configs_are_refused_by_name() {
        let dora = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["q_proj"],"use_dora":true}"#;
        assert!(
            decode_config(dora)
                .unwrap_err()
                .to_string()
                .contains("use_dora")
        );
        let bad = r#"{"peft_type":"LORA","r":4,"lora_alpha":8,"target_modules":["lm_head"]}"#;
        assert!(
            decode_config(bad)
                .unwrap_err()
                .to_string()
                .contains("lm_head")
        );
        let ia3 = r#"{"peft_type":"IA3","r":4,"lora_alpha":8,"target_modules":["q_proj"]}"#;
        assert!(decode_config(ia3).unwrap_err().to_string().contains("IA3"));
    }
}
