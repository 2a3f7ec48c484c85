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

use mekong_e2e::process as harness;

/// The binary under test, run as its own process.
const FEDAGGREGATOR: &str = env!("CARGO_BIN_EXE_fedaggregator");

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use burn::tensor::Device;
use fedaggregator::config::TlsSection;
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, Quiet};
use harness::{
    Aggregator, EVENT_TIMEOUT, LABS, config, corpus, free_port, lab_options, plan, write_config,
};
use mekong_e2e::{Enrolled, enroll_and_provision, provision_options};
use mekong_proto::tls::ParticipantKit;

const ROUNDS: u64 = 3;

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

/// The first line of `aggregator` at or past `target` (see [`KILLS`]), counting a
/// finished run's startup too.
fn wait_until(aggregator: &mut Aggregator, target: (u64, u8)) -> String {
    if let Some(line) = aggregator
        .seen
        .iter()
        .find(|l| l.contains("resuming a finished run") && position(l).is_some_and(|p| p >= target))
    {
        return line.clone();
    }
    aggregator.wait_line(|line| position(line).is_some_and(|p| p >= target))
}

/// The aggregator's log level: the kill schedule reads its debug lines.
const LOG: &str = "info,fedaggregator=debug";

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
    /// Mutual TLS with kits made by the enrollment flow: the labs enroll, the center
    /// provisions from their requests (once per test, so that both runs have the same
    /// identities), each lab installs its kit beside its keys.
    Tls(Arc<Enrolled>),
}

/// A federation of [`LABS`]: each enrolls in `dir/labs/NAME`, the center provisions
/// `dir/fed` (CA, server certificate, kits) from their requests.
fn provision_labs(dir: &Path) -> Enrolled {
    let names: Vec<(&str, &str)> = LABS.iter().map(|n| (*n, &n[4..])).collect();
    enroll_and_provision(
        &dir.join("labs"),
        &names,
        provision_options(&dir.join("fed"), "crash", "127.0.0.1:0", &[], 1),
    )
}

async fn run(transport: Transport, kills: &'static [(u64, u8)]) -> (Outcome, Vec<String>) {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let mut plan = plan("crash", ROUNDS);
    let tls = match &transport {
        Transport::Plaintext => TlsSection::plaintext(),
        Transport::Tls(fed) => {
            plan.roster = fed.provisioned.roster.clone();
            TlsSection::provisioned(&fed.provisioned.dir)
        }
    };
    let mut config = config(dir.path(), port, plan.clone());
    config.server.linger_after_finish_ms = 60_000;
    config.state.adapter_history = 2;
    config.tls = tls;
    let config_path = write_config(dir.path(), &config);

    let mut aggregator = Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, LOG);
    let url = format!("http://127.0.0.1:{port}");
    let labs: Vec<_> = (0..LABS.len())
        .map(|i| {
            let mut options = lab_options(&url, i, &plan, Duration::from_secs(60));
            if let Transport::Tls(fed) = &transport {
                let mut kit = ParticipantKit::load(&fed.labs[i]).unwrap();
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
            let line = wait_until(&mut aggregator, *target);
            aggregator.kill();
            eprintln!("kill {}: after {line}", k + 1);
            aggregator = Aggregator::spawn(std::path::Path::new(FEDAGGREGATOR), &config_path, LOG);
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
