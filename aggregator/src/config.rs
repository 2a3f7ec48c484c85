//! The aggregator's configuration file (TOML): where to listen, where to keep adapters, and
//! the federation plan. Unknown fields are errors, so a typo never silently falls back to a
//! default; every error names the file and the field.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use fedcore::FederationPlan;
use fedcore::roster::RosterEntry;
use serde::{Deserialize, Serialize};
use thiserror::Error;

/// A configuration that could not be loaded.
#[derive(Debug, Error)]
pub enum ConfigFileError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: {message}")]
    Parse { path: String, message: String },
    #[error("{path}: {source}")]
    Invalid {
        path: String,
        #[source]
        source: fedcore::ConfigError,
    },
    #[error("{path}: {field}: {message}")]
    Field {
        path: String,
        field: &'static str,
        message: String,
    },
}

/// Network and storage settings of the server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerSection {
    /// Address to serve gRPC on, e.g. `127.0.0.1:50051`.
    pub listen: SocketAddr,
    /// Directory that receives `round-NNNN/` and `final/` PEFT adapters.
    pub output_dir: PathBuf,
    /// After the last round, how long to keep serving so that participants can fetch the
    /// final adapter; the server stops earlier once every participant has been told.
    #[serde(default = "default_linger_ms")]
    pub linger_after_finish_ms: u64,
    /// Largest global adapter (bytes of f32 values) put inline in a task answer; larger
    /// ones are sent by reference and downloaded in resumable, checksummed 256 KiB chunks.
    #[serde(default = "default_inline_adapter_max_bytes")]
    pub inline_adapter_max_bytes: u64,
}

fn default_inline_adapter_max_bytes() -> u64 {
    mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES
}

fn default_linger_ms() -> u64 {
    30_000
}

/// Transport security. Mutual TLS is the default; plaintext only when `enabled = false` is
/// written out (and then logged loudly). Relative paths are relative to the configuration
/// file's directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// `false` serves plaintext gRPC: anyone who can reach the port can join under any
    /// roster name, and everything on the wire can be read.
    pub enabled: bool,
    /// The aggregator's certificate (PEM), from `fedaggregator provision`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub certificate: Option<PathBuf>,
    /// Its private key (PEM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub private_key: Option<PathBuf>,
    /// The federation CA: only participant certificates it issued are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<PathBuf>,
    /// The CA's revocation list (`fedaggregator revoke` rewrites it); re-read when it
    /// changes, so a revocation refuses new connections without a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub crl: Option<PathBuf>,
}

impl TlsSection {
    /// Plaintext gRPC (tests and single-machine pilots on loopback).
    pub fn plaintext() -> Self {
        TlsSection {
            enabled: false,
            certificate: None,
            private_key: None,
            ca: None,
            crl: None,
        }
    }

    /// Mutual TLS with the files `fedaggregator provision` writes into `dir`.
    pub fn provisioned(dir: &Path) -> Self {
        TlsSection {
            enabled: true,
            certificate: Some(dir.join("server.pem")),
            private_key: Some(dir.join("server.key")),
            ca: Some(dir.join("ca.pem")),
            crl: Some(dir.join("crl.pem")),
        }
    }

    /// The files to serve mutual TLS with; `None` when TLS is off.
    pub fn files(&self) -> Option<mekong_proto::tls::ServerTlsFiles> {
        if !self.enabled {
            return None;
        }
        Some(mekong_proto::tls::ServerTlsFiles {
            certificate: self.certificate.clone()?,
            private_key: self.private_key.clone()?,
            ca: self.ca.clone()?,
            crl: self.crl.clone(),
        })
    }

    /// Every file is named when TLS is on, and none when it is off (so that a config does
    /// not look protected when it is not).
    fn validate(&self) -> Result<(), (&'static str, String)> {
        let required = [
            ("tls.certificate", &self.certificate),
            ("tls.private_key", &self.private_key),
            ("tls.ca", &self.ca),
        ];
        for (field, value) in required {
            if self.enabled && value.is_none() {
                return Err((field, "required when tls.enabled = true".into()));
            }
            if !self.enabled && value.is_some() {
                return Err((
                    field,
                    "set while tls.enabled = false; remove it or enable TLS".into(),
                ));
            }
        }
        if !self.enabled && self.crl.is_some() {
            return Err((
                "tls.crl",
                "set while tls.enabled = false; remove it or enable TLS".into(),
            ));
        }
        Ok(())
    }

    fn resolve_against(&mut self, dir: &Path) {
        for p in [
            &mut self.certificate,
            &mut self.private_key,
            &mut self.ca,
            &mut self.crl,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        }
    }
}

/// The operator's HTTP port (`/healthz`, `/metrics`, `/api/status`, the status page).
/// Plain HTTP without authentication, meant for localhost or an operator network: it shows
/// participant names, languages, round history and traffic (never updates or keys) and
/// changes nothing. Leave the section out to run without it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Address of the admin port, e.g. `127.0.0.1:9464` (port 0 picks a free one).
    pub listen: SocketAddr,
}

impl AdminSection {
    /// The admin port on loopback.
    pub fn loopback(port: u16) -> Self {
        AdminSection {
            listen: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }

    /// The admin port cannot share the gRPC port.
    fn validate(&self, server: &ServerSection) -> Result<(), (&'static str, String)> {
        if self.listen.port() != 0
            && self.listen.port() == server.listen.port()
            && (self.listen.ip() == server.listen.ip()
                || self.listen.ip().is_unspecified()
                || server.listen.ip().is_unspecified())
        {
            return Err((
                "admin.listen",
                format!(
                    "{} is the gRPC address (server.listen); give the admin port its own",
                    self.listen
                ),
            ));
        }
        Ok(())
    }
}

/// Where the aggregator keeps its crash-safe state (see `crate::db`): the run, its
/// members, rounds, the open round's protocol stage and every global adapter, in one SQLite
/// file. Starting with an existing database resumes its run; a database of another plan is
/// refused.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StateSection {
    /// The SQLite file (created 0600 if missing: it holds the participants' bearer ids).
    /// Default: `state.sqlite` in `server.output_dir`. Relative paths are relative to the
    /// working directory, like `server.output_dir`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub database: Option<PathBuf>,
    /// How many of the latest rounds' global adapters the database keeps (the current one
    /// is always kept; `round-NNNN/` directories are not pruned). 0 keeps every round.
    #[serde(default = "default_adapter_history")]
    pub adapter_history: u64,
}

fn default_adapter_history() -> u64 {
    20
}

impl Default for StateSection {
    fn default() -> Self {
        StateSection {
            database: None,
            adapter_history: default_adapter_history(),
        }
    }
}

/// The placeholder identity of an example lab. Its secret is derivable by anyone, so
/// `serve` refuses to run with it; replace it with the lab's identity public key (from its
/// `fedclient enroll` request, which `fedaggregator provision` lists; or `fedclient keygen`).
fn example_public_key(name: &str) -> String {
    use sha2::{Digest, Sha256};
    let seed: [u8; 32] = Sha256::digest(format!("mekong example identity {name}")).into();
    hex::encode(fedcore::secagg::crypto::Identity::from_seed(seed).public())
}

/// The whole aggregator configuration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AggregatorConfig {
    pub server: ServerSection,
    pub tls: TlsSection,
    /// The admin HTTP port; none when left out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<AdminSection>,
    /// The crash-safe state database; defaults apply when left out.
    #[serde(default)]
    pub state: StateSection,
    /// What one caller can make the aggregator hold; defaults apply when left out.
    #[serde(default)]
    pub limits: crate::limits::LimitsSection,
    pub plan: FederationPlan,
}

impl AggregatorConfig {
    /// Parses and validates TOML text; `origin` names the source in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Self, ConfigFileError> {
        let config: AggregatorConfig = toml::from_str(text).map_err(|e| {
            let mut message = e.to_string().trim_end().to_string();
            if message.contains("missing field `tls`") {
                message.push_str(
                    "\nadd a [tls] section: the files `fedaggregator provision` wrote, or `enabled = false` to serve plaintext",
                );
            }
            ConfigFileError::Parse {
                path: origin.to_string(),
                message,
            }
        })?;
        config
            .tls
            .validate()
            .map_err(|(field, message)| ConfigFileError::Field {
                path: origin.to_string(),
                field,
                message,
            })?;
        config
            .limits
            .validate()
            .map_err(|(field, message)| ConfigFileError::Field {
                path: origin.to_string(),
                field,
                message,
            })?;
        if let Some(admin) = &config.admin {
            admin
                .validate(&config.server)
                .map_err(|(field, message)| ConfigFileError::Field {
                    path: origin.to_string(),
                    field,
                    message,
                })?;
        }
        config
            .plan
            .validate()
            .map_err(|source| ConfigFileError::Invalid {
                path: origin.to_string(),
                source,
            })?;
        Ok(config)
    }

    /// The state database's path (`state.database`, by default in `server.output_dir`).
    pub fn database_path(&self) -> PathBuf {
        self.state
            .database
            .clone()
            .unwrap_or_else(|| self.server.output_dir.join("state.sqlite"))
    }

    /// Reads, parses and validates a configuration file.
    pub fn load(path: &Path) -> Result<Self, ConfigFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigFileError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let mut config = Self::from_toml(&text, &path.display().to_string())?;
        let dir = path.parent().unwrap_or(Path::new(""));
        config.tls.resolve_against(dir);
        Ok(config)
    }

    /// A complete, valid example (what `fedaggregator init-config` prints).
    pub fn example() -> Self {
        AggregatorConfig {
            server: ServerSection {
                listen: "127.0.0.1:50051".parse().expect("valid address"),
                output_dir: PathBuf::from("runs/federation"),
                linger_after_finish_ms: default_linger_ms(),
                inline_adapter_max_bytes: default_inline_adapter_max_bytes(),
            },
            tls: TlsSection::provisioned(Path::new("")),
            admin: Some(AdminSection::loopback(9464)),
            // The database goes beside the adapters (`server.output_dir`) unless named.
            state: StateSection::default(),
            limits: Default::default(),
            plan: FederationPlan {
                privacy: Default::default(),
                federation: "mekong-federation".into(),
                model: fedcore::ModelSpec::tiny(),
                lora: Default::default(),
                training: Default::default(),
                rounds: Default::default(),
                roster: ["lab-a", "lab-b", "lab-c"]
                    .iter()
                    .map(|name| RosterEntry {
                        name: name.to_string(),
                        public_key: example_public_key(name),
                    })
                    .collect(),
                secure_aggregation: Default::default(),
                strategy: Default::default(),
            },
        }
    }

    /// Names of roster entries that still carry the example's placeholder keys.
    pub fn placeholder_keys(&self) -> Vec<String> {
        self.plan
            .roster
            .iter()
            .filter(|e| e.public_key == example_public_key(&e.name))
            .map(|e| e.name.clone())
            .collect()
    }

    /// TOML text of this configuration.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration always serialises")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_round_trips() {
        let c = AggregatorConfig::example();
        let back = AggregatorConfig::from_toml(&c.to_toml(), "example.toml").unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn unknown_field_is_named() {
        let text = AggregatorConfig::example()
            .to_toml()
            .replace("[plan.training]", "[plan.training]\nlocal_stpes = 5");
        let err = AggregatorConfig::from_toml(&text, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agg.toml:"), "{err}");
        assert!(err.contains("unknown field `local_stpes`"), "{err}");
    }

    #[test]
    fn invalid_value_is_named() {
        let text = AggregatorConfig::example()
            .to_toml()
            .replace("min_updates = 2", "min_updates = 7");
        let err = AggregatorConfig::from_toml(&text, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("rounds.min_updates"), "{err}");
        let text = AggregatorConfig::example()
            .to_toml()
            .replace("listen = \"127.0.0.1:50051\"", "listen = \"localhost\"");
        let err = AggregatorConfig::from_toml(&text, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen"), "{err}");
    }

    #[test]
    fn tls_is_explicit() {
        let text = AggregatorConfig::example().to_toml();
        assert!(text.contains("[tls]\nenabled = true"), "{text}");
        let start = text.find("[tls]").unwrap();
        let end = start + text[start..].find("\n\n").unwrap();
        let without = format!("{}{}", &text[..start], &text[end..]);
        let err = AggregatorConfig::from_toml(&without, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing field `tls`"), "{err}");
        assert!(err.contains("enabled = false"), "{err}");
        let no_key = text.replace("private_key = \"server.key\"\n", "");
        let err = AggregatorConfig::from_toml(&no_key, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("agg.toml: tls.private_key: required"),
            "{err}"
        );
        let typo = text.replace("[tls]\n", "[tls]\ncrl_file = \"x\"\n");
        let err = AggregatorConfig::from_toml(&typo, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `crl_file`"), "{err}");
        let off = format!("{}[tls]\nenabled = false\n{}", &text[..start], &text[end..]);
        let c = AggregatorConfig::from_toml(&off, "agg.toml").unwrap();
        assert!(c.tls.files().is_none());
    }

    #[test]
    fn tls_paths_are_relative_to_the_config_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agg.toml");
        std::fs::write(&path, AggregatorConfig::example().to_toml()).unwrap();
        let c = AggregatorConfig::load(&path).unwrap();
        let files = c.tls.files().unwrap();
        assert_eq!(files.ca, dir.path().join("ca.pem"));
        assert_eq!(files.crl, Some(dir.path().join("crl.pem")));
    }

    #[test]
    fn a_mode_that_is_not_sum_only_is_refused_with_secure_aggregation() {
        let example = AggregatorConfig::example().to_toml();
        assert!(
            !example.contains("[plan.strategy]"),
            "the default is left out"
        );
        let text = format!("{example}\n[plan.strategy]\nmode = \"flora\"\n");
        let err = AggregatorConfig::from_toml(&text, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("agg.toml:"), "{err}");
        assert!(err.contains("strategy.mode"), "{err}");
        assert!(err.contains("`flora`"), "{err}");
        assert!(err.contains("secure_aggregation.enabled"), "{err}");
        // A sum-only mode with a server optimizer and sampling loads, and changes the plan's
        // fingerprint (labs pin the strategy).
        let text = format!(
            "{example}\n[plan.strategy]\nmode = \"fedsvd\"\n\n[plan.strategy.optimizer]\nkind = \"fedadam\"\neta = 0.01\n"
        );
        let c = AggregatorConfig::from_toml(&text, "agg.toml").unwrap();
        assert_eq!(c.plan.strategy.mode, fedcore::AggregationMode::FedSvd);
        assert_ne!(
            c.plan.fingerprint(),
            AggregatorConfig::example().plan.fingerprint()
        );
        // FedEx-LoRA is sum-only through its dense upload: it loads, and its limit on the
        // dense upload is enforced by name.
        let text = format!("{example}\n[plan.strategy]\nmode = \"fedex_lora\"\n");
        let c = AggregatorConfig::from_toml(&text, "agg.toml").unwrap();
        assert_eq!(c.plan.strategy.mode, fedcore::AggregationMode::FedExLora);
        let text = format!(
            "{example}\n[plan.strategy]\nmode = \"fedex_lora\"\n\n[plan.strategy.fedex]\nmax_dense_values = 10\n"
        );
        let err = AggregatorConfig::from_toml(&text, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("strategy.fedex.max_dense_values"), "{err}");
    }

    /// `[plan.privacy]` as an operator writes it: it loads, changes the fingerprint, is left
    /// out of the example (off by default), and each bad field is named.
    #[test]
    fn privacy_section_loads_and_names_bad_fields() {
        let example = AggregatorConfig::example().to_toml();
        assert!(
            !example.contains("[plan.privacy]"),
            "off by default: left out"
        );
        let text = format!(
            "{example}\n[plan.privacy]\nmode = \"distributed\"\nnoise_multiplier = 1.2\nl2_clip = 0.1\n\n[plan.privacy.record]\nnoise_multiplier = 1.0\nmax_grad_norm = 0.5\n"
        );
        let c = AggregatorConfig::from_toml(&text, "agg.toml").unwrap();
        assert_eq!(
            c.plan.privacy.mode,
            fedcore::privacy::PrivacyMode::Distributed
        );
        assert_eq!(c.plan.privacy.record.map(|r| r.max_grad_norm), Some(0.5));
        assert_ne!(
            c.plan.fingerprint(),
            AggregatorConfig::example().plan.fingerprint()
        );
        for (section, field) in [
            ("mode = \"distributed\"\ndelta = 0.9", "privacy.delta"),
            ("mode = \"distributed\"\nl2_clip = -1.0", "privacy.l2_clip"),
            ("mode = \"laplace\"", "unknown variant `laplace`"),
            ("mode = \"distributed\"\nclip = 1.0", "unknown field `clip`"),
        ] {
            let text = format!("{example}\n[plan.privacy]\n{section}\n");
            let err = AggregatorConfig::from_toml(&text, "agg.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(field), "{section}: {err}");
        }
    }

    #[test]
    fn admin_section_is_optional_and_checked() {
        let text = AggregatorConfig::example().to_toml();
        assert!(
            text.contains("[admin]\nlisten = \"127.0.0.1:9464\""),
            "{text}"
        );
        let start = text.find("[admin]").unwrap();
        let end = start + text[start..].find("\n\n").unwrap();
        let without = format!("{}{}", &text[..start], &text[end..]);
        assert_eq!(
            AggregatorConfig::from_toml(&without, "agg.toml")
                .unwrap()
                .admin,
            None
        );
        let same = text.replace("127.0.0.1:9464", "127.0.0.1:50051");
        let err = AggregatorConfig::from_toml(&same, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("agg.toml: admin.listen: 127.0.0.1:50051 is the gRPC address"),
            "{err}"
        );
        let bad = text.replace("127.0.0.1:9464", "localhost");
        let err = AggregatorConfig::from_toml(&bad, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("listen") && err.contains("localhost"), "{err}");
        let typo = text.replace("[admin]\n", "[admin]\nport = 1\n");
        let err = AggregatorConfig::from_toml(&typo, "agg.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `port`"), "{err}");
    }

    #[test]
    fn state_section_defaults_and_names_bad_fields() {
        let text = AggregatorConfig::example().to_toml();
        assert!(!text.contains("database"), "{text}");
        let back = AggregatorConfig::from_toml(&text, "a.toml").unwrap();
        assert_eq!(back.state.adapter_history, 20);
        assert_eq!(
            back.database_path(),
            PathBuf::from("runs/federation/state.sqlite")
        );
        let typo = text.replace("[state]", "[state]\nhistory = 3");
        let err = AggregatorConfig::from_toml(&typo, "a.toml").unwrap_err();
        assert!(err.to_string().contains("history"), "{err}");
        let bad = text.replace("adapter_history = 20", "adapter_history = -1");
        let err = AggregatorConfig::from_toml(&bad, "a.toml").unwrap_err();
        assert!(err.to_string().contains("adapter_history"), "{err}");
    }

    #[test]
    fn missing_file_is_named() {
        let err = AggregatorConfig::load(Path::new("/nonexistent/agg.toml")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/agg.toml"));
    }
}
