//! The server's side of a secure-aggregation round, as a sans-IO state machine.
//!
//! The caller feeds each participant message as it arrives (`receive_*`) and decides when a
//! stage ends (`close_*`: everyone answered, or the stage's deadline passed); whoever has not
//! answered by then has dropped. Masked inputs are folded into one running sum as they
//! arrive: the server never stores an individual masked vector, let alone an unmasked one,
//! and its memory is O(vector), not O(participants × vector).
//!
//! With a sparse neighbourhood graph ([`crate::secagg::graph`]) the server expects shares only
//! between neighbours, accepts revealed shares only from a holder's neighbourhood, rebuilds
//! each survivor's self mask from its neighbours' shares, and removes for each dropped
//! participant only the pair masks it shared with its surviving neighbours.

use std::collections::{BTreeMap, BTreeSet};

use crate::secagg::crypto::{AgreementSecret, IdentityKeys, verify_with};
use crate::secagg::graph::Graph;
use crate::secagg::mask::{MaskSign, apply_many};
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
    identities: IdentityKeys,
    graph: Graph,
    stage: Stage,
    u1: BTreeMap<Index, AdvertiseKeys>,
    /// ShareKeys messages received, by sender (U2 once closed).
    shares: BTreeMap<Index, Vec<EncryptedShare>>,
    u2: BTreeSet<Index>,
    sum: Vec<u32>,
    /// Words of each masked input folded so far, for inputs still streaming in (or
    /// abandoned and awaiting retraction).
    partial: BTreeMap<Index, usize>,
    u3: BTreeSet<Index>,
    signatures: BTreeMap<Index, ConsistencySignature>,
    survivors: Vec<Index>,
    responses: BTreeMap<Index, UnmaskResponse>,
}

impl ServerSession {
    /// A server for a round whose roster identities are `identities`. Refuses a round whose
    /// graph cannot be built (odd degree on an odd roster) or whose neighbourhoods are
    /// smaller than the quorum (every participant would refuse it).
    pub fn new(cfg: RoundConfig, identities: IdentityKeys) -> Result<Self, ProtocolError> {
        let roster: Vec<Index> = identities.indices().collect();
        let graph = Graph::new(cfg.neighbourhood, &cfg.graph_seed, &roster)?;
        if graph.degree() + 1 < cfg.quorum() {
            return Err(ProtocolError::TooFew {
                stage: Stage::AdvertiseKeys,
                got: graph.degree() + 1,
                needed: cfg.quorum(),
            });
        }
        let sum = vec![0; cfg.vector_len];
        Ok(ServerSession {
            cfg,
            identities,
            graph,
            stage: Stage::AdvertiseKeys,
            u1: BTreeMap::new(),
            shares: BTreeMap::new(),
            u2: BTreeSet::new(),
            sum,
            partial: BTreeMap::new(),
            u3: BTreeSet::new(),
            signatures: BTreeMap::new(),
            survivors: Vec::new(),
            responses: BTreeMap::new(),
        })
    }

    /// The round's neighbourhood graph.
    pub fn graph(&self) -> &Graph {
        &self.graph
    }

    /// The stage the server is collecting.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// The round's parameters.
    pub fn config(&self) -> &RoundConfig {
        &self.cfg
    }

    /// Who is expected to answer the current stage: the roster before keys are advertised,
    /// then U1, U2, U3 and the signers of the consistency check (U4).
    pub fn expected(&self) -> BTreeSet<Index> {
        match self.stage {
            Stage::AdvertiseKeys => self.identities.indices().collect(),
            Stage::ShareKeys => self.u1.keys().copied().collect(),
            Stage::MaskedInput => self.u2.clone(),
            Stage::ConsistencyCheck => self.u3.clone(),
            Stage::Unmask => self.signatures.keys().copied().collect(),
            Stage::Done => BTreeSet::new(),
        }
    }

    /// Whether `who` has answered the current stage.
    pub fn answered(&self, who: Index) -> bool {
        match self.stage {
            Stage::AdvertiseKeys => self.u1.contains_key(&who),
            Stage::ShareKeys => self.shares.contains_key(&who),
            Stage::MaskedInput => self.u3.contains(&who),
            Stage::ConsistencyCheck => self.signatures.contains_key(&who),
            Stage::Unmask => self.responses.contains_key(&who),
            Stage::Done => true,
        }
    }

    /// How many have answered the current stage.
    pub fn answers(&self) -> usize {
        match self.stage {
            Stage::AdvertiseKeys => self.u1.len(),
            Stage::ShareKeys => self.shares.len(),
            Stage::MaskedInput => self.u3.len(),
            Stage::ConsistencyCheck => self.signatures.len(),
            Stage::Unmask => self.responses.len(),
            Stage::Done => 0,
        }
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
            .get(msg.from)
            .ok_or(ProtocolError::UnknownParticipant(msg.from))?;
        verify_with(
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

    /// Stage 1: accepts one member's encrypted shares, which must cover every neighbour of
    /// the sender in U1 exactly once, and no one else.
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
            if s.from != msg.from
                || !self.u1.contains_key(&s.to)
                || !self.graph.are_neighbours(msg.from, s.to)
            {
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
        if let Some(&missing) = self
            .u1
            .keys()
            .find(|&&v| self.graph.are_neighbours(msg.from, v) && !to.contains(&v))
        {
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

    /// Stage 2: folds one whole masked input into the running sum.
    pub fn receive_masked(&mut self, msg: MaskedInput) -> Result<(), ProtocolError> {
        if msg.words.len() != self.cfg.vector_len {
            return Err(ProtocolError::Length {
                from: msg.from,
                got: msg.words.len(),
                expected: self.cfg.vector_len,
            });
        }
        self.receive_masked_chunk(msg.from, 0, &msg.words)?;
        self.commit_masked(msg.from)
    }

    /// Stage 2, streamed: folds the next `words` of `from`'s masked input, which start at
    /// word `offset`, into the running sum as they arrive. Chunks come in order. Nothing of
    /// the input is kept here; a caller whose stream breaks before [`Self::commit_masked`]
    /// must hand the chunks back to [`Self::retract_masked_chunk`] (from its own spool).
    pub fn receive_masked_chunk(
        &mut self,
        from: Index,
        offset: usize,
        words: &[u32],
    ) -> Result<(), ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        if !self.u2.contains(&from) {
            return Err(ProtocolError::UnknownParticipant(from));
        }
        if self.u3.contains(&from) {
            return Err(ProtocolError::Duplicate(from));
        }
        let folded = self.partial.get(&from).copied().unwrap_or(0);
        if offset != folded {
            return Err(ProtocolError::ChunkOffset {
                from,
                got: offset,
                expected: folded,
            });
        }
        let end = offset + words.len();
        if end > self.cfg.vector_len {
            return Err(ProtocolError::Length {
                from,
                got: end,
                expected: self.cfg.vector_len,
            });
        }
        for (s, w) in self.sum[offset..end].iter_mut().zip(words) {
            *s = s.wrapping_add(*w);
        }
        self.partial.insert(from, end);
        Ok(())
    }

    /// Stage 2, streamed: `from`'s masked input is complete; `from` joins U3.
    pub fn commit_masked(&mut self, from: Index) -> Result<(), ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        let folded = self.partial.get(&from).copied().unwrap_or(0);
        if self.u3.contains(&from) {
            return Err(ProtocolError::Duplicate(from));
        }
        if folded != self.cfg.vector_len {
            return Err(ProtocolError::Length {
                from,
                got: folded,
                expected: self.cfg.vector_len,
            });
        }
        self.partial.remove(&from);
        self.u3.insert(from);
        Ok(())
    }

    /// Takes back a chunk of a masked input that will never be committed (its stream broke
    /// or the stage closed first). Allowed in any later stage until the round finishes; the
    /// round cannot finish while any input is partly folded.
    pub fn retract_masked_chunk(
        &mut self,
        from: Index,
        offset: usize,
        words: &[u32],
    ) -> Result<(), ProtocolError> {
        let folded = self
            .partial
            .get_mut(&from)
            .ok_or(ProtocolError::UnknownParticipant(from))?;
        let end = offset + words.len();
        if end > self.cfg.vector_len || words.len() > *folded {
            return Err(ProtocolError::Length {
                from,
                got: words.len(),
                expected: *folded,
            });
        }
        for (s, w) in self.sum[offset..end].iter_mut().zip(words) {
            *s = s.wrapping_sub(*w);
        }
        *folded -= words.len();
        if *folded == 0 {
            self.partial.remove(&from);
        }
        Ok(())
    }

    /// How much of `from`'s masked input is folded: `(words, committed)`. Where a broken
    /// stream resumes (the next chunk must start at `words`).
    pub fn masked_received(&self, from: Index) -> (usize, bool) {
        if self.u3.contains(&from) {
            (self.cfg.vector_len, true)
        } else {
            (self.partial.get(&from).copied().unwrap_or(0), false)
        }
    }

    /// Participants whose masked input is partly folded and not committed.
    pub fn partial_inputs(&self) -> impl Iterator<Item = Index> + '_ {
        self.partial.keys().copied()
    }

    /// Ends stage 2: the survivor list (U3).
    pub fn close_masked(&mut self) -> Result<SurvivorList, ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        self.quorum(Stage::MaskedInput, self.u3.len())?;
        let survivors: Vec<Index> = self.u3.iter().copied().collect();
        if let Some(groups) = &self.cfg.groups {
            groups.check(&survivors)?;
        }
        self.survivors = survivors;
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
        let identity = self
            .identities
            .get(msg.from)
            .ok_or(ProtocolError::UnknownParticipant(msg.from))?;
        verify_with(
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

    /// Stage 4: accepts a participant's revealed shares: self-mask shares only of survivors
    /// in its neighbourhood, mask-key shares only of its neighbours that dropped after
    /// sharing keys, each owner at most once.
    pub fn receive_unmask(&mut self, msg: UnmaskResponse) -> Result<(), ProtocolError> {
        self.expect(Stage::Unmask)?;
        if !self.signatures.contains_key(&msg.from) {
            return Err(ProtocolError::NotASubset(msg.from));
        }
        if self.responses.contains_key(&msg.from) {
            return Err(ProtocolError::Duplicate(msg.from));
        }
        let mut owners = BTreeSet::new();
        for s in &msg.self_mask_shares {
            if !self.u3.contains(&s.owner) || !self.graph.in_neighbourhood(msg.from, s.owner) {
                return Err(ProtocolError::UnexpectedShare {
                    from: msg.from,
                    owner: s.owner,
                });
            }
            if !owners.insert(s.owner) {
                return Err(ProtocolError::Duplicate(s.owner));
            }
        }
        for s in &msg.key_shares {
            if !self.u2.contains(&s.owner)
                || self.u3.contains(&s.owner)
                || !self.graph.are_neighbours(msg.from, s.owner)
            {
                return Err(ProtocolError::UnexpectedShare {
                    from: msg.from,
                    owner: s.owner,
                });
            }
            if !owners.insert(s.owner) {
                return Err(ProtocolError::Duplicate(s.owner));
            }
        }
        self.responses.insert(msg.from, msg);
        Ok(())
    }

    /// Ends the round: reconstructs the survivors' self masks and the mask keys of the
    /// members that dropped after sharing keys (those with a surviving neighbour), removes
    /// every mask, and returns `Σ_{u ∈ U3} x_u mod 2^32` with U3. Each secret needs t shares
    /// from its owner's neighbourhood; too few is [`ProtocolError::Reconstruct`].
    pub fn finish(&mut self) -> Result<(Vec<u32>, Vec<Index>), ProtocolError> {
        self.expect(Stage::Unmask)?;
        self.quorum(Stage::Unmask, self.responses.len())?;
        if let Some(&from) = self.partial.keys().next() {
            return Err(ProtocolError::Unretracted(from));
        }
        let t = self.cfg.threshold;
        let self_mask = by_owner(self.responses.values().flat_map(|r| &r.self_mask_shares));
        let keys = by_owner(self.responses.values().flat_map(|r| &r.key_shares));
        // Every seed first, so a missing share aborts before the sum is touched.
        let mut masks = Vec::new();
        for &u in &self.survivors {
            let seed: Zeroizing<[u8; 16]> = reconstruct(&self_mask, u, t)?;
            masks.push((seed, MaskSign::Subtract));
        }
        for &v in self.u2.difference(&self.u3) {
            let affected: Vec<Index> = self
                .survivors
                .iter()
                .copied()
                .filter(|&u| self.graph.are_neighbours(u, v))
                .collect();
            if affected.is_empty() {
                continue;
            }
            let key: Zeroizing<[u8; 32]> = reconstruct(&keys, v, t)?;
            let secret = AgreementSecret::from_bytes(*key);
            let peers = affected
                .iter()
                .map(|&u| {
                    let advert = self
                        .u1
                        .get(&u)
                        .ok_or(ProtocolError::UnknownParticipant(u))?;
                    Ok((u, advert.s_public))
                })
                .collect::<Result<Vec<_>, ProtocolError>>()?;
            let seeds = secret.pairwise_mask_seeds(&peers, &self.cfg.context, v)?;
            for (u, seed) in affected.into_iter().zip(seeds) {
                // Undo what survivor u applied for the pair (u, v).
                let sign = match pair_mask_sign(u, v) {
                    MaskSign::Add => MaskSign::Subtract,
                    MaskSign::Subtract => MaskSign::Add,
                };
                masks.push((seed, sign));
            }
        }
        let mut sum = std::mem::take(&mut self.sum);
        apply_many(&masks, &mut sum);
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

/// What a [`ServerSession`] must keep to go on after a restart once its masked-input stage
/// has closed (the coordinator resumes, never restarts, an attempt from then on; see
/// `crate::round::snapshot`): the advertised keys, who shared keys (U2) and sent masked
/// inputs (U3), the survivor list, the consistency signatures and the revealed shares. The
/// running sum travels separately ([`ServerSession::sum`]), as it is large and changes only
/// at stage boundaries. Fixed-size byte fields are plain byte vectors here and are
/// length-checked on the way back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SessionState {
    pub stage: Stage,
    /// U1.
    pub advertised: Vec<SavedAdvert>,
    pub u2: BTreeSet<Index>,
    pub u3: BTreeSet<Index>,
    pub survivors: Vec<Index>,
    /// (signer, signature).
    pub signatures: Vec<(Index, Vec<u8>)>,
    pub responses: Vec<SavedResponse>,
}

/// An [`AdvertiseKeys`] in a [`SessionState`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedAdvert {
    pub from: Index,
    pub c_public: Vec<u8>,
    pub s_public: Vec<u8>,
    pub signature: Vec<u8>,
}

/// A revealed share in a [`SessionState`]: (owner, x, y).
pub type SavedShare = (Index, u8, Vec<u8>);

/// An [`UnmaskResponse`] in a [`SessionState`]; its shares are wiped when dropped.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct SavedResponse {
    pub from: Index,
    pub self_mask_shares: Vec<SavedShare>,
    pub key_shares: Vec<SavedShare>,
}

impl Drop for SavedResponse {
    fn drop(&mut self) {
        use zeroize::Zeroize;
        for (_, _, y) in self
            .self_mask_shares
            .iter_mut()
            .chain(self.key_shares.iter_mut())
        {
            y.zeroize();
        }
    }
}

fn fixed<const N: usize>(field: &'static str, bytes: &[u8]) -> Result<[u8; N], ProtocolError> {
    bytes
        .try_into()
        .map_err(|_| ProtocolError::Snapshot(format!("{field} has {} bytes, not {N}", bytes.len())))
}

fn shares_out(shares: &[RevealedShare]) -> Vec<SavedShare> {
    shares.iter().map(|s| (s.owner, s.x, s.y.clone())).collect()
}

fn shares_in(shares: &[SavedShare]) -> Vec<RevealedShare> {
    shares
        .iter()
        .map(|(owner, x, y)| RevealedShare {
            owner: *owner,
            x: *x,
            y: y.clone(),
        })
        .collect()
}

impl ServerSession {
    /// The advertisements of U1, by index (the key roster broadcast after stage 0).
    pub fn advertisements(&self) -> impl Iterator<Item = &AdvertiseKeys> {
        self.u1.values()
    }

    /// The survivor list (U3) once the masked-input stage closed.
    pub fn survivors(&self) -> &[Index] {
        &self.survivors
    }

    /// The consistency signatures received, by signer.
    pub fn signatures(&self) -> impl Iterator<Item = &ConsistencySignature> {
        self.signatures.values()
    }

    /// The running sum of masked inputs, and how many words of each input still streaming
    /// (or awaiting retraction) are folded into it.
    pub fn sum(&self) -> (&[u32], &BTreeMap<Index, usize>) {
        (&self.sum, &self.partial)
    }

    /// Everything but the sum, for a snapshot. Only meaningful once the masked-input stage
    /// has closed (earlier stages are restarted, not resumed).
    pub fn state(&self) -> SessionState {
        SessionState {
            stage: self.stage,
            advertised: self
                .u1
                .values()
                .map(|a| SavedAdvert {
                    from: a.from,
                    c_public: a.c_public.to_vec(),
                    s_public: a.s_public.to_vec(),
                    signature: a.signature.to_vec(),
                })
                .collect(),
            u2: self.u2.clone(),
            u3: self.u3.clone(),
            survivors: self.survivors.clone(),
            signatures: self
                .signatures
                .values()
                .map(|s| (s.from, s.signature.to_vec()))
                .collect(),
            responses: self
                .responses
                .values()
                .map(|r| SavedResponse {
                    from: r.from,
                    self_mask_shares: shares_out(&r.self_mask_shares),
                    key_shares: shares_out(&r.key_shares),
                })
                .collect(),
        }
    }

    /// A session resumed from [`Self::state`] and [`Self::sum`] after a restart, in the
    /// consistency-check or unmask stage. Refuses a state that is not self-consistent
    /// (wrong sizes, survivors outside U2, a stage before the masked input closed).
    pub fn resume(
        cfg: RoundConfig,
        identities: IdentityKeys,
        state: &SessionState,
        sum: Vec<u32>,
        partial: BTreeMap<Index, usize>,
    ) -> Result<Self, ProtocolError> {
        let bad = |m: String| Err(ProtocolError::Snapshot(m));
        if !matches!(state.stage, Stage::ConsistencyCheck | Stage::Unmask) {
            return bad(format!(
                "a session can be resumed only after its masked input closed, not in stage {:?}",
                state.stage
            ));
        }
        if sum.len() != cfg.vector_len {
            return bad(format!(
                "the running sum has {} words, the round's vector {}",
                sum.len(),
                cfg.vector_len
            ));
        }
        let mut s = ServerSession::new(cfg, identities)?;
        for a in &state.advertised {
            if s.identities.get(a.from).is_none() {
                return bad(format!(
                    "advertised keys of {}, who is not on the roster",
                    a.from
                ));
            }
            s.u1.insert(
                a.from,
                AdvertiseKeys {
                    from: a.from,
                    c_public: fixed("c_public", &a.c_public)?,
                    s_public: fixed("s_public", &a.s_public)?,
                    signature: fixed("advertise signature", &a.signature)?,
                },
            );
        }
        let survivors: BTreeSet<Index> = state.survivors.iter().copied().collect();
        if !state.u2.iter().all(|i| s.u1.contains_key(i))
            || !state.u3.is_subset(&state.u2)
            || survivors != state.u3
            || partial.values().any(|&w| w > s.cfg.vector_len)
        {
            return bad("U1 ⊇ U2 ⊇ U3 = survivors does not hold".into());
        }
        s.u2 = state.u2.clone();
        s.u3 = state.u3.clone();
        s.survivors = state.survivors.clone();
        for (from, sig) in &state.signatures {
            if !s.u3.contains(from) {
                return bad(format!(
                    "a consistency signature from {from}, not a survivor"
                ));
            }
            s.signatures.insert(
                *from,
                ConsistencySignature {
                    from: *from,
                    signature: fixed("consistency signature", sig)?,
                },
            );
        }
        for r in &state.responses {
            if !s.signatures.contains_key(&r.from) {
                return bad(format!("revealed shares from {}, who did not sign", r.from));
            }
            s.responses.insert(
                r.from,
                UnmaskResponse {
                    from: r.from,
                    self_mask_shares: shares_in(&r.self_mask_shares),
                    key_shares: shares_in(&r.key_shares),
                },
            );
        }
        s.sum = sum;
        s.partial = partial;
        s.stage = state.stage;
        Ok(s)
    }
}
