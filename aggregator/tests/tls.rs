//! Mutual TLS end to end: a real aggregator on loopback, real certificates from
//! `provision` made from the labs' own enrollment requests, real tonic clients. Participants from another CA, with an expired or a
//! revoked certificate, or claiming another participant's name are refused, and the
//! aggregator keeps serving the others.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use fedaggregator::config::{AggregatorConfig, TlsSection};
use fedaggregator::provision::{self, FederationCa, ProvisionError, ProvisionOptions};
use fedaggregator::{RunningServer, start};
use mekong_e2e::{Enrolled, enroll_and_provision, provision_options};
use mekong_proto::tls::{self, ParticipantKit, TlsError};
use mekong_proto::v1 as pb;
use mekong_proto::v1::federation_client::FederationClient;
use tonic::transport::Channel;

const LABS: [&str; 3] = ["lab-a", "lab-b", "lab-c"];

/// The labs enroll in `dir/labs/NAME`, the center provisions `dir` from their requests,
/// each lab installs its kit beside its keys.
fn provision_into(dir: &Path, federation: &str) -> Enrolled {
    let labs: Vec<(&str, &str)> = LABS.iter().map(|n| (*n, "lo")).collect();
    enroll_and_provision(
        &dir.join("labs"),
        &labs,
        provision_options(dir, federation, "localhost:50051", &["127.0.0.1"], 30),
    )
}

/// A lab's TLS key, as the lab holds it (to have the CA certify it once more).
fn lab_key(dir: &Path, name: &str) -> (rcgen::KeyPair, String) {
    let pem = std::fs::read_to_string(kit(dir, name).private_key).unwrap();
    (rcgen::KeyPair::from_pem(&pem).unwrap(), pem)
}

/// The aggregator.toml provisioning wrote, served on a free loopback port.
async fn serve(dir: &Path) -> RunningServer {
    let mut config = AggregatorConfig::load(&dir.join("aggregator.toml")).expect("config loads");
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.output_dir = dir.join("out");
    // Tests run side by side: no fixed admin port.
    config.admin = None;
    assert!(config.tls.enabled);
    start(&config).await.expect("aggregator starts")
}

/// Lab `name`'s installed kit (in its enrollment directory, beside its keys).
fn kit(dir: &Path, name: &str) -> ParticipantKit {
    ParticipantKit::load(&dir.join("labs").join(name)).expect("kit loads")
}

fn client(server: &RunningServer, config: Arc<rustls::ClientConfig>) -> FederationClient<Channel> {
    FederationClient::new(
        tls::channel(&server.local_addr().to_string(), "localhost", config).expect("channel"),
    )
}

fn kit_client(server: &RunningServer, dir: &Path, name: &str) -> FederationClient<Channel> {
    client(
        server,
        kit(dir, name).client_config().expect("kit is valid"),
    )
}

async fn join(c: &mut FederationClient<Channel>, name: &str) -> Result<String, tonic::Status> {
    c.join(pb::JoinRequest {
        participant_name: name.into(),
        language: "lo".into(),
        client_version: "test".into(),
    })
    .await
    .map(|r| r.into_inner().participant_id)
}

async fn status(
    c: &mut FederationClient<Channel>,
) -> Result<pb::RoundStatusResponse, tonic::Status> {
    c.round_status(pb::RoundStatusRequest {})
        .await
        .map(|r| r.into_inner())
}

/// A fresh connection of a good participant is still served.
async fn still_serves(server: &RunningServer, dir: &Path) {
    let mut good = kit_client(server, dir, "lab-b");
    let s = status(&mut good)
        .await
        .expect("a good participant is served");
    assert_eq!(s.federation, "pilot");
}

/// A client configuration straight from PEM text, without the kit's own checks (what a
/// misbehaving or stale participant would present).
fn raw_config(
    dir: &Path,
    ca_pem: &str,
    cert_pem: &str,
    key_pem: &str,
) -> Arc<rustls::ClientConfig> {
    let write = |name: &str, text: &str| {
        let p = dir.join(name);
        std::fs::write(&p, text).unwrap();
        p
    };
    let ca = tls::load_certs(&write("raw-ca.pem", ca_pem))
        .unwrap()
        .remove(0);
    let chain = tls::load_certs(&write("raw-cert.pem", cert_pem)).unwrap();
    let key = tls::load_key(&write("raw-key.pem", key_pem)).unwrap();
    tls::client_config(ca, chain, key).unwrap()
}

fn assert_refused<T: std::fmt::Debug>(what: &str, r: Result<T, tonic::Status>) -> tonic::Status {
    let status = r.expect_err(what);
    eprintln!("{what}: {status}");
    status
}

/// Refused at the handshake: the client sees the TLS alert the aggregator sent, and
/// `handshake_refusal` says what it means.
fn assert_alert<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    alert: &str,
    meaning: &str,
) {
    let status = assert_refused(what, r);
    let shown = format!("{status:?}");
    assert!(
        shown.contains(&format!("received fatal alert: {alert}")),
        "{what}: expected alert {alert}, got {shown}"
    );
    let refusal = tls::handshake_refusal(&status).expect("a TLS refusal");
    assert_eq!(
        refusal,
        tls::HandshakeRefusal::ByAggregator(meaning.into()),
        "{what}"
    );
}

#[tokio::test]
async fn provisioned_participant_joins_under_its_certificate_name() {
    let dir = tempfile::tempdir().unwrap();
    let made = provision_into(dir.path(), "pilot");
    let made = &made.provisioned;
    assert!(made.config_problem.is_none(), "{:?}", made.config_problem);
    let server = serve(dir.path()).await;

    let mut a = kit_client(&server, dir.path(), "lab-a");
    let id_a = join(&mut a, "lab-a").await.expect("lab-a joins");
    assert_eq!(status(&mut a).await.unwrap().participants_joined, 1);

    // The certificate says lab-b: joining as lab-c is refused, and so is using lab-a's id.
    let mut b = kit_client(&server, dir.path(), "lab-b");
    let refused = assert_refused("join under another name", join(&mut b, "lab-c").await);
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("\"lab-b\""), "{refused}");
    let stolen = b
        .fetch_task(pb::FetchTaskRequest {
            participant_id: id_a.clone(),
            wait_ms: 0,
        })
        .await;
    let refused = assert_refused("another participant's id", stolen);
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // Nor can lab-b make lab-a leave the federation with its id.
    let evicted = b
        .leave(pb::LeaveRequest {
            participant_id: id_a.clone(),
            reason: pb::LeaveReason::OperatorRequest as i32,
        })
        .await;
    let refused = assert_refused("leave with another participant's id", evicted);
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    // lab-a itself may use its id, and lab-b may join as itself.
    a.fetch_task(pb::FetchTaskRequest {
        participant_id: id_a,
        wait_ms: 0,
    })
    .await
    .expect("lab-a fetches with its own id");
    join(&mut b, "lab-b").await.expect("lab-b joins as itself");
    let status_now = status(&mut b).await.unwrap();
    assert_eq!(
        (status_now.participants_joined, status_now.participants_left),
        (2, 0)
    );
    server.shutdown().await.unwrap();
}

/// The links negotiate TLS 1.3 with the hybrid post-quantum key exchange X25519MLKEM768,
/// which rustls on aws-lc-rs prefers: traffic recorded today stays confidential against a
/// future quantum computer.
#[tokio::test]
async fn links_use_tls13_with_the_post_quantum_hybrid_key_exchange() {
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let server = serve(dir.path()).await;
    let config = kit(dir.path(), "lab-a")
        .client_config()
        .expect("kit is valid");
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .expect("connect");
    let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
    let stream = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .expect("handshake");
    let (_, conn) = stream.get_ref();
    assert_eq!(
        conn.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );
    assert_eq!(
        conn.negotiated_key_exchange_group().map(|g| g.name()),
        Some(rustls::NamedGroup::X25519MLKEM768)
    );
    drop(stream);
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn bad_certificates_are_refused_at_the_handshake_and_the_others_served() {
    // `--nocapture` shows what the aggregator logs for each refused handshake.
    let _ = tracing_subscriber::fmt()
        .with_test_writer()
        .with_env_filter("warn")
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let scratch = tempfile::tempdir().unwrap();
    let ca_pem = std::fs::read_to_string(dir.path().join("ca.pem")).unwrap();
    let server = serve(dir.path()).await;
    still_serves(&server, dir.path()).await;

    // Another federation's CA issued this lab-a certificate.
    let other = tempfile::tempdir().unwrap();
    provision_into(other.path(), "pilot");
    let foreign = kit(other.path(), "lab-a");
    let foreign_config = raw_config(
        scratch.path(),
        &ca_pem, // it even trusts our CA for the server
        &std::fs::read_to_string(&foreign.certificate).unwrap(),
        &std::fs::read_to_string(&foreign.private_key).unwrap(),
    );
    let mut c = client(&server, foreign_config);
    // Same CA name, other key: the signature does not verify.
    assert_alert(
        "certificate from another CA of the same name",
        join(&mut c, "lab-a").await,
        "DecryptError",
        "not issued by the federation's CA",
    );
    still_serves(&server, dir.path()).await;
    let elsewhere = tempfile::tempdir().unwrap();
    provision_into(elsewhere.path(), "elsewhere");
    let foreign = kit(elsewhere.path(), "lab-a");
    let foreign_config = raw_config(
        scratch.path(),
        &ca_pem,
        &std::fs::read_to_string(&foreign.certificate).unwrap(),
        &std::fs::read_to_string(&foreign.private_key).unwrap(),
    );
    let mut c = client(&server, foreign_config);
    assert_alert(
        "certificate from another federation's CA",
        join(&mut c, "lab-a").await,
        "UnknownCA",
        "not issued by the federation's CA",
    );
    still_serves(&server, dir.path()).await;

    // Our CA, lab-a's own key, but expired yesterday.
    let ca = FederationCa::load(dir.path()).unwrap();
    let (key, key_pem) = lab_key(dir.path(), "lab-a");
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_participant_between(
            "lab-a",
            &key,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    let mut c = client(
        &server,
        raw_config(scratch.path(), &ca_pem, &expired.cert_pem, &key_pem),
    );
    assert_alert(
        "expired certificate",
        join(&mut c, "lab-a").await,
        "CertificateExpired",
        "expired or not yet valid",
    );
    still_serves(&server, dir.path()).await;

    // Not valid yet.
    let early = ca
        .issue_participant_between(
            "lab-a",
            &key,
            now + time::Duration::days(1),
            now + time::Duration::days(30),
        )
        .unwrap();
    let mut c = client(
        &server,
        raw_config(scratch.path(), &ca_pem, &early.cert_pem, &key_pem),
    );
    assert_alert(
        "certificate not valid yet",
        join(&mut c, "lab-a").await,
        "CertificateExpired",
        "expired or not yet valid",
    );

    // No client certificate at all.
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(
            tls::load_certs(&dir.path().join("ca.pem"))
                .unwrap()
                .remove(0),
        )
        .unwrap();
    let mut anonymous = rustls::ClientConfig::builder_with_provider(tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    anonymous.alpn_protocols = vec![b"h2".to_vec()];
    let mut c = client(&server, Arc::new(anonymous));
    assert_alert(
        "no client certificate",
        join(&mut c, "lab-a").await,
        "CertificateRequired",
        "none was sent",
    );

    // The aggregator's own certificate is not a participant certificate (serverAuth only).
    let mut c = client(
        &server,
        raw_config(
            scratch.path(),
            &ca_pem,
            &std::fs::read_to_string(dir.path().join("server.pem")).unwrap(),
            &std::fs::read_to_string(dir.path().join("server.key")).unwrap(),
        ),
    );
    assert_alert(
        "server certificate as a client",
        join(&mut c, "lab-a").await,
        "UnsupportedCertificate",
        "not a participant (clientAuth) certificate",
    );

    // A participant whose kit names another server does not accept the aggregator.
    let k = kit(dir.path(), "lab-a");
    let mut c = FederationClient::new(
        tls::channel(
            &server.local_addr().to_string(),
            "elsewhere.example.org",
            k.client_config().unwrap(),
        )
        .unwrap(),
    );
    let refused = assert_refused("wrong server name", join(&mut c, "lab-a").await);
    assert_eq!(
        tls::handshake_refusal(&refused),
        Some(tls::HandshakeRefusal::AggregatorCertificate(
            "not valid for the kit's server_name".into()
        ))
    );

    // Plaintext gRPC against the TLS port.
    let plain = Channel::from_shared(format!("http://{}", server.local_addr()))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect_lazy();
    let mut c = FederationClient::new(plain);
    assert_refused("plaintext client", status(&mut c).await);

    // A client that connects and never says anything does not hold up the others.
    let _silent = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();

    still_serves(&server, dir.path()).await;

    // Many refused handshakes at once, beside good calls.
    let bad = raw_config(scratch.path(), &ca_pem, &expired.cert_pem, &key_pem);
    let mut calls = tokio::task::JoinSet::new();
    for i in 0..24 {
        let mut c = if i % 4 == 0 {
            kit_client(&server, dir.path(), "lab-b")
        } else {
            client(&server, bad.clone())
        };
        calls.spawn(async move { (i % 4 == 0, status(&mut c).await.is_ok()) });
    }
    while let Some(done) = calls.join_next().await {
        let (good, served) = done.unwrap();
        assert_eq!(good, served, "good calls served, bad ones refused");
    }

    let mut a = kit_client(&server, dir.path(), "lab-a");
    join(&mut a, "lab-a").await.expect("the real lab-a joins");
    server.shutdown().await.unwrap();
}

#[tokio::test]
async fn revoked_certificates_are_refused_live_and_at_start() {
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let server = serve(dir.path()).await;
    let mut c = kit_client(&server, dir.path(), "lab-c");
    status(&mut c)
        .await
        .expect("lab-c is served before revocation");

    let serials = provision::revoke(dir.path(), "lab-c").expect("revoke");
    assert_eq!(serials.len(), 1);
    // The running aggregator re-reads the list; new connections of lab-c are refused.
    let mut refused = false;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let mut fresh = kit_client(&server, dir.path(), "lab-c");
        if status(&mut fresh).await.is_err() {
            refused = true;
            break;
        }
    }
    assert!(refused, "lab-c still connects after revocation");
    // The connection opened before the revocation is refused call by call.
    let refused = assert_refused(
        "call on a connection opened before revocation",
        status(&mut c).await,
    );
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(refused.message().contains("revoked"), "{refused}");
    still_serves(&server, dir.path()).await;
    server.shutdown().await.unwrap();

    // A fresh aggregator loads the list at start.
    let server = serve(dir.path()).await;
    let mut fresh = kit_client(&server, dir.path(), "lab-c");
    assert_alert(
        "revoked certificate at start",
        join(&mut fresh, "lab-c").await,
        "CertificateRevoked",
        "revoked",
    );
    still_serves(&server, dir.path()).await;
    server.shutdown().await.unwrap();

    assert!(matches!(
        provision::revoke(dir.path(), "lab-c"),
        Err(ProvisionError::AlreadyRevoked(_))
    ));
    let err = provision::revoke(dir.path(), "lab-z").unwrap_err();
    assert!(matches!(err, ProvisionError::NotIssued { .. }), "{err}");
}

#[tokio::test]
async fn provision_writes_public_kits_and_the_lab_keeps_its_keys_0600() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("fed");
    let enrolled = provision_into(&out, "pilot");
    let made = &enrolled.provisioned;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = |p: PathBuf| std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(out.join("ca.key")), 0o600);
        assert_eq!(mode(out.join("server.key")), 0o600);
        assert_eq!(mode(out.join("ca.pem")), 0o644);
        assert_eq!(mode(out.clone()), 0o700);
        for name in LABS {
            let k = kit(&out, name);
            // The lab's keys, made by `enroll` at the lab.
            assert_eq!(mode(k.private_key.clone()), 0o600, "{name}");
            assert_eq!(mode(k.identity.clone()), 0o600, "{name}");
            assert_eq!(mode(k.certificate.clone()), 0o644, "{name}");
            assert_eq!(mode(out.join(provision::KITS_DIR).join(name)), 0o700);
        }
    }
    // A kit is the three public files, nothing else.
    for kit_dir in &made.kits {
        let mut files: Vec<String> = std::fs::read_dir(kit_dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        files.sort();
        assert_eq!(files, ["ca.pem", "client.pem", "participant.toml"]);
    }
    // The identity the lab made is the roster's, and the kit pins the plan written.
    let config = AggregatorConfig::load(&made.config).unwrap();
    assert_eq!(made.plan_sha256, config.plan.fingerprint());
    for (entry, lab_dir) in made.roster.iter().zip(&enrolled.labs) {
        let k = ParticipantKit::load(lab_dir).unwrap();
        assert_eq!(k.name, entry.name);
        assert_eq!(k.language, "lo");
        assert_eq!(k.aggregator, "localhost:50051");
        assert_eq!(k.server_name, "localhost");
        assert_eq!(
            k.policy.plan_sha256.as_deref(),
            Some(made.plan_sha256.as_str())
        );
        let seed = fedclient::identity::IdentitySeed::load(&k.identity).unwrap();
        assert_eq!(seed.public_key_hex(), entry.public_key);
        k.client_config().expect("an installed kit is valid");
        k.channel().expect("a channel can be made from the kit");
    }
    // The roster file and the configuration carry the same keys.
    assert_eq!(config.plan.roster, made.roster);
    assert_eq!(config.plan.federation, "pilot");
    assert_eq!(config.tls.files().unwrap().ca, out.join("ca.pem"));
    let roster_text = std::fs::read_to_string(out.join("roster.toml")).unwrap();
    for e in &made.roster {
        assert!(roster_text.contains(&e.public_key));
    }

    // A kit used where the lab's keys are not (unpacked elsewhere than the enrollment
    // directory) names the missing key and says where it comes from.
    let k = ParticipantKit::load(&made.kits[0]).unwrap();
    let err = k.client_config().unwrap_err();
    assert!(matches!(err, TlsError::MissingLabKey { .. }), "{err}");
    let shown = err.to_string();
    assert!(shown.contains("client.key"), "{shown}");
    assert!(shown.contains("fedclient enroll"), "{shown}");
}

#[tokio::test]
async fn plaintext_when_configured_so() {
    let dir = tempfile::tempdir().unwrap();
    let made = provision_into(dir.path(), "pilot");
    let mut config = AggregatorConfig::load(&made.provisioned.config).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.output_dir = dir.path().join("out");
    config.tls = TlsSection::plaintext();
    config.admin = None;
    let server = start(&config).await.unwrap();
    let channel = Channel::from_shared(server.url()).unwrap().connect_lazy();
    let mut c = FederationClient::new(channel);
    join(&mut c, "lab-a").await.expect("plaintext join");
    assert_eq!(status(&mut c).await.unwrap().participants_joined, 1);
    // A TLS client finds no TLS there.
    let mut t = kit_client(&server, dir.path(), "lab-b");
    assert_refused("TLS against plaintext", status(&mut t).await);
    server.shutdown().await.unwrap();
}

#[test]
fn provision_never_overwrites() {
    let dir = tempfile::tempdir().unwrap();
    let made = provision_into(dir.path(), "pilot");
    let requests: Vec<PathBuf> = made
        .labs
        .iter()
        .map(|l| l.join(mekong_proto::enroll::REQUEST_FILE))
        .collect();
    let options = |out: &Path| ProvisionOptions {
        out: out.to_path_buf(),
        federation: "pilot".into(),
        aggregator_address: "localhost:50051".into(),
        extra_sans: vec![],
        requests: requests.clone(),
        plan: None,
        validity_days: 30,
        ca_validity_days: 365,
        share_metrics: Vec::new(),
    };
    let before = std::fs::read(dir.path().join("ca.key")).unwrap();
    let err = provision::provision(&options(dir.path())).unwrap_err();
    assert!(matches!(err, ProvisionError::Exists { .. }), "{err}");
    assert!(err.to_string().contains("refusing to overwrite"), "{err}");
    assert_eq!(std::fs::read(dir.path().join("ca.key")).unwrap(), before);

    // One stray kit file is enough to refuse, and then nothing at all is written.
    let fresh = tempfile::tempdir().unwrap();
    let kit_dir = fresh.path().join(provision::KITS_DIR).join("lab-b");
    std::fs::create_dir_all(&kit_dir).unwrap();
    std::fs::write(kit_dir.join("client.pem"), "x").unwrap();
    let err = provision::provision(&options(fresh.path())).unwrap_err();
    assert!(err.to_string().contains("client.pem"), "{err}");
    assert!(!fresh.path().join("ca.key").exists());
    assert_eq!(
        std::fs::read_to_string(kit_dir.join("client.pem")).unwrap(),
        "x"
    );
}

#[test]
fn bad_material_gets_clear_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let scratch = tempfile::tempdir().unwrap();
    let good = kit(dir.path(), "lab-a");

    // Missing file.
    let mut k = good.clone();
    k.certificate = scratch.path().join("nope.pem");
    let err = k.client_config().unwrap_err();
    assert!(matches!(err, TlsError::Read { .. }), "{err}");
    assert!(err.to_string().contains("nope.pem"), "{err}");

    // Not PEM.
    let junk = scratch.path().join("junk.pem");
    std::fs::write(&junk, "hello").unwrap();
    let mut k = good.clone();
    k.ca = junk.clone();
    let err = k.client_config().unwrap_err();
    assert!(
        err.to_string()
            .starts_with(&format!("{}: not PEM", junk.display())),
        "{err}"
    );

    // Certificate and key swapped.
    let mut k = good.clone();
    k.private_key = good.certificate.clone();
    let err = k.client_config().unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a private key, found a certificate"),
        "{err}"
    );
    let mut k = good.clone();
    k.certificate = good.private_key.clone();
    let err = k.client_config().unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a certificate, found a private key"),
        "{err}"
    );

    // Another participant's key: the kit's certificate is not for it.
    let mut k = good.clone();
    k.private_key = kit(dir.path(), "lab-b").private_key;
    let err = k.client_config().unwrap_err();
    assert!(matches!(err, TlsError::KitKeyMismatch { .. }), "{err}");
    assert!(err.to_string().contains("fedclient enroll"), "{err}");

    // A certificate from another CA, an expired one, one naming someone else.
    let other = tempfile::tempdir().unwrap();
    provision_into(other.path(), "pilot");
    let mut k = good.clone();
    k.certificate = kit(other.path(), "lab-a").certificate;
    k.private_key = kit(other.path(), "lab-a").private_key;
    let err = k.client_config().unwrap_err();
    assert!(err.to_string().contains("not issued by this CA"), "{err}");

    let ca = FederationCa::load(dir.path()).unwrap();
    let (key, _) = lab_key(dir.path(), "lab-a");
    let now = time::OffsetDateTime::now_utc();
    let expired = ca
        .issue_participant_between(
            "lab-a",
            &key,
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    let mut k = good.clone();
    k.certificate = scratch.path().join("expired.pem");
    std::fs::write(&k.certificate, &expired.cert_pem).unwrap();
    let err = k.client_config().unwrap_err();
    assert!(err.to_string().contains("expired"), "{err}");

    let mut k = good.clone();
    k.name = "lab-b".into();
    let err = k.client_config().unwrap_err();
    assert!(
        err.to_string().contains("names participant \"lab-a\""),
        "{err}"
    );

    // The aggregator refuses to start with a server key that is not its certificate's.
    let mut config = AggregatorConfig::load(&dir.path().join("aggregator.toml")).unwrap();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.tls.private_key = Some(good.private_key.clone());
    let files = config.tls.files().unwrap();
    let err = tls::server_config(&files).unwrap_err();
    assert!(matches!(err, TlsError::KeyMismatch { .. }), "{err}");
    // ... or a CA that did not issue its certificate.
    let mut files = TlsSection::provisioned(dir.path()).files().unwrap();
    files.ca = other.path().join("ca.pem");
    let err = tls::server_config(&files).unwrap_err();
    assert!(err.to_string().contains("server.pem"), "{err}");
    assert!(err.to_string().contains("not issued by this CA"), "{err}");
    // ... or a revocation list that is not one.
    let mut files = TlsSection::provisioned(dir.path()).files().unwrap();
    files.crl = Some(dir.path().join("ca.pem"));
    let err = tls::server_config(&files).unwrap_err();
    assert!(
        err.to_string()
            .contains("expected a certificate revocation list, found a certificate"),
        "{err}"
    );
}

/// Idle connections cannot lock labs out (issue #26): before, 256 handshake places were
/// shared by everyone and an idle connection held one for 10 s, so ~26 idle connections a
/// second from anywhere kept every lab waiting. Now one address gets 64 places at most (the
/// rest of its connections are closed at once) and an idle connection is closed after 3 s
/// without a ClientHello. Here 300 idle connections from 127.0.0.2 (another host, as
/// loopback sees it) are held open while a lab connects from 127.0.0.1 and is served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_connections_from_one_host_do_not_lock_labs_out() {
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let server = serve(dir.path()).await;
    let mut idle = Vec::new();
    for _ in 0..300 {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        if let Ok(stream) = socket.connect(server.local_addr()).await {
            idle.push(stream);
        }
    }
    assert!(idle.len() >= 256, "{} idle connections opened", idle.len());
    // Before the fix this waited for an idle connection's 10 s handshake timeout.
    let mut lab = kit_client(&server, dir.path(), "lab-a");
    let joined = tokio::time::timeout(Duration::from_secs(8), join(&mut lab, "lab-a"))
        .await
        .expect("the lab is served while the idle connections are held");
    joined.expect("the lab joins");
    // The idle connections are all closed by the aggregator (the ones over the address's
    // share at once, the others after the first-flight timeout): each reads end of file.
    let mut open = 0;
    for stream in &mut idle {
        let mut byte = [0u8; 1];
        let read = tokio::io::AsyncReadExt::read(stream, &mut byte);
        match tokio::time::timeout(Duration::from_secs(8), read).await {
            Ok(read) => assert_eq!(
                read.unwrap_or(0),
                0,
                "nothing is sent to an idle connection"
            ),
            Err(_) => open += 1,
        }
    }
    assert_eq!(
        open,
        0,
        "of {} idle connections, {open} still open",
        idle.len()
    );
    still_serves(&server, dir.path()).await;
}

/// One certificate cannot hold connections without bound (issue #26): each open connection
/// holds TLS and HTTP/2 buffers, so a lab gets `MAX_CONNECTIONS_PER_PARTICIPANT` at once;
/// the next is closed right after its handshake, the other labs are served, and a place
/// comes back when one of the lab's connections closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_certificate_holds_a_bounded_number_of_connections() {
    let dir = tempfile::tempdir().unwrap();
    provision_into(dir.path(), "pilot");
    let server = serve(dir.path()).await;
    let mut held = Vec::new();
    for _ in 0..tls::MAX_CONNECTIONS_PER_PARTICIPANT {
        let mut lab = kit_client(&server, dir.path(), "lab-a");
        status(&mut lab).await.expect("within the cap, served");
        held.push(lab);
    }
    let mut over = kit_client(&server, dir.path(), "lab-a");
    status(&mut over)
        .await
        .expect_err("a connection over the cap is closed");
    still_serves(&server, dir.path()).await;
    drop(held.pop());
    // The aggregator sees the close and gives the place back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut again = kit_client(&server, dir.path(), "lab-a");
        match status(&mut again).await {
            Ok(_) => break,
            Err(e) if tokio::time::Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(e) => panic!("no place came back: {e}"),
        }
    }
}
