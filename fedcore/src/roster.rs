//! The roster: every lab allowed in a federation, with the long-term Ed25519 identity key it
//! was provisioned with (`fedclient keygen`). Secure aggregation verifies every stage message
//! against these keys, and a participant's index in the protocol is its position here.

use serde::{Deserialize, Serialize};

use crate::error::ConfigError;
use crate::secagg::crypto::{IdentityKey, IdentityKeys};
use crate::secagg::messages::Index;

/// One provisioned lab.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RosterEntry {
    /// The lab's participant name (what it joins under).
    pub name: String,
    /// Hex of its 32-byte Ed25519 public key.
    pub public_key: String,
}

/// The validated roster: names, keys and protocol indices (1-based, in roster order). The
/// keys are decoded once here, when the roster is validated, and every secure-aggregation
/// session built from this roster shares them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Roster {
    entries: Vec<(String, [u8; 32])>,
    keys: IdentityKeys,
}

impl Roster {
    /// Validates names (unique, well-formed) and keys (valid Ed25519 points); errors name the
    /// entry.
    pub fn new(entries: &[RosterEntry]) -> Result<Self, ConfigError> {
        let mut out: Vec<(String, [u8; 32])> = Vec::with_capacity(entries.len());
        let mut keys = std::collections::BTreeMap::new();
        if entries.len() > 255 {
            return Err(ConfigError::field(
                "roster",
                format!(
                    "{} labs listed; secure aggregation shares secrets over GF(2^8) and supports at most 255",
                    entries.len()
                ),
            ));
        }
        for (i, e) in entries.iter().enumerate() {
            let field = format!("roster[{i}]");
            if !valid_name(&e.name) {
                return Err(ConfigError::field(
                    &format!("{field}.name"),
                    format!(
                        "{:?} is not 1 to 64 letters, digits, '-', '_' or '.'",
                        e.name
                    ),
                ));
            }
            if out.iter().any(|(n, _)| *n == e.name) {
                return Err(ConfigError::field(
                    &format!("{field}.name"),
                    format!("{:?} is listed twice", e.name),
                ));
            }
            let (key, decoded) = parse_identity_key(&e.public_key).map_err(|reason| {
                ConfigError::field(
                    &format!("{field}.public_key"),
                    format!("{reason} (lab {})", e.name),
                )
            })?;
            if out.iter().any(|(_, k)| *k == key) {
                return Err(ConfigError::field(
                    &format!("{field}.public_key"),
                    format!("lab {} has the same key as another lab", e.name),
                ));
            }
            out.push((e.name.clone(), key));
            keys.insert(out.len() as Index, decoded);
        }
        Ok(Roster {
            entries: out,
            keys: IdentityKeys::from_keys(keys),
        })
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The protocol index of `name` (1-based roster position).
    pub fn index_of(&self, name: &str) -> Option<Index> {
        self.entries
            .iter()
            .position(|(n, _)| n == name)
            .map(|p| p as Index + 1)
    }

    /// The name at protocol index `index`.
    pub fn name_of(&self, index: Index) -> Option<&str> {
        let pos = (index as usize).checked_sub(1)?;
        self.entries.get(pos).map(|(n, _)| n.as_str())
    }

    /// Index → identity public key, decoded, as the secure-aggregation sessions take it
    /// (a shared reference: cloning it decodes nothing).
    pub fn identities(&self) -> IdentityKeys {
        self.keys.clone()
    }
}

/// Whether `name` is a valid participant name: 1-64 of `[A-Za-z0-9._-]`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

/// Whether `language` is a valid language label: 1-35 of `[A-Za-z0-9_-]`, the shape of a
/// BCP 47 tag such as `lo`, `km` or `pt-BR`. The label a lab joins with ends up in the
/// coordinator's saved state, logs, the status page and Prometheus labels, so it is short
/// and printable by construction.
pub fn valid_language(language: &str) -> bool {
    !language.is_empty()
        && language.len() <= 35
        && language
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

/// A caller's string as an error message shows it: quoted, and cut to its first 64
/// characters with its length when longer (a refused input may be megabytes long).
pub fn shown_input(input: &str) -> String {
    const SHOWN: usize = 64;
    match input.char_indices().nth(SHOWN) {
        None => format!("{input:?}"),
        Some((cut, _)) => format!("{:?}… ({} bytes)", &input[..cut], input.len()),
    }
}

/// Parses a hex Ed25519 public key and checks it is a valid curve point.
pub fn parse_public_key(hex_key: &str) -> Result<[u8; 32], String> {
    parse_identity_key(hex_key).map(|(key, _)| key)
}

/// [`parse_public_key`], returning the decoded key too.
fn parse_identity_key(hex_key: &str) -> Result<([u8; 32], IdentityKey), String> {
    let bytes = hex::decode(hex_key.trim()).map_err(|e| format!("public key is not hex: {e}"))?;
    let key: [u8; 32] = bytes
        .try_into()
        .map_err(|b: Vec<u8>| format!("public key has {} bytes, expected 32", b.len()))?;
    let decoded = IdentityKey::from_roster_bytes(0, &key)
        .map_err(|_| "public key is not a valid Ed25519 point".to_string())?;
    Ok((key, decoded))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::secagg::crypto::Identity;

    fn entry(name: &str, seed: u8) -> RosterEntry {
        RosterEntry {
            name: name.into(),
            public_key: hex::encode(Identity::from_seed([seed; 32]).public()),
        }
    }

    #[test]
    fn indices_follow_roster_order() {
        let r = Roster::new(&[entry("lo", 1), entry("km", 2), entry("th", 3)]).unwrap();
        assert_eq!(r.index_of("km"), Some(2));
        assert_eq!(r.name_of(3), Some("th"));
        assert_eq!(r.name_of(0), None);
        assert_eq!(r.identities().len(), 3);
    }

    #[test]
    fn bad_entries_are_named() {
        let err = Roster::new(&[entry("lo", 1), entry("lo", 2)]).unwrap_err();
        assert!(err.to_string().contains("roster[1].name"), "{err}");
        let mut bad = entry("km", 2);
        bad.public_key = "abcd".into();
        let err = Roster::new(&[entry("lo", 1), bad]).unwrap_err();
        assert!(err.to_string().contains("roster[1].public_key"), "{err}");
        assert!(err.to_string().contains("2 bytes"), "{err}");
        let mut bad = entry("km", 2);
        bad.public_key = "zz".repeat(32);
        assert!(
            Roster::new(&[bad])
                .unwrap_err()
                .to_string()
                .contains("not hex")
        );
        let err = Roster::new(&[entry("lo", 1), entry("km", 1)]).unwrap_err();
        assert!(err.to_string().contains("same key"), "{err}");
    }
}
