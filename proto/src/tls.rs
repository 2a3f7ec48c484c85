//! Mutual TLS between labs and the aggregator, one code path for both sides.
//!
//! Every certificate of a federation is issued by the federation's own CA
//! (`fedaggregator provision`), a participant's for the key in the CSR of its lab's
//! enrollment request ([`crate::enroll`]): the lab's private key never leaves the lab. The
//! aggregator accepts only client certificates that chain
//! to that CA, are within their validity and are not on the CA's revocation list; the
//! participant trusts that CA alone (no system roots) for the aggregator's certificate. A
//! participant's certificate names it with a URI subject alternative name
//! `urn:mekong:participant:<name>` ([`participant_name`]): that name, not what a request
//! claims, is who the participant is.
//!
//! TLS 1.3 only, ALPN `h2`, with rustls' ring provider.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rustls::crypto::CryptoProvider;
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::SectionKind;
use rustls_pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use tonic::transport::{Channel, Endpoint, Uri};

/// The URI subject alternative name prefix that carries a participant's name.
pub const PARTICIPANT_URI_PREFIX: &str = "urn:mekong:participant:";

/// The file name of a participant kit's description (beside its certificates and keys).
pub const KIT_FILE: &str = "participant.toml";

/// Why TLS material could not be used. Every variant names the file at fault.
#[derive(Debug, Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: io::Error,
    },
    #[error("{path}: not PEM: {message}")]
    NotPem { path: String, message: String },
    #[error("{path}: expected {expected}, found {found}")]
    WrongContent {
        path: String,
        expected: &'static str,
        found: String,
    },
    #[error("{path}: private key rejected: {message}")]
    Key { path: String, message: String },
    #[error("{key} is not the private key of the certificate in {cert}")]
    KeyMismatch { cert: String, key: String },
    #[error(
        "{key} is not the private key of the certificate in {cert}: the kit was issued for another enrollment request; put the kit's files in the directory where `fedclient enroll` wrote the request it was made from"
    )]
    KitKeyMismatch { cert: String, key: String },
    #[error(
        "{path}: this lab's {what} is missing; it is made at the lab by `fedclient enroll` (never by the center, never in the kit): run `fedclient enroll`, send its request to the center, and put the kit you get back in the same directory (or point {field} in {kit} at the key)"
    )]
    MissingLabKey {
        path: String,
        what: &'static str,
        field: &'static str,
        kit: String,
    },
    #[error("{path}: not a usable CA certificate: {message}")]
    Ca { path: String, message: String },
    #[error("{path}: certificate not accepted under the federation CA {ca}: {message}")]
    Untrusted {
        path: String,
        ca: String,
        message: String,
    },
    #[error("{path}: certificate revocation list rejected: {message}")]
    Crl { path: String, message: String },
    #[error(
        "{path}: the certificate carries no participant name (a {PARTICIPANT_URI_PREFIX}NAME subject alternative name)"
    )]
    NoParticipantName { path: String },
    #[error("invalid server name {name:?}: {message}")]
    ServerName { name: String, message: String },
    #[error("invalid aggregator address {address:?}: {message}")]
    Address { address: String, message: String },
    #[error("{path}: {message}")]
    Kit { path: String, message: String },
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The crypto provider every Mekong TLS configuration uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn shown(path: &Path) -> String {
    path.display().to_string()
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: shown(path),
        source,
    })
}

fn kind_name(kind: SectionKind) -> &'static str {
    match kind {
        SectionKind::Certificate => "a certificate",
        SectionKind::PublicKey => "a public key",
        SectionKind::RsaPrivateKey | SectionKind::PrivateKey | SectionKind::EcPrivateKey => {
            "a private key"
        }
        SectionKind::Crl => "a certificate revocation list",
        SectionKind::Csr => "a certificate signing request",
        _ => "an unsupported PEM section",
    }
}

/// All PEM sections of `bytes`; an error if there are none.
fn pem_sections(path: &Path, bytes: &[u8]) -> Result<Vec<(SectionKind, Vec<u8>)>, TlsError> {
    let mut reader: &[u8] = bytes;
    let mut out = Vec::new();
    loop {
        match rustls_pki_types::pem::from_buf(&mut reader) {
            Ok(Some(section)) => out.push(section),
            Ok(None) => break,
            Err(e) => {
                return Err(TlsError::NotPem {
                    path: shown(path),
                    message: e.to_string(),
                });
            }
        }
    }
    if out.is_empty() {
        return Err(TlsError::NotPem {
            path: shown(path),
            message: "no -----BEGIN ...----- section".into(),
        });
    }
    Ok(out)
}

fn wrong(path: &Path, expected: &'static str, sections: &[(SectionKind, Vec<u8>)]) -> TlsError {
    let mut found: Vec<&str> = sections.iter().map(|(k, _)| kind_name(*k)).collect();
    found.dedup();
    TlsError::WrongContent {
        path: shown(path),
        expected,
        found: found.join(", "),
    }
}

/// The certificates of a PEM file, in order (a leaf first, then any intermediates).
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let sections = pem_sections(path, &read(path)?)?;
    let certs: Vec<CertificateDer<'static>> = sections
        .iter()
        .filter(|(k, _)| *k == SectionKind::Certificate)
        .map(|(_, der)| CertificateDer::from(der.clone()))
        .collect();
    if certs.is_empty() {
        return Err(wrong(path, "a certificate", &sections));
    }
    Ok(certs)
}

/// The one private key of a PEM file (PKCS#8, SEC1 or PKCS#1), checked to be usable.
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let sections = pem_sections(path, &read(path)?)?;
    let mut keys = sections.iter().filter_map(|(kind, der)| match kind {
        SectionKind::PrivateKey => Some(PrivateKeyDer::Pkcs8(der.clone().into())),
        SectionKind::EcPrivateKey => Some(PrivateKeyDer::Sec1(der.clone().into())),
        SectionKind::RsaPrivateKey => Some(PrivateKeyDer::Pkcs1(der.clone().into())),
        _ => None,
    });
    let Some(key) = keys.next() else {
        return Err(wrong(path, "a private key", &sections));
    };
    if keys.next().is_some() {
        return Err(TlsError::Key {
            path: shown(path),
            message: "more than one private key in the file".into(),
        });
    }
    provider()
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| TlsError::Key {
            path: shown(path),
            message: format!("not an ECDSA, Ed25519 or RSA key rustls can sign with ({e})"),
        })?;
    Ok(key)
}

/// The certificate revocation lists of a PEM file.
pub fn load_crls(path: &Path) -> Result<Vec<CertificateRevocationListDer<'static>>, TlsError> {
    let sections = pem_sections(path, &read(path)?)?;
    let crls: Vec<_> = sections
        .iter()
        .filter(|(k, _)| *k == SectionKind::Crl)
        .map(|(_, der)| CertificateRevocationListDer::from(der.clone()))
        .collect();
    if crls.is_empty() {
        return Err(wrong(path, "a certificate revocation list", &sections));
    }
    for crl in &crls {
        webpki::OwnedCertRevocationList::from_der(crl).map_err(|e| TlsError::Crl {
            path: shown(path),
            message: format!("{e:?}"),
        })?;
    }
    Ok(crls)
}

/// The federation CA: the one trust root of both sides.
fn load_ca(path: &Path) -> Result<(CertificateDer<'static>, RootCertStore), TlsError> {
    let certs = load_certs(path)?;
    if certs.len() != 1 {
        return Err(TlsError::Ca {
            path: shown(path),
            message: format!(
                "{} certificates; expected the federation CA alone",
                certs.len()
            ),
        });
    }
    let ca = certs.into_iter().next().expect("one certificate");
    let mut roots = RootCertStore::empty();
    roots.add(ca.clone()).map_err(|e| TlsError::Ca {
        path: shown(path),
        message: e.to_string(),
    })?;
    Ok((ca, roots))
}

/// Which side a certificate is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// The aggregator (extended key usage serverAuth).
    Server,
    /// A participant (clientAuth).
    Client,
}

/// Checks, before any connection, that `chain` is issued by the CA `ca`, is valid now and is
/// meant for `role`: a misconfigured kit or server fails at start with its file named rather
/// than at the other side's handshake.
pub fn check_certificate(
    ca: &CertificateDer<'_>,
    chain: &[CertificateDer<'_>],
    role: Role,
) -> Result<(), String> {
    let anchor = webpki::anchor_from_trusted_cert(ca).map_err(|e| format!("CA: {e}"))?;
    let Some(first) = chain.first() else {
        return Err("no certificate".into());
    };
    let leaf = webpki::EndEntityCert::try_from(first).map_err(|e| format!("{e}"))?;
    let usage = match role {
        Role::Server => webpki::KeyUsage::server_auth(),
        Role::Client => webpki::KeyUsage::client_auth(),
    };
    leaf.verify_for_usage(
        provider().signature_verification_algorithms.all,
        &[anchor],
        &chain[1..],
        UnixTime::now(),
        usage,
        None,
        None,
    )
    .map(|_| ())
    .map_err(|e| match e {
        webpki::Error::UnknownIssuer => "not issued by this CA".to_string(),
        webpki::Error::InvalidSignatureForPublicKey => {
            "not issued by this CA (a CA of the same name, but the signature does not verify)"
                .to_string()
        }
        webpki::Error::RequiredEkuNotFoundContext(_) => match role {
            Role::Server => "not a server certificate (no serverAuth usage)".to_string(),
            Role::Client => "not a participant certificate (no clientAuth usage)".to_string(),
        },
        webpki::Error::CertExpired { .. } => "expired".to_string(),
        webpki::Error::CertNotValidYet { .. } => "not valid yet".to_string(),
        other => format!("{other}"),
    })
}

/// The participant named by a certificate's `urn:mekong:participant:<name>` URI SAN.
pub fn participant_name(cert: &CertificateDer<'_>) -> Option<String> {
    let parsed = webpki::EndEntityCert::try_from(cert).ok()?;
    parsed
        .valid_uri_names()
        .find_map(|uri| uri.strip_prefix(PARTICIPANT_URI_PREFIX))
        .filter(|name| fedcore::roster::valid_name(name))
        .map(str::to_string)
}

/// The aggregator's TLS files.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerTlsFiles {
    /// The aggregator's certificate (PEM; the leaf first).
    pub certificate: PathBuf,
    /// Its private key (PEM).
    pub private_key: PathBuf,
    /// The federation CA, the only issuer of participant certificates accepted.
    pub ca: PathBuf,
    /// The CA's certificate revocation list (PEM), if any certificate was ever revoked.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

/// The aggregator's rustls configuration: its certificate, and client certificates required,
/// chained to the federation CA, unexpired and not revoked by the CRL.
pub fn server_config(files: &ServerTlsFiles) -> Result<Arc<ServerConfig>, TlsError> {
    let (ca, roots) = load_ca(&files.ca)?;
    let chain = load_certs(&files.certificate)?;
    let key = load_key(&files.private_key)?;
    check_certificate(&ca, &chain, Role::Server).map_err(|message| TlsError::Untrusted {
        path: shown(&files.certificate),
        ca: shown(&files.ca),
        message,
    })?;
    let crls = match &files.crl {
        Some(path) => load_crls(path)?,
        None => Vec::new(),
    };
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider())
            .with_crls(crls)
            .build()
            .map_err(|e| match &files.crl {
                Some(path) => TlsError::Crl {
                    path: shown(path),
                    message: e.to_string(),
                },
                None => TlsError::Ca {
                    path: shown(&files.ca),
                    message: e.to_string(),
                },
            })?;
    let mut config = ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| key_error(e, &files.certificate, &files.private_key))?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

fn key_error(e: rustls::Error, cert: &Path, key: &Path) -> TlsError {
    match e {
        rustls::Error::InconsistentKeys(_) => TlsError::KeyMismatch {
            cert: shown(cert),
            key: shown(key),
        },
        other => TlsError::Key {
            path: shown(key),
            message: other.to_string(),
        },
    }
}

/// A participant's rustls configuration from PEM material already read: `ca` the only root,
/// `chain` and `key` its client certificate. Nothing is checked beyond what rustls checks;
/// [`ParticipantKit::client_config`] checks the certificate first.
pub fn client_config(
    ca: CertificateDer<'static>,
    chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    roots.add(ca)?;
    let mut config = ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// What a participant kit's `participant.toml` says. Paths are relative to the kit's
/// directory unless absolute.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParticipantKit {
    /// The federation this kit belongs to.
    pub federation: String,
    /// The participant's name (also in its certificate).
    pub name: String,
    /// Language label of its data.
    pub language: String,
    /// `host:port` of the aggregator.
    pub aggregator: String,
    /// The name the aggregator's certificate must carry (a DNS name or IP address).
    pub server_name: String,
    /// The federation CA (PEM).
    pub ca: PathBuf,
    /// The participant's certificate (PEM).
    pub certificate: PathBuf,
    /// Its TLS private key (PEM, 0600): made by the lab (`fedclient enroll`), never by the
    /// center, so it is not in the kit the center ships; the kit names it relative to the
    /// directory the lab unpacks the kit into (its enrollment directory).
    pub private_key: PathBuf,
    /// Its Ed25519 secure-aggregation identity (`fedclient enroll`/`keygen` format, 0600),
    /// the lab's own as well.
    pub identity: PathBuf,
    /// `[policy]`: the lab's own rules (fewest peers, most rounds, which aggregate metrics
    /// it reports, the agreed plan fingerprint). Provisioning writes a starting point; the
    /// lab may edit it, and its participant runtime enforces it locally.
    #[serde(default)]
    pub policy: crate::policy::LocalPolicy,
    /// `[local]`: the lab's data, base model and device, for `fedclient join --config`.
    /// Never sent. Provisioning leaves it out; the lab adds it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub local: Option<crate::policy::LocalSetup>,
}

impl ParticipantKit {
    /// Reads `participant.toml` (or a kit directory holding one) and makes its paths
    /// absolute against the kit's directory.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let file = if path.is_dir() {
            path.join(KIT_FILE)
        } else {
            path.to_path_buf()
        };
        let text = std::fs::read_to_string(&file).map_err(|source| TlsError::Read {
            path: shown(&file),
            source,
        })?;
        let mut kit: ParticipantKit = toml::from_str(&text).map_err(|e| TlsError::Kit {
            path: shown(&file),
            message: e.to_string().trim_end().to_string(),
        })?;
        let dir = file.parent().unwrap_or(Path::new("."));
        let local = kit.local.as_mut();
        let (data, model) = match local {
            Some(l) => (Some(&mut l.data), l.model.as_mut()),
            None => (None, None),
        };
        for p in [
            Some(&mut kit.ca),
            Some(&mut kit.certificate),
            Some(&mut kit.private_key),
            Some(&mut kit.identity),
            data,
            model,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
        kit.policy.validate().map_err(|e| TlsError::Kit {
            path: shown(&file),
            message: e.to_string(),
        })?;
        Ok(kit)
    }

    /// TOML text of this kit description.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("kit always serialises")
    }

    /// Checks that the lab's own private files (TLS key and identity) are where the kit
    /// says: the center never ships them, so a kit unpacked away from the lab's enrollment
    /// directory is told so, naming the file, rather than failing with a bare "not found".
    pub fn check_lab_keys(&self) -> Result<(), TlsError> {
        for (path, what, field) in [
            (&self.private_key, "TLS private key", "private_key"),
            (&self.identity, "identity key", "identity"),
        ] {
            if !path.exists() {
                return Err(TlsError::MissingLabKey {
                    path: shown(path),
                    what,
                    field,
                    kit: KIT_FILE.into(),
                });
            }
        }
        Ok(())
    }

    /// The participant's rustls configuration. Checks first that the lab's keys are present
    /// ([`Self::check_lab_keys`]) and that the kit's certificate is issued by the kit's CA,
    /// is unexpired, is a client certificate, names this participant and matches the lab's
    /// private key.
    pub fn client_config(&self) -> Result<Arc<ClientConfig>, TlsError> {
        self.check_lab_keys()?;
        let (ca, _) = load_ca(&self.ca)?;
        let chain = load_certs(&self.certificate)?;
        let key = load_key(&self.private_key)?;
        check_certificate(&ca, &chain, Role::Client).map_err(|message| TlsError::Untrusted {
            path: shown(&self.certificate),
            ca: shown(&self.ca),
            message,
        })?;
        match participant_name(&chain[0]) {
            Some(name) if name == self.name => {}
            Some(name) => {
                return Err(TlsError::Kit {
                    path: shown(&self.certificate),
                    message: format!(
                        "the certificate names participant {name:?}, the kit {:?}",
                        self.name
                    ),
                });
            }
            None => {
                return Err(TlsError::NoParticipantName {
                    path: shown(&self.certificate),
                });
            }
        }
        client_config(ca, chain, key).map_err(|e| match e {
            TlsError::Rustls(e) => match key_error(e, &self.certificate, &self.private_key) {
                TlsError::KeyMismatch { cert, key } => TlsError::KitKeyMismatch { cert, key },
                other => other,
            },
            other => other,
        })
    }

    /// A lazily connecting gRPC channel to the kit's aggregator over mutual TLS (see
    /// [`channel`]); what the participant runtime wraps in its `FederationClient`.
    pub fn channel(&self) -> Result<Channel, TlsError> {
        channel(&self.aggregator, &self.server_name, self.client_config()?)
    }
}

/// A lazily connecting tonic [`Channel`] to `address` (`host:port`) over TLS with `config`,
/// checking that the server's certificate is valid for `server_name`. Connections are
/// (re)made on demand; each connect gives up after 5 s. Call it inside a tokio runtime.
pub fn channel(
    address: &str,
    server_name: &str,
    config: Arc<ClientConfig>,
) -> Result<Channel, TlsError> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| TlsError::ServerName {
        name: server_name.to_string(),
        message: e.to_string(),
    })?;
    // The scheme is only the `:scheme` pseudo-header here: TLS is done by the connector
    // below, whatever TLS features tonic itself was built with.
    let endpoint =
        Endpoint::from_shared(format!("http://{address}")).map_err(|e| TlsError::Address {
            address: address.to_string(),
            message: e.to_string(),
        })?;
    let endpoint = endpoint
        .connect_timeout(Duration::from_secs(5))
        .tcp_nodelay(true);
    let connector = tokio_rustls::TlsConnector::from(config);
    let address = address.to_string();
    let service = tower::service_fn(move |_: Uri| {
        let connector = connector.clone();
        let name = name.clone();
        let address = address.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(&address).await?;
            tcp.set_nodelay(true)?;
            let tls = connector.connect(name, tcp).await?;
            Ok::<_, io::Error>(hyper_util::rt::TokioIo::new(tls))
        }
    });
    Ok(endpoint.connect_with_connector_lazy(service))
}

/// Why a connection to the aggregator failed, when TLS is what failed: what a participant
/// should report instead of "transport error", and not retry.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum HandshakeRefusal {
    /// The aggregator refused this participant's certificate (the TLS alert it sent).
    #[error("the aggregator refused this participant's certificate: {0}")]
    ByAggregator(String),
    /// This participant did not accept the aggregator's certificate.
    #[error("the aggregator's certificate is not accepted: {0}")]
    AggregatorCertificate(String),
    /// Another TLS failure.
    #[error("TLS failed: {0}")]
    Other(String),
}

/// Finds, in the source chain of an error (a tonic `Status` from a failed call, a transport
/// error), the TLS failure that caused it, told apart by rustls' error types: a
/// `rustls::Error` in the chain, or inside an `io::Error` (how tokio-rustls passes it on).
/// Only where HTTP/2 has flattened the I/O error to its kind and message is rustls' error
/// recognised by that message, translated back to the same types.
pub fn handshake_refusal(err: &(dyn std::error::Error + 'static)) -> Option<HandshakeRefusal> {
    let mut next = Some(err);
    while let Some(e) = next {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return refusal_from_rustls(tls);
        }
        if let Some(io) = e.downcast_ref::<io::Error>()
            && io.kind() == io::ErrorKind::InvalidData
        {
            let inner = io.get_ref();
            if let Some(tls) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
                return refusal_from_rustls(tls);
            }
            let message = inner.map_or_else(|| io.to_string(), |i| i.to_string());
            if let Some(refusal) = rustls_error_from_message(&message)
                .as_ref()
                .and_then(refusal_from_rustls)
            {
                return Some(refusal);
            }
        }
        next = e.source();
    }
    None
}

/// What a rustls error means for a participant: an alert the aggregator sent about this
/// participant's certificate, or a fault in the aggregator's certificate.
fn refusal_from_rustls(error: &rustls::Error) -> Option<HandshakeRefusal> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    match error {
        rustls::Error::AlertReceived(alert) => {
            let meaning = match alert {
                Alert::CertificateExpired => "expired or not yet valid",
                Alert::CertificateRevoked => "revoked",
                Alert::UnknownCA | Alert::DecryptError | Alert::BadCertificate => {
                    "not issued by the federation's CA"
                }
                Alert::CertificateRequired => "none was sent",
                Alert::UnsupportedCertificate => "not a participant (clientAuth) certificate",
                other => return Some(HandshakeRefusal::Other(format!("alert {other:?}"))),
            };
            Some(HandshakeRefusal::ByAggregator(meaning.into()))
        }
        rustls::Error::InvalidCertificate(problem) => {
            let meaning = match problem {
                Cert::NotValidForName | Cert::NotValidForNameContext { .. } => {
                    "not valid for the kit's server_name".to_string()
                }
                Cert::UnknownIssuer | Cert::BadSignature => {
                    "not issued by the kit's CA".to_string()
                }
                Cert::Expired | Cert::ExpiredContext { .. } => "expired".to_string(),
                Cert::NotValidYet | Cert::NotValidYetContext { .. } => "not yet valid".to_string(),
                Cert::Revoked => "revoked".to_string(),
                Cert::Other(other) => other.to_string(),
                other => format!("{other:?}"),
            };
            Some(HandshakeRefusal::AggregatorCertificate(meaning))
        }
        _ => None,
    }
}

/// The rustls error behind one of its messages ("received fatal alert: …", "invalid peer
/// certificate: …"), for the errors [`refusal_from_rustls`] tells apart; another
/// certificate problem keeps its text (`CertificateError::Other`).
fn rustls_error_from_message(message: &str) -> Option<rustls::Error> {
    use rustls::{AlertDescription as Alert, CertificateError as Cert};
    if let Some(alert) = message.strip_prefix("received fatal alert: ") {
        let alert = match alert.trim() {
            "CertificateExpired" => Alert::CertificateExpired,
            "CertificateRevoked" => Alert::CertificateRevoked,
            "UnknownCA" => Alert::UnknownCA,
            "DecryptError" => Alert::DecryptError,
            "BadCertificate" => Alert::BadCertificate,
            "CertificateRequired" => Alert::CertificateRequired,
            "UnsupportedCertificate" => Alert::UnsupportedCertificate,
            "HandshakeFailure" => Alert::HandshakeFailure,
            "ProtocolVersion" => Alert::ProtocolVersion,
            "InternalError" => Alert::InternalError,
            _ => Alert::Unknown(0),
        };
        return Some(rustls::Error::AlertReceived(alert));
    }
    let problem = message.strip_prefix("invalid peer certificate: ")?;
    let lower = problem.to_ascii_lowercase();
    let cert = if lower.contains("notvalidforname") || lower.contains("not valid for name") {
        Cert::NotValidForName
    } else if lower.contains("unknownissuer") || lower.contains("unknown issuer") {
        Cert::UnknownIssuer
    } else if lower.contains("badsignature") || lower.contains("bad signature") {
        Cert::BadSignature
    } else if lower.contains("expired") {
        Cert::Expired
    } else if lower.contains("notvalidyet") || lower.contains("not valid yet") {
        Cert::NotValidYet
    } else if lower.contains("revoked") {
        Cert::Revoked
    } else {
        Cert::Other(rustls::OtherError(Arc::new(MessageOnly(
            problem.to_string(),
        ))))
    };
    Some(rustls::Error::InvalidCertificate(cert))
}

/// A certificate problem known only by its message.
#[derive(Debug)]
struct MessageOnly(String);

impl fmt::Display for MessageOnly {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for MessageOnly {}

/// What the aggregator knows of a connection that passed the handshake: the peer's address,
/// the participant its certificate names and the certificate's serial number. Handlers find
/// it in each request's extensions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerCertificate {
    pub remote_addr: SocketAddr,
    pub participant: String,
    /// The certificate's serial number (DER integer content bytes).
    pub serial: Vec<u8>,
    /// When the certificate expires (its notAfter, seconds since the Unix epoch): the
    /// handshake checked it then, every call checks it again, as it checks revocation.
    pub not_after_unix_s: i64,
}

impl PeerCertificate {
    /// Whether the certificate has expired at `now_unix_s`.
    pub fn expired_at(&self, now_unix_s: i64) -> bool {
        now_unix_s > self.not_after_unix_s
    }
}

/// A certificate's notAfter in seconds since the Unix epoch (`None` if it cannot be read).
pub fn not_after_unix_s(cert: &CertificateDer<'_>) -> Option<i64> {
    x509_parser::parse_x509_certificate(cert.as_ref())
        .ok()
        .map(|(_, parsed)| parsed.validity().not_after.timestamp())
}

/// The serial numbers a revocation list names, for connections opened before the list
/// changed: the handshake checks the list once, a long-lived connection is checked again
/// on every call against this.
#[derive(Debug, Clone, Default)]
pub struct Revocations {
    crls: Arc<Vec<webpki::CertRevocationList<'static>>>,
}

impl Revocations {
    /// The revocation lists of a PEM file.
    pub fn load(path: &Path) -> Result<Self, TlsError> {
        let crls = load_crls(path)?
            .iter()
            .map(|der| {
                webpki::OwnedCertRevocationList::from_der(der)
                    .map(webpki::CertRevocationList::from)
                    .map_err(|e| TlsError::Crl {
                        path: shown(path),
                        message: format!("{e:?}"),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Revocations {
            crls: Arc::new(crls),
        })
    }

    /// Whether a list names `serial` (a list that cannot be searched counts as naming it).
    pub fn is_revoked(&self, serial: &[u8]) -> bool {
        self.crls
            .iter()
            .any(|crl| !matches!(crl.find_serial(serial), Ok(None)))
    }
}

/// How long a connection may take to complete its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Handshakes in progress at once; further connections wait in the listen backlog, so a
/// flood of connections that never finish cannot make the aggregator spawn without bound.
pub const MAX_PENDING_HANDSHAKES: usize = 256;

/// Handshakes in progress at once from one IP address: one host (a stranger opening idle
/// connections, a lab gone wrong) gets a quarter of [`MAX_PENDING_HANDSHAKES`] at most, so
/// the other hosts' handshakes always find a place. A connection beyond it is closed at
/// once.
pub const MAX_PENDING_HANDSHAKES_PER_ADDRESS: usize = 64;

/// How long a new connection may stay silent before its first TLS bytes (the ClientHello):
/// a client that means to talk sends them at once; an idle connection is closed well
/// before [`HANDSHAKE_TIMEOUT`], so it holds a handshake place only briefly.
pub const FIRST_FLIGHT_TIMEOUT: Duration = Duration::from_secs(3);

/// Connections open at once under one participant's certificate. A lab's channel uses
/// one (HTTP/2 carries all its calls), a reconnect briefly two; the cap keeps one
/// certificate from opening thousands, each holding TLS and HTTP/2 buffers. A connection
/// beyond it is closed right after its handshake.
pub const MAX_CONNECTIONS_PER_PARTICIPANT: usize = 16;

/// How many of something each key holds at once (pending handshakes per IP address, open
/// connections per participant), with a cap.
#[derive(Clone)]
struct Occupancy<K: std::hash::Hash + Eq + Clone> {
    table: Arc<std::sync::Mutex<std::collections::HashMap<K, usize>>>,
    cap: usize,
}

/// One place held under a key; given back when dropped.
struct Place<K: std::hash::Hash + Eq + Clone> {
    occupancy: Occupancy<K>,
    key: K,
}

impl<K: std::hash::Hash + Eq + Clone> Occupancy<K> {
    fn new(cap: usize) -> Self {
        Occupancy {
            table: Arc::default(),
            cap,
        }
    }

    fn take(&self, key: K) -> Option<Place<K>> {
        let mut table = self.table.lock().unwrap_or_else(|p| p.into_inner());
        let n = table.entry(key.clone()).or_insert(0);
        if *n >= self.cap {
            return None;
        }
        *n += 1;
        Some(Place {
            occupancy: self.clone(),
            key,
        })
    }
}

impl<K: std::hash::Hash + Eq + Clone> Drop for Place<K> {
    fn drop(&mut self) {
        let mut table = self
            .occupancy
            .table
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        if let Some(n) = table.get_mut(&self.key) {
            *n -= 1;
            if *n == 0 {
                table.remove(&self.key);
            }
        }
    }
}

/// A TLS connection from a participant whose certificate passed verification, as tonic's
/// server takes it (`serve_with_incoming`); its [`PeerCertificate`] reaches every request.
pub struct TlsConnection {
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: PeerCertificate,
    /// Its place among its participant's connections, given back when it closes.
    _open: Place<String>,
}

impl TlsConnection {
    pub fn peer(&self) -> &PeerCertificate {
        &self.peer
    }
}

impl tonic::transport::server::Connected for TlsConnection {
    type ConnectInfo = PeerCertificate;
    fn connect_info(&self) -> PeerCertificate {
        self.peer.clone()
    }
}

impl tokio::io::AsyncRead for TlsConnection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for TlsConnection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write(cx, buf)
    }
    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_flush(cx)
    }
    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<io::Result<()>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> std::task::Poll<io::Result<usize>> {
        std::pin::Pin::new(&mut self.get_mut().stream).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }
}

/// The connections of `listener` that complete a mutual-TLS handshake, as a stream for
/// tonic's `serve_with_incoming`. Each connection is accepted under the configuration
/// `config` holds at that moment (a new revocation list takes effect for new connections). Each handshake runs in its own task under
/// [`HANDSHAKE_TIMEOUT`] (at most [`MAX_PENDING_HANDSHAKES`] at once, at most
/// [`MAX_PENDING_HANDSHAKES_PER_ADDRESS`] from one IP address, its first bytes within
/// [`FIRST_FLIGHT_TIMEOUT`]), and at most [`MAX_CONNECTIONS_PER_PARTICIPANT`] connections
/// stay open under one certificate; a refused, failed or
/// stalled handshake is logged with the peer's address and the reason, and never reaches
/// the stream, so one bad certificate never stops the server from accepting the others. The
/// listener is closed when the stream is dropped.
pub fn incoming(
    listener: tokio::net::TcpListener,
    config: tokio::sync::watch::Receiver<Arc<ServerConfig>>,
) -> tokio_stream::wrappers::ReceiverStream<Result<TlsConnection, io::Error>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    let pending = Arc::new(tokio::sync::Semaphore::new(MAX_PENDING_HANDSHAKES));
    let by_address = Occupancy::new(MAX_PENDING_HANDSHAKES_PER_ADDRESS);
    let by_participant = Occupancy::new(MAX_CONNECTIONS_PER_PARTICIPANT);
    tokio::spawn(async move {
        loop {
            let permit = tokio::select! {
                _ = tx.closed() => break,
                permit = pending.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let accepted = tokio::select! {
                _ = tx.closed() => break,
                accepted = listener.accept() => accepted,
            };
            let (tcp, remote_addr) = match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "cannot accept a connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let Some(slot) = by_address.take(remote_addr.ip()) else {
                tracing::warn!(peer = %remote_addr, "connection closed: {MAX_PENDING_HANDSHAKES_PER_ADDRESS} handshakes from this address are already pending");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let acceptor = tokio_rustls::TlsAcceptor::from(config.borrow().clone());
            let tx = tx.clone();
            let by_participant = by_participant.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let _slot = slot;
                // Waits for the first byte itself (`readable` may wake spuriously).
                let mut first = [0u8; 1];
                if !matches!(
                    tokio::time::timeout(FIRST_FLIGHT_TIMEOUT, tcp.peek(&mut first)).await,
                    Ok(Ok(1))
                ) {
                    tracing::warn!(peer = %remote_addr, "connection closed: no TLS handshake began within {FIRST_FLIGHT_TIMEOUT:?} (or it closed first)");
                    return;
                }
                let stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                    .await
                {
                    Ok(Ok(stream)) => stream,
                    Ok(Err(e)) => {
                        tracing::warn!(peer = %remote_addr, error = %e, "TLS handshake refused");
                        return;
                    }
                    Err(_) => {
                        tracing::warn!(peer = %remote_addr, "TLS handshake timed out");
                        return;
                    }
                };
                let leaf = stream
                    .get_ref()
                    .1
                    .peer_certificates()
                    .and_then(|certs| certs.first());
                let named = leaf.and_then(|cert| {
                    let serial = webpki::EndEntityCert::try_from(cert)
                        .ok()?
                        .serial()
                        .to_vec();
                    Some((participant_name(cert)?, serial, not_after_unix_s(cert)?))
                });
                let Some((participant, serial, not_after_unix_s)) = named else {
                    tracing::warn!(
                        peer = %remote_addr,
                        "TLS connection refused: the client certificate names no participant"
                    );
                    return;
                };
                let Some(open) = by_participant.take(participant.clone()) else {
                    tracing::warn!(peer = %remote_addr, %participant, "connection closed: {MAX_CONNECTIONS_PER_PARTICIPANT} connections under this certificate are already open");
                    return;
                };
                tracing::debug!(peer = %remote_addr, %participant, "TLS connection accepted");
                let peer = PeerCertificate {
                    remote_addr,
                    participant,
                    serial,
                    not_after_unix_s,
                };
                let _ = tx
                    .send(Ok(TlsConnection {
                        stream,
                        peer,
                        _open: open,
                    }))
                    .await;
            });
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::{AlertDescription, CertificateError};

    /// An error chain as tonic hands it over: a transport error whose source is an I/O
    /// error carrying (or, after HTTP/2, only describing) rustls' error.
    #[derive(Debug)]
    struct Transport(io::Error);

    impl fmt::Display for Transport {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("transport error")
        }
    }

    impl std::error::Error for Transport {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn typed(error: rustls::Error) -> Option<HandshakeRefusal> {
        handshake_refusal(&Transport(io::Error::new(
            io::ErrorKind::InvalidData,
            error,
        )))
    }

    fn flattened(message: &str) -> Option<HandshakeRefusal> {
        handshake_refusal(&Transport(io::Error::new(
            io::ErrorKind::InvalidData,
            message.to_string(),
        )))
    }

    #[test]
    fn refusals_are_told_apart_by_rustls_types_and_by_their_messages_alike() {
        let cases = [
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRevoked),
                HandshakeRefusal::ByAggregator("revoked".into()),
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::UnknownCA),
                HandshakeRefusal::ByAggregator("not issued by the federation's CA".into()),
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::CertificateRequired),
                HandshakeRefusal::ByAggregator("none was sent".into()),
            ),
            (
                rustls::Error::AlertReceived(AlertDescription::HandshakeFailure),
                HandshakeRefusal::Other("alert HandshakeFailure".into()),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::NotValidForName),
                HandshakeRefusal::AggregatorCertificate(
                    "not valid for the kit's server_name".into(),
                ),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer),
                HandshakeRefusal::AggregatorCertificate("not issued by the kit's CA".into()),
            ),
            (
                rustls::Error::InvalidCertificate(CertificateError::Expired),
                HandshakeRefusal::AggregatorCertificate("expired".into()),
            ),
        ];
        for (error, expected) in cases {
            // rustls' own error, as tokio-rustls passes it on.
            assert_eq!(typed(error.clone()), Some(expected.clone()), "{error:?}");
            // The same error after HTTP/2 kept only its message.
            assert_eq!(flattened(&error.to_string()), Some(expected), "{error}");
        }
        // Not TLS at all: nothing to report.
        assert_eq!(flattened("connection reset"), None);
        assert_eq!(typed(rustls::Error::DecryptError), None);
        // A certificate problem without a type of its own keeps its text.
        assert_eq!(
            flattened("invalid peer certificate: some new problem"),
            Some(HandshakeRefusal::AggregatorCertificate(
                "some new problem".into()
            ))
        );
    }
}
