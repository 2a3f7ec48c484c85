//! The Hugging Face PEFT adapter format, as byte-level codecs plus thin file helpers.
//!
//! A PEFT LoRA adapter is a directory with `adapter_model.safetensors` (tensors named
//! `base_model.model.<module>.lora_A.weight` `[r, in]` and `...lora_B.weight` `[out, r]`) and
//! `adapter_config.json`. Writing this format means a lab can load a Mekong adapter into
//! Python `peft` unchanged, and bring a PEFT adapter into a federation.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;

use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde::{Deserialize, Serialize};

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

/// Encodes the adapter's tensors as a safetensors file (F32, PEFT key names).
pub fn encode_weights(adapter: &LoraAdapter) -> Vec<u8> {
    let mut owned: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for (name, m) in adapter.modules() {
        for (is_a, t) in [(true, &m.a), (false, &m.b)] {
            let bytes = t.data().iter().flat_map(|v| v.to_le_bytes()).collect();
            owned.push((tensor_key(name, is_a), t.shape().to_vec(), bytes));
        }
    }
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
/// both A and B, with the config's rank; keys that are not LoRA weights are refused by name.
pub fn decode_weights(bytes: &[u8], config: AdapterConfig) -> Result<LoraAdapter, AdapterError> {
    let st =
        SafeTensors::deserialize(bytes).map_err(|e| AdapterError::Safetensors(e.to_string()))?;
    let mut halves: BTreeMap<String, (Option<Matrix>, Option<Matrix>)> = BTreeMap::new();
    for (key, view) in st.iter() {
        let (module, is_a) = parse_key(key)?;
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

fn decode_floats(key: &str, dtype: Dtype, data: &[u8]) -> Result<Vec<f32>, AdapterError> {
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

/// `adapter_config.json` as PEFT writes it. Unknown keys are accepted on read because PEFT
/// adds fields between versions; the ones Mekong depends on are checked.
#[derive(Debug, Serialize, Deserialize)]
struct PeftConfigJson {
    peft_type: String,
    #[serde(default)]
    task_type: Option<String>,
    r: usize,
    lora_alpha: f32,
    target_modules: Vec<String>,
    #[serde(default)]
    base_model_name_or_path: Option<String>,
    #[serde(default)]
    lora_dropout: f32,
    #[serde(default)]
    bias: Option<String>,
    #[serde(default)]
    fan_in_fan_out: bool,
    #[serde(default)]
    inference_mode: bool,
    #[serde(default)]
    use_rslora: bool,
    #[serde(default)]
    use_dora: bool,
}

/// Encodes the config the way PEFT writes it.
pub fn encode_config(config: &AdapterConfig) -> String {
    let json = PeftConfigJson {
        peft_type: "LORA".into(),
        task_type: Some("CAUSAL_LM".into()),
        r: config.rank,
        lora_alpha: config.alpha,
        target_modules: config
            .target_modules
            .iter()
            .map(|t| t.peft_name().to_string())
            .collect(),
        base_model_name_or_path: Some(config.base_model.clone()),
        lora_dropout: 0.0,
        bias: Some("none".into()),
        fan_in_fan_out: false,
        inference_mode: true,
        use_rslora: false,
        use_dora: false,
    };
    serde_json::to_string_pretty(&json).expect("config always serialises")
}

/// Decodes `adapter_config.json`, refusing what Mekong cannot reproduce exactly
/// (non-LoRA types, rsLoRA or DoRA scaling, fan-in-fan-out layouts, unknown targets).
pub fn decode_config(json: &str) -> Result<AdapterConfig, AdapterError> {
    let c: PeftConfigJson =
        serde_json::from_str(json).map_err(|e| AdapterError::Config(e.to_string()))?;
    if c.peft_type != "LORA" {
        return Err(AdapterError::Config(format!(
            "peft_type is {:?}, only \"LORA\" is supported",
            c.peft_type
        )));
    }
    if c.r == 0 {
        return Err(AdapterError::Config("r must be at least 1".into()));
    }
    if !(c.lora_alpha.is_finite() && c.lora_alpha > 0.0) {
        return Err(AdapterError::Config(
            "lora_alpha must be a positive number".into(),
        ));
    }
    for (flag, name) in [
        (c.use_rslora, "use_rslora"),
        (c.use_dora, "use_dora"),
        (c.fan_in_fan_out, "fan_in_fan_out"),
    ] {
        if flag {
            return Err(AdapterError::Config(format!(
                "{name} = true is not supported"
            )));
        }
    }
    let target_modules = c
        .target_modules
        .iter()
        .map(|t| {
            TargetModule::from_peft_name(t)
                .ok_or_else(|| AdapterError::Config(format!("unknown target module {t:?}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(AdapterConfig {
        rank: c.r,
        alpha: c.lora_alpha,
        target_modules,
        base_model: c.base_model_name_or_path.unwrap_or_default(),
    })
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

fn write_atomically(path: &Path, bytes: &[u8]) -> Result<(), AdapterError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).map_err(|source| io_error(&tmp, source))?;
    fs::rename(&tmp, path).map_err(|source| io_error(path, source))
}

fn io_error(path: &Path, source: std::io::Error) -> AdapterError {
    AdapterError::Io {
        path: path.display().to_string(),
        source,
    }
}

fn prefix_path(path: &Path, e: AdapterError) -> AdapterError {
    match e {
        AdapterError::Safetensors(m) => {
            AdapterError::Safetensors(format!("{}: {m}", path.display()))
        }
        AdapterError::Config(m) => AdapterError::Config(format!("{}: {m}", path.display())),
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
        assert_eq!(json["lora_alpha"], 8.0);
        assert_eq!(json["target_modules"][1], "down_proj");
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
