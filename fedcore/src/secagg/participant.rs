//! The participant's side of a secure-aggregation round, as a sans-IO state machine: each
//! method consumes the server's message for one stage and returns this participant's reply,
//! or refuses when the server's message is inconsistent with what it saw before.

use std::collections::{BTreeMap, BTreeSet};

use zeroize::Zeroizing;

use crate::secagg::crypto::{AgreementSecret, Identity, ShareKey, verify};
use crate::secagg::mask::{MaskSign, apply};
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
pub struct RoundRandomness {
    pub c_secret: [u8; 32],
    pub s_secret: [u8; 32],
    pub self_mask_seed: [u8; 16],
    pub shamir_seed: [u8; 32],
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
    /// Identity public keys of every roster member, from provisioning.
    identities: BTreeMap<Index, [u8; 32]>,
    stage: Stage,
    c_secret: AgreementSecret,
    s_secret: AgreementSecret,
    self_mask_seed: Zeroizing<[u8; 16]>,
    shamir_seed: Zeroizing<[u8; 32]>,
    /// U1: members whose advertised keys verified, with (c, s) public keys.
    u1: BTreeMap<Index, ([u8; 32], [u8; 32])>,
    /// Share-encryption keys with every other member of U1, derived once.
    share_keys: BTreeMap<Index, ShareKey>,
    /// Shares held of each U2 member's secrets (own included).
    held: BTreeMap<Index, HeldShares>,
    /// U2: members that sent this participant shares (and itself).
    u2: BTreeSet<Index>,
    /// U3 as signed.
    u3: Vec<Index>,
}

impl ParticipantSession {
    /// A participant `me` with identity seed `identity_seed`, in a round whose roster
    /// identities are `identities` (which must include `me`).
    pub fn new(
        cfg: RoundConfig,
        me: Index,
        identity_seed: [u8; 32],
        identities: BTreeMap<Index, [u8; 32]>,
        randomness: RoundRandomness,
    ) -> Result<Self, ProtocolError> {
        if !identities.contains_key(&me) {
            return Err(ProtocolError::MissingSelf(me));
        }
        if identities.len() < cfg.quorum() {
            return Err(ProtocolError::TooFew {
                stage: Stage::AdvertiseKeys,
                got: identities.len(),
                needed: cfg.quorum(),
            });
        }
        Ok(ParticipantSession {
            cfg,
            me,
            identity: Identity::from_seed(identity_seed),
            identities,
            stage: Stage::AdvertiseKeys,
            c_secret: AgreementSecret::from_bytes(randomness.c_secret),
            s_secret: AgreementSecret::from_bytes(randomness.s_secret),
            self_mask_seed: Zeroizing::new(randomness.self_mask_seed),
            shamir_seed: Zeroizing::new(randomness.shamir_seed),
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

    fn expect(&self, stage: Stage) -> Result<(), ProtocolError> {
        self.stage.expect(stage)
    }

    fn too_few(&self, stage: Stage, got: usize) -> Result<(), ProtocolError> {
        stage.require_quorum(&self.cfg, got)
    }

    /// Stage 0: this participant's signed public keys.
    pub fn advertise(&mut self) -> Result<AdvertiseKeys, ProtocolError> {
        self.expect(Stage::AdvertiseKeys)?;
        let c_public = self.c_secret.public();
        let s_public = self.s_secret.public();
        let signature = self.identity.sign(
            ADVERTISE_TAG,
            &advertise_message(&self.cfg, self.me, &c_public, &s_public),
        );
        self.stage = Stage::ShareKeys;
        Ok(AdvertiseKeys {
            from: self.me,
            c_public,
            s_public,
            signature,
        })
    }

    /// Stage 1: checks every advertisement (signature by the roster identity, this
    /// participant's own keys unchanged, enough peers) and encrypts shares of this
    /// participant's mask key and self-mask seed for every other member of U1.
    pub fn share_keys(&mut self, roster: &KeyRoster) -> Result<ShareKeys, ProtocolError> {
        self.expect(Stage::ShareKeys)?;
        let mut u1 = BTreeMap::new();
        for k in &roster.keys {
            let identity = self
                .identities
                .get(&k.from)
                .ok_or(ProtocolError::UnknownParticipant(k.from))?;
            verify(
                k.from,
                identity,
                ADVERTISE_TAG,
                &advertise_message(&self.cfg, k.from, &k.c_public, &k.s_public),
                &k.signature,
            )?;
            if u1.insert(k.from, (k.c_public, k.s_public)).is_some() {
                return Err(ProtocolError::Duplicate(k.from));
            }
        }
        match u1.get(&self.me) {
            None => return Err(ProtocolError::MissingSelf(self.me)),
            Some((c, s)) if *c != self.c_secret.public() || *s != self.s_secret.public() => {
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

        let mut shares = Vec::with_capacity(n - 1);
        for (pos, (&v, (c_public, _))) in u1.iter().enumerate() {
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
            let mut plain = Zeroizing::new(Vec::with_capacity(SHARE_PLAINTEXT_LEN));
            plain.push(ks.x);
            plain.extend_from_slice(&ks.y);
            plain.push(ms.x);
            plain.extend_from_slice(&ms.y);
            let key = self
                .c_secret
                .share_key(c_public, &self.cfg.context, self.me, v)?;
            let ciphertext = key.seal(&self.cfg.context, self.me, v, &plain)?;
            self.share_keys.insert(v, key);
            shares.push(EncryptedShare {
                from: self.me,
                to: v,
                ciphertext,
            });
        }
        self.u1 = u1;
        self.stage = Stage::MaskedInput;
        Ok(ShareKeys {
            from: self.me,
            shares,
        })
    }

    /// Stage 2: decrypts the shares received (their senders form U2), and masks `input`
    /// with the self mask and one pairwise mask per other member of U2.
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

        let mut words = input.to_vec();
        apply(&self.self_mask_seed, &mut words, MaskSign::Add);
        for &v in &u2 {
            if v == self.me {
                continue;
            }
            let (_, s_public) = &self.u1[&v];
            let seed = self
                .s_secret
                .pairwise_mask_seed(s_public, &self.cfg.context, self.me, v)?;
            apply(&seed, &mut words, pair_mask_sign(self.me, v));
        }
        self.held.extend(held);
        self.u2 = u2;
        self.stage = Stage::ConsistencyCheck;
        Ok(MaskedInput {
            from: self.me,
            words,
        })
    }

    /// Stage 3: signs the survivor list after checking it is a large enough subset of U2
    /// that contains this participant.
    pub fn consistency(
        &mut self,
        list: &SurvivorList,
    ) -> Result<ConsistencySignature, ProtocolError> {
        self.expect(Stage::ConsistencyCheck)?;
        let survivors = sorted_unique(&list.survivors)?;
        if !survivors.contains(&self.me) {
            return Err(ProtocolError::MissingSelf(self.me));
        }
        if let Some(v) = survivors.iter().find(|v| !self.u2.contains(v)) {
            return Err(ProtocolError::NotASubset(*v));
        }
        self.too_few(Stage::ConsistencyCheck, survivors.len())?;
        let signature = self
            .identity
            .sign(CONSISTENCY_TAG, &consistency_message(&self.cfg, &survivors));
        self.u3 = survivors;
        self.stage = Stage::Unmask;
        Ok(ConsistencySignature {
            from: self.me,
            signature,
        })
    }

    /// Stage 4: checks that at least a quorum of survivors signed the very list this
    /// participant signed, then reveals, for each other member of U2, either its self-mask
    /// share (it survived) or its mask-key share (it dropped) — never both.
    pub fn unmask(&mut self, request: &UnmaskRequest) -> Result<UnmaskResponse, ProtocolError> {
        self.expect(Stage::Unmask)?;
        if request.survivors != self.u3 {
            return Err(ProtocolError::InconsistentSurvivors);
        }
        let message = consistency_message(&self.cfg, &self.u3);
        let mut signers = BTreeSet::new();
        for s in &request.signatures {
            if !self.u3.contains(&s.from) {
                return Err(ProtocolError::NotASubset(s.from));
            }
            if !signers.insert(s.from) {
                return Err(ProtocolError::Duplicate(s.from));
            }
            let identity = self
                .identities
                .get(&s.from)
                .ok_or(ProtocolError::UnknownParticipant(s.from))?;
            verify(s.from, identity, CONSISTENCY_TAG, &message, &s.signature)?;
        }
        self.too_few(Stage::Unmask, signers.len())?;

        let survivors: BTreeSet<Index> = self.u3.iter().copied().collect();
        let mut self_mask_shares = Vec::new();
        let mut key_shares = Vec::new();
        for &v in &self.u2 {
            let held = &self.held[&v];
            if survivors.contains(&v) {
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
