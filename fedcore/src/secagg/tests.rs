//! The protocol driven end to end in memory: honest runs with dropouts at every stage, and a
//! malicious server attempting each known attack.

use std::collections::BTreeSet;

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::crypto::{Identity, SessionContext};
use super::messages::*;
use super::protocol::{ProtocolError, RoundConfig, Stage};
use super::simulation::{Dropouts, SimulatedRound, identity_seed as simulation_identity_seed};

fn config(threshold: usize, len: usize) -> RoundConfig {
    RoundConfig {
        context: SessionContext {
            session: [4; 32],
            round: 7,
        },
        threshold,
        min_peers: 3,
        vector_len: len,
        model_hash: [1; 32],
    }
}

fn federation(n: u32, t: usize, len: usize, seed: u64) -> SimulatedRound {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1a2b);
    let inputs = (1..=n)
        .map(|i| (i, (0..len).map(|_| rng.next_u32()).collect()))
        .collect();
    SimulatedRound::new(config(t, len), inputs, seed).unwrap()
}

fn run(f: &mut SimulatedRound, drops: &Dropouts) -> Result<(Vec<u32>, Vec<Index>), ProtocolError> {
    f.run(drops)
}

fn plaintext_sum(f: &SimulatedRound, who: &[Index]) -> Vec<u32> {
    f.plaintext_sum(who)
}

fn identity_seed(i: Index) -> [u8; 32] {
    simulation_identity_seed(i)
}

#[test]
fn honest_round_without_dropouts_gives_the_exact_sum() {
    let mut f = federation(5, 3, 100, 1);
    let (sum, survivors) = run(&mut f, &Default::default()).unwrap();
    assert_eq!(survivors, vec![1, 2, 3, 4, 5]);
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}

#[test]
fn masked_input_alone_looks_uniform() {
    // Input all zeros: the masked vector must still look uniform (mean of u32/2^32 ≈ 0.5,
    // each of 16 buckets ≈ 1/16), so one participant's vector reveals nothing by itself.
    let mut f = federation(4, 3, 20_000, 2);
    for v in f.inputs.values_mut() {
        v.fill(0);
    }
    let (_, deliveries) = through_share_keys(&mut f);
    let words = f
        .parts
        .get_mut(&1)
        .unwrap()
        .masked_input(&deliveries[0], &f.inputs[&1])
        .unwrap()
        .words;
    let n = words.len() as f64;
    let mean = words
        .iter()
        .map(|w| *w as f64 / 4_294_967_296.0)
        .sum::<f64>()
        / n;
    assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
    let mut buckets = [0usize; 16];
    for w in &words {
        buckets[(*w >> 28) as usize] += 1;
    }
    // Chi-square with 15 degrees of freedom: 99.9th percentile ≈ 37.7.
    let expected = n / 16.0;
    let chi2: f64 = buckets
        .iter()
        .map(|b| (*b as f64 - expected).powi(2) / expected)
        .sum();
    assert!(chi2 < 37.7, "chi2 {chi2}, buckets {buckets:?}");
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// Whenever a quorum survives every stage, the unmasked sum equals the plaintext sum of
    /// the survivors' inputs exactly; otherwise the round aborts with TooFew, never a panic.
    #[test]
    fn dropouts_at_every_stage(
        n in 3u32..40,
        t_extra in 0.0f64..1.0,
        drop_rates in proptest::array::uniform5(0.0f64..0.25),
        seed in any::<u64>(),
    ) {
        let min_t = (n as usize) / 2 + 1;
        let t = (min_t + ((n as usize - min_t) as f64 * t_extra) as usize).max(3).min(n as usize);
        let mut f = federation(n, t, 24, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let drops: [BTreeSet<Index>; 5] = core::array::from_fn(|k| {
            (1..=n).filter(|_| (rng.next_u32() as f64 / u32::MAX as f64) < drop_rates[k]).collect()
        });
        // Who is left after each stage, to know whether a quorum survives.
        let mut alive: BTreeSet<Index> = (1..=n).collect();
        let mut enough = true;
        let mut survivors = Vec::new();
        for (k, d) in drops.iter().enumerate() {
            alive.retain(|i| !d.contains(i));
            enough &= alive.len() >= t.max(3);
            if k == 2 {
                survivors = alive.iter().copied().collect();
            }
        }
        match run(&mut f, &drops) {
            Ok((sum, got)) => {
                prop_assert!(enough);
                prop_assert_eq!(&got, &survivors);
                prop_assert_eq!(sum, plaintext_sum(&f, &got));
            }
            Err(ProtocolError::TooFew { .. }) => prop_assert!(!enough),
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}

/// Runs stages 0-1 honestly and returns the deliveries.
fn through_share_keys(f: &mut SimulatedRound) -> (KeyRoster, Vec<ShareDelivery>) {
    let n = f.parts.len() as u32;
    for i in 1..=n {
        let m = f.parts.get_mut(&i).unwrap().advertise().unwrap();
        f.server.receive_advertise(m).unwrap();
    }
    let roster = f.server.close_advertise().unwrap();
    for i in 1..=n {
        let m = f.parts.get_mut(&i).unwrap().share_keys(&roster).unwrap();
        f.server.receive_shares(m).unwrap();
    }
    (roster, f.server.close_share_keys().unwrap())
}

/// Runs stages 0-2 honestly; every participant's masked input reaches the server.
fn through_masked_input(f: &mut SimulatedRound) {
    let (_, deliveries) = through_share_keys(f);
    for d in &deliveries {
        let m = f
            .parts
            .get_mut(&d.to)
            .unwrap()
            .masked_input(d, &f.inputs[&d.to])
            .unwrap();
        f.server.receive_masked(m).unwrap();
    }
}

#[test]
fn substituted_public_keys_are_detected() {
    let mut f = federation(4, 3, 8, 3);
    for i in 1..=4 {
        let m = f.parts.get_mut(&i).unwrap().advertise().unwrap();
        f.server.receive_advertise(m).unwrap();
    }
    let roster = f.server.close_advertise().unwrap();
    // The server swaps participant 2's mask key for one it controls.
    let mut forged = roster.clone();
    forged.keys[1].s_public = super::crypto::AgreementSecret::from_bytes([9; 32]).public();
    // Participant 1 sees a signature that no longer verifies.
    let err = f
        .parts
        .get_mut(&1)
        .unwrap()
        .share_keys(&forged)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Crypto(super::crypto::CryptoError::BadSignature { signer: 2, .. })
        ),
        "{err}"
    );
    // Participant 2 also sees its own keys changed.
    let mut f = federation(4, 3, 8, 3);
    let mut own = None;
    for i in 1..=4 {
        let m = f.parts.get_mut(&i).unwrap().advertise().unwrap();
        if i == 2 {
            own = Some(m.clone());
        }
        f.server.receive_advertise(m).unwrap();
    }
    let roster = f.server.close_advertise().unwrap();
    let mut replayed = roster.clone();
    // A validly signed advertisement from another round cannot be substituted either.
    replayed.keys.retain(|k| k.from != 2);
    replayed.keys.push(AdvertiseKeys {
        c_public: [7; 32],
        ..own.unwrap()
    });
    let err = f
        .parts
        .get_mut(&2)
        .unwrap()
        .share_keys(&replayed)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Crypto(_) | ProtocolError::SubstitutedKeys(2)
        ),
        "{err}"
    );
}

#[test]
fn inconsistent_survivor_lists_are_refused() {
    let mut f = federation(5, 3, 8, 4);
    through_masked_input(&mut f);
    let list = f.server.close_masked().unwrap();
    // The server tells participants 1-3 that 4 and 5 survived, but tells 4 and 5 another story.
    let sigs: Vec<ConsistencySignature> = (1..=5)
        .map(|i| f.parts.get_mut(&i).unwrap().consistency(&list).unwrap())
        .collect();
    let request = UnmaskRequest {
        survivors: vec![1, 2, 3],
        signatures: sigs.clone(),
    };
    assert_eq!(
        f.parts.get_mut(&1).unwrap().unmask(&request).unwrap_err(),
        ProtocolError::InconsistentSurvivors
    );
    // Signatures over a different list do not count.
    let mut f2 = federation(5, 3, 8, 4);
    through_masked_input(&mut f2);
    let full = SurvivorList {
        survivors: vec![1, 2, 3, 4, 5],
    };
    let partial = SurvivorList {
        survivors: vec![1, 2, 3],
    };
    let mut sigs = vec![f2.parts.get_mut(&1).unwrap().consistency(&partial).unwrap()];
    for i in 2..=5 {
        sigs.push(f2.parts.get_mut(&i).unwrap().consistency(&full).unwrap());
    }
    let err = f2
        .parts
        .get_mut(&1)
        .unwrap()
        .unmask(&UnmaskRequest {
            survivors: vec![1, 2, 3],
            signatures: sigs,
        })
        .unwrap_err();
    assert!(
        matches!(err, ProtocolError::NotASubset(4) | ProtocolError::Crypto(_)),
        "{err}"
    );
}

#[test]
fn asking_for_both_shares_of_one_participant_fails() {
    // To unmask participant 5 the server needs its self-mask seed (revealed only if 5
    // survived) and its mask key (revealed only if 5 dropped). Splitting the honest
    // participants into two groups with different survivor lists needs each group to have a
    // quorum of signatures on its list; with a majority threshold that is impossible.
    let mut f = federation(5, 3, 8, 5);
    through_masked_input(&mut f);
    let with_5 = SurvivorList {
        survivors: vec![1, 2, 3, 4, 5],
    };
    let without_5 = SurvivorList {
        survivors: vec![1, 2, 3, 4],
    };
    let a: Vec<_> = [1, 2]
        .iter()
        .map(|i| f.parts.get_mut(i).unwrap().consistency(&with_5).unwrap())
        .collect();
    let b: Vec<_> = [3, 4]
        .iter()
        .map(|i| f.parts.get_mut(i).unwrap().consistency(&without_5).unwrap())
        .collect();
    // Group B holds only two signatures on its list: below the threshold of 3.
    let err = f
        .parts
        .get_mut(&3)
        .unwrap()
        .unmask(&UnmaskRequest {
            survivors: vec![1, 2, 3, 4],
            signatures: b,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::TooFew {
                stage: Stage::Unmask,
                ..
            }
        ),
        "{err}"
    );
    let err = f
        .parts
        .get_mut(&1)
        .unwrap()
        .unmask(&UnmaskRequest {
            survivors: vec![1, 2, 3, 4, 5],
            signatures: a,
        })
        .unwrap_err();
    assert!(matches!(err, ProtocolError::TooFew { .. }), "{err}");
    // And a minority threshold is refused up front.
    let mut weak = federation(6, 3, 8, 6);
    for i in 1..=6 {
        let m = weak.parts.get_mut(&i).unwrap().advertise().unwrap();
        weak.server.receive_advertise(m).unwrap();
    }
    let roster = weak.server.close_advertise().unwrap();
    assert_eq!(
        weak.parts
            .get_mut(&1)
            .unwrap()
            .share_keys(&roster)
            .unwrap_err(),
        ProtocolError::ThresholdNotMajority {
            threshold: 3,
            members: 6
        }
    );
}

#[test]
fn different_global_models_break_the_consistency_check() {
    // A participant that trained on a different global adapter signs a different model hash;
    // its signature does not verify for the others, so the model-inconsistency attack is seen.
    let mut f = federation(4, 3, 8, 7);
    through_masked_input(&mut f);
    let list = f.server.close_masked().unwrap();
    let mut sigs: Vec<_> = (1..=3)
        .map(|i| f.parts.get_mut(&i).unwrap().consistency(&list).unwrap())
        .collect();
    let mut other_cfg = f.cfg.clone();
    other_cfg.model_hash = [2; 32];
    let id4 = Identity::from_seed(identity_seed(4));
    sigs.push(ConsistencySignature {
        from: 4,
        signature: id4.sign(
            "consistency-check",
            &super::protocol::consistency_message(&other_cfg, &list.survivors),
        ),
    });
    let err = f
        .parts
        .get_mut(&1)
        .unwrap()
        .unmask(&UnmaskRequest {
            survivors: list.survivors.clone(),
            signatures: sigs.clone(),
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ProtocolError::Crypto(super::crypto::CryptoError::BadSignature { signer: 4, .. })
        ),
        "{err}"
    );
    // The server refuses it too.
    assert!(f.server.receive_signature(sigs.pop().unwrap()).is_err());
}

#[test]
fn stages_out_of_order_are_refused() {
    let mut f = federation(3, 3, 4, 8);
    let p = f.parts.get_mut(&1).unwrap();
    let err = p
        .consistency(&SurvivorList {
            survivors: vec![1, 2, 3],
        })
        .unwrap_err();
    assert!(matches!(err, ProtocolError::OutOfOrder { .. }));
    assert!(f.server.close_masked().is_err());
}

/// Runs stages 3-4 honestly for everyone in the survivor list and finishes.
fn finish_honestly(f: &mut SimulatedRound) -> Result<(Vec<u32>, Vec<Index>), ProtocolError> {
    let list = f.server.close_masked()?;
    for &i in &list.survivors {
        let m = f.parts.get_mut(&i).unwrap().consistency(&list)?;
        f.server.receive_signature(m)?;
    }
    let request = f.server.close_consistency()?;
    for &i in &list.survivors {
        let m = f.parts.get_mut(&i).unwrap().unmask(&request)?;
        f.server.receive_unmask(m)?;
    }
    f.server.finish()
}

#[test]
fn streamed_chunks_sum_like_whole_inputs_and_broken_streams_are_retracted() {
    let mut f = federation(5, 3, 1000, 11);
    let (_, deliveries) = through_share_keys(&mut f);
    let mut broken = Vec::new();
    for d in &deliveries {
        let m = f
            .parts
            .get_mut(&d.to)
            .unwrap()
            .masked_input(d, &f.inputs[&d.to])
            .unwrap();
        let chunks: Vec<(usize, &[u32])> = m
            .words
            .chunks(300)
            .enumerate()
            .map(|(k, c)| (k * 300, c))
            .collect();
        if d.to == 2 {
            // Participant 2's stream breaks after two chunks: they are taken back later.
            for &(offset, c) in &chunks[..2] {
                f.server.receive_masked_chunk(2, offset, c).unwrap();
            }
            broken = chunks[..2].iter().map(|&(o, c)| (o, c.to_vec())).collect();
            continue;
        }
        // Out-of-order and overlong chunks are refused without touching the sum.
        assert_eq!(
            f.server.receive_masked_chunk(d.to, 300, chunks[1].1),
            Err(ProtocolError::ChunkOffset {
                from: d.to,
                got: 300,
                expected: 0
            })
        );
        assert!(matches!(
            f.server.receive_masked_chunk(d.to, 0, &vec![0; 1001]),
            Err(ProtocolError::Length { got: 1001, .. })
        ));
        assert!(matches!(
            f.server.commit_masked(d.to),
            Err(ProtocolError::Length { got: 0, .. })
        ));
        for &(offset, c) in &chunks {
            f.server.receive_masked_chunk(d.to, offset, c).unwrap();
        }
        f.server.commit_masked(d.to).unwrap();
    }
    assert_eq!(f.server.partial_inputs().collect::<Vec<_>>(), vec![2]);
    // Closing stage 2 leaves participant 2 out; finishing is refused until it is retracted.
    let list = f.server.close_masked().unwrap();
    assert_eq!(list.survivors, vec![1, 3, 4, 5]);
    for &i in &list.survivors {
        let m = f.parts.get_mut(&i).unwrap().consistency(&list).unwrap();
        f.server.receive_signature(m).unwrap();
    }
    let request = f.server.close_consistency().unwrap();
    for &i in &list.survivors {
        let m = f.parts.get_mut(&i).unwrap().unmask(&request).unwrap();
        f.server.receive_unmask(m).unwrap();
    }
    assert_eq!(f.server.finish(), Err(ProtocolError::Unretracted(2)));
    for (offset, c) in broken.iter().rev() {
        f.server.retract_masked_chunk(2, *offset, c).unwrap();
    }
    let (sum, survivors) = f.server.finish().unwrap();
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}

#[test]
fn a_participant_streaming_again_after_retraction_counts_once() {
    let mut f = federation(4, 3, 64, 12);
    let (_, deliveries) = through_share_keys(&mut f);
    for d in &deliveries {
        let m = f
            .parts
            .get_mut(&d.to)
            .unwrap()
            .masked_input(d, &f.inputs[&d.to])
            .unwrap();
        if d.to == 1 {
            f.server.receive_masked_chunk(1, 0, &m.words[..10]).unwrap();
            f.server.retract_masked_chunk(1, 0, &m.words[..10]).unwrap();
        }
        f.server.receive_masked(m).unwrap();
    }
    let (sum, survivors) = finish_honestly(&mut f).unwrap();
    assert_eq!(survivors, vec![1, 2, 3, 4]);
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}
