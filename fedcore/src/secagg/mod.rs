//! Secure-aggregation primitives, each a pure function of its inputs.
//!
//! - [`crypto`]: X25519 agreement, HKDF-SHA256 derivations, ChaCha20-Poly1305 share
//!   encryption and Ed25519 stage signatures, all bound to session and round.
//! - [`mask`]: AES-128-CTR mask streams from 16-byte seeds, specified byte for byte.
//! - [`shamir`]: constant-time Shamir sharing over GF(2^8) for key and seed shares.
//! - [`quantize`]: clip, scale and unbiased stochastic rounding into Z_{2^32}, with the
//!   wrap-around check and the error bound.
//!
//! - [`participant`] and [`server`]: the two sides of one round as sans-IO state machines
//!   (advertise keys → share keys → masked input → consistency check → unmask; Bonawitz et
//!   al. 2017, actively secure variant), exchanging the plain-data [`messages`]; [`protocol`]
//!   holds their shared parameters, errors and signed bytes.
//! - [`graph`]: who deals with whom — the complete graph, or a pseudo-random k-regular
//!   Harary graph drawn per round (SecAgg+, Bell et al. 2020), specified so that any
//!   implementation reproduces it.
//! - [`simulation`]: a whole round in one process, for tests, studies and benchmarks.
//! - [`spec`]: the plan's `[secure_aggregation]` section and the weighted encoding of an
//!   update into the words that are masked.
//!
//! The federation runs these through [`crate::round`]: the coordinator drives a
//! [`server::ServerSession`] per attempt, and [`crate::round::SecureUpload`] drives a
//! [`participant::ParticipantSession`] at each lab.

pub mod crypto;
pub mod graph;
pub mod mask;
pub mod messages;
pub mod participant;
pub mod protocol;
pub mod quantize;
pub mod server;
pub mod shamir;
pub mod simulation;
pub mod spec;

#[cfg(test)]
mod group_tests;
#[cfg(test)]
mod split_view_tests;
#[cfg(test)]
mod tests;
