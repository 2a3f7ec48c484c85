//! Typed errors of the lab-side crate. Every message names what is wrong, so that a lab
//! operator reading a log line knows which module, file or setting to look at.

use thiserror::Error;

/// What can go wrong building, adapting, training or evaluating the model.
#[derive(Debug, Error)]
pub enum ModelError {
    /// The plan's model, LoRA or training section does not describe something buildable.
    #[error("invalid plan: {0}")]
    Config(#[from] fedcore::ConfigError),

    /// An adapter could not be assembled or read.
    #[error("adapter: {0}")]
    Adapter(#[from] fedcore::AdapterError),

    /// The adapter's rank or alpha differs from the model's LoRA configuration.
    #[error("adapter {field} is {found}, but the model was built with {field} = {expected}")]
    AdapterConfig {
        field: &'static str,
        expected: String,
        found: String,
    },

    /// A module the model adapts is absent from the adapter.
    #[error("adapter has no module `{0}`, which the model adapts")]
    MissingModule(String),

    /// The adapter holds a module the model does not adapt.
    #[error("adapter module `{0}` is not adapted by this model")]
    UnexpectedModule(String),

    /// One LoRA tensor has the wrong shape.
    #[error("adapter tensor `{module}.{tensor}` is {found:?}, the model expects {expected:?}")]
    ModuleShape {
        module: String,
        tensor: &'static str,
        expected: [usize; 2],
        found: [usize; 2],
    },

    /// Fewer tokens than one training or evaluation window needs.
    #[error("{what} has {tokens} tokens, at least {needed} are needed")]
    TooFewTokens {
        what: &'static str,
        tokens: usize,
        needed: usize,
    },

    /// A token id the model's embedding cannot look up.
    #[error("token id {token} is outside the model's vocabulary of {vocab_size}")]
    TokenOutOfRange { token: u32, vocab_size: usize },

    /// A training batch whose fields disagree in length.
    #[error(
        "training batch field `{field}` has {len} entries, expected rows × seq = {rows} × {seq}"
    )]
    BatchShape {
        field: &'static str,
        len: usize,
        rows: usize,
        seq: usize,
    },

    /// A RoPE position past the model's tables.
    #[error("position {position} is past the model's max_position_embeddings = {max_positions}")]
    PositionOutOfRange { position: u32, max_positions: usize },

    /// The model's parameters live on another device than the one the caller named.
    #[error("the model lives on {model}, but the call asked for {requested}")]
    DeviceMismatch { model: String, requested: String },

    /// Training produced a loss that is not a finite number.
    #[error("training diverged: loss is {loss} at step {step}")]
    Diverged { step: usize, loss: f32 },

    /// The base checkpoint could not be loaded into the model.
    #[error("checkpoint: {0}")]
    Checkpoint(#[from] CheckpointError),

    /// The backend failed to run or read back a tensor.
    #[error("backend error while {during}: {message}")]
    Backend {
        during: &'static str,
        message: String,
    },
}

impl ModelError {
    /// Wraps a backend failure, saying what was being done.
    pub(crate) fn backend(during: &'static str, err: impl std::fmt::Debug) -> Self {
        ModelError::Backend {
            during,
            message: format!("{err:?}"),
        }
    }
}

/// What can go wrong turning a lab's text into a training corpus.
#[derive(Debug, Error)]
pub enum CorpusError {
    /// The corpus file could not be read.
    #[error("cannot read corpus {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The held-out fraction is not strictly between 0 and 1.
    #[error("held-out fraction must be strictly between 0 and 1, got {0}")]
    HeldoutFraction(f64),

    /// Too little text to split into a training part and a held-out part.
    #[error("corpus for `{language}` is too short: {reason}")]
    TooShort { language: String, reason: String },

    /// A text file is not valid UTF-8. `offset` is the byte offset of the first invalid byte.
    #[error("{path}: not valid UTF-8 at byte offset {offset} (line {line})")]
    InvalidUtf8 {
        path: String,
        offset: usize,
        line: usize,
    },

    /// One line of a JSONL file is not a usable record. `line` counts from 1.
    #[error("{path}:{line}: {reason}")]
    Jsonl {
        path: String,
        line: usize,
        reason: String,
    },

    /// A record parsed, but could not be turned into a training example (its chat template
    /// failed or is inconsistent with itself). `line` counts from 1.
    #[error("{path}:{line}: {source}")]
    Record {
        path: String,
        line: usize,
        #[source]
        source: Box<CorpusError>,
    },

    /// A file of a kind this loader does not read.
    #[error("{path}: unsupported file type (expected `.txt` plain text or `.jsonl` records)")]
    UnsupportedFile { path: String },

    /// The chat template does not compile, fails to render, or renders a conversation
    /// inconsistently (its rendering of a prompt is not a prefix of the whole conversation).
    #[error("chat template: {reason}")]
    Template { reason: String },

    /// The tokenizer failed, or lacks a token the data needs.
    #[error("tokenizer: {reason}")]
    Tokenizer { reason: String },
}

/// What can go wrong opening or reading a pretrained checkpoint. Every message names the
/// file, tensor or field at fault.
#[derive(Debug, Error)]
pub enum CheckpointError {
    /// A checkpoint file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },

    /// The file is not a well-formed checkpoint of its kind.
    #[error("{path}: {reason}")]
    Format { path: String, reason: String },

    /// A field of the checkpoint's configuration is missing or unusable.
    #[error("{path}: field `{field}`: {reason}")]
    Config {
        path: String,
        field: String,
        reason: String,
    },

    /// The model needs a tensor the checkpoint does not hold.
    #[error("checkpoint {path} has no tensor `{name}`")]
    MissingTensor { path: String, name: String },

    /// A tensor has another shape than the configuration implies.
    #[error("tensor `{name}` has shape {found:?}, the model expects {expected:?}")]
    TensorShape {
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a data type or quantisation this release cannot read.
    #[error(
        "tensor `{name}` is stored as {dtype}, which is not supported (supported: {supported})"
    )]
    UnsupportedDtype {
        name: String,
        dtype: String,
        supported: &'static str,
    },

    /// The tokenizer could not be built or read.
    #[error("tokenizer of {path}: {reason}")]
    Tokenizer { path: String, reason: String },

    /// The checkpoint is not the one the federation plan pins.
    #[error(
        "checkpoint {path} has fingerprint {found}, but the plan pins model.weights_sha256 = {expected}"
    )]
    Fingerprint {
        path: String,
        expected: String,
        found: String,
    },

    /// The plan pins a pretrained base, but this lab was given none.
    #[error(
        "the plan pins a pretrained base model (model.weights_sha256 = {expected}); give this lab that checkpoint (e.g. `--model PATH`)"
    )]
    Required { expected: String },

    /// A checkpoint was given, but the plan trains a seeded random base.
    #[error(
        "a base checkpoint ({path}) was given, but the plan has no model.weights_sha256: it trains a seeded random base, so every lab would start from different weights"
    )]
    NotPinned { path: String },

    /// The checkpoint's architecture differs from the plan's `[model]` section.
    #[error(
        "checkpoint {path} does not match the plan: model.{field} is {plan} in the plan, {checkpoint} in the checkpoint"
    )]
    PlanMismatch {
        path: String,
        field: &'static str,
        plan: String,
        checkpoint: String,
    },
}
