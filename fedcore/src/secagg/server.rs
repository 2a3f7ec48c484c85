//! The server's side of a secure-aggregation round, as a sans-IO state machine.
//!
//! The caller feeds each participant message as it arrives (`receive_*`) and decides when a
//! stage ends (`close_*`: everyone answered, or the stage's deadline passed); whoever has not
//! answered by then has dropped. Masked inputs are folded into one running sum as they
//! arrive: the server never stores an individual masked vector, let alone an unmasked one,
//! and its memory is O(vector), not O(participants × vector).

use std::collections::{BTreeMap, BTreeSet};

use crate::secagg::crypto::{AgreementSecret, verify};
use crate::secagg::mask::{MaskSign, apply};
use crate::secagg::messages::{
    AdvertiseKeys, ConsistencySignature, EncryptedShare, Index, KeyRoster, MaskedInput,
    RevealedShare, ShareDelivery, ShareKeys, SurvivorList, UnmaskRequest, UnmaskResponse,
};
use crate::secagg::protocol::{
    ADVERTISE_TAG, CONSISTENCY_TAG, ProtocolError, RoundConfig, Stage, advertise_message,
    consistency_message, pair_mask_sign,
};
use crate::secagg::shamir::{Share, combine};
use zeroize::Zeroizing;

/// The server in one round.
pub struct ServerSession {
    cfg: RoundConfig,
    identities: BTreeMap<Index, [u8; 32]>,
    stage: Stage,
    u1: BTreeMap<Index, AdvertiseKeys>,
    /// ShareKeys messages received, by sender (U2 once closed).
    shares: BTreeMap<Index, Vec<EncryptedShare>>,
    u2: BTreeSet<Index>,
    sum: Vec<u32>,
    u3: BTreeSet<Index>,
    signatures: BTreeMap<Index, ConsistencySignature>,
    survivors: Vec<Index>,
    responses: BTreeMap<Index, UnmaskResponse>,
}

impl ServerSession {
    /// A server for a round whose roster identities are `identities`.
    pub fn new(cfg: RoundConfig, identities: BTreeMap<Index, [u8; 32]>) -> Self {
        let sum = vec![0; cfg.vector_len];
        ServerSession {
            cfg,
            identities,
            stage: Stage::AdvertiseKeys,
            u1: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            sum,
            u3: BTreeSet::new(),
            signatures: BTreeMap::new(),
            survivors: Vec::new(),
            responses: BTreeMap::new(),
        }
    }

    /// The stage the server is collecting.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    fn expect(&self, stage: Stage) -> Result<(), ProtocolError> {
        self.stage.expect(stage)
    }

    fn quorum(&self, stage: Stage, got: usize) -> Result<(), ProtocolError> {
        stage.require_quorum(&self.cfg, got)
    }

    /// Stage 0: accepts a signed advertisement.
    pub fn receive_advertise(&mut self, msg: AdvertiseKeys) -> Result<(), ProtocolError> {
        self.expect(Stage::AdvertiseKeys)?;
        let identity = self
            .identities
            .get(&msg.from)
            .ok_or(ProtocolError::UnknownParticipant(msg.from))?;
        verify(
            msg.from,
            identity,
            ADVERTISE_TAG,
            &advertise_message(&self.cfg, msg.from, &msg.c_public, &msg.s_public),
            &msg.signature,
        )?;
        if self.u1.contains_key(&msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        self.u1.insert(msg.from, msg);
        Ok(())
    }

    /// Ends stage 0: the roster (U1) to broadcast.
    pub fn close_advertise(&mut self) -> Result<KeyRoster, ProtocolError> {
        self.expect(Stage::AdvertiseKeys)?;
        self.quorum(Stage::AdvertiseKeys, self.u1.len())?;
        self.stage = Stage::ShareKeys;
        Ok(KeyRoster {
            keys: self.u1.values().cloned().collect(),
        })
    }

    /// Stage 1: accepts one member's encrypted shares, which must cover every other
    /// member of U1 exactly once.
    pub fn receive_shares(&mut self, msg: ShareKeys) -> Result<(), ProtocolError> {
        self.expect(Stage::ShareKeys)?;
        if !self.u1.contains_key(&msg.from) {
            return Err(ProtocolError::UnknownParticipant(msg.from));
        }
        if self.shares.contains_key(&msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        let mut to = BTreeSet::new();
        for s in &msg.shares {
            if s.from != msg.from || s.to == msg.from || !self.u1.contains_key(&s.to) {
                return Err(ProtocolError::Misaddressed {
                    from: s.from,
                    to: s.to,
                    me: msg.from,
                });
            }
            if !to.insert(s.to) {
                return Err(ProtocolError::Duplicate(s.to));
            }
        }
        if let Some(&missing) = self.u1.keys().find(|v| **v != msg.from && !to.contains(v)) {
            return Err(ProtocolError::MissingShare {
                from: msg.from,
                missing,
            });
        }
        self.shares.insert(msg.from, msg.shares);
        Ok(())
    }

    /// Ends stage 1: for each member of U2, the shares addressed to it by U2.
    pub fn close_share_keys(&mut self) -> Result<Vec<ShareDelivery>, ProtocolError> {
        self.expect(Stage::ShareKeys)?;
        self.quorum(Stage::ShareKeys, self.shares.len())?;
        self.u2 = self.shares.keys().copied().collect();
        let mut deliveries: BTreeMap<Index, Vec<EncryptedShare>> =
            self.u2.iter().map(|v| (*v, Vec::new())).collect();
        for share in self.shares.values().flatten() {
            if let Some(d) = deliveries.get_mut(&share.to) {
                d.push(share.clone());
            }
        }
        self.shares.clear();
        self.stage = Stage::MaskedInput;
        Ok(deliveries
            .into_iter()
            .map(|(to, shares)| ShareDelivery { to, shares })
            .collect())
    }

    /// Stage 2: folds one masked input into the running sum.
    pub fn receive_masked(&mut self, msg: MaskedInput) -> Result<(), ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        if !self.u2.contains(&msg.from) {
            return Err(ProtocolError::UnknownParticipant(msg.from));
        }
        if msg.words.len() != self.cfg.vector_len {
            return Err(ProtocolError::Length {
                from: msg.from,
                got: msg.words.len(),
                expected: self.cfg.vector_len,
            });
        }
        if !self.u3.insert(msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        for (s, w) in self.sum.iter_mut().zip(&msg.words) {
            *s = s.wrapping_add(*w);
        }
        Ok(())
    }

    /// Ends stage 2: the survivor list (U3).
    pub fn close_masked(&mut self) -> Result<SurvivorList, ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        self.quorum(Stage::MaskedInput, self.u3.len())?;
        self.survivors = self.u3.iter().copied().collect();
        self.stage = Stage::ConsistencyCheck;
        Ok(SurvivorList {
            survivors: self.survivors.clone(),
        })
    }

    /// Stage 3: accepts a survivor's signature over the survivor list.
    pub fn receive_signature(&mut self, msg: ConsistencySignature) -> Result<(), ProtocolError> {
        self.expect(Stage::ConsistencyCheck)?;
        if !self.u3.contains(&msg.from) {
            return Err(ProtocolError::NotASubset(msg.from));
        }
        let identity = &self.identities[&msg.from];
        verify(
            msg.from,
            identity,
            CONSISTENCY_TAG,
            &consistency_message(&self.cfg, &self.survivors),
            &msg.signature,
        )?;
        if self.signatures.contains_key(&msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        self.signatures.insert(msg.from, msg);
        Ok(())
    }

    /// Ends stage 3: the unmask request with every signature (U4).
    pub fn close_consistency(&mut self) -> Result<UnmaskRequest, ProtocolError> {
        self.expect(Stage::ConsistencyCheck)?;
        self.quorum(Stage::ConsistencyCheck, self.signatures.len())?;
        self.stage = Stage::Unmask;
        Ok(UnmaskRequest {
            survivors: self.survivors.clone(),
            signatures: self.signatures.values().cloned().collect(),
        })
    }

    /// Stage 4: accepts a participant's revealed shares.
    pub fn receive_unmask(&mut self, msg: UnmaskResponse) -> Result<(), ProtocolError> {
        self.expect(Stage::Unmask)?;
        if !self.signatures.contains_key(&msg.from) {
            return Err(ProtocolError::NotASubset(msg.from));
        }
        if self.responses.contains_key(&msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        self.responses.insert(msg.from, msg);
        Ok(())
    }

    /// Ends the round: reconstructs the survivors' self masks and the dropped members' mask
    /// keys, removes every mask, and returns `Σ_{u ∈ U3} x_u mod 2^32` with U3.
    pub fn finish(&mut self) -> Result<(Vec<u32>, Vec<Index>), ProtocolError> {
        self.expect(Stage::Unmask)?;
        self.quorum(Stage::Unmask, self.responses.len())?;
        let t = self.cfg.threshold;
        let self_mask = by_owner(self.responses.values().flat_map(|r| &r.self_mask_shares));
        let keys = by_owner(self.responses.values().flat_map(|r| &r.key_shares));
        let mut sum = std::mem::take(&mut self.sum);
        for &u in &self.survivors {
            let seed: Zeroizing<[u8; 16]> = reconstruct(&self_mask, u, t)?;
            apply(&seed, &mut sum, MaskSign::Subtract);
        }
        for &v in self.u2.difference(&self.u3) {
            let key: Zeroizing<[u8; 32]> = reconstruct(&keys, v, t)?;
            let secret = AgreementSecret::from_bytes(*key);
            for &u in &self.survivors {
                let seed =
                    secret.pairwise_mask_seed(&self.u1[&u].s_public, &self.cfg.context, v, u)?;
                // Undo what survivor u applied for the pair (u, v).
                let sign = match pair_mask_sign(u, v) {
                    MaskSign::Add => MaskSign::Subtract,
                    MaskSign::Subtract => MaskSign::Add,
                };
                apply(&seed, &mut sum, sign);
            }
        }
        self.stage = Stage::Done;
        Ok((sum, self.survivors.clone()))
    }
}

/// Groups revealed shares by the participant whose secret they share.
fn by_owner<'a>(shares: impl Iterator<Item = &'a RevealedShare>) -> BTreeMap<Index, Vec<Share>> {
    let mut out: BTreeMap<Index, Vec<Share>> = BTreeMap::new();
    for s in shares {
        out.entry(s.owner).or_default().push(Share {
            x: s.x,
            y: s.y.clone(),
        });
    }
    out
}

/// Recovers `owner`'s N-byte secret from its shares; wiped when dropped.
fn reconstruct<const N: usize>(
    shares: &BTreeMap<Index, Vec<Share>>,
    owner: Index,
    threshold: usize,
) -> Result<Zeroizing<[u8; N]>, ProtocolError> {
    let shares = shares.get(&owner).map_or(&[][..], Vec::as_slice);
    let secret = Zeroizing::new(
        combine(shares, threshold).map_err(|e| ProtocolError::Reconstruct(owner, e))?,
    );
    let bytes: [u8; N] = secret
        .as_slice()
        .try_into()
        .map_err(|_| ProtocolError::MalformedShare(owner))?;
    Ok(Zeroizing::new(bytes))
}
