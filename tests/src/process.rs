//! The kit of the tests that drive the real `fedaggregator` binary as a separate process
//! (SIGKILL, restart, operator commands; in aggregator/tests/): the tiny secure plan with
//! three labs whose identities are fixed, their text, a plaintext configuration with a state
//! database, and the `serve` process with the lines it prints. The binary is the caller's:
//! only the aggregator's own tests have `CARGO_BIN_EXE_fedaggregator`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use fedaggregator::AggregatorConfig;
use fedaggregator::config::{ServerSection, StateSection, TlsSection};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::identity::IdentitySeed;
use fedclient::participant::ParticipantOptions;
use fedcore::FederationPlan;
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;

pub const LABS: [&str; 3] = ["lab-lo", "lab-km", "lab-th"];

/// How long any one awaited log line may take (training included).
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(60);

pub fn identity(i: usize) -> IdentitySeed {
    IdentitySeed::from_bytes([(i as u8).wrapping_mul(53).wrapping_add(7); 32])
}

/// [`crate::test_plan`]'s tiny model for [`LABS`], with secure aggregation and deadlines long
/// enough that no lab is ever dropped (the result must not depend on timing).
pub fn plan(federation: &str, rounds: u64) -> FederationPlan {
    let mut plan = crate::test_plan(LABS.len(), rounds, LABS.len(), 300_000);
    plan.federation = federation.into();
    plan.roster = LABS
        .iter()
        .enumerate()
        .map(|(i, name)| RosterEntry {
            name: name.to_string(),
            public_key: identity(i).public_key_hex(),
        })
        .collect();
    plan.secure_aggregation = SecureAggregationSpec {
        stage_timeout_ms: 300_000,
        ..Default::default()
    };
    plan
}

/// Deterministic local text per lab (the tiny byte-level model needs no real language).
pub fn corpus(i: usize) -> LocalCorpus {
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

/// Lab `i`'s options against `url`, pinned to `plan`.
pub fn lab_options(
    url: &str,
    i: usize,
    plan: &FederationPlan,
    patience: Duration,
) -> ParticipantOptions {
    let mut options = ParticipantOptions::new(url, LABS[i], &LABS[i][4..]);
    options.connect_patience = patience;
    options.identity = Some(Arc::new(identity(i)));
    options.plan_sha256 = Some(plan.fingerprint());
    options
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A plaintext aggregator on `port` keeping its output and state database in `dir`.
pub fn config(dir: &Path, port: u16, plan: FederationPlan) -> AggregatorConfig {
    AggregatorConfig {
        server: ServerSection {
            listen: format!("127.0.0.1:{port}").parse().unwrap(),
            output_dir: dir.join("out"),
            linger_after_finish_ms: 30_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls: TlsSection::plaintext(),
        admin: None,
        state: StateSection {
            database: Some(dir.join("state/state.sqlite")),
            adapter_history: 0,
        },
        limits: Default::default(),
        plan,
    }
}

/// Writes `config` as `dir/aggregator.toml` and returns its path.
pub fn write_config(dir: &Path, config: &AggregatorConfig) -> PathBuf {
    let path = dir.join("aggregator.toml");
    std::fs::write(&path, config.to_toml()).unwrap();
    path
}

/// One `fedaggregator serve` process and the lines it prints; killed when dropped.
pub struct Aggregator {
    child: Child,
    lines: Receiver<String>,
    /// Every line read so far.
    pub seen: Vec<String>,
}

impl Aggregator {
    /// Starts `<binary> serve --config <config>` (`binary`: the `fedaggregator` executable,
    /// `env!("CARGO_BIN_EXE_fedaggregator")` in the aggregator's tests) with
    /// `RUST_LOG=<log>` and waits until it serves.
    pub fn spawn(binary: &Path, config: &Path, log: &str) -> Self {
        let mut child = Command::new(binary)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", log)
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

    /// Returns the first line read so far that contains every pattern, or else reads lines
    /// until one does: for what may be printed before the line `spawn` waits for.
    pub fn saw_or_wait_for(&mut self, patterns: &[&str]) -> String {
        let matches = |line: &str| patterns.iter().all(|p| line.contains(p));
        if let Some(line) = self.seen.iter().find(|l| matches(l)) {
            return line.clone();
        }
        self.wait_line(matches)
    }

    /// Reads lines until one contains every pattern.
    pub fn wait_for(&mut self, patterns: &[&str]) -> String {
        self.wait_line(|line| patterns.iter().all(|p| line.contains(p)))
    }

    /// Reads lines until `found` says yes; panics with the log on a timeout or when the
    /// process exits first.
    pub fn wait_line(&mut self, found: impl Fn(&str) -> bool) -> String {
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
                Err(RecvTimeoutError::Timeout) => panic!(
                    "nothing awaited within {EVENT_TIMEOUT:?}:\n{}",
                    self.seen.join("\n")
                ),
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

    /// Lines printed so far, without waiting.
    pub fn drain(&mut self) -> &[String] {
        self.seen.extend(self.lines.try_iter());
        &self.seen
    }

    /// SIGKILL, and reap it (what dropping does, said out loud).
    pub fn kill(self) {}

    /// Waits for the process to exit on its own within `within`; panics with the log if it
    /// does not.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let give_up = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                self.drain();
                return status;
            }
            if Instant::now() >= give_up {
                panic!(
                    "fedaggregator still runs after {within:?}:\n{}",
                    self.drain().join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Aggregator {
    fn drop(&mut self) {
        // An incarnation may have finished and exited on its own.
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
