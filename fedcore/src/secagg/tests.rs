//! The protocol driven end to end in memory: honest runs with dropouts at every stage, and a
//! malicious server attempting each known attack.

use std::collections::BTreeSet;

use proptest::prelude::*;
use rand::{RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::crypto::{Identity, SessionContext};
use super::graph::Graph;
use super::messages::*;
use super::protocol::{Neighbourhood, ProtocolError, RoundConfig, Stage};
use super::shamir::ShamirError;
use super::simulation::{Dropouts, SimulatedRound, identity_seed as simulation_identity_seed};

/// A complete-graph round of `len`-word inputs at `threshold` (also the split-view tests').
pub(super) fn config(threshold: usize, len: usize) -> RoundConfig {
    RoundConfig {
        context: SessionContext {
            session: [4; 32],
            round: 7,
        },
        threshold,
        min_peers: 3,
        vector_len: len,
        model_hash: [1; 32],
        neighbourhood: Neighbourhood::Complete,
        graph_seed: [3; 32],
        groups: None,
    }
}

fn federation(n: u32, t: usize, len: usize, seed: u64) -> SimulatedRound {
    federation_with(config(t, len), n, seed)
}

/// Participants 1..=n with random inputs, for any configuration.
fn federation_with(cfg: RoundConfig, n: u32, seed: u64) -> SimulatedRound {
    let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x1a2b);
    let len = cfg.vector_len;
    let inputs = (1..=n)
        .map(|i| (i, (0..len).map(|_| rng.next_u32()).collect()))
        .collect();
    SimulatedRound::new(cfg, inputs, seed).unwrap()
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
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Complete graph or a random Harary graph, any threshold that is a majority of the
    /// neighbourhood, dropouts before every stage: whenever every check the protocol makes
    /// (each participant's quorum in its neighbourhood, the server's quorums, t shares of
    /// every secret that must be rebuilt) can pass, the unmasked sum equals the plaintext sum
    /// of the survivors' inputs exactly; otherwise the round ends in a clean error (too few
    /// members, or too few shares to rebuild a secret), never a panic.
    #[test]
    fn dropouts_at_every_stage(
        n in 3u32..40,
        t_extra in 0.0f64..1.0,
        sparse in any::<bool>(),
        degree_frac in 0.0f64..1.0,
        drop_rates in proptest::array::uniform5(0.0f64..0.25),
        gentle in any::<bool>(),
        seed in any::<u64>(),
    ) {
        // Half the cases with few dropouts, so that sparse rounds often succeed too.
        let drop_rates = drop_rates.map(|r| if gentle { r / 5.0 } else { r });
        let neighbourhood = if sparse {
            Neighbourhood::Harary { degree: 2 + ((n as usize - 1) as f64 * degree_frac) as usize }
        } else {
            Neighbourhood::Complete
        };
        let cfg = RoundConfig { neighbourhood, ..config(3, 24) };
        let roster: Vec<Index> = (1..=n).collect();
        let graph = match Graph::new(neighbourhood, &cfg.graph_seed, &roster) {
            Ok(g) => g,
            Err(e) => {
                // Only an odd degree below n - 1 on an odd roster is refused.
                let Neighbourhood::Harary { degree } = neighbourhood else {
                    return Err(TestCaseError::fail(format!("complete graph refused: {e}")));
                };
                prop_assert!(degree % 2 == 1 && n % 2 == 1 && degree + 1 < n as usize);
                prop_assert_eq!(e, ProtocolError::OddDegree { degree, members: n as usize });
                return Ok(());
            }
        };
        let members = graph.degree() + 1;
        let min_t = members / 2 + 1;
        let t = (min_t + ((members - min_t) as f64 * t_extra) as usize).max(3).min(members);
        let q = t.max(3);
        let mut f = federation_with(RoundConfig { threshold: t, ..cfg }, n, seed);
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x5eed);
        let drops: [BTreeSet<Index>; 5] = core::array::from_fn(|k| {
            (1..=n).filter(|_| (rng.next_u32() as f64 / u32::MAX as f64) < drop_rates[k]).collect()
        });
        // a[k]: who is left after the dropouts before stage k.
        let mut alive: BTreeSet<Index> = (1..=n).collect();
        let a: Vec<BTreeSet<Index>> = drops
            .iter()
            .map(|d| {
                alive.retain(|i| !d.contains(i));
                alive.clone()
            })
            .collect();
        let in_hood = |set: &BTreeSet<Index>, u: Index| {
            set.iter().filter(|&&v| graph.in_neighbourhood(u, v)).count()
        };
        let neighbours_in = |set: &BTreeSet<Index>, u: Index| {
            set.iter().filter(|&&v| graph.are_neighbours(u, v)).count()
        };
        // The server's quorum at the close of every stage.
        let mut enough = a.iter().all(|s| s.len() >= q);
        // Each participant that answers stage k + 1 counts stage k's members in its
        // neighbourhood (share keys, masked input, consistency check, unmask).
        for k in 0..4 {
            enough &= a[k + 1].iter().all(|&u| in_hood(&a[k], u) >= q);
        }
        // The server rebuilds every survivor's self mask from its neighbourhood's shares, and
        // the mask key of every member that dropped after sharing keys and has a surviving
        // neighbour, from its neighbours' shares.
        enough &= a[2].iter().all(|&u| in_hood(&a[4], u) >= t);
        enough &= a[1]
            .difference(&a[2])
            .filter(|&&v| neighbours_in(&a[2], v) > 0)
            .all(|&v| neighbours_in(&a[4], v) >= t);
        let survivors: Vec<Index> = a[2].iter().copied().collect();
        match run(&mut f, &drops) {
            Ok((sum, got)) => {
                prop_assert!(enough);
                prop_assert_eq!(&got, &survivors);
                prop_assert_eq!(sum, plaintext_sum(&f, &got));
            }
            Err(ProtocolError::TooFew { .. }) => prop_assert!(!enough),
            Err(ProtocolError::Reconstruct(_, ShamirError::NotEnoughShares { .. })) => {
                prop_assert!(!enough)
            }
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

/// A round over a random `degree`-regular Harary graph.
fn sparse_federation(n: u32, degree: usize, t: usize, len: usize, seed: u64) -> SimulatedRound {
    federation_with(
        RoundConfig {
            neighbourhood: Neighbourhood::Harary { degree },
            ..config(t, len)
        },
        n,
        seed,
    )
}

/// Everyone advertises; the roster the server would broadcast.
fn advertise_all(f: &mut SimulatedRound) -> KeyRoster {
    let who: Vec<Index> = f.parts.keys().copied().collect();
    for i in who {
        let m = f.parts.get_mut(&i).unwrap().advertise().unwrap();
        f.server.receive_advertise(m).unwrap();
    }
    f.server.close_advertise().unwrap()
}

#[test]
fn harary_rounds_stay_inside_neighbourhoods_and_sum_exactly() {
    let (n, degree) = (30u32, 6usize);
    let mut f = sparse_federation(n, degree, 4, 500, 21);
    let graph = f.server.graph().clone();
    assert!(!graph.is_complete());
    assert_eq!(graph.degree(), degree);
    let roster = advertise_all(&mut f);
    for i in 1..=n {
        let p = f.parts.get_mut(&i).unwrap();
        let mut hood: Vec<Index> = graph.neighbours(i);
        hood.push(i);
        hood.sort_unstable();
        assert_eq!(p.neighbourhood().collect::<Vec<_>>(), hood);
        let m = p.share_keys(&roster).unwrap();
        // Shares go to the neighbours and nobody else.
        let to: Vec<Index> = m.shares.iter().map(|s| s.to).collect();
        assert_eq!(to, graph.neighbours(i));
        f.server.receive_shares(m).unwrap();
    }
    let deliveries = f.server.close_share_keys().unwrap();
    for d in &deliveries {
        let from: Vec<Index> = d.shares.iter().map(|s| s.from).collect();
        assert_eq!(from, graph.neighbours(d.to));
        let m = f
            .parts
            .get_mut(&d.to)
            .unwrap()
            .masked_input(d, &f.inputs[&d.to])
            .unwrap();
        f.server.receive_masked(m).unwrap();
    }
    let list = f.server.close_masked().unwrap();
    for i in 1..=n {
        let m = f.parts.get_mut(&i).unwrap().consistency(&list).unwrap();
        f.server.receive_signature(m).unwrap();
    }
    let request = f.server.close_consistency().unwrap();
    for i in 1..=n {
        let m = f.parts.get_mut(&i).unwrap().unmask(&request).unwrap();
        // Self-mask shares of its neighbourhood only; nobody dropped, so no key shares.
        let owners: Vec<Index> = m.self_mask_shares.iter().map(|s| s.owner).collect();
        assert_eq!(owners, f.parts[&i].neighbourhood().collect::<Vec<_>>());
        assert!(m.key_shares.is_empty());
        f.server.receive_unmask(m).unwrap();
    }
    let (sum, survivors) = f.server.finish().unwrap();
    assert_eq!(survivors, (1..=n).collect::<Vec<_>>());
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}

#[test]
fn harary_round_survives_dropouts_after_sharing_keys() {
    // Two participants drop before the masked input: their neighbours' pair masks with them
    // are removed from their reconstructed mask keys; a third drops before unmasking.
    let mut f = sparse_federation(40, 8, 5, 300, 22);
    let graph = f.server.graph().clone();
    let d1 = 7;
    let d2 = graph.neighbours(d1)[0];
    let late = *graph
        .neighbours(d1)
        .iter()
        .find(|&&v| v != d2 && !graph.are_neighbours(v, d2))
        .unwrap();
    let drops: Dropouts = [
        BTreeSet::new(),
        BTreeSet::new(),
        BTreeSet::from([d1, d2]),
        BTreeSet::new(),
        BTreeSet::from([late]),
    ];
    let (sum, survivors) = run(&mut f, &drops).unwrap();
    assert!(!survivors.contains(&d1) && !survivors.contains(&d2));
    assert_eq!(survivors.len(), 38);
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}

#[test]
fn sparse_threshold_must_be_a_majority_of_the_neighbourhood() {
    // Degree 6: neighbourhoods of 7, so t = 3 would let two groups of 3 reveal both shares.
    let mut f = sparse_federation(20, 6, 3, 8, 23);
    let roster = advertise_all(&mut f);
    assert_eq!(
        f.parts
            .get_mut(&1)
            .unwrap()
            .share_keys(&roster)
            .unwrap_err(),
        ProtocolError::ThresholdNotMajority {
            threshold: 3,
            members: 7
        }
    );
    // t = 4 is accepted, although it is far below a majority of the 20 participants.
    let mut f = sparse_federation(20, 6, 4, 8, 23);
    let (sum, survivors) = run(&mut f, &Default::default()).unwrap();
    assert_eq!(sum, plaintext_sum(&f, &survivors));
}

#[test]
fn odd_degree_needs_an_even_roster() {
    let inputs = |n: u32| (1..=n).map(|i| (i, vec![i; 4])).collect();
    let cfg = RoundConfig {
        neighbourhood: Neighbourhood::Harary { degree: 5 },
        ..config(4, 4)
    };
    assert_eq!(
        SimulatedRound::new(cfg.clone(), inputs(21), 1).err(),
        Some(ProtocolError::OddDegree {
            degree: 5,
            members: 21
        })
    );
    let mut f = SimulatedRound::new(cfg.clone(), inputs(20), 1).unwrap();
    assert_eq!(f.server.graph().degree(), 5);
    let (sum, survivors) = run(&mut f, &Default::default()).unwrap();
    assert_eq!(sum, plaintext_sum(&f, &survivors));
    // A neighbourhood smaller than the quorum is refused before the round starts.
    let tiny = RoundConfig {
        neighbourhood: Neighbourhood::Harary { degree: 2 },
        ..config(4, 4)
    };
    assert!(matches!(
        SimulatedRound::new(tiny, inputs(20), 1).err(),
        Some(ProtocolError::TooFew {
            stage: Stage::AdvertiseKeys,
            got: 3,
            needed: 4
        })
    ));
}

#[test]
fn server_expects_shares_exactly_for_neighbours() {
    let mut f = sparse_federation(12, 4, 3, 8, 24);
    let graph = f.server.graph().clone();
    let roster = advertise_all(&mut f);
    let m = f.parts.get_mut(&1).unwrap().share_keys(&roster).unwrap();
    let stranger = (2..=12).find(|&v| !graph.are_neighbours(1, v)).unwrap();
    let mut extra = m.clone();
    extra.shares.push(EncryptedShare {
        from: 1,
        to: stranger,
        ciphertext: m.shares[0].ciphertext.clone(),
    });
    assert_eq!(
        f.server.receive_shares(extra),
        Err(ProtocolError::Misaddressed {
            from: 1,
            to: stranger,
            me: 1
        })
    );
    let mut short = m.clone();
    let dropped = short.shares.pop().unwrap().to;
    assert_eq!(
        f.server.receive_shares(short),
        Err(ProtocolError::MissingShare {
            from: 1,
            missing: dropped
        })
    );
    f.server.receive_shares(m).unwrap();
}

#[test]
fn participants_check_their_neighbourhood_and_the_global_lists() {
    let mut f = sparse_federation(12, 4, 3, 8, 25);
    let graph = f.server.graph().clone();
    let strangers: Vec<Index> = (2..=12).filter(|&v| !graph.are_neighbours(1, v)).collect();
    // `absent` never advertises; `quiet` (a neighbour of 1) and `idle` (not a neighbour)
    // advertise but never send shares.
    let (absent, idle) = (strangers[0], strangers[1]);
    let quiet = graph.neighbours(1)[0];
    for i in (1..=12).filter(|&i| i != absent) {
        let m = f.parts.get_mut(&i).unwrap().advertise().unwrap();
        f.server.receive_advertise(m).unwrap();
    }
    let roster = f.server.close_advertise().unwrap();

    // A forged advertisement of a non-neighbour is none of participant 1's business (it
    // holds nothing of it and uses none of its keys); a neighbour's is refused.
    let forge = |who: Index| {
        let mut forged = roster.clone();
        let k = forged.keys.iter_mut().find(|k| k.from == who).unwrap();
        k.signature[0] ^= 1;
        forged
    };
    let probe = |roster: &KeyRoster| {
        let mut p = sparse_federation(12, 4, 3, 8, 25);
        let p1 = p.parts.get_mut(&1).unwrap();
        p1.advertise().unwrap();
        p1.share_keys(roster).map(|_| ())
    };
    probe(&forge(idle)).unwrap();
    assert_eq!(
        probe(&forge(quiet)).unwrap_err(),
        ProtocolError::Crypto(super::crypto::CryptoError::BadSignature {
            signer: quiet,
            tag: "advertise-keys"
        })
    );

    for i in (1..=12).filter(|&i| ![absent, quiet, idle].contains(&i)) {
        let m = f.parts.get_mut(&i).unwrap().share_keys(&roster).unwrap();
        f.server.receive_shares(m).unwrap();
    }
    let deliveries = f.server.close_share_keys().unwrap();
    for d in &deliveries {
        let m = f
            .parts
            .get_mut(&d.to)
            .unwrap()
            .masked_input(d, &f.inputs[&d.to])
            .unwrap();
        f.server.receive_masked(m).unwrap();
    }
    let list = f.server.close_masked().unwrap();
    let with = |extra: Index| {
        let mut l = list.clone();
        l.survivors.push(extra);
        l
    };
    let p1 = f.parts.get_mut(&1).unwrap();
    // Outside U1: refused, neighbour or not. A neighbour that sent no shares: refused. A
    // non-neighbour in U1: participant 1 cannot know whether it sent shares to others.
    assert_eq!(
        p1.consistency(&with(absent)),
        Err(ProtocolError::NotASubset(absent))
    );
    assert_eq!(
        p1.consistency(&with(quiet)),
        Err(ProtocolError::NotASubset(quiet))
    );
    p1.consistency(&with(idle)).unwrap();
}

#[test]
fn revealed_shares_outside_the_neighbourhood_are_refused() {
    let mut f = sparse_federation(12, 4, 3, 8, 26);
    let graph = f.server.graph().clone();
    through_masked_input(&mut f);
    let list = f.server.close_masked().unwrap();
    for i in 1..=12 {
        let m = f.parts.get_mut(&i).unwrap().consistency(&list).unwrap();
        f.server.receive_signature(m).unwrap();
    }
    let request = f.server.close_consistency().unwrap();
    let m = f.parts.get_mut(&1).unwrap().unmask(&request).unwrap();
    let stranger = (2..=12).find(|&v| !graph.are_neighbours(1, v)).unwrap();
    let mut bad = m.clone();
    bad.self_mask_shares[0].owner = stranger;
    assert_eq!(
        f.server.receive_unmask(bad),
        Err(ProtocolError::UnexpectedShare {
            from: 1,
            owner: stranger
        })
    );
    // A mask-key share of a survivor is never acceptable.
    let mut both = m.clone();
    both.key_shares.push(m.self_mask_shares[0].clone());
    assert!(matches!(
        f.server.receive_unmask(both),
        Err(ProtocolError::UnexpectedShare { from: 1, .. })
    ));
    f.server.receive_unmask(m).unwrap();
}
