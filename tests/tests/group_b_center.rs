//! `group_b` against a cheating center (issues #17 and #27): the sum a round reveals has
//! one slot per language, the sum over that language's survivors alone. A center that
//! claims all but one lab of a language dropped would read that lab's update in the slot.
//! Six real labs (three per language, the participant runtime, real burn training) talk to
//! a cheating center in front of an honest aggregator; the center shows them a survivor
//! list on which one Indonesian lab is the only Indonesian survivor. No lab signs it (each
//! refuses with `GroupTooSmall`, as `fedcore/src/secagg/group_tests.rs` checks by name on
//! the state machines), so the center never gets a share it needs to unmask that sum.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use burn::prelude::Device;
use fedclient::participant;
use fedcore::FederationPlan;
use fedcore::strategy::{AggregationMode, GroupSpec, StrategySpec};
use mekong_e2e::cheating_center::{CheatingCenter, Deviation};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};
use mekong_proto::v1 as pb;

/// `(participant name, language)`: roster indices 1–3 are Lao, 4–6 Indonesian.
const LABS: [(&str, &str); 6] = [
    ("lab-lo-ministry", "lo"),
    ("lab-lo-university", "lo"),
    ("lab-lo-hospital", "lo"),
    ("lab-id-ministry", "id"),
    ("lab-id-university", "id"),
    ("lab-id-hospital", "id"),
];

fn plan() -> FederationPlan {
    let identities: Vec<_> = (0..6).map(|i| test_identity(i as u8)).collect();
    let roster: Vec<(&str, _)> = LABS.iter().map(|(n, _)| *n).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 60_000, 5_000);
    plan.strategy = StrategySpec {
        mode: AggregationMode::GroupB,
        groups: Some(GroupSpec {
            members: LABS
                .iter()
                .map(|(n, l)| (n.to_string(), l.to_string()))
                .collect(),
            min_labs: 3,
        }),
        ..Default::default()
    };
    plan.validate().unwrap();
    plan
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_center_that_isolates_one_lab_of_a_language_gets_no_signature() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let plan = plan();
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    // Every lab sent its masked input; the center says two Indonesian labs dropped, in
    // every attempt.
    let shown: Arc<Mutex<BTreeSet<(String, u32)>>> = Arc::default();
    let seen = shown.clone();
    let center = CheatingCenter::start(
        &server.url(),
        Deviation {
            task: Some(Box::new(move |lab, answer| {
                if let Some(pb::fetch_task_response::Task::SecureStep(step)) = &mut answer.task
                    && let Some(pb::secure_step::Step::Consistency(list)) = &mut step.step
                {
                    list.survivors.retain(|i| *i <= 4);
                    seen.lock().unwrap().insert((lab.to_string(), step.attempt));
                }
            })),
            ..Default::default()
        },
    )
    .await;
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for (i, (name, language)) in LABS.iter().enumerate() {
        let mut options = participant_options(&center.url(), name, language);
        options.trust_aggregator_plan = false;
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        options.state_dir = Some(dir.path().join(name));
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(language),
            Device::flex(),
            recorder.clone(),
        )));
    }
    // A lab refuses the list and waits for the next attempt; the center keeps cheating, so
    // the run cannot end (denial of service is always open to a center). Watch until the
    // list was shown to the four listed labs in two attempts, then stop the labs.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    let attempts = || {
        let shown = shown.lock().unwrap();
        let per_lab = |a: u32| shown.iter().filter(|(_, x)| *x == a).count();
        shown
            .iter()
            .map(|(_, a)| *a)
            .collect::<BTreeSet<_>>()
            .into_iter()
            .filter(|a| per_lab(*a) >= 4)
            .count()
    };
    while attempts() < 2 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the center never showed the list twice"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    for lab in &labs {
        assert!(!lab.is_finished(), "no lab finished a round");
        lab.abort();
    }
    {
        let received = center.received();
        let count = |f: fn(&pb::secure_aggregate_request::Message) -> bool| {
            received
                .secure_messages
                .iter()
                .filter(|m| m.message.as_ref().is_some_and(f))
                .count()
        };
        assert!(count(|m| matches!(m, pb::secure_aggregate_request::Message::ShareKeys(_))) >= 6);
        assert_eq!(
            count(|m| matches!(m, pb::secure_aggregate_request::Message::Consistency(_))),
            0,
            "no lab signed a list that isolates one Indonesian lab"
        );
        assert_eq!(
            count(|m| matches!(m, pb::secure_aggregate_request::Message::Unmask(_))),
            0,
            "and no lab revealed a single share"
        );
        assert_eq!(received.plaintext_bytes, 0);
    }
    server.shutdown().await.unwrap();
}
