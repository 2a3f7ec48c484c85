//! What both sides of a secure-aggregation round share: its parameters, its errors, and the
//! exact bytes that get signed.

use std::collections::BTreeMap;

use thiserror::Error;

use crate::secagg::crypto::{CryptoError, SessionContext};
use crate::secagg::mask::MaskSign;
use crate::secagg::messages::Index;
use crate::secagg::shamir::ShamirError;

/// Fewest participants any secure-aggregation round may have: with two, each learns the
/// other's input from the sum.
pub const MIN_PEERS_FLOOR: usize = 3;

/// Which pairs of participants share keys and masks (see [`crate::secagg::graph`] for the
/// exact derivation every party reproduces).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Neighbourhood {
    /// Everyone with everyone (Bonawitz et al. 2017): right for cross-silo rounds of tens
    /// of institutions, where O(n) work per participant is small.
    #[default]
    Complete,
    /// A pseudo-random `degree`-regular Harary graph drawn per round (SecAgg+, Bell et al.
    /// 2020): O(degree) work per participant, for rounds of hundreds or thousands.
    /// `degree >= n - 1` is the complete graph; an odd degree needs an even roster.
    Harary { degree: usize },
}

/// Parameters of one round, known to every participant and the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoundConfig {
    pub context: SessionContext,
    /// Shares needed to reconstruct a secret; also the fewest members of a participant's
    /// neighbourhood that must survive each stage. Must be a strict majority of every
    /// neighbourhood that shares keys.
    pub threshold: usize,
    /// A participant's own floor on the number of peers (never below [`MIN_PEERS_FLOOR`]).
    pub min_peers: usize,
    /// Length of the quantised input vectors, in u32 words.
    pub vector_len: usize,
    /// Hash of the global adapter this round trains from; signed in the consistency check.
    pub model_hash: [u8; 32],
    /// Who shares keys and masks with whom.
    pub neighbourhood: Neighbourhood,
    /// Seed of the sparse graph ([`crate::secagg::spec::graph_seed`]): fixed by the plan
    /// and the round, the same in every attempt.
    pub graph_seed: [u8; 32],
    /// Groups whose slots the sum reveals separately (`group_b`); `None` otherwise.
    pub groups: Option<SurvivorGroups>,
}

/// Under `group_b` the sum carries one slot per group, which is the sum over that group's
/// survivors alone. A group with one survivor would be that lab's update in the clear, so
/// every participant refuses to sign a survivor list in which any group has survivors but
/// fewer than `min` (and the server refuses to propose one). `min` is the plan's
/// `strategy.groups.min_labs`, at least `max_colluding + 2`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorGroups {
    /// Each roster index's group.
    pub group_of: BTreeMap<Index, String>,
    pub min: usize,
}

impl SurvivorGroups {
    /// Refuses `survivors` when a group has some survivors but fewer than `min`.
    pub fn check(&self, survivors: &[Index]) -> Result<(), ProtocolError> {
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for v in survivors {
            if let Some(g) = self.group_of.get(v) {
                *counts.entry(g.as_str()).or_insert(0) += 1;
            }
        }
        match counts.into_iter().find(|(_, n)| *n < self.min) {
            Some((group, n)) => Err(ProtocolError::GroupTooSmall {
                group: group.to_string(),
                survivors: n,
                needed: self.min,
            }),
            None => Ok(()),
        }
    }
}

impl RoundConfig {
    /// The number of members every stage needs in each participant's neighbourhood (itself
    /// included): the threshold, the participant's own floor, and never fewer than three.
    pub fn quorum(&self) -> usize {
        self.threshold.max(self.min_peers).max(MIN_PEERS_FLOOR)
    }
}

/// Stages, for error messages (and the coordinator's snapshot).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Stage {
    AdvertiseKeys,
    ShareKeys,
    MaskedInput,
    ConsistencyCheck,
    Unmask,
    Done,
}

/// Why a round was refused or aborted. Honest participants return these instead of
/// continuing whenever the server misbehaves.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("message for stage {got:?} arrived during stage {expected:?}")]
    OutOfOrder { expected: Stage, got: Stage },
    #[error("{stage:?}: only {got} participants remain, {needed} are needed; round aborted")]
    TooFew {
        stage: Stage,
        got: usize,
        needed: usize,
    },
    #[error("participant {0} is not in this round's roster")]
    UnknownParticipant(Index),
    #[error("participant {0} appears twice")]
    Duplicate(Index),
    #[error(
        "the roster carries different public keys for this participant ({0}): keys were substituted"
    )]
    SubstitutedKeys(Index),
    #[error("this participant ({0}) is missing from a list it must be in")]
    MissingSelf(Index),
    #[error("survivor {0} is not among the participants that shared keys")]
    NotASubset(Index),
    #[error("the unmask request's survivor list differs from the one this participant signed")]
    InconsistentSurvivors,
    #[error("message from {from} is addressed to {to}, not {me}")]
    Misaddressed { from: Index, to: Index, me: Index },
    #[error("participant {from} did not send shares for {missing}")]
    MissingShare { from: Index, missing: Index },
    #[error("masked input of participant {from} has {got} words, expected {expected}")]
    Length {
        from: Index,
        got: usize,
        expected: usize,
    },
    #[error("masked input of participant {from}: chunk starts at word {got}, expected {expected}")]
    ChunkOffset {
        from: Index,
        got: usize,
        expected: usize,
    },
    #[error("the partial masked input of participant {0} was never retracted; the sum is unusable")]
    Unretracted(Index),
    #[error("decrypted shares from {0} are malformed")]
    MalformedShare(Index),
    #[error("the saved secure-aggregation session cannot be resumed: {0}")]
    Snapshot(String),
    #[error("shares of participant {0} did not reconstruct: {1}")]
    Reconstruct(Index, ShamirError),
    #[error("both shares of participant {0} were requested; refusing to reveal")]
    BothShares(Index),
    #[error(
        "threshold {threshold} is not a majority of the {members} members: a server could split them into two groups and learn both shares of one participant"
    )]
    ThresholdNotMajority { threshold: usize, members: usize },
    #[error(
        "no {degree}-regular graph exists on {members} participants (odd degree, odd count); use an even degree"
    )]
    OddDegree { degree: usize, members: usize },
    #[error(
        "participant {from} revealed a share of {owner}, which it cannot hold or must not reveal"
    )]
    UnexpectedShare { from: Index, owner: Index },
    #[error(
        "group {group:?} has {survivors} survivor(s), fewer than {needed}: its slot of the sum would expose too few labs' updates; round aborted"
    )]
    GroupTooSmall {
        group: String,
        survivors: usize,
        needed: usize,
    },
    #[error(transparent)]
    Crypto(#[from] CryptoError),
}

impl Stage {
    /// Refuses a message for stage `got` while this stage is the current one.
    pub(crate) fn expect(self, got: Stage) -> Result<(), ProtocolError> {
        if self != got {
            return Err(ProtocolError::OutOfOrder {
                expected: self,
                got,
            });
        }
        Ok(())
    }

    /// Aborts this stage when fewer than the round's quorum take part in it (counted in the
    /// neighbourhood of whoever checks).
    pub(crate) fn require_quorum(self, cfg: &RoundConfig, got: usize) -> Result<(), ProtocolError> {
        let needed = cfg.quorum();
        if got < needed {
            return Err(ProtocolError::TooFew {
                stage: self,
                got,
                needed,
            });
        }
        Ok(())
    }
}

/// How participant `me` applies the mask it shares with `peer`: the smaller index adds it,
/// the larger subtracts it, so the pair cancels in the sum.
pub(crate) fn pair_mask_sign(me: Index, peer: Index) -> MaskSign {
    if me < peer {
        MaskSign::Add
    } else {
        MaskSign::Subtract
    }
}

/// Signature stage tags.
pub(crate) const ADVERTISE_TAG: &str = "advertise-keys";
/// Public because it is part of the specification: tests that play a cheating server sign
/// with it.
pub const CONSISTENCY_TAG: &str = "consistency-check";

/// The bytes a participant signs when advertising its keys.
pub(crate) fn advertise_message(
    cfg: &RoundConfig,
    from: Index,
    c_public: &[u8; 32],
    s_public: &[u8; 32],
) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + 8 + 4 + 64);
    m.extend_from_slice(&cfg.context.session);
    m.extend_from_slice(&cfg.context.round.to_le_bytes());
    m.extend_from_slice(&from.to_le_bytes());
    m.extend_from_slice(c_public);
    m.extend_from_slice(s_public);
    m
}

/// The bytes every survivor signs in the consistency check: session, round, the hash of
/// the global model trained on, and the sorted survivor list. Public because it is part of
/// the specification (tests that play a cheating server use it).
pub fn consistency_message(cfg: &RoundConfig, survivors: &[Index]) -> Vec<u8> {
    let mut m = Vec::with_capacity(32 + 8 + 32 + 8 + 4 * survivors.len());
    m.extend_from_slice(&cfg.context.session);
    m.extend_from_slice(&cfg.context.round.to_le_bytes());
    m.extend_from_slice(&cfg.model_hash);
    m.extend_from_slice(&(survivors.len() as u64).to_le_bytes());
    for s in survivors {
        m.extend_from_slice(&s.to_le_bytes());
    }
    m
}

/// Plaintext of one encrypted share pair: `x_s ‖ s-share (32) ‖ x_b ‖ b-share (16)`.
pub(crate) const SHARE_PLAINTEXT_LEN: usize = 1 + 32 + 1 + 16;

/// An encrypted share pair on the wire: the plaintext and ChaCha20-Poly1305's 16-byte tag
/// (the nonce is implied). A receiver refuses any other length before storing it.
pub const SHARE_CIPHERTEXT_LEN: usize = SHARE_PLAINTEXT_LEN + 16;

/// The longest revealed share: a key share (32 bytes; a self-mask seed share is 16).
pub const MAX_REVEALED_SHARE_LEN: usize = 32;
