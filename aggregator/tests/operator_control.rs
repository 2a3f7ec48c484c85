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

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use fedaggregator::AggregatorConfig;
use fedaggregator::config::{AdminSection, ServerSection, StateSection, TlsSection};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantOptions, Quiet, RunEnd};
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TargetModule, TrainingSpec};

const LABS: [&str; 3] = ["lab-lo", "lab-km", "lab-th"];
/// The plan's run length; the operator stops the run long before it. Rounds of the tiny
/// model take a fraction of a second, and the commands land wherever the run is by then,
/// so the run is long enough that no command can miss it.
const ROUNDS: u64 = 60;
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);
/// How long the test watches a paused run for a round that must not open.
const PAUSE_WATCH: Duration = Duration::from_secs(2);

fn identity(i: usize) -> IdentitySeed {
    IdentitySeed::from_bytes([(i as u8).wrapping_mul(41).wrapping_add(3); 32])
}

/// The tiny model of the end-to-end tests, secure aggregation, deadlines long enough that
/// no lab is ever dropped.
fn plan() -> FederationPlan {
    FederationPlan {
        federation: "control".into(),
        model: ModelSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            ..ModelSpec::tiny()
        },
        lora: LoraSpec {
            rank: 4,
            alpha: 8.0,
            target_modules: vec![TargetModule::Q, TargetModule::V],
            a_seed: 11,
            dropout: 0.0,
        },
        training: TrainingSpec {
            local_steps: 2,
            batch_size: 4,
            seq_len: 32,
            learning_rate: 1e-2,
            weight_decay: 0.0,
            seed: 5,
            ..TrainingSpec::default()
        },
        rounds: RoundSpec {
            rounds: ROUNDS,
            participants: LABS.len(),
            min_updates: LABS.len(),
            round_timeout_ms: 300_000,
        },
        roster: LABS
            .iter()
            .enumerate()
            .map(|(i, name)| RosterEntry {
                name: name.to_string(),
                public_key: identity(i).public_key_hex(),
            })
            .collect(),
        secure_aggregation: SecureAggregationSpec {
            stage_timeout_ms: 300_000,
            ..Default::default()
        },
        strategy: Default::default(),
    }
}

fn corpus(i: usize) -> LocalCorpus {
    let words = [
        "river", "delta", "rice", "boat", "monsoon", "market", "lantern",
    ];
    let mut text = String::new();
    for line in 0..120 {
        for w in 0..8 {
            text.push_str(words[(line * 3 + w * 5 + i) % words.len()]);
            text.push(' ');
        }
        text.push_str(&format!("{line}.\n"));
    }
    LocalCorpus::from_text(LABS[i], &text, 0.1, &ByteTokenizer).expect("text is long enough")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `fedaggregator serve` process and the lines it prints.
struct Aggregator {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Aggregator {
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fedaggregator");
        let (tx, lines) = channel();
        for stream in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let _ = tx.send(line);
                }
            });
        }
        // Only the readers hold senders: the channel closes when the process exits.
        drop(tx);
        let mut a = Aggregator {
            child,
            lines,
            seen: Vec::new(),
        };
        a.wait_for(&["aggregator serving"]);
        a
    }

    /// Reads lines until one contains every pattern; panics with the log on a timeout.
    fn wait_for(&mut self, patterns: &[&str]) -> String {
        let give_up = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if patterns.iter().all(|p| line.contains(p)) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => panic!(
                    "no line with {patterns:?} within {EVENT_TIMEOUT:?}:\n{}",
                    self.seen.join("\n")
                ),
                Err(RecvTimeoutError::Disconnected) => panic!(
                    "fedaggregator exited before {patterns:?}:\n{}",
                    self.seen.join("\n")
                ),
            }
        }
    }

    /// Lines printed so far without waiting.
    fn drain(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

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
    let plan = plan();
    let config = AggregatorConfig {
        server: ServerSection {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            output_dir: dir.path().join("out"),
            linger_after_finish_ms: 30_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls: TlsSection::plaintext(),
        admin: Some(AdminSection::loopback(admin_port)),
        state: StateSection {
            database: Some(dir.path().join("state.sqlite")),
            adapter_history: 0,
        },
        plan: plan.clone(),
    };
    let config_path = dir.path().join("aggregator.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let admin = format!("http://127.0.0.1:{admin_port}");

    let mut aggregator = Aggregator::spawn(&config_path);
    let url = format!("http://127.0.0.1:{port}");
    let labs: Vec<_> = (0..LABS.len())
        .map(|i| {
            let mut options = ParticipantOptions::new(&url, LABS[i], &LABS[i][4..]);
            options.connect_patience = Duration::from_secs(30);
            options.identity = Some(Arc::new(identity(i)));
            options.plan_sha256 = Some(plan.fingerprint());
            tokio::spawn(participant::run(
                options,
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
    let config = AggregatorConfig {
        server: ServerSection {
            listen: format!("127.0.0.1:{}", free_port()).parse().unwrap(),
            output_dir: dir.path().join("out"),
            linger_after_finish_ms: 1_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls: TlsSection::plaintext(),
        admin: Some(AdminSection::loopback(admin_port)),
        state: StateSection {
            database: Some(dir.path().join("state.sqlite")),
            adapter_history: 0,
        },
        plan: plan(),
    };
    let config_path = dir.path().join("aggregator.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();
    let cfg = config_path.clone();
    let (said, aggregator) = tokio::task::spawn_blocking(move || {
        // Before any start there is no database: refused, and none is created.
        let out = operator("pause", &cfg);
        assert!(!out.status.success());
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("no state database there"),
            "{out:?}"
        );
        drop(Aggregator::spawn(&cfg));
        let out = Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
            .args(["pause", "--wait-s", "1", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let mut aggregator = Aggregator::spawn(&cfg);
        aggregator.wait_for(&["operator request applied", "first round does not open"]);
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
