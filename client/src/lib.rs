//! # fedclient
//!
//! What runs at a lab: a Llama-style decoder with FFA-LoRA adapters in burn, the lab's local
//! text, local training and held-out evaluation.
//!
//! - [`device`]: picking flex (CPU) or wgpu (GPU) at run time.
//! - [`checkpoint`]: pretrained base models (Hugging Face safetensors, GGUF) and tokenizers.
//! - [`data`]: a lab's text and records: tokenizers, chat templates, loss masks, packing,
//!   held-out text.
//! - [`model`]: the decoder and its adapters.
//! - [`train`]: one round of local training on LoRA B.
//! - [`eval`]: held-out loss, perplexity, bits per character.
//! - [`participant`]: the runtime that joins a federation and trains every round.
//! - [`round_clock`]: where a lab's time goes in each round (train, evaluate, download,
//!   secure aggregation, upload, waiting).
//! - [`progress`]: progress bars and per-round summaries for `fedclient`.
//! - [`upload`]: the single seam where an update is encoded for the wire.
//! - [`download`]: receiving a global adapter (inline, or in resumable checksummed chunks).
//! - [`local_train`]: fine-tuning on local data alone (`fedclient train`).
//! - [`identity`]: the lab's long-term Ed25519 identity file.
//! - [`enroll`]: the lab's own keys and its public enrollment request (`fedclient enroll`),
//!   and installing the kit the center returns.
//! - [`error`]: typed errors.

pub mod checkpoint;
pub mod data;
pub mod device;
pub mod download;
pub mod enroll;
pub mod error;
pub mod eval;
pub mod identity;
pub mod local_train;
pub mod model;
pub mod participant;
pub mod progress;
pub mod reveal_record;
pub mod round_clock;
pub mod train;
pub mod upload;
