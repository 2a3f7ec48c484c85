//! `kill -9` of the real `fedaggregator serve` process at 14 points of a three-round secure
//! run (waiting for labs, training, after each secure stage closes, in the middle of the
//! masked-input, consistency and unmask stages, right after a round closes, after the run
//! finished), each time restarted from its SQLite database. Three labs train in this
//! process through the fedclient library and reconnect on their own. The run must complete
//! every round and end with exactly the adapter of an uninterrupted run of the same
//! configuration (same seeds; another session id).
//!
//! Kill points are driven by the aggregator's own log (it runs with
//! `RUST_LOG=info,fedaggregator=debug`): the test waits for the event, then sends SIGKILL
//! from outside (`Child::kill`). The main test runs plaintext gRPC to keep it on crash
//! safety; a second, shorter one kills a run over mutual TLS with provisioned kits, so the
//! labs' reconnection through a fresh TLS handshake is covered too.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use burn::tensor::Device;
use fedaggregator::AggregatorConfig;
use fedaggregator::config::{ServerSection, StateSection, TlsSection};
use fedaggregator::provision::{ParticipantSpec, ProvisionOptions, Provisioned, provision};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantOptions, Quiet};
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TargetModule, TrainingSpec};
use mekong_proto::tls::ParticipantKit;

const LABS: [&str; 3] = ["lab-lo", "lab-km", "lab-th"];
const ROUNDS: u64 = 3;
/// How long any one awaited event may take (training included).
const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

/// Phases of a round, in the order the aggregator logs them (see [`position`]).
const JOINED: u8 = 0;
const OPENED: u8 = 1;
const KEYS_CLOSED: u8 = 2;
const SHARES_CLOSED: u8 = 3;
const MASKED_INPUT: u8 = 4;
const MASKED_CLOSED: u8 = 5;
const SIGNED: u8 = 6;
const CONSISTENCY_CLOSED: u8 = 7;
const REVEALED: u8 = 8;
const ROUND_CLOSED: u8 = 9;

/// Where to kill, as (round, phase): the first line of the running incarnation at or past
/// that point. "At or past", because a restart may resume beyond a point (a round opened
/// before the kill resumes as a restarted attempt, logging no "round opened"), and the
/// schedule must not depend on such races.
const KILLS: &[(u64, u8)] = &[
    // Waiting for participants: the first lab's id must survive.
    (0, JOINED),
    // Round 1 open, labs training.
    (1, OPENED),
    // After keys: the attempt restarts with fresh keys.
    (1, KEYS_CLOSED),
    // After shares, during masked input.
    (1, SHARES_CLOSED),
    // Mid masked input: one input folded, others streaming.
    (1, MASKED_INPUT),
    // After masked input: the sum is saved and the attempt resumes from here on.
    (1, MASKED_CLOSED),
    // During the unmask stage.
    (1, CONSISTENCY_CLOSED),
    // Mid unmask: a lab's shares revealed.
    (1, REVEALED),
    // Right after a round closes.
    (1, ROUND_CLOSED),
    (2, MASKED_INPUT),
    // Mid consistency check.
    (2, SIGNED),
    (3, OPENED),
    (3, REVEALED),
    // The run is over; labs not yet told must still get the final adapter.
    (ROUNDS + 1, JOINED),
];

/// Where in the run a log line of the aggregator says it is, if it says.
fn position(line: &str) -> Option<(u64, u8)> {
    if line.contains("run finished") || line.contains("resuming a finished run") {
        return Some((ROUNDS + 1, JOINED));
    }
    if line.contains("participant joined") {
        return Some((0, JOINED));
    }
    let has = |s: &str| line.contains(s);
    let phase = if has("round opened") || has("kind=\"advertise_keys\"") {
        OPENED
    } else if has("stage=AdvertiseKeys") || has("kind=\"share_keys\"") {
        KEYS_CLOSED
    } else if has("stage=ShareKeys") {
        SHARES_CLOSED
    } else if has("masked input accepted") {
        MASKED_INPUT
    } else if has("stage=MaskedInput") {
        MASKED_CLOSED
    } else if has("kind=\"consistency_check\"") {
        SIGNED
    } else if has("stage=ConsistencyCheck") {
        CONSISTENCY_CLOSED
    } else if has("kind=\"unmask\"") || has("stage=Unmask") {
        REVEALED
    } else if has("round closed") {
        ROUND_CLOSED
    } else {
        return None;
    };
    let digits: String = line
        .split_once(" round=")?
        .1
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    Some((digits.parse().ok()?, phase))
}

fn identity(i: usize) -> IdentitySeed {
    IdentitySeed::from_bytes([(i as u8).wrapping_mul(53).wrapping_add(7); 32])
}

/// The tiny model of the end-to-end tests, three labs, secure aggregation, deadlines long
/// enough that no lab is ever dropped (the result must not depend on timing).
fn plan() -> FederationPlan {
    FederationPlan {
        federation: "crash".into(),
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
            target_modules: vec![TargetModule::Q, TargetModule::V, TargetModule::Down],
            a_seed: 11,
            dropout: 0.0,
        },
        training: TrainingSpec {
            local_steps: 3,
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

/// Deterministic local text per lab (the tiny byte-level model needs no real language).
fn corpus(i: usize) -> LocalCorpus {
    let words = [
        "river", "delta", "rice", "boat", "monsoon", "market", "lantern", "temple", "fish",
        "bridge", "village", "harvest",
    ];
    let mut text = String::new();
    let mut x = 17u64 + i as u64;
    for line in 0..160 {
        for _ in 0..8 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            text.push_str(words[((x >> 33) as usize + i) % words.len()]);
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

/// One `fedaggregator serve` process and the lines it prints.
struct Aggregator {
    child: Child,
    lines: Receiver<String>,
    seen: Vec<String>,
}

impl Aggregator {
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_fedaggregator"))
            .arg("serve")
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info,fedaggregator=debug")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fedaggregator");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let tx2 = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        std::thread::spawn(move || {
            for line in BufReader::new(err).lines().map_while(Result::ok) {
                let _ = tx2.send(line);
            }
        });
        let mut a = Aggregator {
            child,
            lines,
            seen: Vec::new(),
        };
        a.wait_for(&["aggregator serving"]);
        a
    }

    /// Reads lines until one contains every pattern; panics with the log on a timeout or
    /// when the process exits first.
    fn wait_for(&mut self, patterns: &[&str]) -> String {
        self.wait_line(|line| patterns.iter().all(|p| line.contains(p)))
    }

    /// The first line at or past `target` (see [`KILLS`]), counting a finished run's
    /// startup too.
    fn wait_until(&mut self, target: (u64, u8)) -> String {
        if let Some(line) = self.seen.iter().find(|l| {
            l.contains("resuming a finished run") && position(l).is_some_and(|p| p >= target)
        }) {
            return line.clone();
        }
        self.wait_line(|line| position(line).is_some_and(|p| p >= target))
    }

    fn wait_line(&mut self, found: impl Fn(&str) -> bool) -> String {
        let give_up = Instant::now() + EVENT_TIMEOUT;
        loop {
            let left = give_up.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push(line.clone());
                    if found(&line) {
                        return line;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!(
                        "nothing awaited within {EVENT_TIMEOUT:?}:\n{}",
                        self.seen.join("\n")
                    )
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().unwrap();
                    panic!(
                        "fedaggregator exited ({status}) first:\n{}",
                        self.seen.join("\n")
                    )
                }
            }
        }
    }

    /// SIGKILL, and reap it.
    fn kill(mut self) -> Vec<String> {
        // An incarnation may have finished and exited on its own (the last one).
        let _ = self.child.kill();
        self.child.wait().unwrap();
        self.seen.extend(self.lines.try_iter());
        self.seen
    }
}

/// What a run ends with: the hashes of every round's adapter and of the final one.
#[derive(Debug, PartialEq)]
struct Outcome {
    rounds: Vec<String>,
    final_hash: String,
}

/// How the labs reach the aggregator.
#[derive(Clone)]
enum Transport {
    Plaintext,
    /// Mutual TLS with the kits `fedaggregator provision` wrote into this directory
    /// (provisioned once per test, so that both runs have the same identities).
    Tls(Arc<Provisioned>),
}

/// A federation of [`LABS`] provisioned in `dir` (CA, server certificate, kits).
fn provision_labs(dir: &Path) -> Provisioned {
    provision(&ProvisionOptions {
        out: dir.to_path_buf(),
        federation: "crash".into(),
        aggregator_address: "127.0.0.1:0".into(),
        extra_sans: Vec::new(),
        participants: LABS
            .iter()
            .map(|n| ParticipantSpec {
                name: n.to_string(),
                language: n[4..].to_string(),
            })
            .collect(),
        validity_days: 1,
        ca_validity_days: 1,
        share_metrics: Vec::new(),
    })
    .unwrap()
}

async fn run(transport: Transport, kills: &'static [(u64, u8)]) -> (Outcome, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut plan = plan();
    let tls = match &transport {
        Transport::Plaintext => TlsSection::plaintext(),
        Transport::Tls(fed) => {
            plan.roster = fed.roster.clone();
            TlsSection::provisioned(&fed.dir)
        }
    };
    let config = AggregatorConfig {
        server: ServerSection {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            output_dir: dir.path().join("out"),
            linger_after_finish_ms: 60_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls,
        admin: None,
        state: StateSection {
            database: Some(dir.path().join("state/state.sqlite")),
            adapter_history: 2,
        },
        plan: plan.clone(),
    };
    let config_path = dir.path().join("aggregator.toml");
    std::fs::write(&config_path, config.to_toml()).unwrap();

    let mut aggregator = Aggregator::spawn(&config_path);
    let url = format!("http://127.0.0.1:{port}");
    let labs: Vec<_> = (0..LABS.len())
        .map(|i| {
            let mut options = ParticipantOptions::new(&url, LABS[i], &LABS[i][4..]);
            options.connect_patience = Duration::from_secs(60);
            options.identity = Some(Arc::new(identity(i)));
            options.plan_sha256 = Some(plan.fingerprint());
            if let Transport::Tls(fed) = &transport {
                let mut kit = ParticipantKit::load(&fed.kits[i]).unwrap();
                assert_eq!(kit.name, LABS[i]);
                kit.aggregator = format!("127.0.0.1:{port}");
                options.identity = Some(Arc::new(IdentitySeed::load(&kit.identity).unwrap()));
                options.kit = Some(Arc::new(kit));
            }
            tokio::spawn(participant::run(
                options,
                corpus(i),
                Device::flex(),
                Arc::new(Quiet),
            ))
        })
        .collect();

    // The kill schedule blocks on the aggregator's output: off the runtime's workers, which
    // the labs need.
    let driver = tokio::task::spawn_blocking(move || {
        let mut restarts = Vec::new();
        for (k, target) in kills.iter().enumerate() {
            let line = aggregator.wait_until(*target);
            aggregator.kill();
            eprintln!("kill {}: after {line}", k + 1);
            aggregator = Aggregator::spawn(&config_path);
            if let Some(resumed) = aggregator.seen.iter().find(|l| l.contains("resuming")) {
                restarts.push(resumed.clone());
            }
        }
        (aggregator, restarts)
    });
    let (aggregator, restarts) = driver.await.unwrap();
    let mut finals = Vec::new();
    for lab in labs {
        let report = tokio::time::timeout(EVENT_TIMEOUT * 2, lab)
            .await
            .expect("the lab finishes")
            .unwrap()
            .expect("the lab completes the run");
        finals.push(report.final_adapter.content_hash());
    }
    aggregator.kill();

    let out = dir.path().join("out");
    let rounds = (1..=ROUNDS)
        .map(|r| {
            let json = std::fs::read_to_string(out.join(format!("round-{r:04}/round.json")))
                .unwrap_or_else(|e| panic!("round {r} is missing: {e}"));
            let record: serde_json::Value = serde_json::from_str(&json).unwrap();
            assert_eq!(
                record["contributors"].as_array().unwrap().len(),
                LABS.len(),
                "round {r}: nobody dropped"
            );
            let adapter = fedcore::peft::read_dir(&out.join(format!("round-{r:04}"))).unwrap();
            assert_eq!(record["adapter_hash"], adapter.content_hash());
            adapter.content_hash()
        })
        .collect();
    let final_adapter = fedcore::peft::read_dir(&out.join("final")).unwrap();
    for f in &finals {
        assert_eq!(
            f,
            &final_adapter.content_hash(),
            "every lab got the final adapter"
        );
    }
    (
        Outcome {
            rounds,
            final_hash: final_adapter.content_hash(),
        },
        restarts,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_fourteen_points_resumes_to_the_uninterrupted_adapter() {
    let started = Instant::now();
    let (reference, _) = run(Transport::Plaintext, &[]).await;
    eprintln!("uninterrupted run: {:?}", started.elapsed());
    let started = Instant::now();
    let (killed, restarts) = run(Transport::Plaintext, KILLS).await;
    eprintln!("run with {} kills: {:?}", KILLS.len(), started.elapsed());
    for r in &restarts {
        eprintln!("  {r}");
    }
    assert!(KILLS.len() >= 10);
    assert_eq!(restarts.len(), KILLS.len(), "every restart resumed the run");
    assert_eq!(killed.rounds.last(), Some(&killed.final_hash));
    assert_eq!(
        killed, reference,
        "every round, and the final adapter, as without kills"
    );
    // Both ways a restart treats an open secure attempt happened.
    assert!(
        restarts
            .iter()
            .any(|l| l.contains("restarting it with fresh keys")),
        "{restarts:#?}"
    );
    assert!(
        restarts.iter().any(|l| l.contains("goes on where it was")),
        "{restarts:#?}"
    );
}

/// The same over mutual TLS, with fewer kills: labs reconnect through the kit's TLS
/// channel (a fresh handshake with each restarted aggregator) and the run ends as an
/// uninterrupted one with the same kits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_over_mutual_tls_resumes_to_the_uninterrupted_adapter() {
    const TLS_KILLS: &[(u64, u8)] = &[
        (1, KEYS_CLOSED),
        (1, MASKED_CLOSED),
        (1, REVEALED),
        (2, OPENED),
        (3, SIGNED),
    ];
    let fed = tempfile::tempdir().unwrap();
    let transport = Transport::Tls(Arc::new(provision_labs(fed.path())));
    let (reference, _) = run(transport.clone(), &[]).await;
    let started = Instant::now();
    let (killed, restarts) = run(transport, TLS_KILLS).await;
    eprintln!(
        "TLS run with {} kills: {:?}",
        TLS_KILLS.len(),
        started.elapsed()
    );
    assert_eq!(
        restarts.len(),
        TLS_KILLS.len(),
        "every restart resumed the run"
    );
    assert_eq!(killed, reference);
}
