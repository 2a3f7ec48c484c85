//! Provisioning a federation (`fedaggregator provision`, `fedaggregator revoke`): its own
//! certificate authority, the aggregator's server certificate, one kit per participant made
//! from the lab's enrollment request, the roster of their Ed25519 identity keys, and the
//! revocation list the aggregator loads.
//!
//! The center never creates or sees a lab's secret. Each lab runs `fedclient enroll`, which
//! makes its identity and TLS keys at the lab and writes a public request
//! (`mekong_proto::enroll`): name, language, identity public key, a CSR for the TLS key,
//! and an identity signature over them. Provisioning checks each request (the identity
//! signature, the CSR's own signature, no name or key twice), signs the CSR's public key
//! into a certificate whose name it sets itself, and lists the identity key in the roster.
//! Holding a lab's keys, a cheating center could pose as the lab and unmask its
//! secure-aggregation update; holding only public halves it cannot.
//!
//! ```text
//! DIR/
//!   federation.toml   what was issued and revoked (the ledger `revoke` works from)
//!   ca.pem  ca.key    the federation CA (key 0600; keep it offline once provisioned)
//!   server.pem  server.key   the aggregator's certificate (key 0600)
//!   crl.pem           the CA's revocation list
//!   roster.toml       the [[plan.roster]] entries of the participants
//!   aggregator.toml   a starting configuration: plan, roster and [tls] filled in
//!   participants/NAME/   one kit per participant (directory 0700), shipped to the lab; all
//!     participant.toml  ca.pem  client.pem        public: the lab unpacks it beside its keys
//! ```
//!
//! Each kit's `participant.toml` pins (`[policy] plan_sha256`) the fingerprint of the plan
//! in the `aggregator.toml` written beside it. A plan changed after provisioning has another
//! fingerprint, which every lab must then pin anew (`fedaggregator check-config` prints it).
//!
//! A participant certificate names its participant with the URI SAN
//! `urn:mekong:participant:NAME` (and CN = NAME) and carries the clientAuth usage only; the
//! server certificate carries serverAuth only, so neither can stand in for the other.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fedcore::FederationPlan;
use fedcore::roster::RosterEntry;
use mekong_proto::enroll::{self, CheckedRequest, EnrollRequest, RequestError, RequestProblem};
use mekong_proto::tls::{self, ParticipantKit, Role};
use rand::TryRngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams,
    CertificateSigningRequestParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod,
    KeyPair, KeyUsagePurpose, PublicKeyData, RevocationReason, RevokedCertParams, SanType,
    SerialNumber,
};
use serde::{Deserialize, Serialize};
use thiserror::Error;
use time::OffsetDateTime;
use zeroize::Zeroizing;

use crate::config::{AggregatorConfig, TlsSection};

/// The ledger of a provisioned directory.
pub const LEDGER_FILE: &str = "federation.toml";
/// Where the participants' kits go inside a provisioned directory.
pub const KITS_DIR: &str = "participants";
/// The files of a kit: all public.
pub const KIT_FILES: [&str; 3] = [tls::KIT_FILE, "ca.pem", "client.pem"];

/// Why provisioning or revocation failed.
#[derive(Debug, Error)]
pub enum ProvisionError {
    #[error(
        "{path} already exists; refusing to overwrite keys or certificates (provision into a new directory)"
    )]
    Exists { path: String },
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// A lab's enrollment request is refused; names the file and what is wrong.
    #[error("enrollment request refused: {0}")]
    Request(#[from] RequestError),
    #[error(
        "no enrollment requests: give each lab's `fedclient enroll` request with --request FILE or --requests DIR"
    )]
    NoRequests,
    #[error("{path}: {message}")]
    PlanFile { path: String, message: String },
    #[error(
        "the plan names federation {plan:?}, provisioning is for {federation:?}: they must agree (the CA and the kits carry the federation's name)"
    )]
    PlanFederation { plan: String, federation: String },
    #[error("validity must be at least one day")]
    Validity,
    #[error("invalid federation name {0:?}: must not be empty")]
    Federation(String),
    #[error("invalid aggregator address {address:?}: {message}")]
    Address { address: String, message: String },
    #[error("invalid server name {name:?}: {message}")]
    ServerName { name: String, message: String },
    #[error("certificate generation failed: {0}")]
    Certificate(#[from] rcgen::Error),
    #[error("{path}: {message}")]
    Ledger { path: String, message: String },
    #[error("{path}: no certificate was issued to participant {participant:?}")]
    NotIssued { path: String, participant: String },
    #[error("every certificate of participant {0:?} is already revoked")]
    AlreadyRevoked(String),
    #[error("{path}: {message}")]
    Ca { path: String, message: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> ProvisionError + '_ {
    move |source| ProvisionError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// What `fedaggregator provision` is asked for.
#[derive(Debug, Clone)]
pub struct ProvisionOptions {
    /// Directory to write into (created if missing; no file in it is ever overwritten).
    pub out: PathBuf,
    /// Federation name (the plan's `federation`, and the CA's name).
    pub federation: String,
    /// `host:port` participants dial; `host` goes into the server certificate.
    pub aggregator_address: String,
    /// More DNS names or IP addresses for the server certificate.
    pub extra_sans: Vec<String>,
    /// The labs' enrollment requests (`fedclient enroll`), in roster order.
    pub requests: Vec<PathBuf>,
    /// The plan to write (its roster is replaced by the requests'; its federation must be
    /// `federation`). `None`: the example plan, its cohort sizes cut to the roster.
    pub plan: Option<FederationPlan>,
    /// Validity of the server and participant certificates, in days from now.
    pub validity_days: u32,
    /// Validity of the CA (and of its revocation lists), in days from now.
    pub ca_validity_days: u32,
    /// What each kit's `participant.toml` lets its lab report (`share_metrics`): the
    /// starting point of the lab's local policy, which the lab may edit. Empty: nothing.
    pub share_metrics: Vec<mekong_proto::policy::SharedMetric>,
}

/// What provisioning wrote.
#[derive(Debug, Clone)]
pub struct Provisioned {
    pub dir: PathBuf,
    /// The participants' identity keys, in the order given (their protocol order).
    pub roster: Vec<RosterEntry>,
    /// Each participant's language, in roster order.
    pub languages: Vec<String>,
    /// Each participant's kit directory (public files only).
    pub kits: Vec<PathBuf>,
    /// The starting aggregator configuration.
    pub config: PathBuf,
    /// The fingerprint of the plan in that configuration, which every kit pins.
    pub plan_sha256: String,
    /// Why that configuration does not validate, if it does not (e.g. too few
    /// participants for the example plan's rounds): the kits still pin what was written.
    pub config_problem: Option<String>,
}

/// What was issued and revoked, kept beside the CA.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Ledger {
    federation: String,
    aggregator: String,
    server_name: String,
    ca_validity_days: u32,
    crl_number: u64,
    #[serde(default)]
    issued: Vec<IssuedEntry>,
    #[serde(default)]
    revoked: Vec<RevokedEntry>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct IssuedEntry {
    name: String,
    role: String,
    /// Hex of the certificate's serial number.
    serial: String,
    /// Unix seconds.
    not_after: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokedEntry {
    name: String,
    serial: String,
    /// Unix seconds.
    revoked_at: i64,
}

/// A certificate just issued (for a public key the CA was given: the CA makes no key but
/// the aggregator's own).
pub struct Issued {
    pub cert_pem: String,
    /// Hex of the serial number.
    pub serial: String,
    pub not_after: OffsetDateTime,
}

/// The federation's CA, able to issue certificates and revocation lists.
pub struct FederationCa {
    federation: String,
    key: KeyPair,
    cert_pem: String,
}

/// The CA's parameters, a function of the federation name alone, so that a CA loaded back
/// from its key signs with exactly the issuer name its certificate carries.
fn ca_params(federation: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, format!("{federation} federation CA"));
    params
        .distinguished_name
        .push(DnType::OrganizationName, format!("Mekong {federation}"));
    // Participants and the server are signed by the CA directly: no intermediates.
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.key_identifier_method = KeyIdMethod::Sha256;
    params
}

fn random_serial() -> Result<(SerialNumber, String), ProvisionError> {
    let mut bytes = [0u8; 16];
    rand::rngs::OsRng
        .try_fill_bytes(&mut bytes)
        .map_err(|e| ProvisionError::Io {
            path: "operating system randomness".into(),
            source: std::io::Error::other(e),
        })?;
    // Positive, 16 bytes, minimal DER: the serial reads back byte for byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    Ok((SerialNumber::from_slice(&bytes), hex::encode(bytes)))
}

fn hex_serial(serial: &str, path: &Path) -> Result<SerialNumber, ProvisionError> {
    hex::decode(serial)
        .map(|b| SerialNumber::from_slice(&b))
        .map_err(|_| ProvisionError::Ledger {
            path: path.display().to_string(),
            message: format!("serial {serial:?} is not hex"),
        })
}

/// Clock skew allowed between the CA and the machines that check its certificates.
const BACKDATE: time::Duration = time::Duration::minutes(5);

impl FederationCa {
    /// A new CA for `federation`, valid for `days` days.
    pub fn generate(federation: &str, days: u32) -> Result<Self, ProvisionError> {
        let key = KeyPair::generate()?;
        let mut params = ca_params(federation);
        let now = OffsetDateTime::now_utc();
        params.not_before = now - BACKDATE;
        params.not_after = now + time::Duration::days(days.into());
        params.serial_number = Some(random_serial()?.0);
        let cert = params.self_signed(&key)?;
        Ok(FederationCa {
            federation: federation.into(),
            key,
            cert_pem: cert.pem(),
        })
    }

    /// The CA of a provisioned directory (its `ca.pem`, `ca.key` and ledger), checked to be
    /// the CA that issued the directory's certificates.
    pub fn load(dir: &Path) -> Result<Self, ProvisionError> {
        let ledger = read_ledger(dir)?;
        let key_path = dir.join("ca.key");
        let key_pem =
            Zeroizing::new(std::fs::read_to_string(&key_path).map_err(io_err(&key_path))?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| ProvisionError::Ca {
            path: key_path.display().to_string(),
            message: format!("not a CA private key: {e}"),
        })?;
        let cert_path = dir.join("ca.pem");
        let cert_pem = std::fs::read_to_string(&cert_path).map_err(io_err(&cert_path))?;
        let ca = FederationCa {
            federation: ledger.federation,
            key,
            cert_pem,
        };
        // The loaded key and name must sign certificates that chain to ca.pem (the probe's
        // key is thrown away with it).
        let probe = ca.issue_participant("probe", &KeyPair::generate()?, 1)?;
        let ca_der = tls::load_certs(&cert_path).map_err(|e| ProvisionError::Ca {
            path: cert_path.display().to_string(),
            message: e.to_string(),
        })?;
        let probe_der = pem_to_der(&probe.cert_pem);
        tls::check_certificate(&ca_der[0], &[probe_der], Role::Client).map_err(|message| {
            ProvisionError::Ca {
                path: key_path.display().to_string(),
                message: format!(
                    "this key and the ledger's federation name do not sign for {}: {message}",
                    cert_path.display()
                ),
            }
        })?;
        Ok(ca)
    }

    /// The CA certificate (PEM).
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    fn issuer(&self) -> Issuer<'static, &KeyPair> {
        Issuer::new(ca_params(&self.federation), &self.key)
    }

    fn issue(
        &self,
        mut params: CertificateParams,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, ProvisionError> {
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(public_key, &self.issuer())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            serial: serial_hex,
            not_after,
        })
    }

    /// The aggregator's certificate for `names` (DNS names or IP addresses), with its new
    /// private key (PEM): the one key the center makes, as it is the center's own.
    pub fn issue_server(
        &self,
        names: &[String],
        days: u32,
    ) -> Result<(Issued, Zeroizing<String>), ProvisionError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(DnType::CommonName, names[0].clone());
        params.subject_alt_names = names
            .iter()
            .map(|n| match n.parse::<IpAddr>() {
                Ok(ip) => Ok(SanType::IpAddress(ip)),
                Err(_) => Ok(SanType::DnsName(n.clone().try_into()?)),
            })
            .collect::<Result<_, rcgen::Error>>()?;
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let key = KeyPair::generate()?;
        let now = OffsetDateTime::now_utc();
        let issued = self.issue(
            params,
            &key,
            now - BACKDATE,
            now + time::Duration::days(days.into()),
        )?;
        Ok((issued, Zeroizing::new(key.serialize_pem())))
    }

    /// A participant's certificate for the lab's `public_key` (from its CSR), valid from
    /// now for `days` days.
    pub fn issue_participant(
        &self,
        name: &str,
        public_key: &impl PublicKeyData,
        days: u32,
    ) -> Result<Issued, ProvisionError> {
        let now = OffsetDateTime::now_utc();
        self.issue_participant_between(
            name,
            public_key,
            now - BACKDATE,
            now + time::Duration::days(days.into()),
        )
    }

    /// A participant's certificate valid between two instants (tests issue expired ones).
    /// The name is the CA's to set: whatever a CSR's subject says is never copied.
    pub fn issue_participant_between(
        &self,
        name: &str,
        public_key: &impl PublicKeyData,
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, ProvisionError> {
        let mut params = CertificateParams::default();
        params.distinguished_name = rcgen::DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.distinguished_name.push(
            DnType::OrganizationName,
            format!("Mekong {}", self.federation),
        );
        params.subject_alt_names = vec![SanType::URI(
            format!("{}{name}", tls::PARTICIPANT_URI_PREFIX).try_into()?,
        )];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        self.issue(params, public_key, not_before, not_after)
    }

    /// A revocation list naming `revoked` (hex serials with their revocation times).
    fn crl(
        &self,
        revoked: &[(SerialNumber, OffsetDateTime)],
        number: u64,
        days: u32,
    ) -> Result<String, ProvisionError> {
        let now = OffsetDateTime::now_utc();
        let params = CertificateRevocationListParams {
            this_update: now - BACKDATE,
            next_update: now + time::Duration::days(days.into()),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|(serial, at)| RevokedCertParams {
                    serial_number: serial.clone(),
                    revocation_time: *at,
                    reason_code: Some(RevocationReason::Unspecified),
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        Ok(params.signed_by(&self.issuer())?.pem()?)
    }
}

fn pem_to_der(pem: &str) -> rustls_pki_types::CertificateDer<'static> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .expect("rcgen writes valid PEM")
}

/// Splits `host:port` (`[v6]:port` for IPv6) into the host and the port.
fn split_address(address: &str) -> Result<(String, u16), ProvisionError> {
    let bad = |message: &str| ProvisionError::Address {
        address: address.into(),
        message: message.into(),
    };
    let (host, port) = address
        .rsplit_once(':')
        .ok_or_else(|| bad("expected host:port"))?;
    let port: u16 = port
        .parse()
        .map_err(|_| bad("the port is not a number from 0 to 65535"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad("the host is empty"));
    }
    Ok((host.to_string(), port))
}

fn check_server_name(name: &str) -> Result<(), ProvisionError> {
    rustls_pki_types::ServerName::try_from(name.to_string())
        .map(|_| ())
        .map_err(|e| ProvisionError::ServerName {
            name: name.into(),
            message: e.to_string(),
        })
}

/// Writes a new file, never replacing one; `private` files are readable by their owner
/// only (0600).
fn write_new(path: &Path, bytes: &[u8], private: bool) -> Result<(), ProvisionError> {
    use std::io::Write;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(if private { 0o600 } else { 0o644 });
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut f = options.open(path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            ProvisionError::Exists {
                path: path.display().to_string(),
            }
        } else {
            io_err(path)(e)
        }
    })?;
    f.write_all(bytes).map_err(io_err(path))?;
    f.sync_all().map_err(io_err(path))
}

/// Replaces a file by writing a temporary beside it and renaming it over.
fn replace_file(path: &Path, bytes: &[u8]) -> Result<(), ProvisionError> {
    let tmp = path.with_extension("tmp");
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, bytes, false)?;
    std::fs::rename(&tmp, path).map_err(io_err(path))
}

fn private_dir(path: &Path) -> Result<(), ProvisionError> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        builder.mode(0o700);
    }
    builder.create(path).map_err(io_err(path))
}

fn read_ledger(dir: &Path) -> Result<Ledger, ProvisionError> {
    let path = dir.join(LEDGER_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    toml::from_str(&text).map_err(|e| ProvisionError::Ledger {
        path: path.display().to_string(),
        message: e.to_string().trim_end().to_string(),
    })
}

fn ledger_text(ledger: &Ledger) -> String {
    format!(
        "# Written by `fedaggregator provision`; `fedaggregator revoke` updates it.\n{}",
        toml::to_string_pretty(ledger).expect("ledger serialises")
    )
}

/// One lab's request, checked: its identity signature verified, its CSR parsed and its
/// self-signature verified.
struct Admitted {
    path: PathBuf,
    request: CheckedRequest,
    csr: CertificateSigningRequestParams,
}

/// Reads and checks every request, refusing a name, identity key or TLS key that two of
/// them carry. The error names the file and the problem.
fn admit(paths: &[PathBuf]) -> Result<Vec<Admitted>, ProvisionError> {
    let mut admitted: Vec<Admitted> = Vec::new();
    for path in paths {
        let refuse = |problem| ProvisionError::Request(RequestError::new(path, problem));
        let request = EnrollRequest::load(path)?;
        let csr = CertificateSigningRequestParams::from_der(&request.csr_der.as_slice().into())
            .map_err(|e| {
                refuse(match e {
                    rcgen::Error::InvalidCertificationRequestSignature => {
                        RequestProblem::CsrSignature
                    }
                    other => RequestProblem::CsrUnparsable(other.to_string()),
                })
            })?;
        for other in &admitted {
            let shown = other.path.display().to_string();
            if other.request.name == request.name {
                return Err(refuse(RequestProblem::DuplicateName {
                    name: request.name.clone(),
                    other: shown,
                }));
            }
            if other.request.identity_public_key == request.identity_public_key {
                return Err(refuse(RequestProblem::DuplicateIdentity { other: shown }));
            }
            if other.csr.public_key.der_bytes() == csr.public_key.der_bytes() {
                return Err(refuse(RequestProblem::DuplicateTlsKey { other: shown }));
            }
        }
        admitted.push(Admitted {
            path: path.clone(),
            request,
            csr,
        });
    }
    Ok(admitted)
}

/// The `*.toml` files of a directory of requests, by file name (the roster order).
pub fn requests_in(dir: &Path) -> Result<Vec<PathBuf>, ProvisionError> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
        let path = entry.map_err(io_err(dir))?.path();
        if path.is_file() && path.extension().is_some_and(|e| e == "toml") {
            found.push(path);
        }
    }
    found.sort();
    Ok(found)
}

/// Reads `provision --plan FILE`: the `[plan]` sections of an aggregator.toml (`[plan]`,
/// `[plan.model]`, `[plan.lora]`, `[plan.training]`, `[plan.rounds]`,
/// `[plan.secure_aggregation]`, `[plan.strategy]`, `[plan.privacy]`). The roster is the requests' and the
/// federation is provisioning's, so a file that sets a roster, or another federation, is
/// refused; so is any other top-level section (provisioning writes `[server]`, `[tls]`,
/// `[admin]` and `[state]` itself; edit them afterwards, they are not in the fingerprint).
/// Whether the plan is valid is checked once the roster is in ([`provision`]).
pub fn read_plan_file(path: &Path, federation: &str) -> Result<FederationPlan, ProvisionError> {
    let bad = |message: String| ProvisionError::PlanFile {
        path: path.display().to_string(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(io_err(path))?;
    let mut table: toml::Table = toml::from_str(&text).map_err(|e| bad(e.to_string()))?;
    if let Some(other) = table.keys().find(|k| k.as_str() != "plan") {
        return Err(bad(format!(
            "[{other}] is not read by --plan: only the [plan] sections are; provisioning writes [server], [tls], [admin] and [state] into aggregator.toml, which you may edit afterwards"
        )));
    }
    let Some(toml::Value::Table(mut plan)) = table.remove("plan") else {
        return Err(bad("no [plan] section".into()));
    };
    if plan.contains_key("roster") {
        return Err(bad(
            "plan.roster is not read from --plan: the roster is made from the enrollment requests"
                .into(),
        ));
    }
    match plan.get("federation") {
        Some(toml::Value::String(named)) if named != federation => {
            return Err(ProvisionError::PlanFederation {
                plan: named.clone(),
                federation: federation.into(),
            });
        }
        _ => {}
    }
    plan.insert("federation".into(), federation.into());
    toml::Value::Table(plan)
        .try_into()
        .map_err(|e: toml::de::Error| bad(format!("[plan]: {}", e.to_string().trim_end())))
}

/// Provisions a federation into `options.out` from the labs' enrollment requests. Nothing
/// is written unless every request checks and every file it would write is new.
pub fn provision(options: &ProvisionOptions) -> Result<Provisioned, ProvisionError> {
    if options.federation.trim().is_empty() {
        return Err(ProvisionError::Federation(options.federation.clone()));
    }
    if options.requests.is_empty() {
        return Err(ProvisionError::NoRequests);
    }
    if options.validity_days == 0 || options.ca_validity_days == 0 {
        return Err(ProvisionError::Validity);
    }
    if let Some(plan) = &options.plan
        && plan.federation != options.federation
    {
        return Err(ProvisionError::PlanFederation {
            plan: plan.federation.clone(),
            federation: options.federation.clone(),
        });
    }
    let (host, port) = split_address(&options.aggregator_address)?;
    let mut names = vec![host.clone()];
    for san in &options.extra_sans {
        if !names.contains(san) {
            names.push(san.clone());
        }
    }
    for name in &names {
        check_server_name(name)?;
    }
    let labs = admit(&options.requests)?;

    let dir = &options.out;
    let kits_dir = dir.join(KITS_DIR);
    let top = [
        LEDGER_FILE,
        "ca.pem",
        "ca.key",
        "server.pem",
        "server.key",
        "crl.pem",
        "roster.toml",
        "aggregator.toml",
    ];
    let mut planned: Vec<PathBuf> = top.iter().map(|f| dir.join(f)).collect();
    for lab in &labs {
        planned.extend(
            KIT_FILES
                .iter()
                .map(|f| kits_dir.join(&lab.request.name).join(f)),
        );
    }
    if let Some(existing) = planned.iter().find(|p| p.exists()) {
        return Err(ProvisionError::Exists {
            path: existing.display().to_string(),
        });
    }

    // Everything is made in memory first, then written.
    let ca = FederationCa::generate(&options.federation, options.ca_validity_days)?;
    let (server, server_key) = ca.issue_server(&names, options.validity_days)?;
    let crl = ca.crl(&[], 1, options.ca_validity_days)?;
    let mut ledger = Ledger {
        federation: options.federation.clone(),
        aggregator: options.aggregator_address.clone(),
        server_name: host.clone(),
        ca_validity_days: options.ca_validity_days,
        crl_number: 1,
        issued: vec![IssuedEntry {
            name: host.clone(),
            role: "server".into(),
            serial: server.serial.clone(),
            not_after: server.not_after.unix_timestamp(),
        }],
        revoked: Vec::new(),
    };
    let mut certs = Vec::new();
    for lab in &labs {
        // The CSR contributes its public key alone: name, usages and validity are the CA's.
        let cert = ca.issue_participant(
            &lab.request.name,
            &lab.csr.public_key,
            options.validity_days,
        )?;
        ledger.issued.push(IssuedEntry {
            name: lab.request.name.clone(),
            role: "participant".into(),
            serial: cert.serial.clone(),
            not_after: cert.not_after.unix_timestamp(),
        });
        certs.push(cert);
    }
    let roster: Vec<RosterEntry> = labs
        .iter()
        .map(|lab| RosterEntry {
            name: lab.request.name.clone(),
            public_key: lab.request.identity_hex(),
        })
        .collect();

    let mut config = AggregatorConfig::example();
    config.server.listen = format!("0.0.0.0:{port}").parse().expect("valid address");
    config.server.output_dir = PathBuf::from(format!("runs/{}", options.federation));
    config.tls = TlsSection::provisioned(Path::new(""));
    let n = roster.len();
    config.plan = match &options.plan {
        Some(plan) => plan.clone(),
        None => {
            let mut plan = config.plan;
            plan.rounds.participants = plan.rounds.participants.min(n);
            plan.rounds.min_updates = plan.rounds.min_updates.min(n);
            plan
        }
    };
    config.plan.federation = options.federation.clone();
    config.plan.roster = roster.clone();
    let config_text = format!(
        "# Written by `fedaggregator provision`: plan, roster and [tls] are filled in. Every kit\n\
         # pins this plan's fingerprint (participant.toml [policy] plan_sha256); changing the\n\
         # plan changes it, and each lab must then pin the new one (`fedaggregator\n\
         # check-config -c` this file prints it). [server], [admin] and [state] are not in it.\n\
         # [tls] paths are relative to this file's directory.\n{}",
        config.to_toml()
    );
    let config_problem = AggregatorConfig::from_toml(&config_text, "aggregator.toml")
        .err()
        .map(|e| e.to_string());
    // The fingerprint of the plan as a server will read it back from the file.
    let plan_sha256 = toml::from_str::<AggregatorConfig>(&config_text)
        .map(|c| c.plan.fingerprint())
        .unwrap_or_else(|_| config.plan.fingerprint());
    let mut roster_text = String::from(
        "# The participants' Ed25519 identity keys: the [[plan.roster]] entries of aggregator.toml.\n",
    );
    for e in &roster {
        roster_text.push_str(&format!(
            "\n[[plan.roster]]\nname = {:?}\npublic_key = {:?}\n",
            e.name, e.public_key
        ));
    }

    private_dir(dir)?;
    write_new(
        &dir.join("ca.key"),
        Zeroizing::new(ca.key.serialize_pem()).as_bytes(),
        true,
    )?;
    write_new(&dir.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
    write_new(&dir.join("server.key"), server_key.as_bytes(), true)?;
    write_new(&dir.join("server.pem"), server.cert_pem.as_bytes(), false)?;
    write_new(&dir.join("crl.pem"), crl.as_bytes(), false)?;
    write_new(&dir.join("roster.toml"), roster_text.as_bytes(), false)?;
    write_new(&dir.join("aggregator.toml"), config_text.as_bytes(), false)?;
    let mut kit_dirs = Vec::new();
    for (lab, cert) in labs.iter().zip(&certs) {
        let kit_dir = kits_dir.join(&lab.request.name);
        private_dir(&kit_dir)?;
        let description = ParticipantKit {
            federation: options.federation.clone(),
            name: lab.request.name.clone(),
            language: lab.request.language.clone(),
            aggregator: options.aggregator_address.clone(),
            server_name: host.clone(),
            ca: "ca.pem".into(),
            certificate: "client.pem".into(),
            // The lab's own files, made by `fedclient enroll` and never seen here: the lab
            // unpacks this kit into its enrollment directory, beside them.
            private_key: enroll::TLS_KEY_FILE.into(),
            identity: enroll::IDENTITY_FILE.into(),
            policy: mekong_proto::policy::LocalPolicy {
                share_metrics: options.share_metrics.clone(),
                plan_sha256: Some(plan_sha256.clone()),
                ..Default::default()
            },
            local: None,
        };
        write_new(&kit_dir.join("client.pem"), cert.cert_pem.as_bytes(), false)?;
        write_new(&kit_dir.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
        write_new(
            &kit_dir.join(tls::KIT_FILE),
            format!(
                "# Participant kit of federation {:?} for {:?}; paths are relative to this file.\n\
                 # Unpack it into the directory where this lab ran `fedclient enroll`: {} and {}\n\
                 # are the lab's own keys, which never left it. plan_sha256 is the plan the center\n\
                 # provisioned; check it with the other labs before you join.\n{}",
                options.federation,
                lab.request.name,
                enroll::TLS_KEY_FILE,
                enroll::IDENTITY_FILE,
                description.to_toml()
            )
            .as_bytes(),
            false,
        )?;
        kit_dirs.push(kit_dir);
    }
    // The ledger last: its presence means the directory is complete.
    write_new(
        &dir.join(LEDGER_FILE),
        ledger_text(&ledger).as_bytes(),
        false,
    )?;
    Ok(Provisioned {
        dir: dir.clone(),
        roster,
        languages: labs.iter().map(|l| l.request.language.clone()).collect(),
        kits: kit_dirs,
        config: dir.join("aggregator.toml"),
        plan_sha256,
        config_problem,
    })
}

/// Revokes every unrevoked certificate issued to `participant` in the provisioned `dir`:
/// rewrites `crl.pem` (which a running aggregator re-reads) and the ledger. Returns the
/// serials revoked.
pub fn revoke(dir: &Path, participant: &str) -> Result<Vec<String>, ProvisionError> {
    let ledger_path = dir.join(LEDGER_FILE);
    let mut ledger = read_ledger(dir)?;
    let issued: Vec<&IssuedEntry> = ledger
        .issued
        .iter()
        .filter(|e| e.name == participant && e.role == "participant")
        .collect();
    if issued.is_empty() {
        return Err(ProvisionError::NotIssued {
            path: ledger_path.display().to_string(),
            participant: participant.into(),
        });
    }
    let fresh: Vec<String> = issued
        .iter()
        .filter(|e| !ledger.revoked.iter().any(|r| r.serial == e.serial))
        .map(|e| e.serial.clone())
        .collect();
    if fresh.is_empty() {
        return Err(ProvisionError::AlreadyRevoked(participant.into()));
    }
    let ca = FederationCa::load(dir)?;
    let now = OffsetDateTime::now_utc();
    for serial in &fresh {
        ledger.revoked.push(RevokedEntry {
            name: participant.into(),
            serial: serial.clone(),
            revoked_at: now.unix_timestamp(),
        });
    }
    ledger.crl_number += 1;
    let revoked = ledger
        .revoked
        .iter()
        .map(|r| {
            Ok((
                hex_serial(&r.serial, &ledger_path)?,
                OffsetDateTime::from_unix_timestamp(r.revoked_at).map_err(|_| {
                    ProvisionError::Ledger {
                        path: ledger_path.display().to_string(),
                        message: format!("revoked_at {} is out of range", r.revoked_at),
                    }
                })?,
            ))
        })
        .collect::<Result<Vec<_>, ProvisionError>>()?;
    let crl = ca.crl(&revoked, ledger.crl_number, ledger.ca_validity_days)?;
    replace_file(&dir.join("crl.pem"), crl.as_bytes())?;
    replace_file(&ledger_path, ledger_text(&ledger).as_bytes())?;
    Ok(fresh)
}
