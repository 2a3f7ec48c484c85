//! A lab that leaves, across a restart of the real `fedaggregator serve` binary.
//!
//! SIGKILLed right after a lab left in the middle of a run, the restarted aggregator still
//! knows: the round that was open closes without waiting for it, the next is drawn without
//! it, and the records list it as left.
//!
//! Three labs run a secure federation; lab-km's policy allows one round (`max_rounds = 1`),
//! so it says `Leave` when round 2 opens. Three labs with a quorum of three: the two left
//! are too few, so the run finishes at once with that reason (the two are told so) instead
//! of round 2 waiting out its five-minute deadline. The aggregator then exits without
//! lingering (30 s here): everyone who did not leave was told. Restarted on the same state
//! database it still knows who left and who was told, so it exits at once too; before the
//! told set was saved, a restart forgot it and lingered for the labs.

use mekong_e2e::process as harness;

/// The binary under test, run as its own process.
const FEDAGGREGATOR: &str = env!("CARGO_BIN_EXE_fedaggregator");

use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use fedclient::participant::{self, ParticipantError, ParticipantReport, Quiet, RunEnd};
use fedcore::FederationPlan;
use harness::{Aggregator, LABS, config, corpus, free_port, lab_options, plan, write_config};
use tokio::task::JoinHandle;

/// Well under the configured `linger_after_finish_ms` (30 s): an exit this soon means the
/// aggregator did not wait for anyone.
const PROMPT_EXIT: Duration = Duration::from_secs(12);

/// The in-process labs, lab-km with `max_rounds = 1`.
fn spawn_labs(
    url: &str,
    plan: &FederationPlan,
    patience: Duration,
) -> Vec<JoinHandle<Result<ParticipantReport, ParticipantError>>> {
    (0..LABS.len())
        .map(|i| {
            let mut options = lab_options(url, i, plan, patience);
            if LABS[i] == "lab-km" {
                options.max_rounds = Some(1);
            }
            tokio::spawn(participant::run(
                options,
                corpus(i),
                Device::flex(),
                Arc::new(Quiet),
            ))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn departures_and_who_was_told_survive_a_restart() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let plan = plan("leave-restart", 5);
    let config_path = write_config(dir.path(), &config(dir.path(), port, plan.clone()));
    let mut aggregator =
        Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, "info");

    let url = format!("http://127.0.0.1:{port}");
    let labs = spawn_labs(&url, &plan, Duration::from_secs(30));
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    for report in &reports {
        let expected = if report.name == "lab-km" {
            RunEnd::MaxRounds { max_rounds: 1 }
        } else {
            RunEnd::Finished {
                rounds_completed: 1,
            }
        };
        assert_eq!(report.ended, expected, "{}", report.name);
    }

    let aggregator = tokio::task::spawn_blocking(move || {
        aggregator.wait_for(&["participant left the federation", "lab-km"]);
        aggregator.wait_for(&[
            "run finished",
            "too few labs remain after departures: 2 can take part, the plan needs 3",
        ]);
        let finished = Instant::now();
        assert!(aggregator.wait_exit(PROMPT_EXIT).success());
        eprintln!("exited {:.1?} after the run finished", finished.elapsed());

        // Restarted: the departure, the reason and who was told are still there.
        let mut again =
            Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, "info");
        for expected in [
            ["resuming a finished run", "rounds=1"],
            ["the run had finished", "too few labs remain"],
            ["stay away", "lab-km"],
        ] {
            assert!(
                again
                    .seen
                    .iter()
                    .any(|l| expected.iter().all(|p| l.contains(p))),
                "{expected:?} not in:\n{}",
                again.seen.join("\n")
            );
        }
        let restarted = Instant::now();
        assert!(again.wait_exit(PROMPT_EXIT).success());
        eprintln!(
            "restarted aggregator exited after {:.1?}",
            restarted.elapsed()
        );
        again
    })
    .await
    .unwrap();
    assert!(
        !aggregator
            .seen
            .iter()
            .any(|l| l.contains("participant joined")),
        "nobody joined the restarted aggregator"
    );
    eprintln!(
        "leave_restart took {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_departure_survives_a_kill_and_no_later_round_waits_for_it() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    // Plaintext, so that two labs can go on (secure aggregation needs three); deadlines of
    // five minutes: a round that waited for lab-km would stall the test.
    let mut plan = plan("leave-kill", 3);
    plan.secure_aggregation.enabled = false;
    plan.rounds.min_updates = 2;
    let config_path = write_config(dir.path(), &config(dir.path(), port, plan.clone()));
    let mut aggregator =
        Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, "info");

    let url = format!("http://127.0.0.1:{port}");
    let labs = spawn_labs(&url, &plan, Duration::from_secs(60));
    let driver = tokio::task::spawn_blocking(move || {
        // The departure is committed before it is logged.
        aggregator.wait_for(&["participant left the federation", "lab-km"]);
        aggregator.kill();
        let mut again =
            Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, "info");
        assert!(
            again
                .seen
                .iter()
                .any(|l| l.contains("stay away") && l.contains("lab-km")),
            "{}",
            again.seen.join("\n")
        );
        again.wait_for(&["run finished", "rounds=3", "every round of the plan closed"]);
        again
    });
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(
            tokio::time::timeout(harness::EVENT_TIMEOUT, lab)
                .await
                .expect("the lab finishes")
                .unwrap()
                .unwrap(),
        );
    }
    let aggregator = driver.await.unwrap();
    assert!(
        !aggregator.seen.iter().any(|l| l.contains("round extended")),
        "no round waited for its deadline"
    );
    for report in &reports {
        let expected = if report.name == "lab-km" {
            RunEnd::MaxRounds { max_rounds: 1 }
        } else {
            RunEnd::Finished {
                rounds_completed: 3,
            }
        };
        assert_eq!(report.ended, expected, "{}", report.name);
    }
    let out = dir.path().join("out");
    let record = |round: u64| -> serde_json::Value {
        let json = std::fs::read_to_string(out.join(format!("round-{round:04}/round.json")))
            .unwrap_or_else(|e| panic!("round {round} is missing: {e}"));
        serde_json::from_str(&json).unwrap()
    };
    let names = |v: &serde_json::Value, key: &str| -> Vec<String> {
        v[key]
            .as_array()
            .unwrap_or_else(|| panic!("{key} in {v}"))
            .iter()
            .map(|n| n.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(&record(1), "contributors"),
        ["lab-km", "lab-lo", "lab-th"]
    );
    for round in [2, 3] {
        let r = record(round);
        assert_eq!(names(&r, "contributors"), ["lab-lo", "lab-th"], "{r}");
        assert!(names(&r, "dropped").is_empty(), "{r}");
        let left = if round == 2 { vec!["lab-km"] } else { vec![] };
        assert_eq!(names(&r, "left"), left, "{r}");
    }
    let took = started.elapsed();
    eprintln!("kill after a departure: the run took {took:.1?}");
    assert!(took < Duration::from_secs(60), "{took:?}");
}
