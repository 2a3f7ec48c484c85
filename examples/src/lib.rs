//! Mekong's pilot: a whole federation of national-language labs on one machine.
//!
//! The pilot starts a real aggregator on loopback and one real participant per language,
//! each holding only its own language's text, runs the federation over gRPC, and compares
//! held-out loss per language before training, after federated training, and after
//! local-only training with the same number of steps.

pub mod canary;
pub mod corpus;
pub mod experiment;
pub mod layout;
pub mod pilot;
pub mod table;
