//! The architecture of a GGUF model, read from its metadata into a [`ModelSpec`].
//!
//! llama.cpp stores the Hugging Face `config.json` fields under `{arch}.…` keys
//! (`llama.block_count`, `llama.attention.head_count_kv`, ...). The rest is implied by which
//! tensors are present: untied output (`output.weight`), biases (Qwen2 always has q/k/v biases).
//! Supported: `llama` (Llama, Mistral and SmolLM files all use it), `qwen2` and `gemma3`
//! (text).
//!
//! Three Gemma 3 settings are not in the file, because llama.cpp hard-codes them
//! (`llama-model.cpp`, `LLM_ARCH_GEMMA3`): every sixth layer is global (unless the file states
//! `gemma3.attention.sliding_window_pattern`), sliding layers use RoPE base 10000, and scores
//! are scaled by `key_length^-½` except in the 62-layer 27B model (`(hidden / heads)^-½`).
//! The same values are in each model's Hugging Face `config.json`.

use std::path::Path;

use fedcore::{Architecture, Gemma3Layout, ModelSpec, RopeScaling};

use super::reader::{Array, GgufFile, Value};
use crate::error::CheckpointError;

/// The architectures this reader builds models for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arch {
    /// `llama`: q/k rows are permuted for interleaved RoPE in the file.
    Llama,
    /// `qwen2`: q/k/v biases, rows stored as in Hugging Face (NeoX-style RoPE).
    Qwen2,
    /// `gemma3`: Gemma 3 text models; rows as in Hugging Face, norms stored as `1 + w`.
    Gemma3,
}

impl Arch {
    pub fn key(self) -> &'static str {
        match self {
            Arch::Llama => "llama",
            Arch::Qwen2 => "qwen2",
            Arch::Gemma3 => "gemma3",
        }
    }

    /// Whether llama.cpp's converter permuted this architecture's q/k rows.
    pub fn permutes_qk(self) -> bool {
        self == Arch::Llama
    }
}

/// The architecture named by `general.architecture`.
pub fn arch(file: &GgufFile) -> Result<Arch, CheckpointError> {
    let err = |reason: String| config_err(file.path(), "general.architecture", reason);
    match file.get("general.architecture") {
        None => Err(err("missing".into())),
        Some(Value::Str(s)) => match s.as_str() {
            "llama" => Ok(Arch::Llama),
            "qwen2" => Ok(Arch::Qwen2),
            "gemma3" => Ok(Arch::Gemma3),
            other => Err(err(format!(
                "`{other}` is not supported (supported: llama, qwen2, gemma3)"
            ))),
        },
        Some(v) => Err(err(format!("expected a string, found {}", v.type_name()))),
    }
}

fn config_err(path: &Path, field: &str, reason: String) -> CheckpointError {
    CheckpointError::Config {
        path: path.display().to_string(),
        field: field.to_string(),
        reason,
    }
}

/// Reads the architecture from the metadata. `name` is `general.name` (or the file's stem) and
/// `weights_sha256` is left for the caller, which hashes the file.
pub fn spec_from_metadata(file: &GgufFile) -> Result<ModelSpec, CheckpointError> {
    let arch = arch(file)?;
    let prefix = arch.key();
    let path = file.path();
    let key = |k: &str| format!("{prefix}.{k}");
    let usize_opt = |k: &str| -> Result<Option<usize>, CheckpointError> {
        let full = key(k);
        match file.get(&full) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|n| usize::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    config_err(
                        path,
                        &full,
                        format!(
                            "expected a non-negative integer, found {} {v:?}",
                            v.type_name()
                        ),
                    )
                }),
        }
    };
    let required = |k: &str| -> Result<usize, CheckpointError> {
        usize_opt(k)?.ok_or_else(|| config_err(path, &key(k), "missing".into()))
    };
    let f64_opt = |k: &str| -> Result<Option<f64>, CheckpointError> {
        let full = key(k);
        match file.get(&full) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                config_err(
                    path,
                    &full,
                    format!("expected a number, found {}", v.type_name()),
                )
            }),
        }
    };

    let hidden_size = required("embedding_length")?;
    let num_attention_heads = required("attention.head_count")?;
    // `head_count_kv` may be written per layer as an array (hybrid models); we need one value.
    let num_key_value_heads = match file.get(&key("attention.head_count_kv")) {
        Some(Value::Array(_)) => {
            return Err(config_err(
                path,
                &key("attention.head_count_kv"),
                "a per-layer list of KV head counts is not supported".into(),
            ));
        }
        _ => usize_opt("attention.head_count_kv")?.unwrap_or(num_attention_heads),
    };

    // `key_length` is written when the head width is not hidden / heads (Mistral NeMo, Qwen3).
    let default_head_dim = hidden_size.checked_div(num_attention_heads).unwrap_or(0);
    let head_dim = usize_opt("attention.key_length")?;
    if let (Some(k), Some(v)) = (head_dim, usize_opt("attention.value_length")?)
        && k != v
    {
        return Err(config_err(
            path,
            &key("attention.value_length"),
            format!("{v} differs from attention.key_length {k}, which is not supported"),
        ));
    }
    let effective_head_dim = head_dim.unwrap_or(default_head_dim);
    if let Some(rot) = usize_opt("rope.dimension_count")?
        && rot != effective_head_dim
    {
        return Err(config_err(
            path,
            &key("rope.dimension_count"),
            format!(
                "{rot}, but heads are {effective_head_dim} wide: partial rotary embeddings are \
                 not supported"
            ),
        ));
    }

    let tensor = |name: &str| file.tensor_info(name);
    let embedding = tensor("token_embd.weight").ok_or_else(|| CheckpointError::MissingTensor {
        path: path.display().to_string(),
        name: "token_embd.weight".into(),
    })?;
    // The embedding's rows are the vocabulary the model has (ne[1]); the token list, which
    // can be shorter or padded, is the tokenizer's business.
    let vocab_size = match embedding.dims.as_slice() {
        [width, rows] if *width as usize == hidden_size => *rows as usize,
        dims => {
            return Err(CheckpointError::TensorShape {
                name: "token_embd.weight".into(),
                expected: vec![usize_opt("vocab_size")?.unwrap_or(0), hidden_size],
                found: dims.iter().rev().map(|&d| d as usize).collect(),
            });
        }
    };
    if let Some(stated) = usize_opt("vocab_size")?
        && stated != vocab_size
    {
        return Err(config_err(
            path,
            &key("vocab_size"),
            format!("{stated}, but token_embd.weight has {vocab_size} rows"),
        ));
    }

    if tensor("rope_freqs.weight").is_some() {
        return Err(config_err(
            path,
            "rope_freqs.weight",
            "the file carries per-frequency RoPE factors (Llama 3.1-style scaling, as llama.cpp \
             writes it); recovering the scaling parameters from them is not supported"
                .into(),
        ));
    }
    let rope_scaling = rope_scaling(file, prefix)?;

    let has = |suffix: &str| tensor(&format!("blk.0.{suffix}")).is_some();
    let (qkv_bias, o_bias) = match arch {
        Arch::Qwen2 => (true, false),
        Arch::Llama | Arch::Gemma3 => (has("attn_q.bias"), has("attn_output.bias")),
    };
    let num_hidden_layers = required("block_count")?;
    let architecture = match arch {
        Arch::Llama | Arch::Qwen2 => Architecture::Llama,
        Arch::Gemma3 => {
            if let Some(cap) = f64_opt("final_logit_softcapping")?.filter(|&c| c != 0.0) {
                return Err(config_err(
                    path,
                    &key("final_logit_softcapping"),
                    format!("{cap}: logit soft-capping (Gemma 2) is not supported"),
                ));
            }
            let full_attention_layers = gemma3_full_layers(
                file,
                &key("attention.sliding_window_pattern"),
                num_hidden_layers,
            )?;
            // llama.cpp: 27B (62 layers) scales by hidden / heads, the others by the head width.
            let query_pre_attn_scalar = if num_hidden_layers == 62 {
                default_head_dim
            } else {
                effective_head_dim
            };
            Architecture::Gemma3(Gemma3Layout {
                sliding_window: required("attention.sliding_window")?,
                full_attention_layers,
                rope_local_theta: 10_000.0,
                query_pre_attn_scalar: query_pre_attn_scalar as f32,
            })
        }
    };
    let spec = ModelSpec {
        name: model_name(file),
        vocab_size,
        hidden_size,
        intermediate_size: required("feed_forward_length")?,
        num_hidden_layers,
        num_attention_heads,
        num_key_value_heads,
        rope_theta: f64_opt("rope.freq_base")?.unwrap_or(10_000.0) as f32,
        rms_norm_eps: f64_opt("attention.layer_norm_rms_epsilon")?.ok_or_else(|| {
            config_err(
                path,
                &key("attention.layer_norm_rms_epsilon"),
                "missing".into(),
            )
        })? as f32,
        max_position_embeddings: required("context_length")?,
        tie_word_embeddings: tensor("output.weight").is_none(),
        init_seed: 0,
        head_dim: head_dim.filter(|&d| d != default_head_dim),
        qkv_bias,
        o_bias,
        mlp_bias: has("ffn_up.bias"),
        rope_scaling,
        weights_sha256: None,
        architecture,
    };
    spec.validate()
        .map_err(|e| config_err(path, "(architecture)", e.to_string()))?;
    Ok(spec)
}

/// Gemma 3's global layers: from `{arch}.attention.sliding_window_pattern` when the file has
/// it (a period n, or one flag per layer, true = sliding, as newer llama.cpp writes), else
/// llama.cpp's default for Gemma 3, every sixth layer.
fn gemma3_full_layers(
    file: &GgufFile,
    key: &str,
    layers: usize,
) -> Result<Vec<usize>, CheckpointError> {
    let err = |reason: String| config_err(file.path(), key, reason);
    match file.get(key) {
        None => Ok(Gemma3Layout::every_nth_full(layers, 6)),
        Some(Value::Array(array)) => {
            let Array::Bool(flags) = array else {
                return Err(err(format!(
                    "expected a list of booleans, found a list of {}",
                    array.element_type_name()
                )));
            };
            if flags.len() != layers {
                return Err(err(format!("{} flags for {layers} layers", flags.len())));
            }
            Ok((0..layers).filter(|&i| !flags[i]).collect())
        }
        Some(v) => v
            .as_u64()
            .map(|n| Gemma3Layout::every_nth_full(layers, n as usize))
            .ok_or_else(|| {
                err(format!(
                    "expected an integer or a list, found {}",
                    v.type_name()
                ))
            }),
    }
}

/// `general.name`, else the file name without `.gguf`.
fn model_name(file: &GgufFile) -> String {
    file.get("general.name")
        .and_then(Value::as_str)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .or_else(|| {
            file.path()
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
        })
        .unwrap_or_else(|| "base-model".into())
}

/// `{arch}.rope.scaling.type` with `.rope.scaling.factor` (or the older `.rope.scale_linear`).
fn rope_scaling(file: &GgufFile, prefix: &str) -> Result<Option<RopeScaling>, CheckpointError> {
    let type_key = format!("{prefix}.rope.scaling.type");
    let factor_key = format!("{prefix}.rope.scaling.factor");
    let factor = |key: &str| -> Result<Option<f64>, CheckpointError> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v.as_f64().map(Some).ok_or_else(|| {
                config_err(
                    file.path(),
                    key,
                    format!("expected a number, found {}", v.type_name()),
                )
            }),
        }
    };
    let kind = match file.get(&type_key) {
        None => None,
        Some(Value::Str(s)) => Some(s.as_str()),
        Some(v) => {
            return Err(config_err(
                file.path(),
                &type_key,
                format!("expected a string, found {}", v.type_name()),
            ));
        }
    };
    match kind {
        None => {
            let legacy = format!("{prefix}.rope.scale_linear");
            Ok(factor(&legacy)?
                .filter(|&f| f != 1.0)
                .map(|factor| RopeScaling::Linear { factor }))
        }
        Some("none") => Ok(None),
        Some("linear") => {
            let f = factor(&factor_key)?
                .ok_or_else(|| config_err(file.path(), &factor_key, "missing".into()))?;
            Ok((f != 1.0).then_some(RopeScaling::Linear { factor: f }))
        }
        Some(other) => Err(config_err(
            file.path(),
            &type_key,
            format!("`{other}` is not supported (supported: none, linear)"),
        )),
    }
}
