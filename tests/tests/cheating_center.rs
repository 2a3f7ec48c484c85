//! A center that cheats must still see only the sum (issue #27). Real labs (the participant
//! runtime, real burn training) talk to a cheating center: a real gRPC server on loopback
//! that forwards to an honest aggregator and deviates on purpose
//! (`mekong_e2e::cheating_center`). Each deviation ends with every lab refusing, with an
//! error that names it, and with the center holding nothing that determines one lab's
//! update: no plaintext update, and no masked input or shares beyond what an honest round
//! gives.
//!
//! The split-view attack with a colluding lab is played against the protocol's state
//! machines in `fedcore/src/secagg/split_view_tests.rs`.

use std::path::Path;
use std::sync::{Arc, Mutex};

use burn::prelude::Device;
use fedclient::participant::{self, ParticipantError, ParticipantOptions, ParticipantReport};
use fedcore::FederationPlan;
use fedcore::round::guard::GuardError;
use fedcore::secagg::spec::RoundNumberError;
use mekong_e2e::cheating_center::{CheatingCenter, Deviation, TaskTamper};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};
use mekong_proto::v1 as pb;

const CODES: [&str; 3] = ["lo", "km", "th"];

fn name(i: usize) -> String {
    format!("lab-{}", CODES[i])
}

fn plan(rounds: u64) -> FederationPlan {
    let identities: Vec<_> = (0..3).map(|i| test_identity(i as u8)).collect();
    let names: Vec<String> = (0..3).map(name).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    secure_test_plan(&roster, rounds, 60_000, 10_000)
}

/// Lab `i`'s options against `url`: its identity, pinned to `plan` (`None`: unpinned),
/// not trusting the center's plan unless a test says so.
fn lab_options(url: &str, i: usize, plan: Option<&FederationPlan>) -> ParticipantOptions {
    let mut options = participant_options(url, &name(i), CODES[i]);
    options.trust_aggregator_plan = false;
    options.identity = Some(Arc::new(test_identity(i as u8)));
    options.plan_sha256 = plan.map(FederationPlan::fingerprint);
    options
}

/// Runs lab 0 alone with `options` until it stops, which must be a refusal.
async fn refusal(options: ParticipantOptions) -> ParticipantError {
    participant::run(
        options,
        corpus(CODES[0]),
        Device::flex(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap_err()
}

/// Runs the three labs against `url`, pinned to `plan`, each with its state directory
/// under `state`; returns each lab's result.
async fn run_labs(
    url: &str,
    plan: &FederationPlan,
    state: &Path,
) -> Vec<Result<ParticipantReport, ParticipantError>> {
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for (i, code) in CODES.iter().enumerate() {
        let mut options = lab_options(url, i, Some(plan));
        options.state_dir = Some(state.join(name(i)));
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    let mut results = Vec::new();
    for lab in labs {
        results.push(lab.await.unwrap());
    }
    results
}

fn tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
}

/// Each train task, rewritten by `f`.
fn on_train(f: impl Fn(&mut pb::TrainTask) + Send + Sync + 'static) -> TaskTamper {
    Box::new(move |_, answer| {
        if let Some(pb::fetch_task_response::Task::Train(t)) = &mut answer.task {
            f(t);
        }
    })
}

/// An honest aggregator for `plan` writing into `dir`, and a cheating center in front of
/// it that deviates as told.
async fn honest_behind_cheating(
    plan: &FederationPlan,
    dir: &Path,
    deviation: Deviation,
) -> (fedaggregator::RunningServer, CheatingCenter) {
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir))
        .await
        .unwrap();
    let center = CheatingCenter::start(&server.url(), deviation).await;
    (server, center)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_that_drops_the_secure_session_gets_no_plaintext() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(1);
    let (_server, center) = honest_behind_cheating(
        &plan,
        dir.path(),
        Deviation {
            task: Some(on_train(|t| t.secure = None)),
            ..Default::default()
        },
    )
    .await;
    let results = run_labs(&center.url(), &plan, dir.path()).await;
    for r in &results {
        match r {
            Err(e @ ParticipantError::PlaintextRequested { round: 1 }) => {
                assert!(e.to_string().contains("in plaintext"), "{e}");
            }
            other => panic!("expected a refusal of plaintext, got {other:?}"),
        }
    }
    let received = center.received();
    assert_eq!(
        received.plaintext_bytes, 0,
        "no update left a lab in the clear"
    );
    assert_eq!(received.count("SubmitUpdate"), 0);
    assert_eq!(received.count("SubmitUpdateStream"), 0);
    assert_eq!(received.count("SubmitMasked"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_that_substitutes_a_roster_key_is_refused() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(1);
    // The center lists its own key for lab-km, to pose as it towards the others.
    let center_key = test_identity(99).public_key_hex();
    let (_server, center) = honest_behind_cheating(
        &plan,
        dir.path(),
        Deviation {
            join: Some(Box::new(move |answer: &mut pb::JoinResponse| {
                let mut plan = FederationPlan::from_json(&answer.plan_json).unwrap();
                plan.roster[1].public_key = center_key.clone();
                answer.plan_json = plan.to_json();
            })),
            ..Default::default()
        },
    )
    .await;
    let results = run_labs(&center.url(), &plan, dir.path()).await;
    for r in &results {
        assert!(
            matches!(r, Err(ParticipantError::PlanMismatch { expected, .. }) if *expected == plan.fingerprint()),
            "{r:?}"
        );
    }
    // A lab with no pinned plan refuses too, unless its operator explicitly trusts the
    // center.
    let err = refusal(lab_options(&center.url(), 0, None)).await;
    assert!(matches!(err, ParticipantError::NoPlanPin { .. }), "{err:?}");
    assert!(err.to_string().contains("--trust-aggregator-plan"), "{err}");
    assert_eq!(center.received().count("SecureAggregate"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_threshold_below_the_collusion_bound_is_refused_even_by_a_trusting_lab() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(1);
    // Two of three: one colluding lab and the center could split the other two.
    let (_server, center) = honest_behind_cheating(
        &plan,
        dir.path(),
        Deviation {
            join: Some(Box::new(|answer: &mut pb::JoinResponse| {
                let mut value: serde_json::Value = serde_json::from_str(&answer.plan_json).unwrap();
                value["secure_aggregation"]["threshold"] = 2.into();
                answer.plan_json = value.to_string();
            })),
            ..Default::default()
        },
    )
    .await;
    // Even a lab whose operator trusts whatever plan the center sends checks the bound.
    let mut trusting = lab_options(&center.url(), 0, None);
    trusting.trust_aggregator_plan = true;
    let err = refusal(trusting).await;
    let message = err.to_string();
    assert!(
        matches!(err, ParticipantError::Plan(_))
            && message.contains("secure_aggregation.threshold")
            && message.contains("colluding"),
        "{message}"
    );
    assert_eq!(center.received().count("SecureAggregate"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_that_resends_a_global_under_a_new_round_is_refused() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(2);
    // Round 1 honestly; round 2 with round 1's global model.
    let first: Arc<Mutex<Option<pb::AdapterPayload>>> = Arc::default();
    let (_server, center) = honest_behind_cheating(
        &plan,
        dir.path(),
        Deviation {
            task: Some(on_train(move |t| {
                let mut first = first.lock().unwrap();
                if t.round == 1 {
                    first.get_or_insert_with(|| t.global_adapter.clone().unwrap());
                } else {
                    t.global_adapter = first.clone();
                }
            })),
            ..Default::default()
        },
    )
    .await;
    let results = run_labs(&center.url(), &plan, dir.path()).await;
    for r in &results {
        match r {
            Err(ParticipantError::Guard(
                e @ GuardError::GlobalReused {
                    round: 2, first: 1, ..
                },
            )) => {
                assert!(e.to_string().contains("difference two sums"), "{e}");
            }
            other => panic!("expected the resent global to be refused, got {other:?}"),
        }
    }
    let received = center.received();
    // Round 1 ran: every lab masked once.
    assert_eq!(received.count_in_round("SubmitMasked", 1), 3);
    // Round 2: nothing at all, not even a key advertisement.
    assert_eq!(received.count_in_round("SecureAggregate", 2), 0);
    assert_eq!(received.count_in_round("SubmitMasked", 2), 0);
    assert_eq!(received.plaintext_bytes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_grinding_attempts_or_rounds_is_refused() {
    tracing();
    for (what, tamper) in [
        (
            "attempt",
            on_train(|t| {
                if let Some(s) = &mut t.secure {
                    s.attempt = fedcore::secagg::spec::MAX_ATTEMPTS;
                }
            }),
        ),
        ("round", on_train(|t| t.round += 5)),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let plan = plan(1);
        let (_server, center) = honest_behind_cheating(
            &plan,
            dir.path(),
            Deviation {
                task: Some(tamper),
                ..Default::default()
            },
        )
        .await;
        let results = run_labs(&center.url(), &plan, dir.path()).await;
        for r in &results {
            let ok = matches!(
                (what, r),
                (
                    "attempt",
                    Err(ParticipantError::RoundNumbers(
                        RoundNumberError::Attempt { .. }
                    )),
                ) | (
                    "round",
                    Err(ParticipantError::RoundNumbers(RoundNumberError::Round {
                        round: 6,
                        rounds: 1,
                    })),
                )
            );
            assert!(ok, "{what}: {r:?}");
        }
        assert_eq!(center.received().count("SecureAggregate"), 0, "{what}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_restarted_on_its_state_never_unmasks_the_same_model_twice() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(1);
    // An honest run: every lab reveals in round 1 and records it on disk.
    let first = fedaggregator::start(&aggregator_config(plan.clone(), &dir.path().join("run1")))
        .await
        .unwrap();
    let results = run_labs(&first.url(), &plan, dir.path()).await;
    assert!(results.iter().all(Result::is_ok), "{results:?}");
    first.finished().await;
    // The center starts the same plan again (a fresh database: a new session). The
    // restarted labs, reading their state, refuse to train from the same model again.
    let second = fedaggregator::start(&aggregator_config(plan.clone(), &dir.path().join("run2")))
        .await
        .unwrap();
    let results = run_labs(&second.url(), &plan, dir.path()).await;
    for r in &results {
        match r {
            Err(ParticipantError::Guard(e @ GuardError::RunRepeated { round: 1, .. })) => {
                assert!(e.to_string().contains("change it"), "{e}");
            }
            other => panic!("expected a refused repeat, got {other:?}"),
        }
    }
    for i in 0..3 {
        let record = fedcore::round::guard::file_in(&dir.path().join(name(i)), &plan.fingerprint());
        let log = fedcore::round::guard::read_file(&record, &plan.fingerprint()).unwrap();
        assert_eq!(log.last_round(), 1, "{}", record.display());
    }
}

/// Issue #24: a lab killed right after it revealed round 1's shares, restarted on its state
/// directory, is offered a new attempt of round 1 from the same global model (what a center
/// that restarts an attempt after learning a sum would do, here by rewriting round 2's task
/// into round 1, attempt 1). The restarted process remembers the reveal from its record and
/// stays out: it sends nothing for the new attempt (no keys, no masked input, no shares).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_killed_after_its_reveal_stays_out_of_a_restarted_attempt() {
    tracing();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan(2);
    let first: Arc<Mutex<Option<pb::TrainTask>>> = Arc::default();
    let (_server, center) = honest_behind_cheating(
        &plan,
        dir.path(),
        Deviation {
            task: Some(on_train(move |t| {
                let mut first = first.lock().unwrap();
                if t.round == 1 {
                    first.get_or_insert_with(|| t.clone());
                } else if let Some(round_one) = first.as_ref() {
                    *t = round_one.clone();
                    if let Some(s) = &mut t.secure {
                        s.attempt += 1;
                    }
                }
            })),
            ..Default::default()
        },
    )
    .await;
    let recorder = Arc::new(Recorder::default());
    let spawn_labs = || {
        (0..CODES.len())
            .map(|i| {
                let mut options = lab_options(&center.url(), i, Some(&plan));
                options.state_dir = Some(dir.path().join(name(i)));
                tokio::spawn(participant::run(
                    options,
                    corpus(CODES[i]),
                    Device::flex(),
                    recorder.clone(),
                ))
            })
            .collect::<Vec<_>>()
    };
    let unmasked = |round: u64, attempt: u32| {
        center
            .received()
            .secure_messages
            .iter()
            .filter(|m| {
                m.round == round
                    && m.attempt == attempt
                    && matches!(
                        m.message,
                        Some(pb::secure_aggregate_request::Message::Unmask(_))
                    )
            })
            .count()
    };
    // Round 1, honestly, until every lab has revealed; then every lab process is killed.
    let labs = spawn_labs();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while unmasked(1, 0) < CODES.len() {
        assert!(
            std::time::Instant::now() < deadline,
            "round 1 never unmasked"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    for lab in &labs {
        lab.abort();
    }
    // Restarted on their state directories, they are offered attempt 1 of round 1.
    let sent_before = center.received().secure_messages.len();
    let labs = spawn_labs();
    tokio::time::sleep(std::time::Duration::from_secs(8)).await;
    for lab in &labs {
        assert!(!lab.is_finished(), "a lab that stays out keeps waiting");
        lab.abort();
    }
    let received = center.received();
    let new_attempt = received
        .secure_messages
        .iter()
        .skip(sent_before)
        .filter(|m| m.round == 1 && m.attempt == 1)
        .count();
    assert_eq!(new_attempt, 0, "nothing sent for the restarted attempt");
    assert!(
        !received.masked.keys().any(|(_, r, a)| *r == 1 && *a == 1),
        "no masked input for it"
    );
    assert_eq!(
        received.count("Join"),
        2 * CODES.len(),
        "each lab joined again after its restart"
    );
}
