//! Provisioning a federation (`fedaggregator provision`, `fedaggregator revoke`): its own
//! certificate authority, the aggregator's server certificate, one kit per participant, the
//! roster of their Ed25519 identity keys, and the revocation list the aggregator loads.
//!
//! ```text
//! DIR/
//!   federation.toml   what was issued and revoked (the ledger `revoke` works from)
//!   ca.pem  ca.key    the federation CA (key 0600; keep it offline once provisioned)
//!   server.pem  server.key   the aggregator's certificate (key 0600)
//!   crl.pem           the CA's revocation list
//!   roster.toml       the [[plan.roster]] entries of the participants
//!   aggregator.toml   a starting configuration: roster and [tls] filled in
//!   participants/NAME/   one kit per participant (directory 0700), shipped to the lab:
//!     participant.toml  ca.pem  client.pem  client.key (0600)  identity.key (0600)
//! ```
//!
//! A participant certificate names its participant with the URI SAN
//! `urn:mekong:participant:NAME` (and CN = NAME) and carries the clientAuth usage only; the
//! server certificate carries serverAuth only, so neither can stand in for the other.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use fedcore::roster::RosterEntry;
use mekong_proto::tls::{self, ParticipantKit, Role};
use rand::TryRngCore;
use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DnType,
    ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose, RevocationReason,
    RevokedCertParams, SanType, SerialNumber,
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
    #[error("invalid participant {spec:?}: {message}")]
    Participant { spec: String, message: String },
    #[error("participant {0:?} is listed twice")]
    Duplicate(String),
    #[error("no participants: give at least one --participant NAME[:LANG]")]
    NoParticipants,
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

/// One participant to provision: `NAME[:LANG]` on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParticipantSpec {
    pub name: String,
    /// Language label of its data (`und` when not given).
    pub language: String,
}

impl std::str::FromStr for ParticipantSpec {
    type Err = ProvisionError;
    fn from_str(spec: &str) -> Result<Self, ProvisionError> {
        let (name, language) = match spec.split_once(':') {
            Some((n, l)) => (n, l),
            None => (spec, "und"),
        };
        if !fedcore::roster::valid_name(name) {
            return Err(ProvisionError::Participant {
                spec: spec.into(),
                message: "the name must be 1 to 64 letters, digits, '-', '_' or '.'".into(),
            });
        }
        if language.is_empty()
            || language.len() > 35
            || !language
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-')
        {
            return Err(ProvisionError::Participant {
                spec: spec.into(),
                message: "the language must be a tag of letters, digits and '-'".into(),
            });
        }
        Ok(ParticipantSpec {
            name: name.into(),
            language: language.into(),
        })
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
    pub participants: Vec<ParticipantSpec>,
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
    /// Each participant's kit directory.
    pub kits: Vec<PathBuf>,
    /// The starting aggregator configuration.
    pub config: PathBuf,
    /// Why that configuration does not validate yet, if it does not (e.g. too few
    /// participants for the example plan's rounds).
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

/// A certificate just issued, with its private key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: Zeroizing<String>,
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
        // The loaded key and name must sign certificates that chain to ca.pem.
        let probe = ca.issue_participant("probe", 1)?;
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
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued, ProvisionError> {
        let key = KeyPair::generate()?;
        let (serial, serial_hex) = random_serial()?;
        params.serial_number = Some(serial);
        params.not_before = not_before;
        params.not_after = not_after;
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let cert = params.signed_by(&key, &self.issuer())?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: Zeroizing::new(key.serialize_pem()),
            serial: serial_hex,
            not_after,
        })
    }

    /// The aggregator's certificate for `names` (DNS names or IP addresses).
    pub fn issue_server(&self, names: &[String], days: u32) -> Result<Issued, ProvisionError> {
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
        let now = OffsetDateTime::now_utc();
        self.issue(
            params,
            now - BACKDATE,
            now + time::Duration::days(days.into()),
        )
    }

    /// A participant's certificate, valid from now for `days` days.
    pub fn issue_participant(&self, name: &str, days: u32) -> Result<Issued, ProvisionError> {
        let now = OffsetDateTime::now_utc();
        self.issue_participant_between(
            name,
            now - BACKDATE,
            now + time::Duration::days(days.into()),
        )
    }

    /// A participant's certificate valid between two instants (tests issue expired ones).
    pub fn issue_participant_between(
        &self,
        name: &str,
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
        self.issue(params, not_before, not_after)
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

/// A fresh Ed25519 identity seed in the format of `fedclient keygen`
/// (`client/src/identity.rs`): 64 hex characters and a newline. Returns the file text and
/// the public key's hex.
fn identity_file() -> Result<(Zeroizing<String>, String), ProvisionError> {
    let mut seed = Zeroizing::new([0u8; 32]);
    rand::rngs::OsRng
        .try_fill_bytes(seed.as_mut())
        .map_err(|e| ProvisionError::Io {
            path: "operating system randomness".into(),
            source: std::io::Error::other(e),
        })?;
    let public = hex::encode(fedcore::secagg::crypto::Identity::from_seed(*seed).public());
    Ok((
        Zeroizing::new(format!("{}\n", hex::encode(seed.as_ref()))),
        public,
    ))
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

/// Provisions a federation into `options.out`. Nothing is written unless every file it
/// would write is new.
pub fn provision(options: &ProvisionOptions) -> Result<Provisioned, ProvisionError> {
    if options.federation.trim().is_empty() {
        return Err(ProvisionError::Federation(options.federation.clone()));
    }
    if options.participants.is_empty() {
        return Err(ProvisionError::NoParticipants);
    }
    if options.validity_days == 0 || options.ca_validity_days == 0 {
        return Err(ProvisionError::Validity);
    }
    for (i, p) in options.participants.iter().enumerate() {
        if options.participants[..i].iter().any(|q| q.name == p.name) {
            return Err(ProvisionError::Duplicate(p.name.clone()));
        }
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
    let kit_files = [
        tls::KIT_FILE,
        "ca.pem",
        "client.pem",
        "client.key",
        "identity.key",
    ];
    let mut planned: Vec<PathBuf> = top.iter().map(|f| dir.join(f)).collect();
    for p in &options.participants {
        planned.extend(kit_files.iter().map(|f| kits_dir.join(&p.name).join(f)));
    }
    if let Some(existing) = planned.iter().find(|p| p.exists()) {
        return Err(ProvisionError::Exists {
            path: existing.display().to_string(),
        });
    }

    // Everything is made in memory first, then written.
    let ca = FederationCa::generate(&options.federation, options.ca_validity_days)?;
    let server = ca.issue_server(&names, options.validity_days)?;
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
    struct Kit {
        spec: ParticipantSpec,
        cert: Issued,
        identity: Zeroizing<String>,
        public_key: String,
    }
    let mut kits = Vec::new();
    for spec in &options.participants {
        let cert = ca.issue_participant(&spec.name, options.validity_days)?;
        let (identity, public_key) = identity_file()?;
        ledger.issued.push(IssuedEntry {
            name: spec.name.clone(),
            role: "participant".into(),
            serial: cert.serial.clone(),
            not_after: cert.not_after.unix_timestamp(),
        });
        kits.push(Kit {
            spec: spec.clone(),
            cert,
            identity,
            public_key,
        });
    }
    let roster: Vec<RosterEntry> = kits
        .iter()
        .map(|k| RosterEntry {
            name: k.spec.name.clone(),
            public_key: k.public_key.clone(),
        })
        .collect();

    let mut config = AggregatorConfig::example();
    config.server.listen = format!("0.0.0.0:{port}").parse().expect("valid address");
    config.server.output_dir = PathBuf::from(format!("runs/{}", options.federation));
    config.tls = TlsSection::provisioned(Path::new(""));
    config.plan.federation = options.federation.clone();
    config.plan.roster = roster.clone();
    let n = roster.len();
    config.plan.rounds.participants = config.plan.rounds.participants.min(n);
    config.plan.rounds.min_updates = config.plan.rounds.min_updates.min(n);
    let config_text = format!(
        "# Written by `fedaggregator provision`: roster and [tls] are filled in; set the model,\n\
         # training and rounds, then `fedaggregator check-config -c` this file.\n\
         # [tls] paths are relative to this file's directory.\n{}",
        config.to_toml()
    );
    let config_problem = AggregatorConfig::from_toml(&config_text, "aggregator.toml")
        .err()
        .map(|e| e.to_string());
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
    write_new(&dir.join("server.key"), server.key_pem.as_bytes(), true)?;
    write_new(&dir.join("server.pem"), server.cert_pem.as_bytes(), false)?;
    write_new(&dir.join("crl.pem"), crl.as_bytes(), false)?;
    write_new(&dir.join("roster.toml"), roster_text.as_bytes(), false)?;
    write_new(&dir.join("aggregator.toml"), config_text.as_bytes(), false)?;
    let mut kit_dirs = Vec::new();
    for kit in &kits {
        let kit_dir = kits_dir.join(&kit.spec.name);
        private_dir(&kit_dir)?;
        let description = ParticipantKit {
            federation: options.federation.clone(),
            name: kit.spec.name.clone(),
            language: kit.spec.language.clone(),
            aggregator: options.aggregator_address.clone(),
            server_name: host.clone(),
            ca: "ca.pem".into(),
            certificate: "client.pem".into(),
            private_key: "client.key".into(),
            identity: "identity.key".into(),
            // The plan fingerprint is left out: the plan may still change before the run
            // (the written configuration need not validate yet); labs pin it when agreed.
            policy: mekong_proto::policy::LocalPolicy {
                share_metrics: options.share_metrics.clone(),
                ..Default::default()
            },
            local: None,
        };
        write_new(
            &kit_dir.join("client.key"),
            kit.cert.key_pem.as_bytes(),
            true,
        )?;
        write_new(&kit_dir.join("identity.key"), kit.identity.as_bytes(), true)?;
        write_new(
            &kit_dir.join("client.pem"),
            kit.cert.cert_pem.as_bytes(),
            false,
        )?;
        write_new(&kit_dir.join("ca.pem"), ca.cert_pem.as_bytes(), false)?;
        write_new(
            &kit_dir.join(tls::KIT_FILE),
            format!(
                "# Participant kit of federation {:?}; paths are relative to this file.\n{}",
                options.federation,
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
        kits: kit_dirs,
        config: dir.join("aggregator.toml"),
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
