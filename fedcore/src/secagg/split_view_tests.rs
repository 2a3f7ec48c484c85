//! The split-view attack of a cheating server with one colluding lab (issue #27), played
//! against the real participant state machines.
//!
//! Five labs; lab 1 is the target, lab 5 colludes with the server (it signs anything and
//! hands over every share it holds). Every lab advertises keys, shares them and sends its
//! masked input honestly. Then the server shows group A a survivor list on which lab 1
//! survived (so A reveals shares of lab 1's self-mask seed) and group B a list on which
//! lab 1 dropped (so B reveals shares of lab 1's mask key). Each honest lab signs one list
//! and reveals only for a list carrying a threshold of signatures from its neighbourhood.
//! With both secrets the server strips every mask from lab 1's masked input alone.
//!
//! With the old default threshold (a strict majority: 3 of 5) the attack recovers lab 1's
//! input exactly. With the threshold that follows from `max_colluding = 1` (4 of 5) no way
//! of splitting the honest labs gives the server both secrets.

use std::collections::{BTreeMap, BTreeSet};

use rand::SeedableRng;
use rand_chacha::ChaCha20Rng;
use zeroize::Zeroizing;

use super::crypto::{AgreementSecret, Identity, IdentityKeys};
use super::mask::{MaskSign, apply_many};
use super::messages::*;
use super::participant::{ParticipantSession, RoundRandomness};
use super::protocol::{CONSISTENCY_TAG, ProtocolError, consistency_message, pair_mask_sign};
use super::shamir::{Share, combine};
use super::simulation::identity_seed;
use super::spec::SecureAggregationSpec;
use super::tests::config;

const N: Index = 5;
const TARGET: Index = 1;
const COLLUDER: Index = 5;
const LEN: usize = 16;

fn input(i: Index) -> Vec<u32> {
    (0..LEN as u32).map(|k| 1000 * i + 7 * k + 3).collect()
}

/// What the attack ended with: lab 1's input, or why the server could not get it.
type Outcome = Result<Vec<u32>, String>;

/// Runs the attack with `threshold`, showing honest labs in `group_a` the list where the
/// target survived (every lab) and those in `group_b` the list where it dropped (every lab
/// but the target); the others are shown nothing.
fn attack(threshold: usize, group_a: &BTreeSet<Index>, group_b: &BTreeSet<Index>) -> Outcome {
    assert!(group_a.is_disjoint(group_b) && !group_b.contains(&TARGET));
    let cfg = config(threshold, LEN);
    let identities: BTreeMap<Index, [u8; 32]> = (1..=N)
        .map(|i| (i, Identity::from_seed(identity_seed(i)).public()))
        .collect();
    let identities = IdentityKeys::decode(&identities).unwrap();
    let mut rng = ChaCha20Rng::seed_from_u64(27);
    let mut labs: BTreeMap<Index, ParticipantSession> = (1..=N)
        .map(|i| {
            let r = RoundRandomness::draw(&mut rng);
            let s =
                ParticipantSession::new(cfg.clone(), i, identity_seed(i), identities.clone(), r)
                    .unwrap();
            (i, s)
        })
        .collect();

    // Stages 0-2, everyone honest.
    let adverts: Vec<AdvertiseKeys> = labs.values_mut().map(|l| l.advertise().unwrap()).collect();
    let s_public: BTreeMap<Index, [u8; 32]> =
        adverts.iter().map(|a| (a.from, a.s_public)).collect();
    let roster = KeyRoster { keys: adverts };
    let shared: Vec<ShareKeys> = labs
        .values_mut()
        .map(|l| l.share_keys(&roster).unwrap())
        .collect();
    let mut masked = BTreeMap::new();
    for (&i, lab) in labs.iter_mut() {
        let delivery = ShareDelivery {
            to: i,
            shares: shared
                .iter()
                .flat_map(|m| m.shares.iter().filter(|s| s.to == i).cloned())
                .collect(),
        };
        masked.insert(i, lab.masked_input(&delivery, &input(i)).unwrap().words);
    }
    // What the colluder holds of the target's secrets: (mask key, self-mask seed).
    let (colluder_key_share, colluder_seed_share) = labs[&COLLUDER].held_shares_of(TARGET).unwrap();

    // Stage 3: two lists, as long as they can be (every lab sent a masked input, so each
    // list passes every lab's own checks); the colluder signs both.
    let list_a: Vec<Index> = (1..=N).collect();
    let list_b: Vec<Index> = (1..=N).filter(|&i| i != TARGET).collect();
    let colluder = Identity::from_seed(identity_seed(COLLUDER));
    let mut self_mask_shares: Vec<Share> = vec![colluder_seed_share];
    let mut key_shares: Vec<Share> = vec![colluder_key_share];
    let mut refusals = Vec::new();
    for (group, survivors, reveals_seed) in [(group_a, &list_a, true), (group_b, &list_b, false)] {
        let mut signatures = vec![ConsistencySignature {
            from: COLLUDER,
            signature: colluder.sign(CONSISTENCY_TAG, &consistency_message(&cfg, survivors)),
        }];
        let mut signers = Vec::new();
        for &i in group {
            let shown = SurvivorList {
                survivors: survivors.clone(),
            };
            match labs.get_mut(&i).unwrap().consistency(&shown) {
                Ok(s) => {
                    signatures.push(s);
                    signers.push(i);
                }
                Err(e) => refusals.push(format!("lab {i} would not sign: {e}")),
            }
        }
        let request = UnmaskRequest {
            survivors: survivors.clone(),
            signatures,
        };
        for i in signers {
            match labs.get_mut(&i).unwrap().unmask(&request) {
                Ok(response) => {
                    let wanted = if reveals_seed {
                        &response.self_mask_shares
                    } else {
                        &response.key_shares
                    };
                    for s in wanted.iter().filter(|s| s.owner == TARGET) {
                        let share = Share {
                            x: s.x,
                            y: s.y.clone(),
                        };
                        if reveals_seed {
                            self_mask_shares.push(share);
                        } else {
                            key_shares.push(share);
                        }
                    }
                }
                Err(e) => refusals.push(format!("lab {i} would not reveal: {e}")),
            }
        }
    }

    // The server's reconstruction of the target's two secrets, then of its input alone.
    let seed = combine(&self_mask_shares, threshold).map_err(|e| {
        format!(
            "self-mask seed from {} shares: {e}; {refusals:?}",
            self_mask_shares.len()
        )
    })?;
    let key = combine(&key_shares, threshold).map_err(|e| {
        format!(
            "mask key from {} shares: {e}; {refusals:?}",
            key_shares.len()
        )
    })?;
    let seed: [u8; 16] = seed.try_into().unwrap();
    let key: [u8; 32] = key.try_into().unwrap();
    let secret = AgreementSecret::from_bytes(key);
    let peers: Vec<(Index, [u8; 32])> = (1..=N)
        .filter(|&v| v != TARGET)
        .map(|v| (v, s_public[&v]))
        .collect();
    let mut masks = vec![(Zeroizing::new(seed), MaskSign::Subtract)];
    for ((v, _), pair) in peers.iter().zip(
        secret
            .pairwise_mask_seeds(&peers, &cfg.context, TARGET)
            .unwrap(),
    ) {
        let undo = match pair_mask_sign(TARGET, *v) {
            MaskSign::Add => MaskSign::Subtract,
            MaskSign::Subtract => MaskSign::Add,
        };
        masks.push((pair, undo));
    }
    let mut words = masked[&TARGET].clone();
    apply_many(&masks, &mut words);
    Ok(words)
}

fn set(labs: &[Index]) -> BTreeSet<Index> {
    labs.iter().copied().collect()
}

#[test]
fn with_a_strict_majority_one_colluder_unmasks_a_lab_alone() {
    // The old default for five labs, and still what `max_colluding = 0` gives.
    let old = SecureAggregationSpec {
        max_colluding: 0,
        ..Default::default()
    };
    let t = old.threshold_for(N as usize);
    assert_eq!(t, 3);
    let recovered = attack(t, &set(&[1, 2]), &set(&[3, 4])).expect("the attack works at t = 3");
    assert_eq!(
        recovered,
        input(TARGET),
        "the server reads lab 1's input exactly"
    );
}

#[test]
fn the_collusion_threshold_defeats_every_split() {
    let spec = SecureAggregationSpec::default();
    assert_eq!(spec.max_colluding, 1);
    let t = spec.threshold_for(N as usize);
    assert_eq!(t, 4);
    spec.validate(N as usize).unwrap();
    // Every way to show the honest labs 1-4 one of the two lists, or none.
    let honest = [1u32, 2, 3, 4];
    let mut tried = 0;
    for code in 0..3u32.pow(4) {
        let mut a = BTreeSet::new();
        let mut b = BTreeSet::new();
        let mut c = code;
        for &i in &honest {
            match c % 3 {
                1 => {
                    a.insert(i);
                }
                2 if i != TARGET => {
                    b.insert(i);
                }
                _ => {}
            }
            c /= 3;
        }
        let outcome = attack(t, &a, &b);
        assert!(
            outcome.is_err(),
            "split A {a:?} / B {b:?} recovered lab 1's input at t = {t}"
        );
        tried += 1;
    }
    assert_eq!(tried, 81);
    // The refusal names the reason: too few signatures on a list.
    let err = attack(t, &set(&[1, 2]), &set(&[3, 4])).unwrap_err();
    assert!(err.contains("would not reveal"), "{err}");
    assert!(err.contains("4 are needed"), "{err}");
}

#[test]
fn an_honest_lab_refuses_a_list_without_a_threshold_of_signatures() {
    // The check the defence rests on, directly: at t = 4, three signatures are refused.
    let err = attack(4, &set(&[1, 2]), &set(&[])).unwrap_err();
    assert!(
        err.contains(
            &ProtocolError::TooFew {
                stage: super::protocol::Stage::Unmask,
                got: 3,
                needed: 4
            }
            .to_string()
        ),
        "{err}"
    );
}
