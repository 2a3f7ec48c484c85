//! Mekong's wire format, generated once from `proto/mekong/v1/*.proto` and shared by the
//! participant runtime and the aggregator, so the two can never disagree on a field.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Package `mekong.v1`.
pub mod v1 {
    tonic::include_proto!("mekong.v1");
}

/// Largest gRPC message either side accepts. Adapters larger than the aggregator's inline
/// limit travel by reference (`DownloadAdapter`, in [`ADAPTER_CHUNK_BYTES`] chunks) and
/// masked updates in 1 MiB chunks, whatever the adapter's size; only a plaintext update
/// (secure aggregation explicitly off) still travels in one message.
pub const MAX_MESSAGE_BYTES: usize = 256 * 1024 * 1024;

/// Bytes of adapter values per `DownloadAdapter` chunk (256 KiB): small, so that a hundred
/// labs downloading at once hold little in flight on the aggregator.
pub const ADAPTER_CHUNK_BYTES: usize = 256 * 1024;

/// Default largest adapter (values, in bytes) the aggregator puts inline in a task (4 MiB);
/// larger ones are sent by reference and downloaded in chunks.
pub const DEFAULT_INLINE_ADAPTER_BYTES: u64 = 4 * 1024 * 1024;

pub mod convert;
pub mod enroll;
pub mod policy;
pub mod secure;
pub mod tls;
