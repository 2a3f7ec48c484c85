//! The fingerprint a federation plan pins a base checkpoint by (`model.weights_sha256`).
//!
//! It is a SHA-256 over the weight files as they lie on disk, so two labs agree on it exactly
//! when they hold the same bytes, whatever the format: `SHA-256("mekong-checkpoint-v1\n" ‖
//! for each weight file in load order: file name ‖ "\n" ‖ hex SHA-256 of the file ‖ "\n")`.
//! Configuration and tokenizer files are not part of it (the plan carries the architecture,
//! and tokenizers do not change the weights a lab trains against).

use std::io::Read;
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::CheckpointError;

/// Fingerprint of a checkpoint made of `files`, in load order.
pub fn checkpoint_fingerprint(files: &[&Path]) -> Result<String, CheckpointError> {
    let mut outer = Sha256::new();
    outer.update(b"mekong-checkpoint-v1\n");
    for path in files {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        outer.update(name.as_bytes());
        outer.update(b"\n");
        outer.update(hex::encode(file_sha256(path)?).as_bytes());
        outer.update(b"\n");
    }
    Ok(hex::encode(outer.finalize()))
}

/// SHA-256 of one file, streamed in 1 MiB reads.
pub fn file_sha256(path: &Path) -> Result<[u8; 32], CheckpointError> {
    let io = |source| CheckpointError::Io {
        path: path.display().to_string(),
        source,
    };
    let mut file = std::fs::File::open(path).map_err(io)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok(hasher.finalize().into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depends_on_content_and_order() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.safetensors");
        let b = dir.path().join("b.safetensors");
        std::fs::write(&a, b"alpha").unwrap();
        std::fs::write(&b, b"beta").unwrap();
        let ab = checkpoint_fingerprint(&[&a, &b]).unwrap();
        assert_eq!(ab.len(), 64);
        assert_eq!(ab, checkpoint_fingerprint(&[&a, &b]).unwrap());
        assert_ne!(ab, checkpoint_fingerprint(&[&b, &a]).unwrap());
        std::fs::write(&b, b"betA").unwrap();
        assert_ne!(ab, checkpoint_fingerprint(&[&a, &b]).unwrap());
        let err = checkpoint_fingerprint(&[&dir.path().join("missing")]).unwrap_err();
        assert!(err.to_string().contains("missing"), "{err}");
    }
}
