//! A lab with a valid certificate that attacks the center (issue #26), against a real
//! aggregator over mutual TLS on loopback: it joins and leaves and asks for the global
//! adapter anyway, streams updates under made-up ids, joins with a megabyte label, then
//! parks calls to run the center out of memory, speaking raw HTTP/2 (tonic's client cannot
//! send half a message) over its own certificate: many connections, each with every stream
//! the aggregator allows, each announcing a large update and sending part of it. The aggregator holds at most the per-caller budget of
//! unfinished messages (measured here in the process's resident memory, and printed),
//! refuses the rest at their header, cuts the parked ones when their time is up, and the
//! honest labs' round ends with the same global adapter as without the attacker.
//!
//! Its own test binary: the memory figures are the process's, so nothing else runs in it.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use fedaggregator::config::TlsSection;
use fedclient::identity::IdentitySeed;
use fedclient::participant::{self, ParticipantOptions, Quiet};
use mekong_e2e::{aggregator_config, corpus, enroll_and_provision, loopback_provision, test_plan};
use mekong_proto::tls::ParticipantKit;

const MIB: usize = 1024 * 1024;
/// Connections the attacker opens, each with every stream the aggregator allows.
const CONNECTIONS: usize = 4;
/// What each parked call announces and what it sends of it.
const ANNOUNCED: usize = 4 * MIB;
const SENT: usize = MIB;

/// The process's resident memory now, in bytes (Linux).
fn resident_bytes() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: usize = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap();
    kb * 1024
}

/// An HTTP/2 connection to the aggregator over mutual TLS with `kit`'s certificate.
async fn connect(kit: &ParticipantKit, address: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let config = kit.client_config().unwrap();
    let tcp = tokio::net::TcpStream::connect(address).await.unwrap();
    let name =
        tokio_rustls::rustls::pki_types::ServerName::try_from(kit.server_name.clone()).unwrap();
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(name, tcp)
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(connection);
    client
}

/// A message's length prefix announcing `announced` bytes, followed by `sent` of them:
/// made once and shared by every call that sends it (cloning `Bytes` copies nothing), so
/// the attacker's own side adds little to the process's memory.
fn framed(announced: usize, sent: usize) -> Bytes {
    let mut data = vec![0u8; 5 + sent];
    data[1..5].copy_from_slice(&(announced as u32).to_be_bytes());
    Bytes::from(data)
}

/// Opens a call of `method`, sends `frame` on it and keeps the stream open.
async fn park(
    client: &mut h2::client::SendRequest<Bytes>,
    address: SocketAddr,
    method: &str,
    frame: &Bytes,
) -> (h2::client::ResponseFuture, h2::SendStream<Bytes>) {
    *client = client.clone().ready().await.unwrap();
    let request = http::Request::builder()
        .method("POST")
        .uri(format!("http://{address}/mekong.v1.Federation/{method}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(frame.clone(), false).unwrap();
    (response, send)
}

/// The gRPC status a call ended with: from the headers of a trailers-only answer, else
/// from the trailers.
async fn grpc_status(response: h2::client::ResponseFuture) -> (tonic::Code, String) {
    let response = response.await.unwrap();
    let read = |headers: &http::HeaderMap| {
        let code = headers
            .get("grpc-status")?
            .to_str()
            .ok()?
            .parse::<i32>()
            .ok()?;
        let message = headers
            .get("grpc-message")
            .map(|m| percent_decode(m.to_str().unwrap_or("")))
            .unwrap_or_default();
        Some((tonic::Code::from(code), message))
    };
    if let Some(status) = read(response.headers()) {
        return status;
    }
    let mut body = response.into_body();
    while let Some(data) = body.data().await {
        let _ = data;
    }
    let trailers = body.trailers().await.unwrap().unwrap_or_default();
    read(&trailers).expect("a gRPC status in the trailers")
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(v) = text
                .get(i + 1..i + 3)
                .and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            out.push(v);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn lab_options(kit_dir: &Path, address: SocketAddr) -> ParticipantOptions {
    let mut kit = ParticipantKit::load(kit_dir).unwrap();
    kit.aggregator = address.to_string();
    let identity = IdentitySeed::load(&kit.identity).unwrap();
    ParticipantOptions {
        kit: Some(Arc::new(kit.clone())),
        identity: Some(Arc::new(identity)),
        connect_patience: Duration::from_secs(30),
        trust_aggregator_plan: true,
        ..ParticipantOptions::new("", &kit.name, &kit.language)
    }
}

/// Runs one plaintext round of three honest labs over mutual TLS; with `attack`, the
/// fourth certificate parks calls first and while they train. Returns the round's global
/// adapter hash.
async fn round(dir: &Path, attack: bool) -> String {
    let names = [
        ("lab-lo", "lo"),
        ("lab-km", "km"),
        ("lab-th", "th"),
        ("lab-x", "lo"),
    ];
    let enrolled = enroll_and_provision(
        &dir.join("labs"),
        &names,
        loopback_provision(&dir.join("fed"), "e2e"),
    );
    let mut plan = test_plan(3, 1, 3, 120_000);
    plan.roster = enrolled.provisioned.roster.clone();
    let mut config = aggregator_config(plan, &dir.join("out"));
    config.tls = TlsSection::provisioned(&dir.join("fed"));
    config.limits.request_body_timeout_ms = 4_000;
    let limits = config.limits.clone();
    let server = fedaggregator::start(&config).await.unwrap();
    let address = server.local_addr();

    if attack {
        let mut attacker = ParticipantKit::load(&enrolled.labs[3]).unwrap();
        attacker.aggregator = address.to_string();
        let parked_frame = framed(ANNOUNCED, SENT);
        let oversized_frame = framed(200 * MIB, 16);
        let control_frame = framed(MIB, 16);
        let before = resident_bytes();
        the_other_attacks(&attacker, &server).await;
        let after_others = resident_bytes();
        let mut calls = Vec::new();
        for _ in 0..CONNECTIONS {
            let mut client = connect(&attacker, address).await;
            for _ in 0..limits.streams_per_connection {
                calls.push(park(&mut client, address, "SubmitUpdate", &parked_frame).await);
            }
        }
        let oversized = park(
            &mut connect(&attacker, address).await,
            address,
            "SubmitUpdate",
            &oversized_frame,
        )
        .await;
        let control = park(
            &mut connect(&attacker, address).await,
            address,
            "Join",
            &control_frame,
        )
        .await;
        // What the parked calls sent has arrived (loopback); the peak of what is held.
        let mut peak = resident_bytes();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            peak = peak.max(resident_bytes());
        }
        let grown = peak.saturating_sub(before);
        let parked = calls.len() * SENT;
        println!(
            "after joining and leaving, downloading, 20 update streams under made-up ids and \
             a megabyte language label, {} calls parked with {} MiB sent in all: resident \
             memory {:.1} MiB before, {:.1} MiB after the calls that are not parked, \
             {:.1} MiB at the peak, +{:.1} MiB (bound: {} MiB of unfinished messages per \
             caller)",
            calls.len(),
            parked / MIB,
            before as f64 / MIB as f64,
            after_others as f64 / MIB as f64,
            peak as f64 / MIB as f64,
            grown as f64 / MIB as f64,
            limits.unfinished_bytes_per_caller / MIB
        );
        assert!(
            grown < limits.unfinished_bytes_per_caller + 24 * MIB,
            "the aggregator grew by {grown} bytes while {parked} were parked"
        );

        // The honest labs train while the parked calls are still open.
        let honest = tokio::spawn(run_labs(enrolled.labs[..3].to_vec(), address));
        let (code, message) = grpc_status(oversized.0).await;
        assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        assert!(message.contains("limits.update_message_bytes"), "{message}");
        let (code, message) = grpc_status(control.0).await;
        assert_eq!(code, tonic::Code::ResourceExhausted, "{message}");
        assert!(
            message.contains("limits.control_message_bytes"),
            "{message}"
        );
        let mut cut = 0;
        let mut over_budget = 0;
        for (response, _send) in calls {
            let (code, message) = grpc_status(response).await;
            match code {
                tonic::Code::DeadlineExceeded => {
                    assert!(
                        message.contains("limits.request_body_timeout_ms"),
                        "{message}"
                    );
                    cut += 1;
                }
                tonic::Code::ResourceExhausted => {
                    assert!(
                        message.contains("limits.unfinished_bytes_per_caller"),
                        "{message}"
                    );
                    over_budget += 1;
                }
                other => panic!("{other:?}: {message}"),
            }
        }
        assert_eq!(
            cut,
            limits.unfinished_bytes_per_caller / ANNOUNCED,
            "as many calls parked as the budget holds, cut when their time was up"
        );
        assert_eq!(
            cut + over_budget,
            CONNECTIONS * limits.streams_per_connection as usize
        );
        honest.await.unwrap();
    } else {
        run_labs(enrolled.labs[..3].to_vec(), address).await;
    }
    server.finished().await;
    let record = &server.status().history[0];
    let mut contributors = record.contributors.clone();
    contributors.sort();
    assert_eq!(contributors, ["lab-km", "lab-lo", "lab-th"]);
    record.adapter_hash.clone()
}

/// The attacker's calls that are not parked, each refused by name: it joins and leaves,
/// then asks for the global adapter; it streams updates under ids no join handed out and
/// breaks each stream; it joins with a megabyte language label.
async fn the_other_attacks(kit: &ParticipantKit, server: &fedaggregator::RunningServer) {
    use mekong_proto::v1::{self as pb, federation_client::FederationClient};
    use tokio_stream::wrappers::ReceiverStream;
    let mut client = FederationClient::new(kit.channel().unwrap());
    let join = |language: String| pb::JoinRequest {
        participant_name: kit.name.clone(),
        language,
        client_version: "attacker".into(),
    };
    let id = client
        .join(join("lo".into()))
        .await
        .unwrap()
        .into_inner()
        .participant_id;
    client
        .leave(pb::LeaveRequest {
            participant_id: id.clone(),
            reason: pb::LeaveReason::OperatorRequest as i32,
        })
        .await
        .unwrap();
    let refused = client
        .download_adapter(pb::DownloadAdapterRequest {
            participant_id: id,
            content_hash: server.status().global_hash,
            offset: 0,
        })
        .await
        .map(|_| ())
        .expect_err("a lab that left is served nothing");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");

    for i in 0..20 {
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(mekong_e2e::first_update_chunk(
            &format!("{i:032x}"),
            vec![0u8; 64 * 1024],
        ))
        .await
        .unwrap();
        let call = client.submit_update_stream(ReceiverStream::new(rx));
        let refused = tokio::time::timeout(Duration::from_secs(10), call)
            .await
            .expect("refused at the first chunk")
            .expect_err("an id no join handed out is refused");
        assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused}");
        drop(tx);
    }

    let refused = client
        .join(join("a".repeat(MIB)))
        .await
        .expect_err("a megabyte label is refused");
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted, "{refused}");
}

async fn run_labs(labs: Vec<std::path::PathBuf>, address: SocketAddr) {
    let runs: Vec<_> = labs
        .iter()
        .map(|dir| {
            let options = lab_options(dir, address);
            let language = options.language.clone();
            tokio::spawn(participant::run(
                options,
                corpus(&language),
                burn::tensor::Device::flex(),
                Arc::new(Quiet),
            ))
        })
        .collect();
    for run in runs {
        run.await.unwrap().unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parked_calls_hold_at_most_the_callers_budget_and_the_round_is_unchanged() {
    let attacked = tempfile::tempdir().unwrap();
    let clean = tempfile::tempdir().unwrap();
    let with_attacker = round(attacked.path(), true).await;
    let without = round(clean.path(), false).await;
    assert_eq!(
        with_attacker, without,
        "the honest labs' global adapter is the one they make without the attacker"
    );
}
