//! A lab's enrollment request: the one file a lab sends the center to be admitted
//! (`fedclient enroll` writes it, `fedaggregator provision` reads it).
//!
//! The lab makes its two secrets itself (its Ed25519 identity and its TLS key) and sends
//! only their public halves: its name and language, its identity public key, a PKCS#10
//! certificate signing request for its TLS key, and an identity signature over all of them.
//! So the center never holds a secret that would let it pose as a lab or unmask one lab's
//! secure-aggregation update. The CSR's own signature proves possession of the TLS key; the
//! identity signature proves possession of the identity key and binds the two keys, the
//! name and the language together, so none of them can be swapped in transit without the
//! request being refused.
//!
//! The signed message is [`proof_message`]: a domain separator, then each field as a 4-byte
//! big-endian length and its bytes, signed with [`Identity::sign`] under the tag
//! [`PROOF_TAG`] (which prefixes the secure-aggregation domain and the tag, so no protocol
//! message can be passed off as a proof, nor a proof as a protocol message).

use std::path::Path;

use fedcore::secagg::crypto::{self, Identity};
use rustls_pki_types::pem::SectionKind;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// The lab's request file, as `fedclient enroll` names it.
pub const REQUEST_FILE: &str = "enroll-request.toml";
/// The lab's Ed25519 identity seed (0600), as `fedclient enroll` names it and a kit's
/// `participant.toml` refers to it.
pub const IDENTITY_FILE: &str = "identity.key";
/// The lab's TLS private key (0600), as `fedclient enroll` names it and a kit's
/// `participant.toml` refers to it.
pub const TLS_KEY_FILE: &str = "client.key";

/// The tag the identity signs an enrollment proof under (distinct from every protocol
/// stage's tag).
pub const PROOF_TAG: &str = "enroll";
/// The first field of the signed message: what it is and its format's version.
const PROOF_DOMAIN: &[u8] = b"mekong/enroll/v1";

/// What is wrong with a request (the file is named by [`RequestError`]).
#[derive(Debug, Error)]
pub enum RequestProblem {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("not an enrollment request: {0}")]
    Parse(String),
    #[error("name {0:?} is invalid: it must be 1 to 64 letters, digits, '-', '_' or '.'")]
    Name(String),
    #[error("language {0:?} is invalid: it must be a tag of 1 to 35 letters, digits and '-'")]
    Language(String),
    #[error("identity_public_key: {0}")]
    IdentityKey(String),
    #[error("csr: {0}")]
    CsrPem(String),
    #[error("csr: the certificate signing request cannot be parsed: {0}")]
    CsrUnparsable(String),
    #[error(
        "csr: the certificate signing request's own signature is invalid: it was not signed by the key it carries"
    )]
    CsrSignature,
    #[error("signature: expected 128 hexadecimal digits (an Ed25519 signature)")]
    SignatureMalformed,
    #[error(
        "bad signature: the identity signature does not verify over the name, language, identity key and CSR (the request was changed after the lab signed it, or not signed by that identity)"
    )]
    BadSignature,
    #[error("duplicate name {name:?}: {other} enrolls it too")]
    DuplicateName { name: String, other: String },
    #[error("duplicate identity key: {other} carries the same identity public key")]
    DuplicateIdentity { other: String },
    #[error("duplicate TLS key: {other}'s CSR carries the same public key")]
    DuplicateTlsKey { other: String },
}

/// A request refused, naming its file.
#[derive(Debug, Error)]
#[error("{path}: {problem}")]
pub struct RequestError {
    pub path: String,
    pub problem: RequestProblem,
}

impl RequestError {
    pub fn new(path: &Path, problem: RequestProblem) -> Self {
        RequestError {
            path: path.display().to_string(),
            problem,
        }
    }
}

/// The request file's fields. Everything in it is public.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnrollRequest {
    /// The lab's participant name (what its certificate will name).
    pub name: String,
    /// Language label of its data.
    pub language: String,
    /// Its Ed25519 identity public key, hex (what the roster lists).
    pub identity_public_key: String,
    /// Ed25519 signature by that identity over [`proof_message`], hex.
    pub signature: String,
    /// PKCS#10 certificate signing request for its TLS key (PEM).
    pub csr: String,
}

/// A request whose fields are well formed and whose identity signature verifies. The CSR's
/// own signature is checked where it is parsed (by the CA, which needs it parsed anyway).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckedRequest {
    pub name: String,
    pub language: String,
    pub identity_public_key: [u8; 32],
    /// The CSR (DER).
    pub csr_der: Vec<u8>,
}

impl CheckedRequest {
    /// Hex of the identity public key, as the roster lists it.
    pub fn identity_hex(&self) -> String {
        hex::encode(self.identity_public_key)
    }
}

/// Whether `language` is a usable language label (BCP 47-like: letters, digits and '-').
pub fn valid_language(language: &str) -> bool {
    !language.is_empty()
        && language.len() <= 35
        && language
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
}

/// The exact bytes the identity signs: the domain separator, then name, language, identity
/// public key and CSR (DER), each as a 4-byte big-endian length and its bytes, so no two
/// different requests share an encoding.
pub fn proof_message(
    name: &str,
    language: &str,
    identity_public_key: &[u8; 32],
    csr_der: &[u8],
) -> Vec<u8> {
    let fields: [&[u8]; 5] = [
        PROOF_DOMAIN,
        name.as_bytes(),
        language.as_bytes(),
        identity_public_key,
        csr_der,
    ];
    let mut m = Vec::with_capacity(fields.iter().map(|f| 4 + f.len()).sum());
    for field in fields {
        let len = u32::try_from(field.len()).expect("enrollment fields are small");
        m.extend_from_slice(&len.to_be_bytes());
        m.extend_from_slice(field);
    }
    m
}

/// The DER of the one PEM `CERTIFICATE REQUEST` in `pem`.
fn csr_der(pem: &str) -> Result<Vec<u8>, RequestProblem> {
    let mut reader = pem.as_bytes();
    let mut found = Vec::new();
    loop {
        match rustls_pki_types::pem::from_buf(&mut reader) {
            Ok(Some((kind, der))) => found.push((kind, der)),
            Ok(None) => break,
            Err(e) => return Err(RequestProblem::CsrPem(format!("not PEM: {e}"))),
        }
    }
    match found.as_slice() {
        [(SectionKind::Csr, der)] => Ok(der.clone()),
        [] => Err(RequestProblem::CsrPem(
            "no -----BEGIN CERTIFICATE REQUEST----- section".into(),
        )),
        [_] => Err(RequestProblem::CsrPem(
            "the PEM section is not a CERTIFICATE REQUEST".into(),
        )),
        _ => Err(RequestProblem::CsrPem(format!(
            "{} PEM sections; expected one CERTIFICATE REQUEST",
            found.len()
        ))),
    }
}

impl EnrollRequest {
    /// A request for `name` and `language`, signed by `identity` over the CSR `csr_pem`.
    pub fn sign(
        identity: &Identity,
        name: &str,
        language: &str,
        csr_pem: &str,
    ) -> Result<Self, RequestProblem> {
        let der = csr_der(csr_pem)?;
        let public = identity.public();
        let signature = identity.sign(PROOF_TAG, &proof_message(name, language, &public, &der));
        Ok(EnrollRequest {
            name: name.into(),
            language: language.into(),
            identity_public_key: hex::encode(public),
            signature: hex::encode(signature),
            csr: csr_pem.into(),
        })
    }

    /// Checks every field and the identity signature.
    pub fn check(&self) -> Result<CheckedRequest, RequestProblem> {
        if !fedcore::roster::valid_name(&self.name) {
            return Err(RequestProblem::Name(self.name.clone()));
        }
        if !valid_language(&self.language) {
            return Err(RequestProblem::Language(self.language.clone()));
        }
        let identity_public_key = fedcore::roster::parse_public_key(&self.identity_public_key)
            .map_err(RequestProblem::IdentityKey)?;
        let csr_der = csr_der(&self.csr)?;
        let signature: [u8; 64] = hex::decode(self.signature.trim())
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or(RequestProblem::SignatureMalformed)?;
        let message = proof_message(&self.name, &self.language, &identity_public_key, &csr_der);
        crypto::verify(0, &identity_public_key, PROOF_TAG, &message, &signature)
            .map_err(|_| RequestProblem::BadSignature)?;
        Ok(CheckedRequest {
            name: self.name.clone(),
            language: self.language.clone(),
            identity_public_key,
            csr_der,
        })
    }

    /// TOML text of the request file, with a header saying what it is.
    pub fn to_toml(&self) -> String {
        format!(
            "# Enrollment request of lab {:?}: public; send this file (only this one) to the\n\
             # federation's center, which runs `fedaggregator provision --request` on it.\n{}",
            self.name,
            toml::to_string_pretty(self).expect("a request always serialises")
        )
    }

    /// Parses request text; `path` names it in errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, RequestError> {
        toml::from_str(text).map_err(|e| {
            RequestError::new(
                path,
                RequestProblem::Parse(e.to_string().trim_end().to_string()),
            )
        })
    }

    /// Reads a request file and checks it ([`Self::check`]).
    pub fn load(path: &Path) -> Result<CheckedRequest, RequestError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| RequestError::new(path, RequestProblem::Read(e)))?;
        Self::from_toml(&text, path)?
            .check()
            .map_err(|problem| RequestError::new(path, problem))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proof_fields_cannot_slide_into_each_other() {
        let key = [7u8; 32];
        assert_ne!(
            proof_message("ab", "c", &key, b"x"),
            proof_message("a", "bc", &key, b"x")
        );
    }

    #[test]
    fn languages() {
        assert!(valid_language("lo"));
        assert!(valid_language("zh-Hant"));
        assert!(!valid_language(""));
        assert!(!valid_language("l o"));
        assert!(!valid_language(&"a".repeat(36)));
    }
}
