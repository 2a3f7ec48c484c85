//! The single seam where a trained update becomes bytes for the aggregator.
//!
//! This release sends the B matrices as plaintext little-endian f32. Secure aggregation
//! replaces this module's output with masked vectors; no other code in the client builds an
//! update payload, so that swap changes one place.

use fedcore::update::encode_f32_le;
use mekong_proto::v1 as pb;

/// Encodes the upload vector (laid out by the round's upload manifest) for `SubmitUpdate`.
pub fn encode(values: &[f32]) -> pb::submit_update_request::Payload {
    pb::submit_update_request::Payload::Plaintext(pb::PlaintextUpdate {
        values_f32_le: encode_f32_le(values),
    })
}
