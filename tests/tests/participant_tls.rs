//! The participant runtime over mutual TLS with kits made by the enrollment flow (labs
//! `enroll`, the center provisions from their requests): a good lab trains a round;
//! a revoked lab and a lab from another federation stop at once with the reason, and never
//! fall into the retry loop meant for an unreachable aggregator.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use fedaggregator::config::TlsSection;
use fedaggregator::provision::revoke;
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantError, ParticipantOptions, Quiet};
use mekong_e2e::{
    Enrolled, aggregator_config, corpus, enroll_and_provision, loopback_provision, test_plan,
};
use mekong_proto::tls::ParticipantKit;

/// Labs `names` enroll under `dir/labs-FEDERATION`, the center provisions `dir/FEDERATION`.
fn provision_into(dir: &Path, federation: &str, names: &[&str]) -> Enrolled {
    let labs: Vec<(&str, &str)> = names.iter().map(|n| (*n, "lo")).collect();
    enroll_and_provision(
        &dir.join(format!("labs-{federation}")),
        &labs,
        loopback_provision(&dir.join(federation), federation),
    )
}

/// Runs the lab whose directory (keys and installed kit) is `kit_dir` against the aggregator at `address`.
async fn run_lab(
    kit_dir: &Path,
    address: std::net::SocketAddr,
) -> Result<participant::ParticipantReport, ParticipantError> {
    participant::run(
        options(kit_dir, address),
        corpus("lo"),
        burn::tensor::Device::flex(),
        Arc::new(Quiet),
    )
    .await
}

fn options(kit_dir: &Path, address: std::net::SocketAddr) -> ParticipantOptions {
    let mut kit = ParticipantKit::load(kit_dir).unwrap();
    kit.aggregator = address.to_string();
    let identity = IdentitySeed::load(&kit.identity).unwrap();
    ParticipantOptions {
        kit: Some(Arc::new(kit.clone())),
        identity: Some(Arc::new(identity)),
        // Long enough that a retry loop would show up as a slow test, not a quick error.
        connect_patience: Duration::from_secs(60),
        // What is tested here is the certificates; the plan is the test's own.
        trust_aggregator_plan: true,
        ..ParticipantOptions::new("", &kit.name, &kit.language)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kits_connect_and_refused_certificates_stop_the_participant() {
    let dir = tempfile::tempdir().unwrap();
    let fed = dir.path().join("e2e");
    let enrolled = provision_into(dir.path(), "e2e", &["lab-a", "lab-b"]);
    let provisioned = &enrolled.provisioned;
    let foreign = provision_into(dir.path(), "other", &["lab-a"]);

    // lab-b is revoked before the aggregator starts (a running one re-reads the CRL within
    // a second; the aggregator's own tests cover that).
    revoke(&fed, "lab-b").unwrap();
    let mut plan = test_plan(1, 1, 1, 60_000);
    plan.roster = provisioned.roster.clone();
    let mut config = aggregator_config(plan, &dir.path().join("out"));
    config.tls = TlsSection::provisioned(&fed);
    let server = fedaggregator::start(&config).await.unwrap();
    let address = server.local_addr();

    let started = std::time::Instant::now();
    let err = run_lab(&enrolled.labs[1], address).await.unwrap_err();
    // In TLS 1.3 the aggregator checks the client certificate after the client has finished
    // its side of the handshake, so the client may already have sent its first request when
    // the "revoked" alert comes back; hyper then reports only a cancelled request and the
    // reason is lost (about one try in ten here). The participant retries a cancelled call
    // like a dropped connection (an aggregator killed mid-call looks the same), and the
    // next handshake reports the revocation: the lab stops within a retry or two.
    assert!(
        matches!(err, ParticipantError::Handshake { .. }) && err.to_string().contains("revoked"),
        "{err}"
    );
    // A lab holding a kit from another federation: neither side accepts the other's CA.
    let err = run_lab(&foreign.labs[0], address).await.unwrap_err();
    assert!(
        matches!(err, ParticipantError::Handshake { .. }),
        "a foreign kit must fail at the handshake: {err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "refusals must not be retried: {:?}",
        started.elapsed()
    );

    // The good lab trains the federation's one round over TLS.
    let report = run_lab(&enrolled.labs[0], address).await.unwrap();
    assert_eq!(report.rounds.len(), 1);
    server.finished().await;
    server.shutdown().await.unwrap();
}
