//! A lab's local data: text and records in, token ids with loss masks out. Nothing here
//! leaves the lab.
//!
//! - [`tokenizer`]: [`TextTokenizer`]; [`ByteTokenizer`] (the pilot's); [`HfTokenizer`], a
//!   pretrained model's own tokenizer, with characters-per-token for bits per character.
//! - [`text`]: plain-text files (strict UTF-8, NFC) and the held-out split by trailing lines.
//! - [`jsonl`]: JSONL records (`text`, `prompt` + `response`, or chat `messages`), with
//!   errors that name the file and line.
//! - [`chat`]: rendering conversations with the model's Jinja chat template, and which part
//!   of them is trained.
//! - [`examples`]: [`Example`], the unit of training: tokens and a per-token loss mask.
//! - [`packing`]: [`pack`]ing examples into fixed-length rows with positions and segments.
//! - [`heldout`]: evaluation text ([`HeldOut`]) and the bits-per-character probe.
//! - [`dataset`]: [`LocalDataset`], a lab's directory or files in one language.
//! - [`corpus`]: [`LocalCorpus`], one text as one token stream (the byte-level pilot).
//!
//! Everything is normalised to Unicode NFC on load.

pub mod chat;
pub mod corpus;
pub mod dataset;
pub mod examples;
pub mod heldout;
pub mod jsonl;
pub mod packing;
pub mod text;
pub mod tokenizer;

pub use chat::{ChatTemplate, Message, Role, Segment};
pub use corpus::LocalCorpus;
pub use dataset::{FileKind, LocalDataset, data_files};
pub use examples::{Example, ExampleBuilder};
pub use heldout::{BPC_PROBE_CHARS, BPC_PROBE_TOKENS, BpcProbe, HeldOut, bpc_probe};
pub use jsonl::{JsonlRecord, Record};
pub use packing::{PackedRow, pack};
pub use tokenizer::{ByteTokenizer, HfTokenizer, TextTokenizer};
