//! The lab's round machine driven against the real coordinator, deterministically: whole
//! secure rounds, a center that restarts an attempt after the reveal (also against a lab
//! restarted from its persisted record), one that asks for plaintext or states other work,
//! refused uploads, and the lab's own reasons to leave.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use zeroize::Zeroizing;

use super::guard::{GuardError, RevealLog};
use super::lab::*;
use super::secure_tests::{identity_seed, secure_plan};
use super::*;
use crate::adapter::LoraAdapter;
use crate::secagg::participant::RoundRandomness;

/// One lab: its machine, its token at the coordinator, and what its "disk" holds.
struct TestLab {
    name: String,
    token: String,
    machine: LabMachine,
    rng: ChaCha8Rng,
    /// The reveal record as last persisted.
    disk: RevealLog,
    done: Vec<u64>,
    /// Answers no secure step from this stage on (a lab whose process died).
    silent_from: Option<crate::secagg::protocol::Stage>,
    /// Training orders the machine gave.
    trainings: usize,
    /// Why the lab left, once it did.
    left: Option<LeaveReason>,
}

fn setup(name: &str, i: usize) -> LabSetup {
    LabSetup {
        name: name.to_string(),
        max_rounds: None,
        min_peers: 2,
        identity_seed: Some(Zeroizing::new(identity_seed(i))),
        max_epsilon: None,
        record_sampling_rate: Some(0.05),
    }
}

fn labs(c: &mut Coordinator, n: usize) -> Vec<TestLab> {
    (0..n)
        .map(|i| {
            let name = format!("lab{i}");
            let token = format!("token{i}");
            c.join(token.clone(), &name, "lo", 0).unwrap();
            let disk = RevealLog::new(&c.plan().fingerprint());
            TestLab {
                machine: LabMachine::new(c.plan().clone(), setup(&name, i), disk.clone()).unwrap(),
                name,
                token,
                rng: ChaCha8Rng::seed_from_u64(40 + i as u64),
                disk,
                done: Vec::new(),
                silent_from: None,
                trainings: 0,
                left: None,
            }
        })
        .collect()
}

/// What the shell's training gives: the start adapter with B moved by a lab-specific step.
fn fake_training(order: &TrainOrder, bump: f32) -> LoraAdapter {
    let mut trained = order.start.clone();
    for (_, module) in trained.modules_mut() {
        for v in module.b.data_mut() {
            *v += bump;
        }
    }
    trained
}

fn train_task(c: &Coordinator, token: &str, rng: &mut ChaCha8Rng) -> Option<TrainTask> {
    let Ok(Task::Train {
        round,
        global,
        work,
        secure,
        ..
    }) = c.task(token)
    else {
        return None;
    };
    Some(TrainTask {
        round,
        secure,
        work: StatedWork::of(c.plan().strategy.mode, &work),
        global: global.clone(),
        randomness: RoundRandomness::draw(rng),
    })
}

/// Performs `next` for `lab` against the coordinator, as the shell would, until the
/// machine has nothing more to do for this task.
fn perform(c: &mut Coordinator, lab: &mut TestLab, mut next: Next, now: u64) {
    loop {
        next = match next {
            Next::Train(order) => {
                lab.trainings += 1;
                let bump = 0.01 * (lab.token.len() + lab.name.len()) as f32;
                let trained = fake_training(&order, bump);
                lab.machine.trained(trained, 100).unwrap()
            }
            Next::Send(message) => {
                let (round, attempt) = lab
                    .machine
                    .secure_upload()
                    .map(|u| (u.round(), u.attempt()))
                    .unwrap();
                c.secure_message(&lab.token, round, attempt, message, now)
                    .unwrap();
                match lab.machine.sent(true) {
                    Some(next) => next,
                    None => return,
                }
            }
            Next::RevealAfter { persist, message } => {
                let (round, attempt) = lab
                    .machine
                    .secure_upload()
                    .map(|u| (u.round(), u.attempt()))
                    .unwrap();
                lab.disk = persist;
                c.secure_message(&lab.token, round, attempt, message, now)
                    .unwrap();
                match lab.machine.sent(true) {
                    Some(next) => next,
                    None => return,
                }
            }
            Next::SendMasked(words) => {
                let (round, attempt) = lab
                    .machine
                    .secure_upload()
                    .map(|u| (u.round(), u.attempt()))
                    .unwrap();
                c.masked_chunk(&lab.token, round, attempt, 0, &words)
                    .unwrap();
                c.masked_commit(&lab.token, round, attempt, now).unwrap();
                match lab.machine.sent(true) {
                    Some(next) => next,
                    None => return,
                }
            }
            Next::RoundDone { round } => {
                lab.done.push(round);
                return;
            }
            Next::Leave { reason, .. } => {
                c.leave(&lab.token, reason, now).unwrap();
                lab.left = Some(reason);
                return;
            }
            other => panic!("{}: unexpected {other:?}", lab.name),
        }
    }
}

/// Gives `lab` (lab0) a privacy budget of `max_epsilon` under `plan`, from its record on disk.
fn give_budget(lab: &mut TestLab, plan: &FederationPlan, max_epsilon: f64) {
    lab.machine = LabMachine::new(
        plan.clone(),
        LabSetup {
            max_epsilon: Some(max_epsilon),
            ..setup("lab0", 0)
        },
        lab.disk.clone(),
    )
    .unwrap();
}

/// Lets every lab act on its current task until nobody has anything left to do.
fn drive(c: &mut Coordinator, labs: &mut [TestLab], now: u64) {
    loop {
        let mut progressed = false;
        for lab in labs.iter_mut() {
            if let Some(task) = train_task(c, &lab.token, &mut lab.rng) {
                // Keys already advertised for this attempt: the lab waits for the stage.
                let attempt = task.secure.map(|s| s.attempt);
                if lab
                    .machine
                    .secure_upload()
                    .is_some_and(|u| u.round() == task.round && Some(u.attempt()) == attempt)
                {
                    continue;
                }
                let next = lab.machine.train(task, false).unwrap();
                if matches!(next, Next::Pause { .. }) {
                    continue;
                }
                perform(c, lab, next, now);
                progressed = true;
                continue;
            }
            let Ok(Task::Secure {
                round,
                attempt,
                step,
                ..
            }) = c.task(&lab.token)
            else {
                continue;
            };
            if lab
                .silent_from
                .is_some_and(|s| s as u8 <= step.stage() as u8)
            {
                continue;
            }
            let next = lab.machine.secure_step(round, attempt, &step).unwrap();
            if matches!(next, Next::Pause { .. }) {
                continue;
            }
            perform(c, lab, next, now);
            progressed = true;
        }
        if !progressed {
            return;
        }
    }
}

#[test]
fn secure_rounds_run_through_the_labs_machines() {
    let mut c = Coordinator::new(secure_plan(3, None, 2), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 3);
    drive(&mut c, &mut labs, 10);
    assert_eq!(c.history().len(), 2, "{:?}", c.status());
    for record in c.history() {
        assert_eq!(record.contributors, ["lab0", "lab1", "lab2"]);
    }
    for lab in &labs {
        assert_eq!(lab.done, [1, 2], "{}", lab.name);
        assert_eq!(lab.disk.last_round(), 2, "persisted before each reveal");
    }
}

/// Two of four labs die before their masked input: the attempt fails below the threshold,
/// the next one starts, and every lab, the two back included, takes part in it with the
/// update it trained for attempt 0 (trained once, masked afresh).
#[test]
fn after_a_failed_attempt_the_labs_take_part_again_with_the_same_update() {
    let mut c = Coordinator::new(secure_plan(4, Some(3), 1), [5; 32]).unwrap();
    let mut labs = labs(&mut c, 4);
    labs[0].silent_from = Some(crate::secagg::protocol::Stage::MaskedInput);
    labs[1].silent_from = Some(crate::secagg::protocol::Stage::MaskedInput);
    drive(&mut c, &mut labs, 10);
    let deadline = c.next_deadline().unwrap();
    c.tick(deadline).unwrap();
    assert!(c.history().is_empty(), "attempt 0 failed");
    for lab in &mut labs {
        lab.silent_from = None;
    }
    drive(&mut c, &mut labs, deadline + 1);
    let record = &c.history()[0];
    assert_eq!(record.contributors, ["lab0", "lab1", "lab2", "lab3"]);
    assert_eq!(record.secure.as_ref().map(|s| s.attempt), Some(1));
    for lab in &labs {
        assert_eq!(lab.trainings, 1, "{} trained once", lab.name);
        assert_eq!(lab.done, [1], "{}", lab.name);
    }
}

/// A center that learned round 1's sum starts another attempt of it from the same global:
/// the lab stays out (an honest center counts it as dropped), and so does the same lab
/// restarted from what it persisted; the same global under a later round is refused.
#[test]
fn a_restarted_attempt_after_the_reveal_gets_nothing_even_from_a_restarted_lab() {
    let plan = secure_plan(3, None, 3);
    let mut c = Coordinator::new(plan.clone(), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 3);
    let first_global = c.global().clone();
    let session = [3; 32];
    drive(&mut c, &mut labs, 10);
    assert!(c.history().len() >= 2);
    let lab = &mut labs[0];
    let round_one = |attempt: u32, round: u64, rng: &mut ChaCha8Rng, c: &Coordinator| TrainTask {
        round,
        secure: Some(SecureTrain {
            session,
            attempt,
            index: 0,
        }),
        work: StatedWork::of(
            c.plan().strategy.mode,
            &RoundWork::derive(
                &Strategy::for_plan(c.plan().strategy.clone(), c.plan()).unwrap(),
                &c.plan().lora,
                "lab0",
                &crate::strategy::ServerState::default(),
                &Strategy::for_plan(c.plan().strategy.clone(), c.plan())
                    .unwrap()
                    .upload_layout(&first_global, &Default::default()),
            ),
        ),
        global: first_global.clone(),
        randomness: RoundRandomness::draw(rng),
    };
    let again = lab
        .machine
        .train(round_one(1, 1, &mut lab.rng, &c), false)
        .unwrap();
    assert!(
        matches!(
            again,
            Next::Pause {
                why: Pause::AlreadyRevealed { round: 1 },
                ..
            }
        ),
        "{again:?}"
    );
    let mut restarted = LabMachine::new(plan.clone(), setup("lab0", 0), lab.disk.clone()).unwrap();
    let again = restarted
        .train(round_one(1, 1, &mut lab.rng, &c), false)
        .unwrap();
    assert!(
        matches!(
            again,
            Next::Pause {
                why: Pause::AlreadyRevealed { .. },
                ..
            }
        ),
        "the restarted lab remembers from its record: {again:?}"
    );
    let reused = restarted
        .train(round_one(0, 3, &mut lab.rng, &c), false)
        .unwrap_err();
    assert!(
        matches!(reused, LabError::Guard(GuardError::GlobalReused { .. })),
        "{reused}"
    );
}

#[test]
fn a_task_against_the_pinned_plan_is_refused_by_name() {
    let mut c = Coordinator::new(secure_plan(3, None, 2), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 3);
    let lab = &mut labs[1];
    // Plaintext asked under a secure plan.
    let mut task = train_task(&c, &lab.token, &mut lab.rng).unwrap();
    task.secure = None;
    let refused = lab.machine.train(task, false).unwrap_err();
    assert!(
        matches!(refused, LabError::PlaintextRequested { round: 1 }),
        "{refused}"
    );
    // Other work than the plan's.
    let mut task = train_task(&c, &lab.token, &mut lab.rng).unwrap();
    task.work.rank += 1;
    let refused = lab.machine.train(task, false).unwrap_err();
    assert!(
        matches!(refused, LabError::WorkMismatch { round: 1, .. }),
        "{refused}"
    );
    // A round number beyond the plan.
    let mut task = train_task(&c, &lab.token, &mut lab.rng).unwrap();
    task.round = 99;
    let refused = lab.machine.train(task, false).unwrap_err();
    assert!(matches!(refused, LabError::RoundNumbers(_)), "{refused}");
    // A secure session under a plaintext plan.
    let mut plain = secure_plan(3, None, 2);
    plain.secure_aggregation.enabled = false;
    let mut machine = LabMachine::new(plain, setup("lab1", 1), RevealLog::new("x")).unwrap();
    let task = train_task(&c, &lab.token, &mut lab.rng).unwrap();
    let refused = machine.train(task, false).unwrap_err();
    assert!(
        matches!(refused, LabError::SecureUnplanned { round: 1 }),
        "{refused}"
    );
}

#[test]
fn refused_plaintext_updates_back_off_then_give_up_and_policy_leaves_between_rounds() {
    let mut plan = secure_plan(2, None, 3);
    plan.secure_aggregation.enabled = false;
    let mut c = Coordinator::new(plan.clone(), [3; 32]).unwrap();
    c.join("t0".into(), "lab0", "lo", 0).unwrap();
    c.join("t1".into(), "lab1", "lo", 0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let mut machine = LabMachine::new(
        plan.clone(),
        LabSetup {
            max_rounds: Some(1),
            ..setup("lab0", 0)
        },
        RevealLog::new(&plan.fingerprint()),
    )
    .unwrap();
    // Waiting: the operator's request to leave is honoured at once (no session open).
    assert!(matches!(
        machine.wait(60_000, false),
        Next::Pause {
            ms: MAX_WAIT_MS,
            ..
        }
    ));
    let task = train_task(&c, "t0", &mut rng).unwrap();
    let Next::Train(order) = machine.train(task, false).unwrap() else {
        panic!("a fresh round trains");
    };
    let Next::Upload(update) = machine.trained(fake_training(&order, 0.5), 10).unwrap() else {
        panic!("a plaintext plan uploads");
    };
    assert_eq!(update.round, 1);
    assert_eq!(update.layout_hash, c.upload_manifest().hash_hex());
    // The center refuses it again and again: pauses double, then the lab gives up.
    let mut pauses = Vec::new();
    let given_up = loop {
        match machine.uploaded(false) {
            Ok(Next::Pause { ms, .. }) => pauses.push(ms),
            Ok(other) => panic!("{other:?}"),
            Err(e) => break e,
        }
        let task = train_task(&c, "t0", &mut rng).unwrap();
        // The same round and model: the update trained before is handed in again.
        assert!(matches!(
            machine.train(task, false).unwrap(),
            Next::Upload(_)
        ));
    };
    assert_eq!(pauses, [500, 1_000, 2_000, 4_000, 8_000, 16_000, 30_000]);
    assert!(
        matches!(given_up, LabError::UpdateRefused { round: 1, tries: 8 }),
        "{given_up}"
    );
    // Taken: the round is done, and the policy's one round is used up: the next task is
    // answered by leaving, with its global.
    let task = train_task(&c, "t0", &mut rng).unwrap();
    assert!(matches!(
        machine.train(task, false).unwrap(),
        Next::Upload(_)
    ));
    assert!(matches!(
        machine.uploaded(true).unwrap(),
        Next::RoundDone { round: 1 }
    ));
    let task = train_task(&c, "t0", &mut rng).unwrap();
    assert!(matches!(
        machine.train(task, false).unwrap(),
        Next::Leave {
            reason: LeaveReason::MaxRounds,
            ..
        }
    ));
    assert!(matches!(
        machine.wait(100, true),
        Next::Leave {
            reason: LeaveReason::OperatorRequest,
            ..
        }
    ));
}

/// Under `[privacy]`: secure rounds run with each lab's noise; the center's new global is
/// exactly what the plaintext sum of the labs' noised encodings gives; each record's ε is
/// the accountant's, and the labs' own ledgers agree with the center's; a lab whose budget
/// covers two rounds leaves cleanly before the third, and the others go on.
#[test]
fn noised_rounds_are_accounted_and_a_lab_leaves_at_its_budget() {
    use crate::privacy::ledger::epsilon_spent;
    use crate::privacy::{PrivacyMode, PrivacySpec};
    let mut plan = secure_plan(4, None, 3);
    plan.privacy = PrivacySpec {
        mode: PrivacyMode::Distributed,
        noise_multiplier: 1.0,
        l2_clip: 0.5,
        delta: 1e-5,
        record: None,
    };
    let mut c = Coordinator::new(plan.clone(), [3; 32]).unwrap();
    let initial = c.global().clone();
    let len = c.layout.len();
    // The threshold of 4 labs with one colluder is 3: sums of 4 have 3 labs of noise no
    // coalition removes, the worst case 2.
    let mechanism = |round: u64, honest: usize| {
        plan.update_encoding(len, round)
            .unwrap()
            .private()
            .unwrap()
            .mechanism(honest)
    };
    let limit =
        0.999 * epsilon_spent(&[mechanism(1, 3), mechanism(2, 3), mechanism(3, 2)], 1e-5).unwrap();
    let mut labs = labs(&mut c, 4);
    give_budget(&mut labs[0], &plan, limit);
    drive(&mut c, &mut labs, 10);
    assert_eq!(c.history().len(), 3, "{:?}", c.status());
    assert_eq!(labs[0].left, Some(LeaveReason::PrivacyBudget));
    assert_eq!(labs[0].done, [1, 2]);
    assert_eq!(c.history()[2].contributors, ["lab1", "lab2", "lab3"]);

    // Round 1's global is what the plaintext sum of the four noised encodings gives.
    let encoding = plan.update_encoding(len, 1).unwrap();
    let mut sum = vec![0u32; encoding.vector_len()];
    for (i, lab) in labs.iter().enumerate() {
        let bump = 0.01 * (lab.token.len() + lab.name.len()) as f32;
        let seed = rounding_seed(&identity_seed(i), 1, &initial.content_hash());
        let encoded = encoding.encode(&vec![bump; len], 100, seed).unwrap();
        assert_eq!(
            encoded.clipped, 1,
            "{len} values of {bump} are over the clip"
        );
        let words = encoded.words;
        for (s, w) in sum.iter_mut().zip(words) {
            *s = s.wrapping_add(w);
        }
    }
    let decoded = encoding.decode_sum(&sum, 4).unwrap();
    let strategy = Strategy::for_plan(plan.strategy.clone(), &plan).unwrap();
    let expected = strategy
        .aggregate(
            &initial,
            &Default::default(),
            &crate::strategy::AggregatedUpload::from_decoded(&decoded),
        )
        .unwrap();
    assert_eq!(c.history()[0].adapter_hash, expected.global.content_hash());
    // The noise is there, at the stated size, around the clipped mean: every lab's update
    // is 0.1 in each value, scaled to norm 0.5.
    let exact = 0.5 / (len as f64).sqrt();
    let errors: Vec<f64> = decoded.mean_update.iter().map(|v| v - exact).collect();
    let bias = errors.iter().sum::<f64>() / len as f64;
    let sd = (errors.iter().map(|e| e * e).sum::<f64>() / len as f64).sqrt();
    assert!(
        bias.abs() < 5.0 * decoded.noise_stddev / (len as f64).sqrt(),
        "bias {bias}"
    );
    assert!(
        (sd / decoded.noise_stddev - 1.0).abs() < 0.05,
        "{sd} vs {}",
        decoded.noise_stddev
    );

    // ε as recorded, and as each lab counts it.
    let mut all_rounds = Vec::new();
    for (r, record) in c.history().iter().enumerate() {
        let privacy = record.secure.as_ref().unwrap().privacy.as_ref().unwrap();
        let honest = record.contributors.len() - 1;
        assert_eq!(privacy.mechanism, mechanism(r as u64 + 1, honest));
        let once = epsilon_spent(std::slice::from_ref(&privacy.mechanism), 1e-5).unwrap();
        assert_eq!(privacy.epsilon_round, once);
        all_rounds.push(privacy.mechanism.clone());
        assert_eq!(
            privacy.epsilon_spent,
            epsilon_spent(&all_rounds, 1e-5).unwrap()
        );
    }
    let spent = labs[1].machine.epsilon_spent().unwrap().unwrap();
    assert_eq!(
        spent,
        c.history()[2]
            .secure
            .as_ref()
            .unwrap()
            .privacy
            .as_ref()
            .unwrap()
            .epsilon_spent
    );
    let lab0 = labs[0].machine.epsilon_spent().unwrap().unwrap();
    assert!(lab0 <= limit && lab0 == epsilon_spent(&all_rounds[..2], 1e-5).unwrap());

    // A lab with a budget refuses a plan without noise.
    let err = LabMachine::new(
        secure_plan(4, None, 3),
        LabSetup {
            max_epsilon: Some(8.0),
            ..setup("lab0", 0)
        },
        RevealLog::new("00"),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("max_epsilon = 8"), "{err}");
}

/// Under `[privacy.record]` a lab counts the DP-SGD steps of every round it revealed, and
/// leaves before the round whose steps would take it past its budget; a lab that cannot
/// say its sampling rate refuses the plan.
#[test]
fn a_lab_leaves_before_dp_sgd_would_exceed_its_budget() {
    use crate::privacy::RecordDpSpec;
    use crate::privacy::ledger::record_epsilon;
    let mut plan = secure_plan(4, None, 3);
    plan.privacy.record = Some(RecordDpSpec {
        noise_multiplier: 1.0,
        max_grad_norm: 1.0,
    });
    let steps = plan.training.local_steps as u64;
    let two = record_epsilon(0.05, 1.0, 2 * steps, 1e-5).unwrap();
    let three = record_epsilon(0.05, 1.0, 3 * steps, 1e-5).unwrap();
    assert!(two < three);
    let mut c = Coordinator::new(plan.clone(), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 4);
    give_budget(&mut labs[0], &plan, (two + three) / 2.0);
    drive(&mut c, &mut labs, 10);
    assert_eq!(c.history().len(), 3, "{:?}", c.status());
    assert_eq!(labs[0].left, Some(LeaveReason::PrivacyBudget));
    assert_eq!(labs[0].done, [1, 2]);
    assert_eq!(labs[0].machine.record_epsilon_spent().unwrap(), Some(two));
    assert_eq!(labs[1].machine.record_epsilon_spent().unwrap(), Some(three));
    // No noise on the sums: no client-level ε.
    assert_eq!(labs[1].machine.epsilon_spent().unwrap(), None);
    let err = LabMachine::new(
        plan,
        LabSetup {
            record_sampling_rate: None,
            ..setup("lab0", 0)
        },
        RevealLog::new("00"),
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("sampling rate"), "{err}");
}
