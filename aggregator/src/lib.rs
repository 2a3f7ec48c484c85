//! # fedaggregator
//!
//! What the regional center runs: a tonic gRPC server for `mekong.v1.Federation` around
//! fedcore's round coordinator, with every round's global adapter saved in the Hugging Face
//! PEFT format.
//!
//! - [`admin`]: the operator's HTTP port (health, Prometheus metrics, status page) and
//!   `fedaggregator status`.
//! - [`config`]: the TOML configuration file, validated field by field.
//! - [`download`]: the global adapter on the wire (inline, or in resumable checksummed
//!   chunks).
//! - [`control`]: the operator's pause / resume / stop, through the state database.
//! - [`db`]: the crash-safe state in SQLite, from which a killed aggregator resumes its run.
//! - [`limits`]: the `[limits]` section: what one caller can make the aggregator hold.
//! - [`message_limits`]: the tower layer that enforces them on request bodies as bytes
//!   arrive.
//! - [`server`]: start, watch, drain and stop a running aggregator.
//! - [`service`]: the gRPC handlers.
//! - [`store`]: the on-disk history of global adapters.
//! - [`provision`]: the federation CA, server certificate, participant kits and revocation.
//! - `spool`: the undo log of a masked-input stream, so a broken stream leaves the sum clean.
//! - `held`: masked inputs whose stream broke, kept for the participant to resume.

pub mod admin;
pub mod config;
pub mod control;
pub mod db;
pub mod download;
mod held;
pub mod limits;
pub mod message_limits;
mod partial_update;
pub mod provision;
pub mod server;
pub mod service;
mod spool;
mod status_map;
pub mod store;

pub use config::AggregatorConfig;
pub use server::{RunningServer, ServeError, start};
