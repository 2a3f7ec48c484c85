//! The operator's pause, resume and stop: a round in progress always finishes; no round
//! opens while paused; a stop finishes the run with the rounds actually closed; refusals
//! name the state and change nothing; the requests survive a save and restore.

use super::secure_tests::{completed, drive, labs, secure_plan};
use super::snapshot::{Resumed, Saved};
use super::*;
use crate::plan::{LoraSpec, ModelSpec, RoundSpec, TrainingSpec};
use crate::update::encode_f32_le;

fn plaintext_plan(participants: usize, rounds: u64) -> FederationPlan {
    FederationPlan {
        privacy: Default::default(),
        federation: "control".into(),
        model: ModelSpec::tiny(),
        lora: LoraSpec::default(),
        training: TrainingSpec::default(),
        rounds: RoundSpec {
            rounds,
            participants,
            min_updates: participants,
            round_timeout_ms: 1_000,
        },
        roster: Vec::new(),
        secure_aggregation: crate::secagg::spec::SecureAggregationSpec {
            enabled: false,
            ..Default::default()
        },
        strategy: Default::default(),
    }
}

fn joined(participants: usize, rounds: u64) -> Coordinator {
    let mut c = Coordinator::new(plaintext_plan(participants, rounds), [9; 32]).unwrap();
    for i in 0..participants {
        c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
    }
    c
}

/// Every participant submits `fill` for the open round; returns the last call's events.
fn submit_all(c: &mut Coordinator, fill: f32) -> Vec<Event> {
    let round = c.status().round;
    let mut events = Vec::new();
    for i in 0..c.status().participants_joined {
        let update = SubmittedUpdate {
            round,
            layout_hash: c.upload_manifest().hash_hex(),
            base_adapter_hash: c.global_hash().to_string(),
            num_samples: 1,
            payload: UpdatePayload::Plaintext(encode_f32_le(&vec![
                fill;
                c.upload_manifest().len()
            ])),
        };
        events = c.submit(&format!("t{i}"), &update, 10).unwrap();
    }
    events
}

fn restored(c: &Coordinator, now_ms: u64) -> (Coordinator, Resumed) {
    Coordinator::restore(
        c.plan().clone(),
        Saved {
            state: &c.encode_state(),
            server_state: &c.encode_server_state(),
            global: c.global().clone(),
            history: c.history().to_vec(),
            sum: None,
        },
        now_ms,
    )
    .unwrap()
}

#[test]
fn pause_mid_round_lets_the_round_finish_then_no_round_opens_until_resumed() {
    let mut c = joined(2, 3);
    let applied = c.pause().unwrap();
    assert!(applied.message.contains("round 1 finishes"), "{applied:?}");
    assert!(applied.events.is_empty());
    assert!(c.status().control.paused);
    // The round in progress goes on as usual.
    assert!(matches!(
        c.task("t0").unwrap(),
        Task::Train { round: 1, .. }
    ));
    let events = submit_all(&mut c, 1.0);
    assert!(completed(&events).is_some_and(|r| r.round == 1));
    assert_eq!(events.last(), Some(&Event::Paused { after_round: 1 }));
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::RoundStarted { .. }))
    );
    let status = c.status();
    assert_eq!((status.stage, status.round), (Stage::Paused, 1));
    assert_eq!(
        c.task("t1").unwrap(),
        Task::Wait(WaitReason::Paused { after_round: 1 })
    );
    // Time passing changes nothing; updates are refused with the reason.
    assert!(c.tick(1_000_000).unwrap().is_empty());
    assert_eq!(c.next_deadline(), None);
    let update = SubmittedUpdate {
        round: 2,
        layout_hash: c.upload_manifest().hash_hex(),
        base_adapter_hash: c.global_hash().to_string(),
        num_samples: 1,
        payload: UpdatePayload::Plaintext(encode_f32_le(&vec![0.0; c.upload_manifest().len()])),
    };
    assert_eq!(
        c.submit("t0", &update, 20),
        Err(RoundError::Paused { after_round: 1 })
    );
    // A participant joining while paused waits too.
    c.join("t2".into(), "p2", "th", 30).unwrap();
    assert_eq!(
        c.task("t2").unwrap(),
        Task::Wait(WaitReason::Paused { after_round: 1 })
    );

    let applied = c.resume(2_000).unwrap();
    assert_eq!(applied.message, "resumed: round 2 opened");
    assert!(matches!(
        &applied.events[..],
        [Event::RoundStarted { round: 2, deadline_ms: 3_000, cohort }] if cohort.len() == 3
    ));
    assert_eq!(c.status().control, Control::default());
    assert!(matches!(
        c.task("t0").unwrap(),
        Task::Train { round: 2, .. }
    ));
}

#[test]
fn resume_before_the_pause_took_effect_cancels_it() {
    let mut c = joined(2, 2);
    c.pause().unwrap();
    let applied = c.resume(5).unwrap();
    assert!(
        applied.message.contains("had not taken effect"),
        "{applied:?}"
    );
    assert!(applied.events.is_empty());
    let events = submit_all(&mut c, 1.0);
    assert!(matches!(
        events.last(),
        Some(Event::RoundStarted { round: 2, .. })
    ));
}

#[test]
fn paused_before_the_first_round_it_opens_only_when_resumed() {
    let mut c = Coordinator::new(plaintext_plan(2, 2), [9; 32]).unwrap();
    c.join("t0".into(), "p0", "lo", 0).unwrap();
    assert!(c.pause().unwrap().message.contains("first round"));
    assert!(c.join("t1".into(), "p1", "km", 0).unwrap().is_empty());
    assert_eq!(c.status().stage, Stage::WaitingForParticipants);
    assert_eq!(
        c.task("t0").unwrap(),
        Task::Wait(WaitReason::Paused { after_round: 0 })
    );
    let applied = c.resume(100).unwrap();
    assert!(matches!(
        &applied.events[..],
        [Event::RoundStarted { round: 1, .. }]
    ));
}

#[test]
fn stop_mid_round_finishes_the_run_after_that_round() {
    let mut c = joined(2, 5);
    submit_all(&mut c, 1.0);
    assert_eq!(c.status().round, 2);
    let applied = c.stop().unwrap();
    assert!(applied.message.contains("round 2 closes"), "{applied:?}");
    assert!(applied.events.is_empty());
    assert!(c.status().control.stop_requested);
    assert!(matches!(
        c.task("t0").unwrap(),
        Task::Train { round: 2, .. }
    ));
    let events = submit_all(&mut c, 2.0);
    let record = completed(&events).expect("round 2 closes").clone();
    assert_eq!(events.last(), Some(&Event::RunFinished { rounds: 2 }));
    assert_eq!(c.status().stage, Stage::Finished);
    assert_eq!(c.status().control, Control::default());
    match c.task("t1").unwrap() {
        Task::Finished {
            rounds,
            global_hash,
            ..
        } => {
            assert_eq!(rounds, 2);
            assert_eq!(global_hash, record.adapter_hash);
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        c.stop(),
        Err(ControlError::Finished {
            command: "stop",
            rounds: 2
        })
    );
}

#[test]
fn stop_while_paused_or_waiting_finishes_at_once() {
    let mut c = joined(2, 4);
    c.pause().unwrap();
    submit_all(&mut c, 1.0);
    assert_eq!(c.status().stage, Stage::Paused);
    let applied = c.stop().unwrap();
    assert_eq!(applied.events, vec![Event::RunFinished { rounds: 1 }]);
    assert!(
        applied.message.contains("after 1 of 4 rounds"),
        "{applied:?}"
    );
    assert!(matches!(
        c.task("t0").unwrap(),
        Task::Finished { rounds: 1, .. }
    ));

    let mut c = Coordinator::new(plaintext_plan(2, 4), [9; 32]).unwrap();
    let initial = c.global_hash().to_string();
    let applied = c.stop().unwrap();
    assert_eq!(applied.events, vec![Event::RunFinished { rounds: 0 }]);
    assert_eq!(c.global_hash(), initial);
    assert_eq!(
        c.join("t0".into(), "p0", "lo", 0),
        Err(RoundError::RunFinished)
    );
}

#[test]
fn refused_commands_name_the_state_and_change_nothing() {
    let mut c = joined(2, 3);
    let err = c.resume(0).unwrap_err();
    assert_eq!(
        err,
        ControlError::NotPaused {
            state: "running round 1".into()
        }
    );
    assert_eq!(
        err.to_string(),
        "the run is not paused (it is running round 1); there is nothing to resume"
    );
    c.pause().unwrap();
    let err = c.pause().unwrap_err();
    assert_eq!(
        err,
        ControlError::AlreadyPaused {
            round_open: Some(1)
        }
    );
    assert!(err.to_string().contains("once round 1 closes"), "{err}");
    c.stop().unwrap();
    assert_eq!(c.stop(), Err(ControlError::AlreadyStopping { round: 1 }));
    let mut d = joined(2, 3);
    d.stop().unwrap();
    assert_eq!(
        d.pause(),
        Err(ControlError::Stopping {
            command: "pause",
            round: 1
        })
    );
    let before = c.encode_state();
    assert!(c.pause().is_err());
    assert!(c.stop().is_err());
    assert_eq!(c.encode_state(), before);
    assert_eq!(Command::from_name("stop").map(Command::name), Some("stop"));
    assert_eq!(Command::from_name("halt"), None);
}

#[test]
fn the_operator_requests_survive_a_restore() {
    // Pause requested while round 1 is open: restored, round 1 restarts and the pause holds.
    let mut c = joined(2, 3);
    c.pause().unwrap();
    let (mut r, resumed) = restored(&c, 50);
    assert_eq!(resumed, Resumed::RoundRestarted { round: 1 });
    assert!(r.control().paused);
    submit_all(&mut r, 1.0);
    assert_eq!(r.status().stage, Stage::Paused);
    // Paused between rounds: restored paused, and resume opens round 2.
    let (mut r, resumed) = restored(&r, 60);
    assert_eq!(resumed, Resumed::Paused { after_round: 1 });
    assert_eq!(
        r.task("t0").unwrap(),
        Task::Wait(WaitReason::Paused { after_round: 1 })
    );
    assert!(matches!(
        &r.resume(70).unwrap().events[..],
        [Event::RoundStarted { round: 2, .. }]
    ));
    // A stop request survives too.
    r.stop().unwrap();
    let (mut r, _) = restored(&r, 80);
    assert!(r.control().stop_requested);
    let events = submit_all(&mut r, 1.0);
    assert_eq!(events.last(), Some(&Event::RunFinished { rounds: 2 }));
}

#[test]
fn a_paused_secure_round_completes_its_attempt_then_waits() {
    let mut c = Coordinator::new(secure_plan(4, None, 3), [3; 32]).unwrap();
    let mut labs = labs(&mut c, 4, 1);
    c.pause().unwrap();
    let events = drive(&mut c, &mut labs, 10);
    let record = completed(&events).expect("round 1 completes under pause");
    assert_eq!(record.contributors.len(), 4);
    assert_eq!(events.last(), Some(&Event::Paused { after_round: 1 }));
    assert_eq!(c.status().stage, Stage::Paused);
    // Nothing to do while paused.
    assert!(drive(&mut c, &mut labs, 20).is_empty());
    c.resume(30).unwrap();
    c.stop().unwrap();
    let events = drive(&mut c, &mut labs, 40);
    assert!(completed(&events).is_some_and(|r| r.round == 2));
    assert_eq!(events.last(), Some(&Event::RunFinished { rounds: 2 }));
    assert_eq!(c.history().len(), 2);
}

#[test]
fn a_version_1_state_restores_as_a_run_without_operator_requests() {
    use ciborium::Value;
    let c = joined(2, 3);
    let state: Value = ciborium::from_reader(c.encode_state().as_slice()).unwrap();
    let Value::Map(fields) = state else {
        panic!("the state is a CBOR map")
    };
    // What a version 1 build wrote: no control fields.
    let v1: Vec<(Value, Value)> = fields
        .into_iter()
        .filter(|(k, _)| !matches!(k.as_text(), Some("paused" | "stop_requested")))
        .map(|(k, v)| match k.as_text() {
            Some("version") => (k, Value::from(1u32)),
            _ => (k, v),
        })
        .collect();
    let mut bytes = Vec::new();
    ciborium::into_writer(&Value::Map(v1), &mut bytes).unwrap();
    let (r, resumed) = Coordinator::restore(
        c.plan().clone(),
        Saved {
            state: &bytes,
            server_state: &c.encode_server_state(),
            global: c.global().clone(),
            history: Vec::new(),
            sum: None,
        },
        0,
    )
    .unwrap();
    assert_eq!(resumed, Resumed::RoundRestarted { round: 1 });
    assert_eq!(r.control(), Control::default());
}
