//! Hugging Face checkpoints: `config.json`, `model.safetensors` or a sharded
//! `model.safetensors.index.json`, `tokenizer.json` and `tokenizer_config.json`.
//!
//! Tensor names and layout are already those the model builder expects; this module only
//! reads the configuration into a [`ModelSpec`], indexes the safetensors headers, and casts
//! f16/bf16 to f32 tensor by tensor.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use fedcore::{Architecture, Gemma3Layout, ModelSpec, RopeScaling};
use serde_json::Value;

use super::fingerprint::checkpoint_fingerprint;
use super::{Checkpoint, CheckpointFormat, CheckpointTokenizer, HostTensor, WeightSource};
use crate::error::CheckpointError;

/// Data types this reader converts to f32.
const SUPPORTED_DTYPES: &str = "F32, F16, BF16";

/// Largest safetensors header accepted (the format's own limit is 100 MB).
const MAX_HEADER: u64 = 100 << 20;

/// Opens a Hugging Face checkpoint directory.
pub fn open(dir: &Path) -> Result<Checkpoint, CheckpointError> {
    let config_path = dir.join("config.json");
    let config: Value = read_json(&config_path)?;
    let mut spec = spec_from_config(&config, &config_path)?;
    spec.name = model_name(&config, dir);

    let weights = SafetensorsWeights::open(dir)?;
    let files: Vec<&Path> = weights.files.iter().map(|f| f.path.as_path()).collect();
    spec.weights_sha256 = Some(checkpoint_fingerprint(&files)?);
    let tokenizer = read_tokenizer(dir)?;
    Ok(Checkpoint {
        path: dir.to_path_buf(),
        format: CheckpointFormat::HfSafetensors,
        spec,
        weights: Box::new(weights),
        tokenizer,
    })
}

fn read_json(path: &Path) -> Result<Value, CheckpointError> {
    let text = std::fs::read_to_string(path).map_err(|source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|e| CheckpointError::Format {
        path: path.display().to_string(),
        reason: format!("not valid JSON: {e}"),
    })
}

/// `_name_or_path` when the config records one, else the directory's name.
fn model_name(config: &Value, dir: &Path) -> String {
    config
        .get("_name_or_path")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .unwrap_or_else(|| {
            dir.canonicalize()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .unwrap_or_else(|| "base-model".to_string())
        })
}

/// Reads the architecture from a Hugging Face `config.json` (Llama, Qwen2, Mistral, Gemma 3
/// text).
pub fn spec_from_config(config: &Value, path: &Path) -> Result<ModelSpec, CheckpointError> {
    let field_err = |field: &str, reason: String| CheckpointError::Config {
        path: path.display().to_string(),
        field: field.to_string(),
        reason,
    };
    let model_type = config
        .get("model_type")
        .and_then(Value::as_str)
        .ok_or_else(|| field_err("model_type", "missing".into()))?;
    if model_type == "gemma3" {
        return Err(field_err(
            "model_type",
            "`gemma3` is the multimodal Gemma 3 (text under `text_config`, vision tower \
             beside it); only the text-only form `gemma3_text` (Gemma 3 270m and 1b) is \
             supported"
                .into(),
        ));
    }
    if !matches!(model_type, "llama" | "qwen2" | "mistral" | "gemma3_text") {
        return Err(field_err(
            "model_type",
            format!(
                "`{model_type}` is not supported (supported: llama, qwen2, mistral, gemma3_text)"
            ),
        ));
    }
    let gemma = model_type == "gemma3_text";
    let usize_field = |field: &str| -> Result<Option<usize>, CheckpointError> {
        match config.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v.as_u64().map(|n| Some(n as usize)).ok_or_else(|| {
                field_err(field, format!("expected a non-negative integer, got {v}"))
            }),
        }
    };
    let f64_field = |field: &str| -> Result<Option<f64>, CheckpointError> {
        match config.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_f64()
                .map(Some)
                .ok_or_else(|| field_err(field, format!("expected a number, got {v}"))),
        }
    };
    let bool_field = |field: &str| -> Result<Option<bool>, CheckpointError> {
        match config.get(field) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => v
                .as_bool()
                .map(Some)
                .ok_or_else(|| field_err(field, format!("expected true or false, got {v}"))),
        }
    };
    let required = |field: &str| -> Result<usize, CheckpointError> {
        usize_field(field)?.ok_or_else(|| field_err(field, "missing".into()))
    };

    // Gemma names the field `hidden_activation` (and keeps a stale `hidden_act`).
    let (act_field, expected_act) = if gemma {
        ("hidden_activation", "gelu_pytorch_tanh")
    } else {
        ("hidden_act", "silu")
    };
    if let Some(act) = config.get(act_field).and_then(Value::as_str)
        && act != expected_act
    {
        return Err(field_err(
            act_field,
            format!("`{act}` is not supported ({model_type} MLPs use {expected_act})"),
        ));
    }
    for capping in ["attn_logit_softcapping", "final_logit_softcapping"] {
        if let Some(v) = f64_field(capping)? {
            return Err(field_err(
                capping,
                format!("{v}: logit soft-capping (Gemma 2) is not supported"),
            ));
        }
    }

    let num_attention_heads = required("num_attention_heads")?;
    let attention_bias = bool_field("attention_bias")?.unwrap_or(false);
    let (qkv_bias, o_bias) = match model_type {
        // Qwen2 always has q/k/v biases and none on o_proj.
        "qwen2" => (true, false),
        _ => (attention_bias, attention_bias),
    };
    let num_hidden_layers = required("num_hidden_layers")?;
    let architecture = if gemma {
        gemma3_layout(
            config,
            num_hidden_layers,
            &f64_field,
            &usize_field,
            &field_err,
        )?
    } else {
        Architecture::Llama
    };
    let spec = ModelSpec {
        name: String::new(),
        vocab_size: required("vocab_size")?,
        hidden_size: required("hidden_size")?,
        intermediate_size: required("intermediate_size")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads: usize_field("num_key_value_heads")?.unwrap_or(num_attention_heads),
        rope_theta: rope_theta(config, gemma, &f64_field)?,
        rms_norm_eps: f64_field("rms_norm_eps")?.unwrap_or(1e-6) as f32,
        max_position_embeddings: required("max_position_embeddings")?,
        // Gemma ties its head by default; Llama does not.
        tie_word_embeddings: bool_field("tie_word_embeddings")?.unwrap_or(gemma),
        init_seed: 0,
        // Gemma3TextConfig's default head is 256 wide, whatever hidden / heads is.
        head_dim: usize_field("head_dim")?.or(gemma.then_some(256)),
        qkv_bias,
        o_bias,
        mlp_bias: bool_field("mlp_bias")?.unwrap_or(false),
        // transformers ≥ 5 writes `rope_parameters` (theta included); earlier versions
        // `rope_theta` and `rope_scaling`.
        rope_scaling: match config.get("rope_parameters").filter(|v| !v.is_null()) {
            // Gemma 3 keys its parameters by layer type; scaling applies to global layers.
            Some(params) if gemma && params.get("full_attention").is_some() => rope_scaling(
                params.get("full_attention"),
                "rope_parameters.full_attention",
                &field_err,
            )?,
            Some(params) => rope_scaling(Some(params), "rope_parameters", &field_err)?,
            None => rope_scaling(config.get("rope_scaling"), "rope_scaling", &field_err)?,
        },
        weights_sha256: None,
        architecture,
    };
    spec.validate()
        .map_err(|e| field_err("(architecture)", e.to_string()))?;
    Ok(spec)
}

/// `rope_parameters.rope_theta` (transformers ≥ 5; Gemma 3's under `full_attention`), else
/// `rope_theta`, else 10000 (Llama) or 1e6 (Gemma 3).
fn rope_theta(
    config: &Value,
    gemma: bool,
    f64_field: &dyn Fn(&str) -> Result<Option<f64>, CheckpointError>,
) -> Result<f32, CheckpointError> {
    let params = config.get("rope_parameters");
    if let Some(theta) = params
        .and_then(|p| p.get("full_attention").unwrap_or(p).get("rope_theta"))
        .and_then(Value::as_f64)
    {
        return Ok(theta as f32);
    }
    Ok(f64_field("rope_theta")?.unwrap_or(if gemma { 1e6 } else { 10_000.0 }) as f32)
}

/// Gemma 3's interleaved attention from `config.json`, in either form transformers writes:
/// `layer_types` (preferred; older files may carry a stale `_sliding_window_pattern` beside
/// it) or `sliding_window_pattern` (every n-th layer global, default 6), and the local RoPE
/// base from `rope_parameters.sliding_attention` or `rope_local_base_freq` (default 10000).
fn gemma3_layout(
    config: &Value,
    num_hidden_layers: usize,
    f64_field: &dyn Fn(&str) -> Result<Option<f64>, CheckpointError>,
    usize_field: &dyn Fn(&str) -> Result<Option<usize>, CheckpointError>,
    field_err: &dyn Fn(&str, String) -> CheckpointError,
) -> Result<Architecture, CheckpointError> {
    let full_attention_layers = match config.get("layer_types").filter(|v| !v.is_null()) {
        Some(Value::Array(kinds)) => {
            if kinds.len() != num_hidden_layers {
                return Err(field_err(
                    "layer_types",
                    format!("{} entries for {num_hidden_layers} layers", kinds.len()),
                ));
            }
            let mut full = Vec::new();
            for (i, kind) in kinds.iter().enumerate() {
                match kind.as_str() {
                    Some("full_attention") => full.push(i),
                    Some("sliding_attention") => {}
                    _ => {
                        return Err(field_err(
                            &format!("layer_types[{i}]"),
                            format!("{kind}: expected \"full_attention\" or \"sliding_attention\""),
                        ));
                    }
                }
            }
            full
        }
        Some(v) => {
            return Err(field_err(
                "layer_types",
                format!("expected a list, got {v}"),
            ));
        }
        None => {
            let pattern = usize_field("sliding_window_pattern")?.unwrap_or(6);
            Gemma3Layout::every_nth_full(num_hidden_layers, pattern)
        }
    };
    let rope_local_theta = match config
        .get("rope_parameters")
        .and_then(|p| p.get("sliding_attention"))
    {
        Some(local) => {
            if let Some(kind) = local.get("rope_type").and_then(Value::as_str)
                && kind != "default"
            {
                return Err(field_err(
                    "rope_parameters.sliding_attention.rope_type",
                    format!("`{kind}` is not supported on sliding layers (only default)"),
                ));
            }
            local
                .get("rope_theta")
                .and_then(Value::as_f64)
                .ok_or_else(|| {
                    field_err(
                        "rope_parameters.sliding_attention.rope_theta",
                        "missing or not a number".into(),
                    )
                })?
        }
        None => f64_field("rope_local_base_freq")?.unwrap_or(10_000.0),
    };
    Ok(Architecture::Gemma3(Gemma3Layout {
        sliding_window: usize_field("sliding_window")?.unwrap_or(4096),
        full_attention_layers,
        rope_local_theta: rope_local_theta as f32,
        query_pre_attn_scalar: f64_field("query_pre_attn_scalar")?.unwrap_or(256.0) as f32,
    }))
}

fn rope_scaling(
    value: Option<&Value>,
    section: &str,
    field_err: &dyn Fn(&str, String) -> CheckpointError,
) -> Result<Option<RopeScaling>, CheckpointError> {
    let Some(v) = value.filter(|v| !v.is_null()) else {
        return Ok(None);
    };
    let kind = v
        .get("rope_type")
        .or_else(|| v.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let num = |key: &str| {
        v.get(key).and_then(Value::as_f64).ok_or_else(|| {
            field_err(
                &format!("{section}.{key}"),
                "missing or not a number".into(),
            )
        })
    };
    match kind {
        "default" | "" => Ok(None),
        "linear" => Ok(Some(RopeScaling::Linear {
            factor: num("factor")?,
        })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")? as usize,
        })),
        other => Err(field_err(
            &format!("{section}.rope_type"),
            format!("`{other}` is not supported (supported: llama3, linear)"),
        )),
    }
}

/// One safetensors file: its path, an open handle and where its data begins.
struct ShardFile {
    path: PathBuf,
    file: Mutex<File>,
    data_start: u64,
}

/// Where one tensor lies.
struct TensorEntry {
    shard: usize,
    dtype: String,
    shape: Vec<usize>,
    begin: u64,
    end: u64,
}

/// Tensors of one or more safetensors files, read on demand.
pub struct SafetensorsWeights {
    files: Vec<ShardFile>,
    index: BTreeMap<String, TensorEntry>,
    dir: PathBuf,
}

impl SafetensorsWeights {
    /// Indexes `model.safetensors`, or the shards named by `model.safetensors.index.json`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index_path = dir.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let index = read_json(&index_path)?;
            let map = index
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| CheckpointError::Format {
                    path: index_path.display().to_string(),
                    reason: "no `weight_map` object".into(),
                })?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect();
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_string()]
        } else {
            return Err(CheckpointError::Format {
                path: dir.display().to_string(),
                reason: "has neither model.safetensors nor model.safetensors.index.json".into(),
            });
        };
        let mut weights = SafetensorsWeights {
            files: Vec::new(),
            index: BTreeMap::new(),
            dir: dir.to_path_buf(),
        };
        for name in shard_names {
            weights.add_shard(&dir.join(name))?;
        }
        Ok(weights)
    }

    fn add_shard(&mut self, path: &Path) -> Result<(), CheckpointError> {
        let display = path.display().to_string();
        let io = |source| CheckpointError::Io {
            path: display.clone(),
            source,
        };
        let bad = |reason: String| CheckpointError::Format {
            path: display.clone(),
            reason,
        };
        let mut file = File::open(path).map_err(io)?;
        let file_len = file.metadata().map_err(io)?.len();
        let mut len = [0u8; 8];
        file.read_exact(&mut len)
            .map_err(|_| bad("shorter than a safetensors header".into()))?;
        let header_len = u64::from_le_bytes(len);
        if header_len > MAX_HEADER || 8 + header_len > file_len {
            return Err(bad(format!(
                "header length {header_len} does not fit a file of {file_len} bytes"
            )));
        }
        let mut header = vec![0u8; header_len as usize];
        file.read_exact(&mut header).map_err(io)?;
        let header: BTreeMap<String, Value> = serde_json::from_slice(&header)
            .map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
        let data_start = 8 + header_len;
        let shard = self.files.len();
        for (name, entry) in header {
            if name == "__metadata__" {
                continue;
            }
            let dtype = entry
                .get("dtype")
                .and_then(Value::as_str)
                .ok_or_else(|| bad(format!("tensor `{name}` has no dtype")))?
                .to_string();
            let shape: Vec<usize> = entry
                .get("shape")
                .and_then(Value::as_array)
                .and_then(|dims| {
                    dims.iter()
                        .map(|d| d.as_u64().map(|d| d as usize))
                        .collect()
                })
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid shape")))?;
            let offsets: Vec<u64> = entry
                .get("data_offsets")
                .and_then(Value::as_array)
                .and_then(|o| o.iter().map(Value::as_u64).collect())
                .filter(|o: &Vec<u64>| o.len() == 2 && o[0] <= o[1])
                .ok_or_else(|| bad(format!("tensor `{name}` has no valid data_offsets")))?;
            if data_start + offsets[1] > file_len {
                return Err(bad(format!(
                    "tensor `{name}` ends at byte {} past the end of the file ({file_len} bytes): \
                     the file is truncated",
                    data_start + offsets[1]
                )));
            }
            self.index.insert(
                name,
                TensorEntry {
                    shard,
                    dtype,
                    shape,
                    begin: offsets[0],
                    end: offsets[1],
                },
            );
        }
        self.files.push(ShardFile {
            path: path.to_path_buf(),
            file: Mutex::new(file),
            data_start,
        });
        Ok(())
    }
}

impl WeightSource for SafetensorsWeights {
    fn names(&self) -> Vec<String> {
        self.index.keys().cloned().collect()
    }

    fn tensor(&self, name: &str) -> Result<HostTensor, CheckpointError> {
        let entry = self
            .index
            .get(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                path: self.dir.display().to_string(),
                name: name.to_string(),
            })?;
        let width = match entry.dtype.as_str() {
            "F32" => 4,
            "F16" | "BF16" => 2,
            other => {
                return Err(CheckpointError::UnsupportedDtype {
                    name: name.to_string(),
                    dtype: other.to_string(),
                    supported: SUPPORTED_DTYPES,
                });
            }
        };
        let count: usize = entry.shape.iter().product();
        let bytes_len = entry.end - entry.begin;
        let shard = &self.files[entry.shard];
        if bytes_len != (count * width) as u64 {
            return Err(CheckpointError::Format {
                path: shard.path.display().to_string(),
                reason: format!(
                    "tensor `{name}` has {bytes_len} bytes, but shape {:?} of {} needs {}",
                    entry.shape,
                    entry.dtype,
                    count * width
                ),
            });
        }
        let mut bytes = vec![0u8; bytes_len as usize];
        {
            let io = |source| CheckpointError::Io {
                path: shard.path.display().to_string(),
                source,
            };
            let mut file = shard.file.lock().unwrap_or_else(|p| p.into_inner());
            file.seek(SeekFrom::Start(shard.data_start + entry.begin))
                .map_err(io)?;
            file.read_exact(&mut bytes).map_err(io)?;
        }
        let data = match entry.dtype.as_str() {
            "F32" => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            "F16" => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            _ => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
        };
        Ok(HostTensor {
            shape: entry.shape.clone(),
            data,
        })
    }
}

/// `tokenizer.json` with `tokenizer_config.json`'s special tokens and chat template, when
/// present.
fn read_tokenizer(dir: &Path) -> Result<Option<CheckpointTokenizer>, CheckpointError> {
    let path = dir.join("tokenizer.json");
    if !path.exists() {
        return Ok(None);
    }
    let tokenizer =
        tokenizers::Tokenizer::from_file(&path).map_err(|e| CheckpointError::Tokenizer {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
    let config_path = dir.join("tokenizer_config.json");
    let config = if config_path.exists() {
        read_json(&config_path)?
    } else {
        Value::Null
    };
    // Special tokens are strings or `{"content": "..."}` objects (AddedToken).
    let token = |key: &str| match config.get(key) {
        Some(Value::String(s)) => Some(s.clone()),
        Some(Value::Object(o)) => o.get("content").and_then(Value::as_str).map(str::to_string),
        _ => None,
    };
    let chat_template = match config.get("chat_template") {
        Some(Value::String(s)) => Some(s.clone()),
        // A list of named templates: take the default one.
        Some(Value::Array(list)) => list
            .iter()
            .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
            .and_then(|t| t.get("template").and_then(Value::as_str))
            .map(str::to_string),
        _ => None,
    };
    Ok(Some(CheckpointTokenizer {
        tokenizer,
        bos_token: token("bos_token"),
        eos_token: token("eos_token"),
        chat_template,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn llama_config() -> Value {
        json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 32,
            "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_key_value_heads": 2, "rope_theta": 100000.0, "rms_norm_eps": 1e-5,
            "max_position_embeddings": 128, "tie_word_embeddings": true, "hidden_act": "silu",
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        })
    }

    #[test]
    fn reads_llama_and_qwen2_configs() {
        let spec = spec_from_config(&llama_config(), Path::new("config.json")).unwrap();
        assert_eq!(spec.num_key_value_heads, 2);
        assert_eq!(spec.rope_theta, 100000.0);
        assert!(spec.tie_word_embeddings && !spec.qkv_bias && !spec.o_bias);
        assert!(matches!(
            spec.rope_scaling,
            Some(RopeScaling::Llama3 { .. })
        ));

        let mut qwen = llama_config();
        qwen["model_type"] = json!("qwen2");
        qwen["rope_scaling"] = Value::Null;
        let spec = spec_from_config(&qwen, Path::new("config.json")).unwrap();
        assert!(spec.qkv_bias && !spec.o_bias && spec.rope_scaling.is_none());
    }

    #[test]
    fn config_errors_name_the_field() {
        let mut c = llama_config();
        c["model_type"] = json!("gpt2");
        let err = spec_from_config(&c, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("model_type") && err.to_string().contains("gpt2"));

        let mut c = llama_config();
        c.as_object_mut().unwrap().remove("hidden_size");
        let err = spec_from_config(&c, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("`hidden_size`: missing"), "{err}");

        let mut c = llama_config();
        c["rope_scaling"] = json!({"rope_type": "yarn", "factor": 4.0});
        let err = spec_from_config(&c, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("yarn"), "{err}");

        let mut c = llama_config();
        c["num_key_value_heads"] = json!(3);
        let err = spec_from_config(&c, Path::new("x/config.json")).unwrap_err();
        assert!(err.to_string().contains("num_key_value_heads"), "{err}");
    }
}
