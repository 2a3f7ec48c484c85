//! Typed errors of fedcore. Every message names what is wrong.

use thiserror::Error;

/// A bad field in a plan or configuration.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum ConfigError {
    #[error("invalid `{field}`: {reason}")]
    Field { field: String, reason: String },
    #[error("cannot parse configuration: {0}")]
    Parse(String),
}

impl ConfigError {
    /// An error about one named field.
    pub fn field(field: &str, reason: impl Into<String>) -> Self {
        ConfigError::Field {
            field: field.to_string(),
            reason: reason.into(),
        }
    }
}

/// A malformed adapter, tensor or adapter file.
#[derive(Debug, Error)]
pub enum AdapterError {
    #[error("shape mismatch: {0}")]
    Shape(String),
    #[error("tensor `{0}` is missing")]
    MissingTensor(String),
    #[error("unexpected tensor `{0}`")]
    UnexpectedTensor(String),
    #[error("tensor `{name}` has dtype {dtype}; only F32, F16 and BF16 adapters can be read")]
    Dtype { name: String, dtype: String },
    #[error("invalid safetensors data: {0}")]
    Safetensors(String),
    #[error("invalid adapter_config.json: {0}")]
    Config(String),
    /// One key of `adapter_config.json` is malformed, or asks for something Mekong cannot
    /// reproduce exactly (DoRA, rsLoRA, trained biases, per-module ranks, ...). Loading such an
    /// adapter as plain LoRA would silently compute a different model, so it is refused.
    #[error("{file}: `{key}` {reason}")]
    ConfigKey {
        /// `adapter_config.json`, or its full path when read from a directory.
        file: String,
        key: String,
        reason: String,
    },
    /// A LoRA tensor of a module that `target_modules` in the config does not cover: the
    /// weights and the config disagree about what the adapter adapts.
    #[error("tensor `{key}` adapts a module not covered by target_modules {targets}")]
    UntargetedTensor { key: String, targets: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
