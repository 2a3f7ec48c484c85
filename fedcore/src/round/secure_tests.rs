//! The coordinator with secure aggregation on, driven by real participant sessions: whole
//! rounds, dropouts at each stage, failed attempts, broken streams, and refusals.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use zeroize::Zeroizing;

use super::*;
use crate::adapter::LoraAdapter;
use crate::plan::{LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
use crate::roster::RosterEntry;
use crate::secagg::crypto::Identity;
use crate::secagg::participant::RoundRandomness;
use crate::secagg::protocol::Stage as S;
use crate::secagg::spec::SecureAggregationSpec;

const ROUND_TIMEOUT: u64 = 1_000;
const STAGE_TIMEOUT: u64 = 500;

pub(super) fn identity_seed(i: usize) -> [u8; 32] {
    [i as u8 + 1; 32]
}

pub(super) fn secure_plan(labs: usize, threshold: Option<usize>, rounds: u64) -> FederationPlan {
    FederationPlan {
        privacy: Default::default(),
        federation: "secure-test".into(),
        model: ModelSpec::tiny(),
        lora: LoraSpec::default(),
        training: TrainingSpec::default(),
        rounds: RoundSpec {
            rounds,
            participants: labs,
            min_updates: 1,
            round_timeout_ms: ROUND_TIMEOUT,
        },
        roster: (0..labs)
            .map(|i| RosterEntry {
                name: format!("lab{i}"),
                public_key: hex::encode(Identity::from_seed(identity_seed(i)).public()),
            })
            .collect(),
        secure_aggregation: SecureAggregationSpec {
            threshold,
            stage_timeout_ms: STAGE_TIMEOUT,
            ..Default::default()
        },
        strategy: Default::default(),
    }
}

/// One simulated lab: its update, and the stage before which it goes silent.
pub(super) struct Lab {
    pub(super) name: String,
    pub(super) token: String,
    pub(super) seed: usize,
    pub(super) delta: Vec<f32>,
    pub(super) samples: u64,
    pub(super) silent_from: Option<S>,
    pub(super) upload: Option<SecureUpload>,
    pub(super) rng: ChaCha8Rng,
}

pub(super) fn labs(c: &mut Coordinator, n: usize, seed: u64) -> Vec<Lab> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let len = c.upload_manifest().len();
    (0..n)
        .map(|i| {
            let name = format!("lab{i}");
            let token = format!("token{i}");
            c.join(token.clone(), &name, "lo", 0).unwrap();
            Lab {
                name,
                token,
                seed: i,
                delta: (0..len).map(|_| rng.random_range(-0.2f32..0.2)).collect(),
                samples: 100 * (i as u64 + 1),
                silent_from: None,
                upload: None,
                rng: ChaCha8Rng::seed_from_u64(seed + 100 + i as u64),
            }
        })
        .collect()
}

pub(super) fn randomness(rng: &mut ChaCha8Rng) -> RoundRandomness {
    RoundRandomness::draw(rng)
}

/// Streams a masked input in chunks of `chunk` words and commits it.
fn stream(
    c: &mut Coordinator,
    lab: &Lab,
    round: u64,
    attempt: u32,
    words: &[u32],
    chunk: usize,
    now: u64,
) -> Vec<Event> {
    for (k, part) in words.chunks(chunk).enumerate() {
        c.masked_chunk(&lab.token, round, attempt, k * chunk, part)
            .unwrap();
    }
    c.masked_commit(&lab.token, round, attempt, now).unwrap()
}

/// Lets every lab act on its current task until nobody has anything left to do.
pub(super) fn drive(c: &mut Coordinator, labs: &mut [Lab], now: u64) -> Vec<Event> {
    let mut events = Vec::new();
    loop {
        let mut progressed = false;
        for lab in labs.iter_mut() {
            let task = c.task(&lab.token).unwrap();
            match task {
                Task::Train {
                    round,
                    global_hash,
                    secure: Some(t),
                    ..
                } => {
                    if lab.silent_from == Some(S::AdvertiseKeys) {
                        continue;
                    }
                    let secrets = UploadSecrets {
                        identity_seed: Zeroizing::new(identity_seed(lab.seed)),
                        randomness: randomness(&mut lab.rng),
                        rounding_seed: [lab.seed as u8; 32],
                    };
                    let global_hash = global_hash.to_string();
                    let plan = c.plan().clone();
                    let (upload, advert) = SecureUpload::open(
                        &plan,
                        &lab.name,
                        t,
                        round,
                        &global_hash,
                        &lab.delta,
                        lab.samples,
                        3,
                        secrets,
                    )
                    .unwrap();
                    lab.upload = Some(upload);
                    events.extend(
                        c.secure_message(
                            &lab.token,
                            round,
                            t.attempt,
                            SecureMessage::Advertise(advert),
                            now,
                        )
                        .unwrap(),
                    );
                    progressed = true;
                }
                Task::Secure {
                    round,
                    attempt,
                    step,
                    ..
                } => {
                    let stage = step.stage();
                    if lab.silent_from.is_some_and(|s| s as u8 <= stage as u8) {
                        continue;
                    }
                    let reply = lab.upload.as_mut().unwrap().respond(&step).unwrap();
                    match reply {
                        Reply::Message(m) => events.extend(
                            c.secure_message(&lab.token, round, attempt, m, now)
                                .unwrap(),
                        ),
                        Reply::Masked(m) => {
                            let lab: &Lab = lab;
                            events.extend(stream(c, lab, round, attempt, &m.words, 97, now));
                        }
                    }
                    progressed = true;
                }
                _ => {}
            }
        }
        if !progressed {
            return events;
        }
    }
}

/// `B_global + Σ n_i Δ_i / Σ n_i` over `who`, from the labs' own deltas.
fn expected_b(
    c_before: &LoraAdapter,
    manifest: &LayoutManifest,
    labs: &[Lab],
    who: &[usize],
) -> Vec<f64> {
    let b = c_before.flatten(manifest).unwrap();
    let total: u64 = who.iter().map(|i| labs[*i].samples).sum();
    (0..b.len())
        .map(|k| {
            b[k] as f64
                + who
                    .iter()
                    .map(|i| labs[*i].samples as f64 * labs[*i].delta[k] as f64)
                    .sum::<f64>()
                    / total as f64
        })
        .collect()
}

fn assert_close(c: &Coordinator, expected: &[f64], bound: f64) {
    let got = c.global().adapter.flatten(c.upload_manifest()).unwrap();
    for (k, (g, e)) in got.iter().zip(expected).enumerate() {
        // f32 rounding of the stored adapter on top of the quantisation bound.
        assert!(
            (*g as f64 - e).abs() <= bound + 1e-6,
            "value {k}: {g} vs {e} (bound {bound})"
        );
    }
}

pub(super) fn completed(events: &[Event]) -> Option<&RoundRecord> {
    events.iter().find_map(|e| match e {
        Event::RoundCompleted(r) => Some(r),
        _ => None,
    })
}

#[test]
fn honest_secure_round_gives_the_weighted_mean_within_the_bound() {
    let mut c = Coordinator::new(secure_plan(4, None, 2), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 4, 1);
    let before = c.global().adapter.clone();
    let events = drive(&mut c, &mut labs, 10);
    let record = completed(&events).expect("round 1 completes").clone();
    assert_eq!(record.contributors, vec!["lab0", "lab1", "lab2", "lab3"]);
    assert!(record.dropped.is_empty());
    assert_eq!(record.total_samples, 100 + 200 + 300 + 400);
    let secure = record.secure.unwrap();
    assert_eq!(secure.attempt, 0);
    assert!(secure.error_bound < 1e-3, "{}", secure.error_bound);
    // Both rounds ran with the same local updates: B moved by the weighted mean twice.
    let b0 = before.flatten(c.upload_manifest()).unwrap();
    let once = expected_b(&before, c.upload_manifest(), &labs, &[0, 1, 2, 3]);
    let twice: Vec<f64> = once
        .iter()
        .zip(&b0)
        .map(|(e, b)| 2.0 * e - *b as f64)
        .collect();
    assert_close(&c, &twice, 2.0 * secure.error_bound);
    assert_eq!(c.history().len(), 2);
    assert!(events.iter().any(|e| matches!(
        e,
        Event::SecureStageClosed {
            stage: S::MaskedInput,
            remaining: 4,
            ..
        }
    )));
    assert!(matches!(c.status().stage, Stage::Finished));
}

#[test]
fn dropouts_during_key_sharing_and_masked_input_leave_the_survivors_mean() {
    // Two dropouts of five need t = 3: a plan that tolerates no colluding lab.
    let mut plan = secure_plan(5, None, 1);
    plan.secure_aggregation.max_colluding = 0;
    let mut c = Coordinator::new(plan, [4; 32]).unwrap();
    let mut labs = labs(&mut c, 5, 2);
    labs[3].silent_from = Some(S::ShareKeys);
    labs[1].silent_from = Some(S::MaskedInput);
    let before = c.global().adapter.clone();
    let mut events = drive(&mut c, &mut labs, 10);
    assert!(completed(&events).is_none());
    // Lab 3 never shares keys: the stage closes at its deadline without it.
    assert!(matches!(
        c.task("token3").unwrap(),
        Task::Secure {
            step: SecureStep::ShareKeys(_),
            ..
        }
    ));
    let deadline = c.next_deadline().unwrap();
    events.extend(c.tick(deadline).unwrap());
    assert_eq!(
        c.task("token3").unwrap(),
        Task::Wait(WaitReason::DroppedFromAttempt {
            round: 1,
            attempt: 0
        })
    );
    events.extend(drive(&mut c, &mut labs, deadline));
    // Lab 1 never sends its masked input.
    let deadline = c.next_deadline().unwrap();
    events.extend(c.tick(deadline).unwrap());
    events.extend(drive(&mut c, &mut labs, deadline));
    let record = completed(&events).expect("the round completes").clone();
    assert_eq!(record.contributors, vec!["lab0", "lab2", "lab4"]);
    assert_eq!(record.dropped, vec!["lab1", "lab3"]);
    assert_close(
        &c,
        &expected_b(&before, c.upload_manifest(), &labs, &[0, 2, 4]),
        record.secure.unwrap().error_bound,
    );
    assert!(matches!(c.status().stage, Stage::Finished));
}

#[test]
fn too_few_survivors_fail_the_attempt_cleanly_and_the_next_attempt_succeeds() {
    let mut c = Coordinator::new(secure_plan(4, Some(3), 1), [5; 32]).unwrap();
    let mut labs = labs(&mut c, 4, 3);
    labs[0].silent_from = Some(S::MaskedInput);
    labs[1].silent_from = Some(S::MaskedInput);
    let mut events = drive(&mut c, &mut labs, 10);
    let deadline = c.next_deadline().unwrap();
    events.extend(c.tick(deadline).unwrap());
    let reason = events
        .iter()
        .find_map(|e| match e {
            Event::SecureAttemptFailed {
                attempt: 0, reason, ..
            } => Some(reason.clone()),
            _ => None,
        })
        .expect("attempt 0 fails");
    assert!(
        reason.contains("only 2 participants remain, 3 are needed"),
        "{reason}"
    );
    // Everyone is asked to take part in attempt 1; a message for attempt 0 is refused.
    assert!(matches!(
        c.task("token2").unwrap(),
        Task::Train {
            secure: Some(SecureTrain { attempt: 1, .. }),
            ..
        }
    ));
    let stale = c.secure_message(
        "token2",
        1,
        0,
        SecureMessage::Consistency(crate::secagg::messages::ConsistencySignature {
            from: 3,
            signature: [0; 64],
        }),
        deadline,
    );
    assert_eq!(
        stale,
        Err(RoundError::WrongAttempt {
            round: 1,
            got: 0,
            current: 1
        })
    );
    for lab in &mut labs {
        lab.silent_from = None;
    }
    let events = drive(&mut c, &mut labs, deadline + 1);
    let record = completed(&events).expect("attempt 1 completes");
    assert_eq!(record.secure.as_ref().unwrap().attempt, 1);
    assert_eq!(record.contributors.len(), 4);
}

#[test]
fn a_broken_masked_stream_is_taken_back_before_the_sum_is_used() {
    let mut c = Coordinator::new(secure_plan(4, None, 1), [6; 32]).unwrap();
    let mut labs = labs(&mut c, 4, 4);
    labs[2].silent_from = Some(S::MaskedInput);
    let before = c.global().adapter.clone();
    let mut events = drive(&mut c, &mut labs, 10);
    // Lab 2 starts streaming, then its connection dies after one chunk.
    let Task::Secure {
        round,
        attempt,
        step,
        ..
    } = c.task("token2").unwrap()
    else {
        panic!("lab 2 should be asked for its masked input");
    };
    let step = step.clone();
    let Reply::Masked(m) = labs[2].upload.as_mut().unwrap().respond(&step).unwrap() else {
        panic!("a masked input");
    };
    let index = c
        .masked_chunk("token2", round, attempt, 0, &m.words[..50])
        .unwrap();
    let deadline = c.next_deadline().unwrap();
    events.extend(c.tick(deadline).unwrap());
    events.extend(drive(&mut c, &mut labs, deadline));
    // Every share is in, but the sum still holds lab 2's partial input: the round waits.
    assert!(completed(&events).is_none());
    let events = c
        .masked_retract(index, round, attempt, 0, &m.words[..50], deadline + 1)
        .unwrap();
    let record = completed(&events).expect("completes once the chunk is taken back");
    assert_eq!(record.contributors, vec!["lab0", "lab1", "lab3"]);
    assert_close(
        &c,
        &expected_b(&before, c.upload_manifest(), &labs, &[0, 1, 3]),
        record.secure.as_ref().unwrap().error_bound,
    );
}

#[test]
fn secure_federations_refuse_plaintext_strangers_and_impersonation() {
    let mut c = Coordinator::new(secure_plan(3, None, 1), [8; 32]).unwrap();
    assert_eq!(
        c.join("x".into(), "stranger", "lo", 0),
        Err(RoundError::NotOnRoster("stranger".into()))
    );
    let mut labs = labs(&mut c, 3, 5);
    let update = SubmittedUpdate {
        round: 1,
        layout_hash: c.upload_manifest().hash_hex(),
        base_adapter_hash: c.global_hash().to_string(),
        num_samples: 1,
        payload: UpdatePayload::Plaintext(crate::update::encode_f32_le(&vec![
            0.0;
            c.upload_manifest()
                .len()
        ])),
    };
    assert_eq!(
        c.submit("token0", &update, 1),
        Err(RoundError::SecureAggregationRequired)
    );
    // Lab 0 tries to advertise keys in lab 1's name.
    let Task::Train {
        secure: Some(t),
        global_hash,
        ..
    } = c.task("token1").unwrap()
    else {
        panic!("train");
    };
    let global_hash = global_hash.to_string();
    let plan = c.plan().clone();
    let (delta1, delta2) = (labs[1].delta.clone(), labs[2].delta.clone());
    let (_, advert) = SecureUpload::open(
        &plan,
        "lab1",
        t,
        1,
        &global_hash,
        &delta1,
        5,
        3,
        UploadSecrets {
            identity_seed: Zeroizing::new(identity_seed(1)),
            randomness: randomness(&mut labs[1].rng),
            rounding_seed: [0; 32],
        },
    )
    .unwrap();
    let err = c
        .secure_message("token0", 1, 0, SecureMessage::Advertise(advert), 1)
        .unwrap_err();
    assert!(
        matches!(
            err,
            RoundError::Protocol(ProtocolError::Misaddressed { .. })
        ),
        "{err}"
    );
    // A participant opening a session under the wrong index is refused locally.
    let wrong = SecureUpload::open(
        &plan,
        "lab2",
        t,
        1,
        &global_hash,
        &delta2,
        5,
        3,
        UploadSecrets {
            identity_seed: Zeroizing::new(identity_seed(2)),
            randomness: randomness(&mut labs[2].rng),
            rounding_seed: [0; 32],
        },
    );
    assert!(matches!(
        wrong,
        Err(UploadError::WrongIndex {
            got: 2,
            expected: 3
        })
    ));
    let events = drive(&mut c, &mut labs, 2);
    assert!(completed(&events).is_some());
}

#[test]
fn stage_zero_is_extended_while_too_few_have_trained() {
    let mut c = Coordinator::new(secure_plan(4, None, 1), [9; 32]).unwrap();
    let mut labs = labs(&mut c, 4, 6);
    for lab in labs.iter_mut().skip(1) {
        lab.silent_from = Some(S::AdvertiseKeys);
    }
    drive(&mut c, &mut labs, 10);
    let events = c.tick(ROUND_TIMEOUT).unwrap();
    assert!(matches!(
        events[..],
        [Event::RoundExtended {
            received: 1,
            needed: 3,
            ..
        }]
    ));
    assert_eq!(
        c.task("token0").unwrap(),
        Task::Wait(WaitReason::SecureStage {
            round: 1,
            stage: S::AdvertiseKeys
        })
    );
}

#[test]
fn sparse_neighbourhood_rounds_give_the_survivors_mean() {
    let mut plan = secure_plan(7, None, 1);
    plan.secure_aggregation.neighbourhood_degree = Some(4);
    let mut c = Coordinator::new(plan, [10; 32]).unwrap();
    let mut labs = labs(&mut c, 7, 7);
    labs[5].silent_from = Some(S::MaskedInput);
    let before = c.global().adapter.clone();
    let mut events = drive(&mut c, &mut labs, 10);
    let deadline = c.next_deadline().unwrap();
    events.extend(c.tick(deadline).unwrap());
    events.extend(drive(&mut c, &mut labs, deadline));
    let record = completed(&events).expect("the round completes").clone();
    assert_eq!(record.dropped, vec!["lab5"]);
    assert_close(
        &c,
        &expected_b(&before, c.upload_manifest(), &labs, &[0, 1, 2, 3, 4, 6]),
        record.secure.unwrap().error_bound,
    );
}
