//! `fedclient enroll`: a lab makes its own secrets and the one public file it sends the
//! center.
//!
//! In the enrollment directory it writes, never overwriting anything:
//!
//! ```text
//! DIR/                    (created 0700 if missing)
//!   identity.key          the Ed25519 identity seed (0600; `fedclient keygen`'s format)
//!   client.key            the TLS private key (0600; ECDSA P-256, rcgen's default)
//!   enroll-request.toml   public: name, language, identity public key, a CSR for the TLS
//!                         key, and the identity's signature over them (`mekong_proto::enroll`)
//! ```
//!
//! Only the request leaves the lab. The center answers with a kit (`participant.toml`,
//! `ca.pem`, `client.pem`) whose `participant.toml` names `client.key` and `identity.key`
//! relative to itself, so the lab puts the kit's files in this same directory
//! ([`install_kit`] does so, refusing a kit whose certificate is not for this lab's key).
//! The center never holds either secret: it could otherwise pose as the lab, or unmask the
//! lab's secure-aggregation update.

use std::path::{Path, PathBuf};

use mekong_proto::enroll::{
    EnrollRequest, IDENTITY_FILE, REQUEST_FILE, RequestProblem, TLS_KEY_FILE, valid_language,
};
use mekong_proto::tls::{KIT_FILE, ParticipantKit, TlsError};
use thiserror::Error;
use zeroize::Zeroizing;

use crate::identity::{IdentityError, IdentitySeed, write_private};

/// The files a kit from `fedaggregator provision` holds: all public.
pub const KIT_FILES: [&str; 3] = [KIT_FILE, "ca.pem", "client.pem"];

/// Why enrolling (or installing a kit) failed.
#[derive(Debug, Error)]
pub enum EnrollError {
    #[error("invalid name {0:?}: it must be 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("invalid language {0:?}: it must be a tag of 1 to 35 letters, digits and '-'")]
    Language(String),
    #[error(
        "{path} already exists; refusing to overwrite a lab's keys or request (enroll into a new directory, or delete it if you mean to start over)"
    )]
    Exists { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(transparent)]
    Identity(#[from] IdentityError),
    #[error("making the TLS key or its certificate signing request: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("the request just made does not check: {0}")]
    Request(#[from] RequestProblem),
    #[error("{kit}: {source}")]
    Kit {
        kit: String,
        #[source]
        source: TlsError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> EnrollError + '_ {
    move |source| EnrollError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `fedclient enroll` is asked for.
#[derive(Debug, Clone)]
pub struct EnrollOptions {
    /// The lab's participant name.
    pub name: String,
    /// Language label of its data.
    pub language: String,
    /// The enrollment directory (created 0700 if missing).
    pub out: PathBuf,
}

/// What enrolling wrote.
#[derive(Debug, Clone)]
pub struct Enrolled {
    pub dir: PathBuf,
    /// The identity seed (private, 0600).
    pub identity: PathBuf,
    /// The TLS private key (private, 0600).
    pub tls_key: PathBuf,
    /// The request to send the center (public).
    pub request: PathBuf,
    /// Hex of the identity public key (what the roster will list).
    pub identity_public_key: String,
}

/// Creates the lab's identity, TLS key and enrollment request in `options.out`. Nothing is
/// written unless none of the three files exists; the request is written last, so its
/// presence means the lab's keys are there.
pub fn enroll(options: &EnrollOptions) -> Result<Enrolled, EnrollError> {
    if !fedcore::roster::valid_name(&options.name) {
        return Err(EnrollError::Name(options.name.clone()));
    }
    if !valid_language(&options.language) {
        return Err(EnrollError::Language(options.language.clone()));
    }
    let dir = &options.out;
    let identity_path = dir.join(IDENTITY_FILE);
    let key_path = dir.join(TLS_KEY_FILE);
    let request_path = dir.join(REQUEST_FILE);
    if let Some(existing) = [&identity_path, &key_path, &request_path]
        .into_iter()
        .find(|p| p.exists())
    {
        return Err(EnrollError::Exists {
            path: existing.display().to_string(),
        });
    }

    // Everything is made in memory first, then written.
    let identity = IdentitySeed::random().map_err(io_err(&identity_path))?;
    let tls_key = rcgen::KeyPair::generate()?;
    let mut params = rcgen::CertificateParams::default();
    // Informative only: the center names the certificate itself and ignores the CSR's
    // subject (the name it signs is the request's, bound by the identity signature).
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, options.name.clone());
    let csr = params.serialize_request(&tls_key)?.pem()?;
    let request =
        EnrollRequest::sign(&identity.identity(), &options.name, &options.language, &csr)?;
    request.check()?;

    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(dir).map_err(io_err(dir))?;
    let key_pem = Zeroizing::new(tls_key.serialize_pem());
    write_private(&key_path, key_pem.as_bytes()).map_err(|e| exists_or_io(&key_path, e))?;
    identity.save(&identity_path)?;
    write_public(&request_path, request.to_toml().as_bytes())?;
    Ok(Enrolled {
        dir: dir.clone(),
        identity: identity_path,
        tls_key: key_path,
        request: request_path,
        identity_public_key: identity.public_key_hex(),
    })
}

fn exists_or_io(path: &Path, e: std::io::Error) -> EnrollError {
    if e.kind() == std::io::ErrorKind::AlreadyExists {
        EnrollError::Exists {
            path: path.display().to_string(),
        }
    } else {
        io_err(path)(e)
    }
}

/// Writes a new public file (0644), never replacing one.
fn write_public(path: &Path, bytes: &[u8]) -> Result<(), EnrollError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o644);
    }
    let mut f = options.open(path).map_err(|e| exists_or_io(path, e))?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Copies a kit's files (`participant.toml`, `ca.pem`, `client.pem`) from `kit_dir` into
/// the lab's enrollment directory `lab_dir`, never overwriting. Checks first, writing
/// nothing if it fails, that the kit works with the lab's own keys there (its certificate
/// is the CA's, names the lab and is for the lab's TLS key). Returns the installed
/// `participant.toml`.
pub fn install_kit(kit_dir: &Path, lab_dir: &Path) -> Result<PathBuf, EnrollError> {
    if let Some(existing) = KIT_FILES
        .iter()
        .map(|f| lab_dir.join(f))
        .find(|p| p.exists())
    {
        return Err(EnrollError::Exists {
            path: existing.display().to_string(),
        });
    }
    let source = kit_dir.join(KIT_FILE);
    let kit_error = |kit: &Path, source| EnrollError::Kit {
        kit: kit.display().to_string(),
        source,
    };
    // The kit as it will read once installed: its keys (relative names) in the lab's
    // directory, its certificates still where they are.
    let mut kit = ParticipantKit::load(&source).map_err(|e| kit_error(&source, e))?;
    for key in [&mut kit.private_key, &mut kit.identity] {
        if let Ok(relative) = key.strip_prefix(kit_dir) {
            *key = lab_dir.join(relative);
        }
    }
    kit.client_config().map_err(|e| kit_error(&source, e))?;
    for file in KIT_FILES {
        let from = kit_dir.join(file);
        let bytes = std::fs::read(&from).map_err(io_err(&from))?;
        write_public(&lab_dir.join(file), &bytes)?;
    }
    let installed = lab_dir.join(KIT_FILE);
    ParticipantKit::load(&installed)
        .and_then(|k| k.client_config())
        .map_err(|e| kit_error(&installed, e))?;
    Ok(installed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enroll_writes_private_keys_and_a_request_that_checks() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lab");
        let options = EnrollOptions {
            name: "lab-lo".into(),
            language: "lo".into(),
            out: out.clone(),
        };
        let made = enroll(&options).unwrap();
        let checked = EnrollRequest::load(&made.request).unwrap();
        assert_eq!(checked.name, "lab-lo");
        assert_eq!(checked.language, "lo");
        assert_eq!(checked.identity_hex(), made.identity_public_key);
        let seed = IdentitySeed::load(&made.identity).unwrap();
        assert_eq!(seed.public_key_hex(), made.identity_public_key);
        mekong_proto::tls::load_key(&made.tls_key).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode(&made.identity), 0o600);
            assert_eq!(mode(&made.tls_key), 0o600);
            assert_eq!(mode(&made.request), 0o644);
            assert_eq!(mode(&out), 0o700);
        }
        // The request holds no secret.
        let text = std::fs::read_to_string(&made.request).unwrap();
        assert!(!text.contains("PRIVATE KEY"));
        assert!(!text.contains(&hex::encode(*seed.bytes())));

        // Never overwritten: a second enroll into the same directory is refused, and the
        // keys are untouched.
        let before = std::fs::read(&made.identity).unwrap();
        let err = enroll(&options).unwrap_err();
        assert!(matches!(err, EnrollError::Exists { .. }), "{err}");
        assert!(err.to_string().contains("identity.key"), "{err}");
        assert_eq!(std::fs::read(&made.identity).unwrap(), before);
    }

    #[test]
    fn bad_names_and_languages_are_refused_before_anything_is_written() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("lab");
        let err = enroll(&EnrollOptions {
            name: "lab lo".into(),
            language: "lo".into(),
            out: out.clone(),
        })
        .unwrap_err();
        assert!(matches!(err, EnrollError::Name(_)), "{err}");
        let err = enroll(&EnrollOptions {
            name: "lab-lo".into(),
            language: "l o".into(),
            out: out.clone(),
        })
        .unwrap_err();
        assert!(matches!(err, EnrollError::Language(_)), "{err}");
        assert!(!out.exists());
    }
}
