//! Saving and restoring the coordinator: a run restarted after every single input ends
//! with exactly the adapter of an uninterrupted run; attempts before the masked input closed
//! restart, later ones resume; foreign or inconsistent saves are refused.

use zeroize::Zeroizing;

use super::secure_tests::{Lab, completed, drive, identity_seed, labs, randomness, secure_plan};
use super::snapshot::{Resumed, Saved, SavedSum, SnapshotError};
use super::*;
use crate::secagg::protocol::Stage as S;

/// What an aggregator would have in its database after the last input.
struct Disk {
    plan: FederationPlan,
    state: Vec<u8>,
    server_state: Vec<u8>,
    global: GlobalModel,
    history: Vec<RoundRecord>,
    sum: Option<SavedSum>,
}

fn save(c: &Coordinator) -> Disk {
    Disk {
        plan: c.plan().clone(),
        state: c.encode_state(),
        server_state: c.encode_server_state(),
        global: c.global().clone(),
        history: c.history().to_vec(),
        sum: c.durable_sum().map(|s| SavedSum {
            round: s.round,
            attempt: s.attempt,
            partial: s.encode_partial(),
            words_le: s.words_le(),
        }),
    }
}

fn load(disk: Disk, now: u64) -> Result<(Coordinator, Resumed), SnapshotError> {
    Coordinator::restore(
        disk.plan,
        Saved {
            state: &disk.state,
            server_state: &disk.server_state,
            global: disk.global,
            history: disk.history,
            sum: disk.sum,
        },
        now,
    )
}

/// One input from the first lab that has something to do; false when nobody has.
fn step(c: &mut Coordinator, labs: &mut [Lab], now: u64) -> bool {
    for lab in labs.iter_mut() {
        match c.task(&lab.token).unwrap() {
            Task::Train {
                round,
                global_hash,
                secure: Some(t),
                ..
            } => {
                let secrets = UploadSecrets {
                    identity_seed: Zeroizing::new(identity_seed(lab.seed)),
                    randomness: randomness(&mut lab.rng),
                    // Per update, not per attempt (see `rounding_seed`).
                    rounding_seed: rounding_seed(&identity_seed(lab.seed), round, global_hash),
                };
                let (global_hash, plan) = (global_hash.to_string(), c.plan().clone());
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
                c.secure_message(
                    &lab.token,
                    round,
                    t.attempt,
                    SecureMessage::Advertise(advert),
                    now,
                )
                .unwrap();
                return true;
            }
            Task::Secure {
                round,
                attempt,
                step,
                ..
            } => {
                match lab.upload.as_mut().unwrap().respond(&step).unwrap() {
                    Reply::Message(m) => {
                        c.secure_message(&lab.token, round, attempt, m, now)
                            .unwrap();
                    }
                    Reply::Masked(m) => {
                        for (k, part) in m.words.chunks(97).enumerate() {
                            c.masked_chunk(&lab.token, round, attempt, k * 97, part)
                                .unwrap();
                        }
                        c.masked_commit(&lab.token, round, attempt, now).unwrap();
                    }
                }
                return true;
            }
            _ => {}
        }
    }
    false
}

fn deterministic_labs(c: &mut Coordinator) -> Vec<Lab> {
    let mut labs = labs(c, 4, 1);
    for lab in &mut labs {
        lab.rng = rand_chacha::ChaCha8Rng::seed_from_u64(lab.seed as u64);
    }
    labs
}

use rand::SeedableRng;

#[test]
fn a_run_restarted_after_every_input_ends_with_the_uninterrupted_adapter() {
    // Uninterrupted, with the labs' rounding derived per update.
    let mut straight = Coordinator::new(secure_plan(4, None, 3), [3; 32]).unwrap();
    let mut labs_a = deterministic_labs(&mut straight);
    while step(&mut straight, &mut labs_a, 10) {}
    assert_eq!(straight.status().stage, Stage::Finished);
    assert_eq!(straight.history().len(), 3);

    // Another run (another session id), saved and restored after every input from the
    // close of the masked input on (the attempt resumes), and after the first input of each
    // round's first attempt (it restarts; restarting after every input before the masked
    // input closes would never let an attempt get that far).
    let mut c = Coordinator::new(secure_plan(4, None, 3), [9; 32]).unwrap();
    let mut labs_b = deterministic_labs(&mut c);
    let mut resumed = Vec::new();
    let mut now = 0;
    loop {
        let restart = match c.status().secure {
            Some((S::ConsistencyCheck | S::Unmask, _)) | Some((_, 0)) | None => true,
            Some(_) => false,
        };
        if restart {
            let (restored, how) = load(save(&c), now).unwrap();
            assert_eq!(restored.session(), [9; 32], "the run keeps its session id");
            c = restored;
            resumed.push(how);
        }
        now += 1;
        if !step(&mut c, &mut labs_b, now) {
            break;
        }
    }
    assert_eq!(c.status().stage, Stage::Finished);
    assert_eq!(c.history().len(), 3);
    assert_eq!(c.global(), straight.global(), "bit-identical final adapter");
    assert_eq!(c.global_hash(), straight.global_hash());
    for (a, b) in c.history().iter().zip(straight.history()) {
        assert_eq!(a.adapter_hash, b.adapter_hash);
        assert_eq!(a.contributors, b.contributors);
    }
    // Both kinds of resumption happened: restarts before the masked input closed, and
    // resumptions of the same attempt in its consistency and unmask stages.
    assert!(
        resumed
            .iter()
            .any(|r| matches!(r, Resumed::AttemptRestarted { round: 1, .. }))
    );
    for stage in [S::ConsistencyCheck, S::Unmask] {
        assert!(
            resumed
                .iter()
                .any(|r| matches!(r, Resumed::AttemptResumed { stage: s, .. } if *s == stage)),
            "{stage:?}: {resumed:?}"
        );
    }
    assert_eq!(resumed.last(), Some(&Resumed::Finished));
}

#[test]
fn an_attempt_in_its_unmask_stage_resumes_with_its_shares_and_is_never_restarted() {
    let mut c = Coordinator::new(secure_plan(4, None, 1), [3; 32]).unwrap();
    let mut labs = deterministic_labs(&mut c);
    // Drive until the unmask stage has one revealed response.
    loop {
        if let Some((S::Unmask, _)) = c.status().secure {
            break;
        }
        assert!(step(&mut c, &mut labs, 1));
    }
    assert!(step(&mut c, &mut labs, 1));
    let disk = save(&c);
    assert!(disk.sum.is_some());
    let (mut back, how) = load(save(&c), 2).unwrap();
    assert_eq!(
        how,
        Resumed::AttemptResumed {
            round: 1,
            attempt: 0,
            stage: S::Unmask
        }
    );
    // The lab that revealed is not asked again; the others finish the same attempt.
    let events = drive(&mut back, &mut labs, 3);
    let record = completed(&events).expect("the resumed attempt completes");
    assert_eq!(record.secure.as_ref().unwrap().attempt, 0);
    assert_eq!(record.contributors.len(), 4);

    // Without its sum the attempt cannot go on, and is refused rather than restarted.
    let mut no_sum = disk;
    no_sum.sum = None;
    let err = load(no_sum, 2).unwrap_err();
    assert!(
        err.to_string().contains("running sum was not saved"),
        "{err}"
    );
}

#[test]
fn a_restart_mid_masked_input_restarts_the_attempt_with_fresh_keys() {
    let mut c = Coordinator::new(secure_plan(4, None, 1), [3; 32]).unwrap();
    let mut labs = deterministic_labs(&mut c);
    loop {
        if let Some((S::MaskedInput, _)) = c.status().secure {
            break;
        }
        assert!(step(&mut c, &mut labs, 1));
    }
    // One masked input folded in, the stage still open.
    assert!(step(&mut c, &mut labs, 1));
    assert!(
        c.durable_sum().is_none(),
        "nothing vector-sized to save yet"
    );
    let (mut back, how) = load(save(&c), 2).unwrap();
    assert_eq!(
        how,
        Resumed::AttemptRestarted {
            round: 1,
            attempt: 1
        }
    );
    let Task::Train {
        secure: Some(t), ..
    } = back.task(&labs[0].token).unwrap()
    else {
        panic!("a restarted attempt starts with fresh keys");
    };
    assert_eq!(t.attempt, 1);
    let events = drive(&mut back, &mut labs, 3);
    assert_eq!(
        completed(&events).unwrap().secure.as_ref().unwrap().attempt,
        1
    );
}

#[test]
fn a_plaintext_round_collects_again_and_tokens_survive() {
    let mut p = secure_plan(3, None, 2);
    p.secure_aggregation.enabled = false;
    p.roster.clear();
    let mut c = Coordinator::new(p, [1; 32]).unwrap();
    for i in 0..3 {
        c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
    }
    let update = |c: &Coordinator| SubmittedUpdate {
        round: 1,
        layout_hash: c.upload_manifest().hash_hex(),
        base_adapter_hash: c.global_hash().to_string(),
        num_samples: 5,
        payload: UpdatePayload::Plaintext(crate::update::encode_f32_le(&vec![
            0.5;
            c.upload_manifest()
                .len()
        ])),
    };
    let u = update(&c);
    c.submit("t0", &u, 1).unwrap();
    let (mut back, how) = load(save(&c), 0).unwrap();
    assert_eq!(how, Resumed::RoundRestarted { round: 1 });
    assert_eq!(back.participant("t2"), Some(("p2", "lo")));
    assert_eq!(back.status().updates_received, 0);
    assert!(matches!(
        back.task("t0").unwrap(),
        Task::Train { round: 1, .. }
    ));
    for t in ["t0", "t1", "t2"] {
        back.submit(t, &u, 1).unwrap();
    }
    assert_eq!(back.history().len(), 1);
    // A closed round survives a restart with its adapter.
    let global = back.global().clone();
    let (again, how) = load(save(&back), 0).unwrap();
    assert_eq!(how, Resumed::RoundRestarted { round: 2 });
    assert_eq!(again.global(), &global);
    assert_eq!(again.history(), back.history());
    // A history that does not match the state is refused.
    let mut lost = save(&back);
    lost.history.clear();
    let err = load(lost, 0).unwrap_err();
    assert!(err.to_string().contains("1 rounds closed"), "{err}");
}

#[test]
fn foreign_or_inconsistent_saves_are_refused_and_name_the_problem() {
    let mut c = Coordinator::new(secure_plan(4, None, 2), [3; 32]).unwrap();
    let _labs = deterministic_labs(&mut c);

    let mut other_plan = save(&c);
    other_plan.plan.rounds.rounds = 5;
    let err = load(other_plan, 0).unwrap_err();
    assert!(matches!(err, SnapshotError::PlanMismatch { .. }), "{err}");
    assert!(err.to_string().contains("another plan"), "{err}");

    let mut garbage = save(&c);
    garbage.state = b"not a snapshot".to_vec();
    let err = load(garbage, 0).unwrap_err();
    assert!(
        err.to_string()
            .contains("coordinator state is not readable"),
        "{err}"
    );

    let mut wrong_global = save(&c);
    wrong_global
        .global
        .adapter
        .modules_mut()
        .next()
        .unwrap()
        .1
        .b
        .data_mut()[0] = 1.0;
    let err = load(wrong_global, 0).unwrap_err();
    assert!(matches!(err, SnapshotError::GlobalMismatch { .. }), "{err}");

    let mut bad_state = save(&c);
    bad_state.server_state = vec![0xff];
    let err = load(bad_state, 0).unwrap_err();
    assert!(
        err.to_string().contains("server state is not readable"),
        "{err}"
    );
}
