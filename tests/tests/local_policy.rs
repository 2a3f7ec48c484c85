//! A lab's `participant.toml` as `fedclient join --config` reads it: `[local]` names its data
//! (relative to the file) and `[policy] max_rounds` makes it leave after its first round,
//! enforced by its own runtime. It says so (`Leave`), so the secure federation goes on
//! without waiting for it: the other three labs finish every round, the rounds after it
//! left are theirs alone, records and the admin status list it as left (not dropped), and
//! no round waits for its (long) deadline.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::prelude::Device;
use fedaggregator::admin::client::fetch_status;
use fedaggregator::config::{AdminSection, TlsSection};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantOptions, Quiet, RunEnd};
use mekong_e2e::{aggregator_config, corpus, enroll_and_provision, loopback_provision, test_plan};
use mekong_proto::tls::ParticipantKit;

const CODES: [&str; 4] = ["lo", "km", "th", "vi"];

/// Adds `[local]` and a `max_rounds` to the `[policy]` provisioning wrote.
fn edit_policy(kit_dir: &Path) {
    let file = kit_dir.join("participant.toml");
    let text = std::fs::read_to_string(&file).unwrap();
    assert!(text.contains("[policy]\n"), "{text}");
    let text = text.replace("[policy]\n", "[policy]\nmax_rounds = 1\n")
        + "\n[local]\ndata = \"text/km.txt\"\nheldout = 0.2\ndevice = \"cpu\"\n";
    std::fs::write(&file, text).unwrap();
    let (_, km) = mekong_examples::corpus::udhr("km").unwrap();
    std::fs::create_dir_all(kit_dir.join("text")).unwrap();
    std::fs::write(kit_dir.join("text/km.txt"), km).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_leaves_after_its_max_rounds_and_the_federation_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("fed");

    // Deadlines far longer than the run: a round that waited for lab-km would take a whole
    // minute (two of them would, before `Leave`, as straggler rounds).
    const ROUND_TIMEOUT_MS: u64 = 60_000;
    let mut plan = test_plan(4, 3, 1, ROUND_TIMEOUT_MS);
    plan.secure_aggregation.enabled = true;
    plan.secure_aggregation.stage_timeout_ms = ROUND_TIMEOUT_MS;
    // The center provisions this plan, so every kit pins its fingerprint (`[policy]
    // plan_sha256`), which the labs' own runtimes then enforce.
    let names: Vec<String> = CODES.iter().map(|c| format!("lab-{c}")).collect();
    let labs: Vec<(&str, &str)> = names.iter().map(String::as_str).zip(CODES).collect();
    let enrolled = enroll_and_provision(
        &dir.path().join("labs"),
        &labs,
        fedaggregator::provision::ProvisionOptions {
            plan: Some(plan.clone()),
            ..loopback_provision(&fed, "e2e")
        },
    );
    let provisioned = &enrolled.provisioned;
    edit_policy(&enrolled.labs[1]);
    plan.roster = provisioned.roster.clone();
    assert_eq!(provisioned.plan_sha256, plan.fingerprint());
    assert!(
        provisioned.config_problem.is_none(),
        "{:?}",
        provisioned.config_problem
    );
    let mut config = aggregator_config(plan.clone(), &dir.path().join("out"));
    config.tls = TlsSection::provisioned(&fed);
    config.admin = Some(AdminSection::loopback(0));
    let started = Instant::now();
    let server = fedaggregator::start(&config).await.unwrap();

    let mut labs = Vec::new();
    for (code, kit_dir) in CODES.iter().zip(&enrolled.labs) {
        let mut kit = ParticipantKit::load(kit_dir).unwrap();
        kit.aggregator = server.local_addr().to_string();
        let data = match &kit.local {
            Some(local) => {
                assert_eq!(local.data, kit_dir.join("text/km.txt"));
                assert_eq!((local.heldout, local.device.as_str()), (0.2, "cpu"));
                LocalCorpus::from_file(&local.data, code, local.heldout, &ByteTokenizer).unwrap()
            }
            None => corpus(code),
        };
        let identity = IdentitySeed::load(&kit.identity).unwrap();
        let policy = kit.policy.clone();
        let options = ParticipantOptions {
            identity: Some(Arc::new(identity)),
            connect_patience: Duration::from_secs(30),
            kit: Some(Arc::new(kit.clone())),
            ..ParticipantOptions::new("", &kit.name, &kit.language)
        }
        .with_policy(&policy);
        labs.push(tokio::spawn(participant::run(
            options,
            data,
            Device::flex(),
            Arc::new(Quiet),
        )));
    }
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    server.finished().await;
    let took = started.elapsed();
    eprintln!("three rounds, one lab leaving after the first, took {took:.1?}");
    assert!(
        took < Duration::from_millis(ROUND_TIMEOUT_MS),
        "the run took {took:?}: a round waited for its deadline"
    );

    let km = &reports[1];
    assert_eq!(km.ended, RunEnd::MaxRounds { max_rounds: 1 });
    assert_eq!(km.rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1]);
    for other in [&reports[0], &reports[2], &reports[3]] {
        assert_eq!(
            other.ended,
            RunEnd::Finished {
                rounds_completed: 3
            },
            "{}",
            other.name
        );
        assert_eq!(other.rounds.len(), 3, "{}", other.name);
    }
    let status = server.status();
    assert_eq!(status.participants_left, 1);
    assert_eq!(
        status.finish_reason,
        Some(fedcore::round::FinishReason::Completed)
    );
    let history = status.history;
    assert_eq!(history.len(), 3);
    assert!(history[0].contributors.contains(&"lab-km".to_string()));
    for record in &history[1..] {
        assert_eq!(
            record.contributors,
            vec!["lab-lo", "lab-th", "lab-vi"],
            "{record:?}"
        );
        assert!(record.dropped.is_empty(), "{record:?}");
    }
    // Round 2 opened with lab-km in its cohort (round 1 had just closed); it left before
    // advertising keys. Round 3 was drawn without it.
    assert_eq!(history[1].left, ["lab-km"]);
    assert!(history[2].left.is_empty());

    // The operator's status says it left, and when.
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let report = fetch_status(&admin).await.unwrap();
    let km = report
        .participants
        .iter()
        .find(|p| p.name == "lab-km")
        .unwrap();
    assert_eq!(
        km.left.as_deref(),
        Some("left after round 1 (its max_rounds policy was reached)")
    );
    assert!(
        report
            .participants
            .iter()
            .filter(|p| p.name != "lab-km")
            .all(|p| p.left.is_none())
    );
    assert_eq!(report.rounds[1].left, ["lab-km"]);
    // `fedaggregator status` says so too.
    let summary = report.summary();
    assert!(summary.contains("1 left"), "{summary}");
    assert!(
        summary.contains("(left after round 1 (its max_rounds policy was reached))"),
        "{summary}"
    );
    assert_eq!(report.participants_dropped, 0);
    assert_eq!(report.participants_left, 1);
    let (_, metrics) = fedaggregator::admin::client::get(&admin, "/metrics")
        .await
        .unwrap();
    assert!(
        metrics.lines().any(|l| l == "mekong_participants_left 1"),
        "{metrics}"
    );
    server.shutdown().await.unwrap();
}

/// Asks its lab to leave once its update for round 1 was accepted, as Ctrl-C does in
/// `fedclient join`.
struct LeaveAfterFirstRound(participant::LeaveRequest);

impl participant::ParticipantObserver for LeaveAfterFirstRound {
    fn update_accepted(&self, _name: &str, _round: u64, _round_closed: bool) {
        self.0.request();
    }
}

/// A lab whose operator asks it to leave (`LeaveRequest`, what Ctrl-C sets) leaves at the
/// first moment that breaks no round: its round-1 update stays in round 1, it tells the
/// aggregator (reason: operator request), and rounds 2 and 3 neither include nor wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_whose_operator_asks_it_to_leave_leaves_between_rounds() {
    let dir = tempfile::tempdir().unwrap();
    const ROUND_TIMEOUT_MS: u64 = 60_000;
    let plan = test_plan(3, 3, 2, ROUND_TIMEOUT_MS);
    let mut config = aggregator_config(plan, dir.path());
    config.admin = Some(AdminSection::loopback(0));
    let started = Instant::now();
    let server = fedaggregator::start(&config).await.unwrap();
    let mut labs = Vec::new();
    for code in ["lo", "km", "th"] {
        let options = mekong_e2e::participant_options(&server.url(), &format!("lab-{code}"), code);
        let observer: Arc<dyn participant::ParticipantObserver> = if code == "th" {
            Arc::new(LeaveAfterFirstRound(options.leave.clone()))
        } else {
            Arc::new(Quiet)
        };
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            observer,
        )));
    }
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    server.finished().await;
    let took = started.elapsed();
    assert!(
        took < Duration::from_millis(ROUND_TIMEOUT_MS),
        "the run took {took:?}: a round waited for the lab that left"
    );
    let th = &reports[2];
    assert_eq!(th.ended, RunEnd::LeftOnRequest);
    assert_eq!(th.rounds.iter().map(|r| r.round).collect::<Vec<_>>(), [1]);
    let history = server.status().history;
    assert_eq!(history.len(), 3);
    assert_eq!(history[0].contributors, ["lab-km", "lab-lo", "lab-th"]);
    for record in &history[1..] {
        assert_eq!(record.contributors, ["lab-km", "lab-lo"], "{record:?}");
        assert!(record.dropped.is_empty(), "{record:?}");
    }
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let report = fetch_status(&admin).await.unwrap();
    let th = report
        .participants
        .iter()
        .find(|p| p.name == "lab-th")
        .unwrap();
    // After round 0 or 1: round 1 may still have been open when it left (its update stays).
    let left = th.left.as_deref().unwrap();
    assert!(
        left.starts_with("left after round") && left.ends_with("(its operator asked it to leave)"),
        "{left}"
    );
    server.shutdown().await.unwrap();
}
