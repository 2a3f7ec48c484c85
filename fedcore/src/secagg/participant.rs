//! The participant's side of a secure-aggregation round, as a sans-IO state machine: each
//! method consumes the server's message for one stage and returns this participant's reply,
//! or refuses when the server's message is inconsistent with what it saw before.
//!
//! Everything a participant does is confined to its *neighbourhood* in the round's graph
//! ([`crate::secagg::graph`]): itself and its neighbours, every other member for the complete
//! graph. It checks the advertisements of its neighbourhood only, Shamir-shares its secrets
//! among the neighbourhood members that advertised (threshold t of them), masks against the
//! neighbours that sent it shares, and reveals shares only of neighbours. Every quorum is
//! counted inside the neighbourhood, and t must be a strict majority of the neighbourhood
//! members that share keys.
//!
//! Why that is enough: the server learns `x_v` only with both `b_v` (self mask) and `s_v`
//! (mask key), i.e. t shares of each. Both are held only by `v`'s neighbourhood, and an honest
//! holder reveals at most one of the two for `v` in a round (it answers one unmask request,
//! after signing one survivor list). Two disjoint groups of honest holders of t members each
//! do not fit into a neighbourhood in which t is a strict majority. The consistency check
//! (everyone signs the same global survivor list and the model hash, and each participant
//! wants t valid signatures from its own neighbourhood) binds the round to one list and one
//! model on top of that. Members outside the neighbourhood never hold anything of this
//! participant, so their advertisements and signatures are not checked here (the server and
//! their own neighbours check them).

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::secagg::crypto::{
    AgreementSecret, Identity, IdentityKey, IdentityKeys, ShareKey, SignedItem, verify_batch,
};
use crate::secagg::graph::Graph;
use crate::secagg::mask::{MaskSign, apply_many};
use crate::secagg::messages::{
    AdvertiseKeys, ConsistencySignature, EncryptedShare, Index, KeyRoster, MaskedInput,
    RevealedShare, ShareDelivery, ShareKeys, SurvivorList, UnmaskRequest, UnmaskResponse,
};
use crate::secagg::protocol::{
    ADVERTISE_TAG, CONSISTENCY_TAG, ProtocolError, RoundConfig, SHARE_PLAINTEXT_LEN, Stage,
    advertise_message, consistency_message, pair_mask_sign,
};
use crate::secagg::shamir::{Share, split};

/// Fresh secret randomness for one round, drawn by the caller (from the OS in production).
/// Wiped from memory when dropped: the session copies what it keeps into wiped storage.
#[derive(zeroize::Zeroize, zeroize::ZeroizeOnDrop)]
pub struct RoundRandomness {
    pub c_secret: [u8; 32],
    pub s_secret: [u8; 32],
    pub self_mask_seed: [u8; 16],
    pub shamir_seed: [u8; 32],
}

impl RoundRandomness {
    /// Draws every secret from `rng` (the OS-seeded generator in production, a seeded
    /// one in simulations).
    pub fn draw(rng: &mut impl rand::RngCore) -> Self {
        let mut r = RoundRandomness {
            c_secret: [0; 32],
            s_secret: [0; 32],
            self_mask_seed: [0; 16],
            shamir_seed: [0; 32],
        };
        rng.fill_bytes(&mut r.c_secret);
        rng.fill_bytes(&mut r.s_secret);
        rng.fill_bytes(&mut r.self_mask_seed);
        rng.fill_bytes(&mut r.shamir_seed);
        r
    }
}

/// The two shares this participant holds of one peer's secrets.
struct HeldShares {
    key_share: Share,
    self_mask_share: Share,
}

/// One participant in one round.
pub struct ParticipantSession {
    cfg: RoundConfig,
    me: Index,
    identity: Identity,
    /// Identity public keys of every roster member, from provisioning, decoded once for
    /// the federation (or at least for the whole attempt) by the caller.
    identities: IdentityKeys,
    /// This participant and its neighbours in the round's graph.
    neighbourhood: BTreeSet<Index>,
    stage: Stage,
    c_secret: AgreementSecret,
    s_secret: AgreementSecret,
    /// The public keys of `c_secret` and `s_secret`, computed when advertising.
    publics: Option<([u8; 32], [u8; 32])>,
    /// This participant's own signatures (advertisement, consistency check): when the
    /// server relays them unchanged they need no verification (Ed25519 signing is
    /// deterministic, so the same message gives the same bytes).
    own_signatures: (Option<[u8; 64]>, Option<[u8; 64]>),
    self_mask_seed: Zeroizing<[u8; 16]>,
    shamir_seed: Zeroizing<[u8; 32]>,
    /// Every member listed in the key roster (U1), neighbours or not.
    u1_all: BTreeSet<Index>,
    /// U1 ∩ neighbourhood: members whose advertised keys verified, with (c, s) public keys.
    u1: BTreeMap<Index, ([u8; 32], [u8; 32])>,
    /// Share-encryption keys with every other member of `u1`, derived once.
    share_keys: BTreeMap<Index, ShareKey>,
    /// Shares held of each U2 member's secrets (own included).
    held: BTreeMap<Index, HeldShares>,
    /// U2 ∩ neighbourhood: neighbours that sent this participant shares, and itself.
    u2: BTreeSet<Index>,
    /// U3 as signed (global).
    u3: Vec<Index>,
}

impl ParticipantSession {
    /// A participant `me` with identity seed `identity_seed`, in a round whose roster
    /// identities are `identities` (which must include `me`). Refuses a round whose graph
    /// cannot be built or gives this participant a neighbourhood smaller than the quorum.
    pub fn new(
        cfg: RoundConfig,
        me: Index,
        identity_seed: [u8; 32],
        identities: IdentityKeys,
        randomness: RoundRandomness,
    ) -> Result<Self, ProtocolError> {
        if !identities.contains(me) {
            return Err(ProtocolError::MissingSelf(me));
        }
        let roster: Vec<Index> = identities.indices().collect();
        let graph = Graph::new(cfg.neighbourhood, &cfg.graph_seed, &roster)?;
        let mut neighbourhood: BTreeSet<Index> = graph.neighbours(me).into_iter().collect();
        neighbourhood.insert(me);
        if neighbourhood.len() < cfg.quorum() {
            return Err(ProtocolError::TooFew {
                stage: Stage::AdvertiseKeys,
                got: neighbourhood.len(),
                needed: cfg.quorum(),
            });
        }
        Ok(ParticipantSession {
            cfg,
            me,
            identity: Identity::from_seed(identity_seed),
            identities,
            neighbourhood,
            stage: Stage::AdvertiseKeys,
            c_secret: AgreementSecret::from_bytes(randomness.c_secret),
            s_secret: AgreementSecret::from_bytes(randomness.s_secret),
            publics: None,
            own_signatures: (None, None),
            self_mask_seed: Zeroizing::new(randomness.self_mask_seed),
            shamir_seed: Zeroizing::new(randomness.shamir_seed),
            u1_all: BTreeSet::new(),
            u1: BTreeMap::new(),
            share_keys: BTreeMap::new(),
            held: BTreeMap::new(),
            u2: BTreeSet::new(),
            u3: Vec::new(),
        })
    }

    /// The stage this participant is waiting in.
    pub fn stage(&self) -> Stage {
        self.stage
    }

    /// This participant and its neighbours, ascending.
    pub fn neighbourhood(&self) -> impl Iterator<Item = Index> + '_ {
        self.neighbourhood.iter().copied()
    }

    fn expect(&self, stage: Stage) -> Result<(), ProtocolError> {
        self.stage.expect(stage)
    }

    fn too_few(&self, stage: Stage, got: usize) -> Result<(), ProtocolError> {
        stage.require_quorum(&self.cfg, got)
    }

    /// The public keys of this round's two agreement secrets (each a base-point
    /// multiplication, so computed once).
    fn publics(&mut self) -> ([u8; 32], [u8; 32]) {
        *self
            .publics
            .get_or_insert_with(|| (self.c_secret.public(), self.s_secret.public()))
    }

    /// The identity key of roster member `v`.
    fn identity_key(&self, v: Index) -> Result<IdentityKey, ProtocolError> {
        self.identities
            .get(v)
            .copied()
            .ok_or(ProtocolError::UnknownParticipant(v))
    }

    /// Stage 0: this participant's signed public keys.
    pub fn advertise(&mut self) -> Result<AdvertiseKeys, ProtocolError> {
        self.expect(Stage::AdvertiseKeys)?;
        let (c_public, s_public) = self.publics();
        let signature = self.identity.sign(
            ADVERTISE_TAG,
            &advertise_message(&self.cfg, self.me, &c_public, &s_public),
        );
        self.own_signatures.0 = Some(signature);
        self.stage = Stage::ShareKeys;
        Ok(AdvertiseKeys {
            from: self.me,
            c_public,
            s_public,
            signature,
        })
    }

    /// Stage 1: checks the advertisements of its neighbourhood (signature by the roster
    /// identity, this participant's own keys unchanged, enough members, t a majority of
    /// them) and encrypts shares of this participant's mask key and self-mask seed for every
    /// neighbour in U1. Other members' entries are only checked to be known and unique.
    pub fn share_keys(&mut self, roster: &KeyRoster) -> Result<ShareKeys, ProtocolError> {
        self.expect(Stage::ShareKeys)?;
        let mut u1_all = BTreeSet::new();
        let mut u1 = BTreeMap::new();
        let mut checked = Vec::new();
        for k in &roster.keys {
            if !self.identities.contains(k.from) {
                return Err(ProtocolError::UnknownParticipant(k.from));
            }
            if !u1_all.insert(k.from) {
                return Err(ProtocolError::Duplicate(k.from));
            }
            if self.neighbourhood.contains(&k.from) {
                u1.insert(k.from, (k.c_public, k.s_public));
                // Its own advertisement, relayed unchanged, is known good.
                if k.from == self.me
                    && (k.c_public, k.s_public) == self.publics()
                    && Some(k.signature) == self.own_signatures.0
                {
                    continue;
                }
                let key = self.identity_key(k.from)?;
                let message = advertise_message(&self.cfg, k.from, &k.c_public, &k.s_public);
                checked.push((k.from, key, message, &k.signature));
            }
        }
        let items: Vec<SignedItem<'_>> = checked
            .iter()
            .map(|(signer, key, message, signature)| SignedItem {
                signer: *signer,
                key,
                message,
                signature,
            })
            .collect();
        verify_batch(ADVERTISE_TAG, &items)?;
        let own = self.publics();
        match u1.get(&self.me) {
            None => return Err(ProtocolError::MissingSelf(self.me)),
            Some(keys) if *keys != own => {
                return Err(ProtocolError::SubstitutedKeys(self.me));
            }
            Some(_) => {}
        }
        self.too_few(Stage::ShareKeys, u1.len())?;
        if 2 * self.cfg.threshold <= u1.len() {
            return Err(ProtocolError::ThresholdNotMajority {
                threshold: self.cfg.threshold,
                members: u1.len(),
            });
        }

        let n = u1.len();
        let t = self.cfg.threshold;
        let key = self.s_secret.to_bytes();
        let mut seed_b = *self.shamir_seed;
        seed_b[0] ^= 0xff; // independent polynomials for the two secrets
        let key_shares = split(key.as_ref(), t, n, *self.shamir_seed)
            .map_err(|e| ProtocolError::Reconstruct(self.me, e))?;
        let mask_shares = split(self.self_mask_seed.as_ref(), t, n, seed_b)
            .map_err(|e| ProtocolError::Reconstruct(self.me, e))?;

        let peers: Vec<(Index, [u8; 32])> = u1
            .iter()
            .filter(|(v, _)| **v != self.me)
            .map(|(&v, (c_public, _))| (v, *c_public))
            .collect();
        let mut keys = self
            .c_secret
            .share_keys(&peers, &self.cfg.context, self.me)?
            .into_iter();
        let mut shares = Vec::with_capacity(n - 1);
        for (pos, &v) in u1.keys().enumerate() {
            let (ks, ms) = (&key_shares[pos], &mask_shares[pos]);
            if v == self.me {
                self.held.insert(
                    v,
                    HeldShares {
                        key_share: ks.clone(),
                        self_mask_share: ms.clone(),
                    },
                );
                continue;
            }
            let key = keys.next().ok_or(ProtocolError::UnknownParticipant(v))?;
            let mut plain = Zeroizing::new(Vec::with_capacity(SHARE_PLAINTEXT_LEN));
            plain.push(ks.x);
            plain.extend_from_slice(&ks.y);
            plain.push(ms.x);
            plain.extend_from_slice(&ms.y);
            let ciphertext = key.seal(&self.cfg.context, self.me, v, &plain)?;
            self.share_keys.insert(v, key);
            shares.push(EncryptedShare {
                from: self.me,
                to: v,
                ciphertext,
            });
        }
        self.u1 = u1;
        self.u1_all = u1_all;
        self.stage = Stage::MaskedInput;
        Ok(ShareKeys {
            from: self.me,
            shares,
        })
    }

    /// Stage 2: decrypts the shares received (their senders form U2, all neighbours), and
    /// masks `input` with the self mask and one pairwise mask per neighbour in U2.
    pub fn masked_input(
        &mut self,
        delivery: &ShareDelivery,
        input: &[u32],
    ) -> Result<MaskedInput, ProtocolError> {
        self.expect(Stage::MaskedInput)?;
        if input.len() != self.cfg.vector_len {
            return Err(ProtocolError::Length {
                from: self.me,
                got: input.len(),
                expected: self.cfg.vector_len,
            });
        }
        let mut u2 = BTreeSet::from([self.me]);
        let mut held = BTreeMap::new();
        for s in &delivery.shares {
            if s.to != self.me || delivery.to != self.me {
                return Err(ProtocolError::Misaddressed {
                    from: s.from,
                    to: s.to,
                    me: self.me,
                });
            }
            let key = self
                .share_keys
                .get(&s.from)
                .ok_or(ProtocolError::UnknownParticipant(s.from))?;
            if !u2.insert(s.from) {
                return Err(ProtocolError::Duplicate(s.from));
            }
            let plain = key.open(&self.cfg.context, s.from, self.me, &s.ciphertext)?;
            if plain.len() != SHARE_PLAINTEXT_LEN {
                return Err(ProtocolError::MalformedShare(s.from));
            }
            held.insert(
                s.from,
                HeldShares {
                    key_share: Share {
                        x: plain[0],
                        y: plain[1..33].to_vec(),
                    },
                    self_mask_share: Share {
                        x: plain[33],
                        y: plain[34..].to_vec(),
                    },
                },
            );
        }
        self.too_few(Stage::MaskedInput, u2.len())?;

        let peers = u2
            .iter()
            .filter(|v| **v != self.me)
            .map(|&v| {
                let (_, s_public) = self
                    .u1
                    .get(&v)
                    .ok_or(ProtocolError::UnknownParticipant(v))?;
                Ok((v, *s_public))
            })
            .collect::<Result<Vec<_>, ProtocolError>>()?;
        let seeds = self
            .s_secret
            .pairwise_mask_seeds(&peers, &self.cfg.context, self.me)?;
        let mut masks = Vec::with_capacity(u2.len());
        masks.push((self.self_mask_seed.clone(), MaskSign::Add));
        for ((v, _), seed) in peers.iter().zip(seeds) {
            masks.push((seed, pair_mask_sign(self.me, *v)));
        }
        let mut words = input.to_vec();
        apply_many(&masks, &mut words);
        self.held.extend(held);
        self.u2 = u2;
        self.stage = Stage::ConsistencyCheck;
        Ok(MaskedInput {
            from: self.me,
            words,
        })
    }

    /// Stage 3: signs the (global) survivor list after checking that it contains this
    /// participant, lists only members of U1, lists of its neighbours only those that sent it
    /// shares, and holds a quorum of its neighbourhood.
    pub fn consistency(
        &mut self,
        list: &SurvivorList,
    ) -> Result<ConsistencySignature, ProtocolError> {
        self.expect(Stage::ConsistencyCheck)?;
        let survivors = sorted_unique(&list.survivors)?;
        if !survivors.contains(&self.me) {
            return Err(ProtocolError::MissingSelf(self.me));
        }
        if let Some(v) = survivors.iter().find(|v| {
            !self.u1_all.contains(v) || (self.neighbourhood.contains(v) && !self.u2.contains(v))
        }) {
            return Err(ProtocolError::NotASubset(*v));
        }
        let local = survivors
            .iter()
            .filter(|v| self.neighbourhood.contains(v))
            .count();
        self.too_few(Stage::ConsistencyCheck, local)?;
        if let Some(groups) = &self.cfg.groups {
            groups.check(&survivors)?;
        }
        let signature = self
            .identity
            .sign(CONSISTENCY_TAG, &consistency_message(&self.cfg, &survivors));
        self.u3 = survivors;
        self.own_signatures.1 = Some(signature);
        self.stage = Stage::Unmask;
        Ok(ConsistencySignature {
            from: self.me,
            signature,
        })
    }

    /// The shares this participant holds of `owner`'s mask key and self-mask seed, as a
    /// colluding lab would hand them to a cheating server (attack tests only).
    #[cfg(test)]
    pub(crate) fn held_shares_of(&self, owner: Index) -> Option<(Share, Share)> {
        self.held
            .get(&owner)
            .map(|h| (h.key_share.clone(), h.self_mask_share.clone()))
    }

    /// Stage 4: checks that at least a quorum of its neighbourhood signed the very list this
    /// participant signed (signatures of other members are checked for membership and
    /// uniqueness only: they count for nothing here), then reveals, for each neighbour in
    /// U2 and itself, either its self-mask share (it survived) or its mask-key share (it
    /// dropped) — never both.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, ProtocolError> {
        self.expect(Stage::Unmask)?;
        if request.survivors != self.u3 {
            return Err(ProtocolError::InconsistentSurvivors);
        }
        let message = consistency_message(&self.cfg, &self.u3);
        let mut signers = BTreeSet::new();
        let mut checked = Vec::new();
        let mut signers_in_hood = 0;
        for s in &request.signatures {
            if self.u3.binary_search(&s.from).is_err() {
                return Err(ProtocolError::NotASubset(s.from));
            }
            if !signers.insert(s.from) {
                return Err(ProtocolError::Duplicate(s.from));
            }
            if !self.identities.contains(s.from) {
                return Err(ProtocolError::UnknownParticipant(s.from));
            }
            if s.from == self.me && Some(s.signature) == self.own_signatures.1 {
                signers_in_hood += 1;
            } else if self.neighbourhood.contains(&s.from) {
                checked.push((s.from, self.identity_key(s.from)?, &s.signature));
                signers_in_hood += 1;
            }
        }
        let items: Vec<SignedItem<'_>> = checked
            .iter()
            .map(|(signer, key, signature)| SignedItem {
                signer: *signer,
                key,
                message: &message,
                signature,
            })
            .collect();
        verify_batch(CONSISTENCY_TAG, &items)?;
        self.too_few(Stage::Unmask, signers_in_hood)?;

        let mut self_mask_shares = Vec::new();
        let mut key_shares = Vec::new();
        for &v in &self.u2 {
            let held = self.held.get(&v).ok_or(ProtocolError::MissingShare {
                from: v,
                missing: self.me,
            })?;
            if self.u3.binary_search(&v).is_ok() {
                self_mask_shares.push(RevealedShare {
                    owner: v,
                    x: held.self_mask_share.x,
                    y: held.self_mask_share.y.clone(),
                });
            } else {
                key_shares.push(RevealedShare {
                    owner: v,
                    x: held.key_share.x,
                    y: held.key_share.y.clone(),
                });
            }
        }
        // Nothing more can be revealed in this round.
        self.held.clear();
        self.stage = Stage::Done;
        Ok(UnmaskResponse {
            from: self.me,
            self_mask_shares,
            key_shares,
        })
    }
}

/// Sorts and deduplicates a list of indices, refusing duplicates.
pub(crate) fn sorted_unique(list: &[Index]) -> Result<Vec<Index>, ProtocolError> {
    let mut v = list.to_vec();
    v.sort_unstable();
    if let Some(w) = v.windows(2).find(|w| w[0] == w[1]) {
        return Err(ProtocolError::Duplicate(w[0]));
    }
    Ok(v)
}
