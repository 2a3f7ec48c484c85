//! Conversions between wire messages and fedcore types, in one place for both sides.

use fedcore::LoraAdapter;
use fedcore::update::{UpdateError, check_values, decode_f32_le, encode_f32_le};
use thiserror::Error;

use crate::v1 as pb;

/// Why a received adapter payload was refused.
#[derive(Debug, Error)]
pub enum PayloadError {
    #[error("adapter layout {got} does not match the plan's layout {expected}")]
    Layout { got: String, expected: String },
    #[error("adapter values: {0}")]
    Values(#[from] UpdateError),
    #[error("adapter content hash {computed} does not match the announced {announced}")]
    ContentHash { computed: String, announced: String },
    #[error("the message carries no adapter")]
    Missing,
}

/// Flattens an adapter (every A then B, canonical order) into its wire form.
pub fn adapter_payload(adapter: &LoraAdapter, content_hash: &str) -> pb::AdapterPayload {
    let manifest = adapter.full_manifest();
    let values = adapter
        .flatten(&manifest)
        .expect("an adapter flattens by its own manifest");
    pb::AdapterPayload {
        layout_hash: manifest.hash_hex(),
        content_hash: content_hash.to_string(),
        values_f32_le: encode_f32_le(&values),
    }
}

/// Rebuilds an adapter from its wire form, using `template` (the plan's initial adapter) for
/// names and shapes; checks the layout hash, every value, and the content hash.
pub fn decode_adapter_payload(
    payload: Option<&pb::AdapterPayload>,
    template: &LoraAdapter,
) -> Result<LoraAdapter, PayloadError> {
    let payload = payload.ok_or(PayloadError::Missing)?;
    let manifest = template.full_manifest();
    if payload.layout_hash != manifest.hash_hex() {
        return Err(PayloadError::Layout {
            got: payload.layout_hash.clone(),
            expected: manifest.hash_hex(),
        });
    }
    let values = decode_f32_le(&payload.values_f32_le)?;
    check_values(&values, &manifest)?;
    let mut adapter = template.clone();
    adapter
        .unflatten(&manifest, &values)
        .expect("length and layout were checked");
    let computed = adapter.content_hash();
    if computed != payload.content_hash {
        return Err(PayloadError::ContentHash {
            computed,
            announced: payload.content_hash.clone(),
        });
    }
    Ok(adapter)
}
