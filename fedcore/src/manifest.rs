//! Layout manifests: the names, shapes and offsets that turn a set of tensors into one flat
//! f32 vector and back. Both sides hash the manifest, and an update whose manifest hash differs
//! from the round's is refused before a single value is read.

use sha2::{Digest, Sha256};

/// One tensor's place in a flat vector.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSlot {
    /// e.g. `model.layers.0.self_attn.q_proj.lora_B`.
    pub name: String,
    pub shape: [usize; 2],
    /// Index of the tensor's first value in the flat vector.
    pub offset: usize,
}

impl TensorSlot {
    /// A slot whose offset is assigned when it is placed in a manifest.
    pub fn new(name: String, shape: [usize; 2]) -> Self {
        TensorSlot {
            name,
            shape,
            offset: 0,
        }
    }

    /// Number of values.
    pub fn numel(&self) -> usize {
        self.shape[0] * self.shape[1]
    }
}

/// An ordered list of tensor slots with contiguous offsets and a stable hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutManifest {
    slots: Vec<TensorSlot>,
    len: usize,
    hash: [u8; 32],
}

impl LayoutManifest {
    /// Lays the slots out back to back, in the given order.
    pub fn new(mut slots: Vec<TensorSlot>) -> Self {
        let mut offset = 0;
        for s in &mut slots {
            s.offset = offset;
            offset += s.numel();
        }
        let hash = hash_slots(&slots);
        LayoutManifest {
            slots,
            len: offset,
            hash,
        }
    }

    pub fn slots(&self) -> &[TensorSlot] {
        &self.slots
    }

    /// Total number of values.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when the manifest lays out no values.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// SHA-256 over a versioned, length-prefixed encoding of every name and shape in order.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
    }

    /// The hash as lowercase hex (what travels on the wire).
    pub fn hash_hex(&self) -> String {
        hex::encode(self.hash)
    }

    /// First 12 hex digits, for messages.
    pub fn short_hash(&self) -> String {
        self.hash_hex()[..12].to_string()
    }
}

fn hash_slots(slots: &[TensorSlot]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"mekong/layout/v1");
    h.update((slots.len() as u64).to_le_bytes());
    for s in slots {
        h.update((s.name.len() as u64).to_le_bytes());
        h.update(s.name.as_bytes());
        h.update((s.shape[0] as u64).to_le_bytes());
        h.update((s.shape[1] as u64).to_le_bytes());
    }
    h.finalize().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slots() -> Vec<TensorSlot> {
        vec![
            TensorSlot::new("a.lora_A".into(), [2, 3]),
            TensorSlot::new("a.lora_B".into(), [4, 2]),
        ]
    }

    #[test]
    fn offsets_are_contiguous() {
        let m = LayoutManifest::new(slots());
        assert_eq!(m.slots()[0].offset, 0);
        assert_eq!(m.slots()[1].offset, 6);
        assert_eq!(m.len(), 14);
    }

    #[test]
    fn equal_layouts_hash_equal_and_different_layouts_differ() {
        let a = LayoutManifest::new(slots());
        let b = LayoutManifest::new(slots());
        assert_eq!(a.hash(), b.hash());

        let mut renamed = slots();
        renamed[0].name = "b.lora_A".into();
        assert_ne!(a.hash(), LayoutManifest::new(renamed).hash());

        let mut reshaped = slots();
        reshaped[0].shape = [3, 2];
        assert_ne!(a.hash(), LayoutManifest::new(reshaped).hash());

        let mut reordered = slots();
        reordered.reverse();
        assert_ne!(a.hash(), LayoutManifest::new(reordered).hash());
    }
}
