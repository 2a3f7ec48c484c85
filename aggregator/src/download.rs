//! The global adapter on the wire: encoded once per content hash, put inline in small task
//! answers, and otherwise served by reference through `DownloadAdapter` in chunks, each
//! with its SHA-256, from any offset (so a broken download resumes where it stopped).
//!
//! Encoding once matters at scale: every lab's `FetchTask` used to flatten and encode the
//! whole adapter again, and hold its own copy until sent. Now a task answer for a large
//! adapter is a few hundred bytes, and all downloads read the one shared encoding.

use std::sync::{Arc, Mutex};

use fedcore::strategy::GlobalModel;
use fedcore::update::encode_f32_le;
use mekong_proto::ADAPTER_CHUNK_BYTES;
use mekong_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tonic::Status;

/// One adapter's wire form: hashes and the little-endian f32 values.
#[derive(Debug)]
pub struct EncodedAdapter {
    pub content_hash: String,
    pub layout_hash: String,
    pub values: Vec<u8>,
}

/// The encoding of the adapter most recently asked for (the current global adapter).
#[derive(Debug)]
pub struct AdapterCache {
    current: Mutex<Option<Arc<EncodedAdapter>>>,
    /// Largest adapter (bytes of values) put inline in a task answer.
    inline_max_bytes: u64,
}

impl AdapterCache {
    pub fn new(inline_max_bytes: u64) -> Self {
        AdapterCache {
            current: Mutex::new(None),
            inline_max_bytes,
        }
    }

    /// The wire form of `global` (its adapter, and FedEx-LoRA's dense corrections after it),
    /// whose content hash is `hash`: encoded on first use.
    pub fn encoded(&self, global: &GlobalModel, hash: &str) -> Arc<EncodedAdapter> {
        let mut current = self.current.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = current.as_ref()
            && e.content_hash == hash
        {
            return e.clone();
        }
        let encoded = Arc::new(EncodedAdapter {
            content_hash: hash.to_string(),
            layout_hash: global.manifest().hash_hex(),
            values: encode_f32_le(&global.flatten()),
        });
        *current = Some(encoded.clone());
        encoded
    }

    /// What a task answer carries: the values inline up to the limit, else a reference.
    pub fn payload(&self, global: &GlobalModel, hash: &str) -> pb::AdapterPayload {
        let e = self.encoded(global, hash);
        let inline = e.values.len() as u64 <= self.inline_max_bytes;
        pb::AdapterPayload {
            layout_hash: e.layout_hash.clone(),
            content_hash: e.content_hash.clone(),
            values_f32_le: if inline { e.values.clone() } else { Vec::new() },
            values_bytes: e.values.len() as u64,
        }
    }
}

/// The chunks of `adapter` from byte `offset` on, computed as the stream is read.
pub fn chunks(
    adapter: Arc<EncodedAdapter>,
    offset: u64,
) -> Result<
    impl tokio_stream::Stream<Item = Result<pb::AdapterChunk, Status>> + Send + 'static,
    Status,
> {
    let len = adapter.values.len() as u64;
    if !offset.is_multiple_of(4) || offset > len {
        return Err(Status::invalid_argument(format!(
            "download offset {offset}: expected a multiple of 4 no larger than the adapter's {len} bytes"
        )));
    }
    let starts = (offset as usize..adapter.values.len()).step_by(ADAPTER_CHUNK_BYTES);
    Ok(tokio_stream::iter(starts.map(move |start| {
        let end = (start + ADAPTER_CHUNK_BYTES).min(adapter.values.len());
        let values = adapter.values[start..end].to_vec();
        Ok(pb::AdapterChunk {
            offset: start as u64,
            sha256: Sha256::digest(&values).to_vec(),
            values_f32_le: values,
        })
    })))
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio_stream::StreamExt;

    fn adapter() -> GlobalModel {
        crate::AggregatorConfig::example().plan.initial_model()
    }

    #[tokio::test]
    async fn chunks_cover_the_values_from_any_offset_with_their_checksums() {
        let cache = AdapterCache::new(0);
        let a = adapter();
        let hash = a.content_hash();
        let e = cache.encoded(&a, &hash);
        assert!(Arc::ptr_eq(&e, &cache.encoded(&a, &hash)), "encoded once");
        let p = cache.payload(&a, &hash);
        assert!(p.values_f32_le.is_empty());
        assert_eq!(p.values_bytes, e.values.len() as u64);
        for offset in [
            0,
            4,
            e.values.len() as u64 / 2 / 4 * 4,
            e.values.len() as u64,
        ] {
            let got: Vec<_> = chunks(e.clone(), offset).unwrap().collect().await;
            let mut bytes = Vec::new();
            for c in got {
                let c = c.unwrap();
                assert_eq!(c.offset, offset + bytes.len() as u64);
                assert!(c.values_f32_le.len() <= ADAPTER_CHUNK_BYTES);
                assert_eq!(c.sha256, Sha256::digest(&c.values_f32_le).to_vec());
                bytes.extend(c.values_f32_le);
            }
            assert_eq!(bytes, e.values[offset as usize..]);
        }
        for bad in [2, e.values.len() as u64 + 4] {
            let err = chunks(e.clone(), bad).err().unwrap();
            assert!(err.message().contains(&format!("offset {bad}")), "{err}");
        }
        let inline = AdapterCache::new(u64::MAX).payload(&a, &hash);
        assert_eq!(inline.values_f32_le, e.values);
    }
}
