//! Secure-aggregation messages between fedcore's types and the wire. Decoding checks every
//! fixed-size field, so a malformed message is refused with the field named instead of
//! reaching the protocol.

use fedcore::round::{SecureMessage, SecureStep};
use fedcore::secagg::messages as m;
use fedcore::secagg::protocol::{MAX_REVEALED_SHARE_LEN, SHARE_CIPHERTEXT_LEN};
use thiserror::Error;

use crate::v1 as pb;

/// A secure-aggregation message that does not decode.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum WireError {
    #[error("field `{field}` has {got} bytes, expected {expected}")]
    Bytes {
        field: &'static str,
        got: usize,
        expected: usize,
    },
    #[error("field `{0}` is missing")]
    Missing(&'static str),
    #[error("Shamir x coordinate {0} is out of range (1-255)")]
    ShareX(u32),
    #[error("masked chunk has {0} bytes, not a whole number of u32 words")]
    WordBytes(usize),
    #[error("a revealed share has {0} bytes; shares are 1 to {MAX_REVEALED_SHARE_LEN}")]
    ShareY(usize),
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], WireError> {
    bytes.try_into().map_err(|_| WireError::Bytes {
        field,
        got: bytes.len(),
        expected: N,
    })
}

/// Encodes u32 words little-endian.
pub fn encode_words(words: &[u32]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Decodes little-endian u32 words.
pub fn decode_words(bytes: &[u8]) -> Result<Vec<u32>, WireError> {
    if !bytes.len().is_multiple_of(4) {
        return Err(WireError::WordBytes(bytes.len()));
    }
    Ok(bytes
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

pub fn advertise_to_wire(a: &m::AdvertiseKeys) -> pb::AdvertisedKeys {
    pb::AdvertisedKeys {
        from: a.from,
        c_public: a.c_public.to_vec(),
        s_public: a.s_public.to_vec(),
        signature: a.signature.to_vec(),
    }
}

pub fn advertise_from_wire(a: &pb::AdvertisedKeys) -> Result<m::AdvertiseKeys, WireError> {
    Ok(m::AdvertiseKeys {
        from: a.from,
        c_public: fixed("c_public", &a.c_public)?,
        s_public: fixed("s_public", &a.s_public)?,
        signature: fixed("signature", &a.signature)?,
    })
}

fn share_to_wire(s: &m::EncryptedShare) -> pb::EncryptedShare {
    pb::EncryptedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext.clone(),
    }
}

fn share_from_wire(s: &pb::EncryptedShare) -> m::EncryptedShare {
    m::EncryptedShare {
        from: s.from,
        to: s.to,
        ciphertext: s.ciphertext.clone(),
    }
}

fn signature_to_wire(s: &m::ConsistencySignature) -> pb::ConsistencySignature {
    pb::ConsistencySignature {
        from: s.from,
        signature: s.signature.to_vec(),
    }
}

fn signature_from_wire(s: &pb::ConsistencySignature) -> Result<m::ConsistencySignature, WireError> {
    Ok(m::ConsistencySignature {
        from: s.from,
        signature: fixed("signature", &s.signature)?,
    })
}

fn revealed_to_wire(s: &m::RevealedShare) -> pb::RevealedShare {
    pb::RevealedShare {
        owner: s.owner,
        x: s.x.into(),
        y: s.y.clone(),
    }
}

fn revealed_from_wire(s: &pb::RevealedShare) -> Result<m::RevealedShare, WireError> {
    let x = u8::try_from(s.x)
        .ok()
        .filter(|x| *x != 0)
        .ok_or(WireError::ShareX(s.x))?;
    if s.y.is_empty() || s.y.len() > MAX_REVEALED_SHARE_LEN {
        return Err(WireError::ShareY(s.y.len()));
    }
    Ok(m::RevealedShare {
        owner: s.owner,
        x,
        y: s.y.clone(),
    })
}

/// A participant's stage message for `SecureAggregate`.
pub fn message_to_wire(msg: &SecureMessage) -> pb::secure_aggregate_request::Message {
    use pb::secure_aggregate_request::Message as W;
    match msg {
        SecureMessage::Advertise(a) => W::Advertise(advertise_to_wire(a)),
        SecureMessage::ShareKeys(s) => W::ShareKeys(pb::ShareKeys {
            from: s.from,
            shares: s.shares.iter().map(share_to_wire).collect(),
        }),
        SecureMessage::Consistency(s) => W::Consistency(signature_to_wire(s)),
        SecureMessage::Unmask(u) => W::Unmask(pb::UnmaskResponse {
            from: u.from,
            self_mask_shares: u.self_mask_shares.iter().map(revealed_to_wire).collect(),
            key_shares: u.key_shares.iter().map(revealed_to_wire).collect(),
        }),
    }
}

/// Decodes a `SecureAggregate` message.
pub fn message_from_wire(
    msg: Option<&pb::secure_aggregate_request::Message>,
) -> Result<SecureMessage, WireError> {
    use pb::secure_aggregate_request::Message as W;
    Ok(match msg.ok_or(WireError::Missing("message"))? {
        W::Advertise(a) => SecureMessage::Advertise(advertise_from_wire(a)?),
        W::ShareKeys(s) => SecureMessage::ShareKeys(m::ShareKeys {
            from: s.from,
            // Checked here, before the aggregator stores them in its resumable state.
            shares: s
                .shares
                .iter()
                .map(|share| {
                    fixed::<SHARE_CIPHERTEXT_LEN>("ciphertext", &share.ciphertext)?;
                    Ok(share_from_wire(share))
                })
                .collect::<Result<_, WireError>>()?,
        }),
        W::Consistency(s) => SecureMessage::Consistency(signature_from_wire(s)?),
        W::Unmask(u) => SecureMessage::Unmask(m::UnmaskResponse {
            from: u.from,
            self_mask_shares: u
                .self_mask_shares
                .iter()
                .map(revealed_from_wire)
                .collect::<Result<_, _>>()?,
            key_shares: u
                .key_shares
                .iter()
                .map(revealed_from_wire)
                .collect::<Result<_, _>>()?,
        }),
    })
}

/// The server's request of one stage, for `FetchTask`.
pub fn step_to_wire(step: &SecureStep<'_>) -> pb::secure_step::Step {
    use pb::secure_step::Step as W;
    match step {
        SecureStep::ShareKeys(r) => W::ShareKeys(pb::KeyRoster {
            keys: r.keys.iter().map(advertise_to_wire).collect(),
        }),
        SecureStep::MaskedInput(d) => W::MaskedInput(pb::ShareDelivery {
            to: d.to,
            shares: d.shares.iter().map(share_to_wire).collect(),
        }),
        SecureStep::Consistency(l) => W::Consistency(pb::SurvivorList {
            survivors: l.survivors.clone(),
        }),
        SecureStep::Unmask(u) => W::Unmask(pb::UnmaskRequest {
            survivors: u.survivors.clone(),
            signatures: u.signatures.iter().map(signature_to_wire).collect(),
        }),
    }
}

/// A decoded stage request, owning its data; [`OwnedStep::as_step`] lends it to a session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OwnedStep {
    ShareKeys(m::KeyRoster),
    MaskedInput(m::ShareDelivery),
    Consistency(m::SurvivorList),
    Unmask(m::UnmaskRequest),
}

impl OwnedStep {
    pub fn as_step(&self) -> SecureStep<'_> {
        match self {
            OwnedStep::ShareKeys(r) => SecureStep::ShareKeys(r),
            OwnedStep::MaskedInput(d) => SecureStep::MaskedInput(d),
            OwnedStep::Consistency(l) => SecureStep::Consistency(l),
            OwnedStep::Unmask(u) => SecureStep::Unmask(u),
        }
    }
}

/// Decodes a stage request from `FetchTask`.
pub fn step_from_wire(step: Option<&pb::secure_step::Step>) -> Result<OwnedStep, WireError> {
    use pb::secure_step::Step as W;
    Ok(match step.ok_or(WireError::Missing("step"))? {
        W::ShareKeys(r) => OwnedStep::ShareKeys(m::KeyRoster {
            keys: r
                .keys
                .iter()
                .map(advertise_from_wire)
                .collect::<Result<_, _>>()?,
        }),
        W::MaskedInput(d) => OwnedStep::MaskedInput(m::ShareDelivery {
            to: d.to,
            shares: d.shares.iter().map(share_from_wire).collect(),
        }),
        W::Consistency(l) => OwnedStep::Consistency(m::SurvivorList {
            survivors: l.survivors.clone(),
        }),
        W::Unmask(u) => OwnedStep::Unmask(m::UnmaskRequest {
            survivors: u.survivors.clone(),
            signatures: u
                .signatures
                .iter()
                .map(signature_from_wire)
                .collect::<Result<_, _>>()?,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip_and_bad_lengths_are_named() {
        let advert = m::AdvertiseKeys {
            from: 3,
            c_public: [1; 32],
            s_public: [2; 32],
            signature: [3; 64],
        };
        let msg = SecureMessage::Advertise(advert.clone());
        let wire = message_to_wire(&msg);
        assert_eq!(message_from_wire(Some(&wire)).unwrap(), msg);
        let mut short = advertise_to_wire(&advert);
        short.signature.pop();
        let wire = pb::secure_aggregate_request::Message::Advertise(short);
        assert_eq!(
            message_from_wire(Some(&wire)).unwrap_err().to_string(),
            "field `signature` has 63 bytes, expected 64"
        );
        assert_eq!(message_from_wire(None), Err(WireError::Missing("message")));
        let unmask = SecureMessage::Unmask(m::UnmaskResponse {
            from: 1,
            self_mask_shares: vec![m::RevealedShare {
                owner: 2,
                x: 5,
                y: vec![9; 16],
            }],
            key_shares: vec![],
        });
        let mut wire = message_to_wire(&unmask);
        assert_eq!(message_from_wire(Some(&wire)).unwrap(), unmask);
        if let pb::secure_aggregate_request::Message::Unmask(u) = &mut wire {
            u.self_mask_shares[0].x = 256;
        }
        assert_eq!(message_from_wire(Some(&wire)), Err(WireError::ShareX(256)));
        // Shares of any other size are refused before they are stored (issue #26).
        if let pb::secure_aggregate_request::Message::Unmask(u) = &mut wire {
            u.self_mask_shares[0].x = 5;
            u.self_mask_shares[0].y = vec![0; 1 << 20];
        }
        assert_eq!(
            message_from_wire(Some(&wire)),
            Err(WireError::ShareY(1 << 20))
        );
        let share = |len| pb::EncryptedShare {
            from: 1,
            to: 2,
            ciphertext: vec![7; len],
        };
        let keys = |len| {
            pb::secure_aggregate_request::Message::ShareKeys(pb::ShareKeys {
                from: 1,
                shares: vec![share(SHARE_CIPHERTEXT_LEN), share(len)],
            })
        };
        assert!(message_from_wire(Some(&keys(SHARE_CIPHERTEXT_LEN))).is_ok());
        assert_eq!(
            message_from_wire(Some(&keys(1 << 20)))
                .unwrap_err()
                .to_string(),
            format!(
                "field `ciphertext` has {} bytes, expected {SHARE_CIPHERTEXT_LEN}",
                1 << 20
            )
        );
    }

    #[test]
    fn steps_and_words_round_trip() {
        let step = OwnedStep::Unmask(m::UnmaskRequest {
            survivors: vec![1, 2, 4],
            signatures: vec![m::ConsistencySignature {
                from: 2,
                signature: [7; 64],
            }],
        });
        let wire = step_to_wire(&step.as_step());
        assert_eq!(step_from_wire(Some(&wire)).unwrap(), step);
        let words = vec![0, 1, u32::MAX, 0xdead_beef];
        assert_eq!(decode_words(&encode_words(&words)).unwrap(), words);
        assert_eq!(decode_words(&[0; 5]), Err(WireError::WordBytes(5)));
    }
}
