//! Labs leaving the federation (`leave.rs`): never sampled again, the open round stops
//! waiting for them, too few members finish the run with a reason, a departure mid-attempt
//! is a dropout, and everything survives a save and restore (old saves included).

use super::secure_tests::{Lab, completed, drive, labs, secure_plan};
use super::snapshot::Saved;
use super::*;
use crate::secagg::protocol::Stage as S;
use crate::strategy::{SamplingSpec, StrategySpec};
use crate::update::encode_f32_le;

/// The coordinator tests' plaintext plan, with deadlines no test reaches by accident.
fn plaintext_plan(participants: usize, min_updates: usize, rounds: u64) -> FederationPlan {
    let mut plan = super::tests::plan(participants, min_updates, rounds);
    plan.rounds.round_timeout_ms = 60_000;
    plan
}

fn joined(plan: FederationPlan) -> Coordinator {
    let n = plan.rounds.participants;
    let mut c = Coordinator::new(plan, [9; 32]).unwrap();
    for i in 0..n {
        c.join(format!("t{i}"), &format!("p{i}"), "lo", 0).unwrap();
    }
    c
}

fn submit(c: &mut Coordinator, i: usize, now: u64) -> Vec<Event> {
    let u = SubmittedUpdate {
        round: c.status().round,
        layout_hash: c.upload_manifest().hash_hex(),
        base_adapter_hash: c.global_hash().to_string(),
        num_samples: 1,
        payload: UpdatePayload::Plaintext(encode_f32_le(&vec![0.5; c.upload_manifest().len()])),
    };
    c.submit(&format!("t{i}"), &u, now).unwrap()
}

fn started_cohort(events: &[Event]) -> Option<Vec<String>> {
    events.iter().find_map(|e| match e {
        Event::RoundStarted { cohort, .. } => Some(cohort.clone()),
        _ => None,
    })
}

#[test]
fn the_open_round_stops_waiting_and_a_lab_that_left_is_never_sampled_again() {
    let mut c = joined(plaintext_plan(3, 1, 3));
    for i in 0..3 {
        submit(&mut c, i, 10);
    }
    // Round 2 opened with p2 in its cohort; p2 leaves (its max_rounds is 1).
    assert_eq!(c.status().round, 2);
    let (departure, events) = c.leave("t2", LeaveReason::MaxRounds, 20).unwrap();
    assert!(events.is_empty(), "{events:?}");
    assert_eq!(
        departure,
        Departure {
            reason: LeaveReason::MaxRounds,
            after_round: 1
        }
    );
    // A retried Leave answers with the first record and changes nothing.
    assert_eq!(
        c.leave("t2", LeaveReason::OperatorRequest, 30).unwrap(),
        (departure, Vec::new())
    );
    submit(&mut c, 0, 40);
    // The last one still awaited closes the round at once, long before the deadline.
    let events = submit(&mut c, 1, 50);
    let record = completed(&events).expect("round 2 closes").clone();
    assert_eq!(record.contributors, ["p0", "p1"]);
    assert_eq!(record.left, ["p2"]);
    assert!(record.dropped.is_empty(), "{record:?}");
    assert_eq!(started_cohort(&events).unwrap(), ["p0", "p1"]);
    // Everything p2 does is refused by name, and it cannot join again.
    let err = c.task("t2").unwrap_err();
    assert!(
        matches!(&err, RoundError::Left { name, .. } if name == "p2"),
        "{err}"
    );
    assert!(err.to_string().contains("left after round 1"), "{err}");
    assert!(matches!(
        c.join("t2-again".into(), "p2", "lo", 60),
        Err(RoundError::Left { .. })
    ));
    let status = c.status();
    assert_eq!(
        (status.participants_joined, status.participants_left),
        (3, 1)
    );
    // Round 3 closes with the two; the run completes, and p2 needs no telling.
    submit(&mut c, 0, 70);
    let events = submit(&mut c, 1, 80);
    assert!(completed(&events).unwrap().left.is_empty());
    assert_eq!(c.finish_reason(), Some(FinishReason::Completed));
    assert!(!c.everyone_told());
    assert!(c.mark_told_finished("t0"));
    assert!(!c.mark_told_finished("t0"));
    assert!(!c.mark_told_finished("t2"));
    assert!(!c.everyone_told());
    assert!(c.mark_told_finished("t1"));
    assert!(c.everyone_told());
}

#[test]
fn a_departure_of_the_last_awaited_member_closes_the_round_now() {
    let mut c = joined(plaintext_plan(3, 2, 2));
    submit(&mut c, 0, 10);
    submit(&mut c, 1, 20);
    let (_, events) = c.leave("t2", LeaveReason::OperatorRequest, 30).unwrap();
    let record = completed(&events).expect("the round closes on the departure");
    assert_eq!((record.round, record.left.clone()), (1, vec!["p2".into()]));
    assert!(record.dropped.is_empty());
    // Round 2 is drawn from the two present members.
    assert_eq!(started_cohort(&events).unwrap(), ["p0", "p1"]);
}

#[test]
fn sampling_draws_deterministically_from_the_members_still_present() {
    let sampling = SamplingSpec {
        fraction: 0.5,
        min_participants: 1,
        seed: 11,
    };
    let mut plan = plaintext_plan(6, 1, 3);
    plan.strategy = StrategySpec {
        sampling: sampling.clone(),
        ..Default::default()
    };
    let mut c = joined(plan);
    // p5 leaves before it is ever drawn again, whether or not it was in round 1.
    c.leave("t5", LeaveReason::MaxRounds, 5).unwrap();
    assert_eq!(c.status().round, 1);
    let everyone: Vec<String> = (0..6).map(|i| format!("p{i}")).collect();
    let cohort = sampling.sample(1, &everyone);
    let mut events = Vec::new();
    for name in &cohort {
        if name != "p5" {
            events = submit(&mut c, name[1..].parse().unwrap(), 10);
        }
    }
    let present: Vec<String> = (0..5).map(|i| format!("p{i}")).collect();
    assert_eq!(
        started_cohort(&events).expect("round 2 opens"),
        sampling.sample(2, &present)
    );
}

#[test]
fn too_few_members_left_finish_the_run_with_a_reason() {
    let mut c = joined(plaintext_plan(3, 2, 5));
    submit(&mut c, 0, 10);
    submit(&mut c, 1, 10);
    submit(&mut c, 2, 10);
    // One leaves: two remain, as many as min_updates; the run goes on.
    let (_, events) = c.leave("t1", LeaveReason::MaxRounds, 20).unwrap();
    assert!(events.is_empty());
    // A second leaves: round 2 can no longer gather two updates.
    let (_, events) = c.leave("t2", LeaveReason::MaxRounds, 30).unwrap();
    assert_eq!(events, vec![Event::RunFinished { rounds: 1 }]);
    let reason = FinishReason::TooFewMembers {
        remaining: 1,
        needed: 2,
    };
    assert_eq!(c.finish_reason(), Some(reason));
    assert_eq!(c.status().finish_reason, Some(reason));
    assert!(
        reason
            .to_string()
            .contains("1 can take part, the plan needs 2")
    );
    assert!(matches!(
        c.task("t0").unwrap(),
        Task::Finished { rounds: 1, .. }
    ));
    assert_eq!(c.history().len(), 1);
}

#[test]
fn a_roster_federation_that_can_no_longer_start_finishes() {
    let mut plan = secure_plan(3, None, 2);
    plan.rounds.participants = 3;
    let mut c = Coordinator::new(plan, [1; 32]).unwrap();
    c.join("token0".into(), "lab0", "lo", 0).unwrap();
    let (_, events) = c.leave("token0", LeaveReason::Unspecified, 5).unwrap();
    assert_eq!(events, vec![Event::RunFinished { rounds: 0 }]);
    assert_eq!(
        c.finish_reason(),
        Some(FinishReason::TooFewMembers {
            remaining: 2,
            needed: 3
        })
    );
}

#[test]
fn under_secure_aggregation_a_departure_is_a_dropout_of_the_stage() {
    // Before it advertised keys (how the runtime leaves: between rounds, in stage 0 of the
    // round that opened after its last): both rounds go on without it and without a
    // deadline passing (nothing here ticks the clock).
    let mut c = Coordinator::new(secure_plan(5, None, 2), [3; 32]).unwrap();
    let mut all = labs(&mut c, 5, 7);
    let (_, events) = c.leave("token4", LeaveReason::MaxRounds, 20).unwrap();
    assert!(events.is_empty());
    let events = drive(&mut c, &mut all[..4], 30);
    let records: Vec<&RoundRecord> = events
        .iter()
        .filter_map(|e| match e {
            Event::RoundCompleted(r) => Some(r),
            _ => None,
        })
        .collect();
    assert_eq!(records.len(), 2, "{events:?}");
    for record in &records {
        assert_eq!(record.contributors, ["lab0", "lab1", "lab2", "lab3"]);
        assert!(record.dropped.is_empty());
    }
    // Listed as left in the round it was awaited by; never sampled into the next.
    assert_eq!(records[0].left, ["lab4"]);
    assert!(records[1].left.is_empty());
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::SecureAttemptFailed { .. }))
    );

    // Mid-attempt (it advertised keys, then leaves instead of sharing them): the stage
    // closes without it at once, and the attempt finishes over the others.
    let mut c = Coordinator::new(secure_plan(5, None, 1), [4; 32]).unwrap();
    let mut all = labs(&mut c, 5, 8);
    all[3].silent_from = Some(S::ShareKeys);
    let events = drive(&mut c, &mut all, 10);
    assert!(completed(&events).is_none());
    let (_, mut events) = c.leave("token3", LeaveReason::OperatorRequest, 20).unwrap();
    assert!(matches!(
        events[..],
        [Event::SecureStageClosed {
            stage: S::ShareKeys,
            remaining: 4,
            ..
        }]
    ));
    let _gone: Lab = all.remove(3);
    events.extend(drive(&mut c, &mut all, 30));
    let record = completed(&events).expect("the attempt finishes without a deadline");
    assert_eq!(record.contributors, ["lab0", "lab1", "lab2", "lab4"]);
    assert_eq!(record.left, ["lab3"]);
    assert_eq!(record.secure.as_ref().unwrap().attempt, 0);
}

#[test]
fn too_few_for_the_secure_quorum_finish_the_run() {
    // Four labs, threshold 3: two departures leave two, below the quorum.
    let mut c = Coordinator::new(secure_plan(4, None, 3), [5; 32]).unwrap();
    let _all = labs(&mut c, 4, 9);
    assert!(
        c.leave("token3", LeaveReason::MaxRounds, 20)
            .unwrap()
            .1
            .is_empty()
    );
    let (_, events) = c.leave("token2", LeaveReason::MaxRounds, 30).unwrap();
    assert_eq!(events, vec![Event::RunFinished { rounds: 0 }]);
    assert!(matches!(
        c.task("token0").unwrap(),
        Task::Finished { rounds: 0, .. }
    ));
    assert_eq!(
        c.finish_reason(),
        Some(FinishReason::TooFewMembers {
            remaining: 2,
            needed: 3
        })
    );
}

fn restore(c: &Coordinator, state: &[u8]) -> Coordinator {
    Coordinator::restore(
        c.plan().clone(),
        Saved {
            state,
            server_state: &c.encode_server_state(),
            global: c.global().clone(),
            history: c.history().to_vec(),
            sum: None,
        },
        0,
    )
    .unwrap()
    .0
}

#[test]
fn departures_told_members_and_the_finish_reason_survive_a_restart() {
    let mut c = joined(plaintext_plan(3, 1, 2));
    for i in 0..3 {
        submit(&mut c, i, 10);
    }
    let (departure, _) = c.leave("t2", LeaveReason::MaxRounds, 20).unwrap();
    let mut r = restore(&c, &c.encode_state());
    assert_eq!(r.departures().get("p2"), Some(&departure));
    // Still refused, still not sampled, and the open round still does not wait for it.
    assert!(matches!(r.task("t2"), Err(RoundError::Left { .. })));
    submit(&mut r, 0, 10);
    let events = submit(&mut r, 1, 10);
    assert_eq!(completed(&events).unwrap().left, ["p2"]);
    assert_eq!(r.finish_reason(), Some(FinishReason::Completed));
    r.mark_told_finished("t0");
    let r2 = restore(&r, &r.encode_state());
    assert!(!r2.everyone_told());
    assert_eq!(r2.finish_reason(), Some(FinishReason::Completed));
    let mut r2 = r2;
    assert!(
        !r2.mark_told_finished("t0"),
        "t0 was told before the restart"
    );
    assert!(r2.mark_told_finished("t1"));
    assert!(r2.everyone_told());
}

#[test]
fn a_state_saved_before_departures_existed_still_loads() {
    use ciborium::Value;
    let mut c = joined(plaintext_plan(3, 1, 2));
    submit(&mut c, 0, 10);
    // What a version 2 build wrote: no departures, told members or finish reason.
    let Value::Map(fields) = ciborium::from_reader(&c.encode_state()[..]).unwrap() else {
        panic!("the state is a map")
    };
    let old: Vec<(Value, Value)> = fields
        .into_iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_text(),
                Some("left" | "told_finished" | "finish_reason")
            )
        })
        .map(|(k, v)| match k.as_text() {
            Some("version") => (k, Value::Integer(2.into())),
            _ => (k, v),
        })
        .collect();
    assert_eq!(old.len(), 10);
    let mut bytes = Vec::new();
    ciborium::into_writer(&Value::Map(old), &mut bytes).unwrap();
    let mut r = restore(&c, &bytes);
    assert!(r.departures().is_empty());
    assert_eq!(r.status().round, 1);
    // The restored run works as before: p1 and p2 still close round 1 ...
    submit(&mut r, 0, 10);
    submit(&mut r, 1, 10);
    let events = submit(&mut r, 2, 10);
    assert_eq!(completed(&events).unwrap().contributors.len(), 3);
    // ... and a record written before `left` existed reads with none.
    let mut record = serde_json::to_value(&r.history()[0]).unwrap();
    record.as_object_mut().unwrap().remove("left");
    let old: RoundRecord = serde_json::from_value(record).unwrap();
    assert!(old.left.is_empty());
}

#[test]
fn a_departure_while_paused_that_leaves_too_few_finishes_the_run() {
    let mut c = joined(plaintext_plan(2, 2, 3));
    c.pause().unwrap();
    submit(&mut c, 0, 10);
    let events = submit(&mut c, 1, 10);
    assert!(
        events.contains(&Event::Paused { after_round: 1 }),
        "{events:?}"
    );
    let (_, events) = c.leave("t1", LeaveReason::OperatorRequest, 20).unwrap();
    assert_eq!(events, vec![Event::RunFinished { rounds: 1 }]);
    assert_eq!(
        c.finish_reason(),
        Some(FinishReason::TooFewMembers {
            remaining: 1,
            needed: 2
        })
    );
    assert!(matches!(c.resume(30), Err(ControlError::Finished { .. })));
}
