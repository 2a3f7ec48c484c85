//! The operator's pause, resume and stop, end to end: the real `fedaggregator serve`
//! binary runs a secure federation of three in-process fedclient labs, and the real
//! `fedaggregator pause|resume|stop --config` commands steer it through the state database.
//!
//! Paused while a round runs, that round finishes and no further round opens for as long as
//! the pause lasts (the admin port's `/api/status` and `/metrics` say paused at that round);
//! resumed, the next round opens; stopped during a later round, the run finishes when that round closes,
//! long before the plan's run length, and the labs end with Finished, the rounds actually
//! completed and the last round's adapter as the final one. A refused command (resume of a
//! run that is not paused) exits non-zero with the reason. A request made while no aggregator
//! runs is applied when it next starts.

use mekong_e2e::process as harness;

/// The binary under test, run as its own process.
const FEDAGGREGATOR: &str = env!("CARGO_BIN_EXE_fedaggregator");

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use fedaggregator::config::AdminSection;
use fedclient::participant::{self, Quiet, RunEnd};
use harness::{
    Aggregator, EVENT_TIMEOUT, LABS, config, corpus, free_port, lab_options, plan, write_config,
};

/// The plan's run length; the operator stops the run long before it. Rounds of the tiny
/// model take a fraction of a second, and the commands land wherever the run is by then,
/// so the run is long enough that no command can miss it.
const ROUNDS: u64 = 60;
/// How long the test watches a paused run for a round that must not open.
const PAUSE_WATCH: Duration = Duration::from_secs(2);

/// Runs `fedaggregator <command> --config <config>`.
fn operator(command: &str, config: &Path) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
        .args([command, "--config"])
        .arg(config)
        .env("NO_COLOR", "1")
        .output()
        .expect("run fedaggregator");
    eprintln!(
        "fedaggregator {command}: {}\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// The round number between `before` and `after` in `text`.
fn round_in(text: &str, before: &str, after: &str) -> u64 {
    text.split_once(before)
        .and_then(|(_, rest)| rest.split_once(after))
        .and_then(|(n, _)| n.parse().ok())
        .unwrap_or_else(|| panic!("no round between {before:?} and {after:?} in {text:?}"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_rounds_resume_goes_on_and_stop_finishes_early() {
    let started = Instant::now();
    let dir = tempfile::tempdir().unwrap();
    let (port, admin_port) = (free_port(), free_port());
    let plan = plan("control", ROUNDS);
    let mut config = config(dir.path(), port, plan.clone());
    config.admin = Some(AdminSection::loopback(admin_port));
    let config_path = write_config(dir.path(), &config);
    let admin = format!("http://127.0.0.1:{admin_port}");

    let mut aggregator =
        Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, "info");
    let url = format!("http://127.0.0.1:{port}");
    let labs: Vec<_> = (0..LABS.len())
        .map(|i| {
            tokio::spawn(participant::run(
                lab_options(&url, i, &plan, Duration::from_secs(30)),
                corpus(i),
                Device::flex(),
                Arc::new(Quiet),
            ))
        })
        .collect();

    // The operator's side blocks on processes and the log: off the runtime's workers.
    let cfg = config_path.clone();
    let admin_url = admin.clone();
    let (aggregator, stopped_at) = tokio::task::spawn_blocking(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let status = |base: &str| {
            runtime
                .block_on(fedaggregator::admin::client::fetch_status(base))
                .unwrap()
        };
        aggregator.wait_for(&["round opened", "round=1 "]);
        let out = operator("pause", &cfg);
        assert!(out.status.success());
        // The round open when the request was applied.
        let paused_at = round_in(
            &stdout(&out),
            "paused: round ",
            " finishes, then no new round opens",
        );
        let s = status(&admin_url);
        assert!(s.paused || s.stage == "paused", "{s:?}");

        // That round finishes under the pause; then nothing opens.
        aggregator.wait_for(&["round closed", &format!("round={paused_at} ")]);
        aggregator.wait_for(&[
            "paused by the operator",
            &format!("after_round={paused_at}"),
        ]);
        let watch_until = Instant::now() + PAUSE_WATCH;
        while Instant::now() < watch_until {
            let s = status(&admin_url);
            assert_eq!((s.stage.as_str(), s.round), ("paused", paused_at), "{s:?}");
            assert!(s.paused && s.rounds.len() as u64 == paused_at, "{s:?}");
            std::thread::sleep(Duration::from_millis(250));
        }
        let next = format!("round={} ", paused_at + 1);
        assert!(
            !aggregator
                .drain()
                .iter()
                .any(|l| l.contains("round opened") && l.contains(&next)),
            "a round opened while paused"
        );
        let (code, metrics) = runtime
            .block_on(fedaggregator::admin::client::get(&admin_url, "/metrics"))
            .unwrap();
        assert_eq!(code, 200);
        assert!(metrics.contains("mekong_paused 1"), "{metrics}");
        assert!(
            metrics.contains("mekong_stage{stage=\"paused\"} 1"),
            "{metrics}"
        );

        let out = operator("resume", &cfg);
        assert!(out.status.success());
        assert!(
            stdout(&out).contains(&format!("resumed: round {} opened", paused_at + 1)),
            "{}",
            stdout(&out)
        );
        aggregator.wait_for(&["round opened", &next]);
        assert!(!status(&admin_url).paused);

        // Not paused any more: a second resume is refused with the reason, non-zero.
        let out = operator("resume", &cfg);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("the run is not paused (it is running round"),
            "{err}"
        );

        let out = operator("stop", &cfg);
        assert!(out.status.success());
        let stopped_at = round_in(&stdout(&out), "the run finishes when round ", " closes");
        aggregator.wait_for(&["run finished", &format!("rounds={stopped_at} ")]);
        (aggregator, stopped_at)
    })
    .await
    .unwrap();
    assert!(stopped_at < ROUNDS, "stopped at {stopped_at}");

    let mut finals = Vec::new();
    for lab in labs {
        let report = tokio::time::timeout(EVENT_TIMEOUT, lab)
            .await
            .expect("the lab finishes")
            .unwrap()
            .expect("the lab completes the run");
        assert!(
            matches!(report.ended, RunEnd::Finished { rounds_completed } if rounds_completed == stopped_at),
            "{:?}",
            report.ended
        );
        finals.push(report.final_adapter.content_hash());
    }
    let out = dir.path().join("out");
    let last = fedcore::peft::read_dir(&out.join(format!("round-{stopped_at:04}"))).unwrap();
    let final_adapter = fedcore::peft::read_dir(&out.join("final")).unwrap();
    assert_eq!(
        final_adapter.content_hash(),
        last.content_hash(),
        "the final adapter is the last round's"
    );
    assert!(finals.iter().all(|f| *f == last.content_hash()));
    assert!(!out.join(format!("round-{:04}", stopped_at + 1)).exists());
    let s = fedaggregator::admin::client::fetch_status(&admin)
        .await
        .unwrap();
    assert_eq!((s.stage.as_str(), s.round), ("finished", stopped_at));
    assert!(!s.paused && !s.stop_requested);

    // The run is over: a further command is refused, naming the state.
    let cfg = config_path.clone();
    let out = tokio::task::spawn_blocking(move || operator("pause", &cfg))
        .await
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already finished"),
        "{out:?}"
    );
    drop(aggregator);
    eprintln!("operator control run: {:?}", started.elapsed());
}

/// A request made while no aggregator runs stays pending, the command says so, and the
/// next `serve` applies it at start: the run comes up paused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_made_while_stopped_is_applied_at_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let admin_port = free_port();
    let mut config = config(dir.path(), free_port(), plan("control", ROUNDS));
    config.server.linger_after_finish_ms = 1_000;
    config.admin = Some(AdminSection::loopback(admin_port));
    let config_path = write_config(dir.path(), &config);
    let cfg = config_path.clone();
    let (said, aggregator) = tokio::task::spawn_blocking(move || {
        // Before any start there is no database: refused, and none is created.
        let out = operator("pause", &cfg);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no state database there"),
            "{out:?}"
        );
        drop(Aggregator::spawn(
            std::path::Path::new(FEDAGGREGATOR),
            &cfg,
            "info",
        ));
        let out = Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
            .args(["pause", "--wait-s", "1", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut aggregator = Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &cfg, "info");
        // The deadline ticker can apply the request before `serve` says it is serving.
        aggregator.saw_or_wait_for(&["operator request applied", "first round does not open"]);
        (stdout(&out), aggregator)
    })
    .await
    .unwrap();
    assert!(
        said.contains("is pending") && said.contains("next starts"),
        "{said}"
    );
    let s = fedaggregator::admin::client::fetch_status(&format!("http://127.0.0.1:{admin_port}"))
        .await
        .unwrap();
    assert!(s.paused, "{s:?}");
    assert_eq!(s.stage, "waiting_for_participants");
    drop(aggregator);
}
