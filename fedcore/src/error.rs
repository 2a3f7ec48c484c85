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
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
}
