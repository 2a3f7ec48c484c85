//! A lab's long-term Ed25519 identity: generated once at the lab (`fedclient enroll`, or
//! `fedclient keygen` for a federation without TLS), kept in a file only the lab can read,
//! and listed by public key in the aggregator's roster. Every secure aggregation stage
//! message is signed with it. The center never sees the secret: with it, the center could
//! sign as the lab and unmask its update.

use std::path::Path;

use fedcore::secagg::crypto::Identity;
use rand::TryRngCore;
use thiserror::Error;
use zeroize::Zeroizing;

/// Why an identity file could not be made or read.
#[derive(Debug, Error)]
pub enum IdentityError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "{path} already exists; refusing to overwrite an identity (delete it first if you mean to)"
    )]
    Exists { path: String },
    #[error("{path} is not an identity file: expected 64 hex characters (a 32-byte Ed25519 seed)")]
    Malformed { path: String },
}

/// A lab's identity seed, wiped from memory when dropped.
pub struct IdentitySeed(Zeroizing<[u8; 32]>);

impl std::fmt::Debug for IdentitySeed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IdentitySeed(public {})", self.public_key_hex())
    }
}

impl IdentitySeed {
    pub fn bytes(&self) -> Zeroizing<[u8; 32]> {
        self.0.clone()
    }

    /// Hex of the public key, as it goes into the aggregator's roster.
    pub fn public_key_hex(&self) -> String {
        hex::encode(Identity::from_seed(*self.0).public())
    }

    /// Draws a fresh seed from the operating system's randomness and writes it to `path`
    /// (readable by its owner only), refusing to overwrite an existing file.
    pub fn generate(path: &Path) -> Result<Self, IdentityError> {
        if path.exists() {
            return Err(IdentityError::Exists {
                path: path.display().to_string(),
            });
        }
        let seed = Self::random().map_err(|source| IdentityError::Io {
            path: path.display().to_string(),
            source,
        })?;
        seed.save(path)?;
        Ok(seed)
    }

    /// A fresh seed from the operating system's randomness, in memory only.
    pub fn random() -> std::io::Result<Self> {
        let mut seed = Zeroizing::new([0u8; 32]);
        rand::rngs::OsRng
            .try_fill_bytes(seed.as_mut())
            .map_err(std::io::Error::other)?;
        Ok(IdentitySeed(seed))
    }

    /// Writes the seed to `path` (64 hex characters and a newline, readable by its owner
    /// only), refusing to overwrite an existing file.
    pub fn save(&self, path: &Path) -> Result<(), IdentityError> {
        let shown = path.display().to_string();
        let text = Zeroizing::new(format!("{}\n", hex::encode(self.0.as_ref())));
        write_private(path, text.as_bytes()).map_err(|source| {
            if source.kind() == std::io::ErrorKind::AlreadyExists {
                IdentityError::Exists { path: shown }
            } else {
                IdentityError::Io {
                    path: shown,
                    source,
                }
            }
        })
    }

    /// The signing identity of this seed.
    pub fn identity(&self) -> Identity {
        Identity::from_seed(*self.0)
    }

    /// Reads an identity file.
    pub fn load(path: &Path) -> Result<Self, IdentityError> {
        let shown = path.display().to_string();
        let text =
            Zeroizing::new(
                std::fs::read_to_string(path).map_err(|source| IdentityError::Io {
                    path: shown.clone(),
                    source,
                })?,
            );
        let bytes =
            Zeroizing::new(
                hex::decode(text.trim()).map_err(|_| IdentityError::Malformed {
                    path: shown.clone(),
                })?,
            );
        let seed: [u8; 32] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| IdentityError::Malformed { path: shown })?;
        Ok(IdentitySeed(Zeroizing::new(seed)))
    }

    /// An identity from known bytes (simulations and tests).
    pub fn from_bytes(seed: [u8; 32]) -> Self {
        IdentitySeed(Zeroizing::new(seed))
    }
}

/// Creates `path` readable by its owner only (0600) and writes `bytes`, refusing to
/// overwrite an existing file.
#[cfg(unix)]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(not(unix))]
pub(crate) fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(path)?;
    f.write_all(bytes)?;
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_identity_loads_back_and_is_private() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lab.key");
        let made = IdentitySeed::generate(&path).unwrap();
        let loaded = IdentitySeed::load(&path).unwrap();
        assert_eq!(made.public_key_hex(), loaded.public_key_hex());
        assert!(matches!(
            IdentitySeed::generate(&path),
            Err(IdentityError::Exists { .. })
        ));
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        std::fs::write(dir.path().join("bad.key"), "not hex").unwrap();
        let err = IdentitySeed::load(&dir.path().join("bad.key")).unwrap_err();
        assert!(err.to_string().contains("64 hex characters"), "{err}");
    }
}
