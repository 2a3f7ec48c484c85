//! The messages of one secure-aggregation round (Bonawitz et al., CCS 2017, actively secure
//! variant), as plain data. Participants are named by their index in the round's roster.

/// A participant's index in the round's roster (from provisioning).
pub type Index = u32;

/// Stage 0, participant → server: the round's two public keys, signed with the identity key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdvertiseKeys {
    pub from: Index,
    /// X25519 key for share encryption.
    pub c_public: [u8; 32],
    /// X25519 key for pairwise masks.
    pub s_public: [u8; 32],
    pub signature: [u8; 64],
}

/// Stage 0, server → participants: every advertisement received in time (U1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRoster {
    pub keys: Vec<AdvertiseKeys>,
}

/// One encrypted pair of shares (of the sender's mask key and self-mask seed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncryptedShare {
    pub from: Index,
    pub to: Index,
    pub ciphertext: Vec<u8>,
}

/// Stage 1, participant → server: shares for every neighbour in U1 (every other member of U1
/// for the complete graph).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareKeys {
    pub from: Index,
    pub shares: Vec<EncryptedShare>,
}

/// Stage 1, server → one participant: the shares addressed to it by members of U2.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShareDelivery {
    pub to: Index,
    pub shares: Vec<EncryptedShare>,
}

/// Stage 2, participant → server: the masked, quantised update.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MaskedInput {
    pub from: Index,
    pub words: Vec<u32>,
}

/// Stage 2, server → survivors: who sent a masked input in time (U3), sorted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SurvivorList {
    pub survivors: Vec<Index>,
}

/// Stage 3, participant → server: a signature over the round, the global-model hash and U3.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsistencySignature {
    pub from: Index,
    pub signature: [u8; 64],
}

/// Stage 3, server → survivors: U3 again with every signature received (U4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskRequest {
    pub survivors: Vec<Index>,
    pub signatures: Vec<ConsistencySignature>,
}

/// One revealed Shamir share of a secret owned by `owner`.
#[derive(Clone, PartialEq, Eq)]
pub struct RevealedShare {
    pub owner: Index,
    pub x: u8,
    pub y: Vec<u8>,
}

impl std::fmt::Debug for RevealedShare {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "RevealedShare {{ owner: {}, x: {} }}",
            self.owner, self.x
        )
    }
}

/// Stage 4, participant → server: self-mask shares of survivors and mask-key shares of
/// participants that dropped after sharing keys — never both for one owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnmaskResponse {
    pub from: Index,
    pub self_mask_shares: Vec<RevealedShare>,
    pub key_shares: Vec<RevealedShare>,
}
