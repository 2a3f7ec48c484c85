//! Mekong's wire format, generated once from `proto/mekong/v1/*.proto` and shared by the
//! participant runtime and the aggregator, so the two can never disagree on a field.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Package `mekong.v1`.
pub mod v1 {
    tonic::include_proto!("mekong.v1");
}

/// Largest gRPC message either side accepts: adapters of this release travel in one message
/// (chunked streaming arrives with large-adapter support).
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

pub mod convert;
pub mod policy;
pub mod secure;
pub mod tls;
