//! A caller that attacks the center (issue #26), against a real aggregator and real labs
//! over gRPC on loopback: whatever it does, the honest labs' round completes as it would
//! without it, and the attacker gets a refusal that names what was wrong.

use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use fedclient::participant;
use mekong_e2e::{
    aggregator_config, corpus, first_update_chunk, join_as, participant_options, secure_test_plan,
    test_identity, test_plan,
};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Silent `SubmitMasked` streams opened by a caller as soon as the round opens. Before the
/// fix each took one of the aggregator's eight reading slots for 30 s before saying who it
/// was, so forty of them kept every honest lab's masked input waiting past the 10 s stage
/// deadline and the attempt failed. Now a stream takes a slot only once its first chunk
/// has named a member, so the honest labs' first attempt succeeds with all three, and its
/// global adapter is the one the same labs make without the attacker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_masked_streams_take_no_slot_from_honest_labs() {
    let attacked = secure_round(40).await;
    let clean = secure_round(0).await;
    assert_eq!(
        attacked, clean,
        "the honest labs' global adapter is the one they make without the attacker"
    );
}

/// One secure round of three labs while a caller holds `silent` masked streams open from
/// the moment the round opens; the round's global adapter hash.
async fn secure_round(silent: usize) -> String {
    let dir = tempfile::tempdir().unwrap();
    let names = ["lab-lo", "lab-km", "lab-th"];
    let identities: Vec<_> = (0..names.len() as u8).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().copied().zip(&identities).collect();
    let plan = secure_test_plan(&roster, 1, 120_000, 10_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();

    let mut labs = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let code = &name[4..];
        let mut options = participant_options(&server.url(), name, code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            Arc::new(participant::Quiet),
        )));
    }
    while server.status().round < 1 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // The round is open: streams that never send a chunk, held open.
    let mut streams = Vec::new();
    for _ in 0..silent {
        let mut client = FederationClient::connect(server.url()).await.unwrap();
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::MaskedChunk>(1);
        let call = tokio::spawn(async move { client.submit_masked(ReceiverStream::new(rx)).await });
        streams.push((tx, call));
    }
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;
    let round = &server.status().history[0];
    let mut contributors = round.contributors.clone();
    contributors.sort();
    assert_eq!(contributors, ["lab-km", "lab-lo", "lab-th"]);
    assert!(round.dropped.is_empty(), "{:?}", round.dropped);
    assert_eq!(
        round.secure.as_ref().map(|s| s.attempt),
        Some(0),
        "the first attempt succeeded"
    );
    // The silent streams are answered once they give up waiting, none of them accepted.
    for (tx, call) in streams {
        drop(tx);
        let refused = call
            .await
            .unwrap()
            .expect_err("a silent stream is not accepted");
        assert!(
            matches!(
                refused.code(),
                Code::InvalidArgument | Code::DeadlineExceeded
            ),
            "{refused}"
        );
    }
    round.adapter_hash.clone()
}

/// A plaintext aggregator on loopback waiting for three labs, its files in `dir`.
async fn waiting_aggregator(dir: &std::path::Path) -> fedaggregator::RunningServer {
    fedaggregator::start(&aggregator_config(test_plan(3, 1, 3, 60_000), dir))
        .await
        .unwrap()
}

/// Update streams under ids no join handed out are refused at their first chunk, before
/// anything is buffered (before the fix each was buffered and, once broken, held until the
/// round changed); a language label of a megabyte is refused at join with a message that
/// shows it cut.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strangers_ids_and_huge_labels_are_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let server = waiting_aggregator(dir.path()).await;
    let mut client = FederationClient::connect(server.url()).await.unwrap();

    for i in 0..20 {
        let id = format!("{i:032x}");
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.send(first_update_chunk(&id, vec![0u8; 1024]))
            .await
            .unwrap();
        // The sender stays open: before the fix, the aggregator buffered the chunk and
        // waited for the next; now it answers at once.
        let refused = tokio::time::timeout(
            Duration::from_secs(10),
            client.submit_update_stream(ReceiverStream::new(rx)),
        )
        .await
        .expect("refused without waiting for more chunks")
        .expect_err("an unknown id is refused");
        assert_eq!(refused.code(), Code::Unauthenticated, "{refused}");
        assert!(
            refused.message().contains("unknown participant id"),
            "{refused}"
        );
        drop(tx);
    }

    // A megabyte label does not fit a Join message: refused at its length prefix, before
    // it is read. One that fits is refused by Join, with the label shown cut.
    let join = |language: String| pb::JoinRequest {
        participant_name: "lab-x".into(),
        language,
        client_version: "test".into(),
    };
    let refused = client
        .join(join("a".repeat(1 << 20)))
        .await
        .expect_err("a megabyte language label is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("limits.control_message_bytes"),
        "{refused}"
    );
    let refused = client
        .join(join("a".repeat(40_000)))
        .await
        .expect_err("a 40 kB language label is refused");
    assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
    assert!(
        refused.message().contains("language must be") && refused.message().len() < 400,
        "{}",
        &refused.message()[..refused.message().len().min(400)]
    );
    // The client's version string goes into the log: short and printable, or refused.
    for version in ["1.0\u{1b}[2J".to_string(), "v".repeat(65)] {
        let refused = client
            .join(pb::JoinRequest {
                participant_name: "lab-x".into(),
                language: "lo".into(),
                client_version: version,
            })
            .await
            .expect_err("a bad client_version is refused");
        assert_eq!(refused.code(), Code::InvalidArgument, "{refused}");
        assert!(refused.message().contains("client_version"), "{refused}");
    }
    assert_eq!(server.status().participants_joined, 0);
}

/// A lab has one plaintext update stream in flight at a time: a second, opened while the
/// first waits for its next chunk, is refused before it buffers anything (before, each
/// buffered up to the update's size).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_update_stream_of_a_lab_is_refused_while_the_first_is_open() {
    let dir = tempfile::tempdir().unwrap();
    let server = waiting_aggregator(dir.path()).await;
    let mut client = FederationClient::connect(server.url()).await.unwrap();
    let id = join_as(&mut client, "lab-twice", "lo").await;
    let open = |client: &FederationClient<tonic::transport::Channel>| {
        let mut client = client.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        tx.try_send(first_update_chunk(&id, vec![0u8; 1024]))
            .unwrap();
        let call =
            tokio::spawn(async move { client.submit_update_stream(ReceiverStream::new(rx)).await });
        (tx, call)
    };
    let (first_tx, first) = open(&client);
    // The first stream's chunk has been taken once the aggregator holds its bytes' claim;
    // give it a moment, then open the second.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (second_tx, second) = open(&client);
    let refused = tokio::time::timeout(Duration::from_secs(10), second)
        .await
        .expect("refused without waiting")
        .unwrap()
        .expect_err("a second stream is refused");
    assert_eq!(refused.code(), Code::ResourceExhausted, "{refused}");
    assert!(
        refused.message().contains("another update stream"),
        "{refused}"
    );
    assert!(!first.is_finished(), "the first stream is still open");
    drop((first_tx, second_tx));
    let ended = first
        .await
        .unwrap()
        .expect_err("the first stream never completed");
    assert_eq!(ended.code(), Code::InvalidArgument, "{ended}");
}

/// A lab that left the federation is served nothing more of this run: not the later global
/// adapters (before, `DownloadAdapter` served it every one) and not metrics reports.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lab_that_left_is_served_no_later_global_adapter() {
    let dir = tempfile::tempdir().unwrap();
    let server = waiting_aggregator(dir.path()).await;
    let mut client = FederationClient::connect(server.url()).await.unwrap();
    let id = join_as(&mut client, "lab-gone", "lo").await;
    let hash = server.status().global_hash;
    let download = |client: &mut FederationClient<tonic::transport::Channel>| {
        let request = pb::DownloadAdapterRequest {
            participant_id: id.clone(),
            content_hash: hash.clone(),
            offset: 0,
        };
        let mut client = client.clone();
        async move { client.download_adapter(request).await.map(|_| ()) }
    };
    download(&mut client)
        .await
        .expect("a member is served the global adapter");
    client
        .leave(pb::LeaveRequest {
            participant_id: id.clone(),
            reason: pb::LeaveReason::OperatorRequest as i32,
        })
        .await
        .unwrap();
    let refused = download(&mut client)
        .await
        .expect_err("a departed lab is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
    assert!(refused.message().contains("lab-gone"), "{refused}");
    let refused = client
        .report_metrics(pb::ReportMetricsRequest {
            participant_id: id.clone(),
            round: 1,
            heldout_loss_before: 2.0,
            heldout_loss_after: 1.0,
            heldout_tokens: 10,
            round_timing: None,
        })
        .await
        .expect_err("a departed lab's report is refused");
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused}");
}

/// One connection cannot park calls without bound: the aggregator tells every HTTP/2 client
/// it takes at most `limits.streams_per_connection` streams at once (hyper's default is no
/// limit); a compliant client then queues the rest itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_gets_a_bounded_number_of_streams() {
    let dir = tempfile::tempdir().unwrap();
    let server = waiting_aggregator(dir.path()).await;
    let tcp = tokio::net::TcpStream::connect(server.local_addr())
        .await
        .unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    // The server's SETTINGS arrive with its first frames; one request makes sure of them.
    let request = http::Request::builder()
        .method("POST")
        .uri(format!(
            "http://{}/mekong.v1.Federation/RoundStatus",
            server.local_addr()
        ))
        .header("content-type", "application/grpc")
        .header("te", "trailers")
        .body(())
        .unwrap();
    let (response, mut send) = client.send_request(request, false).unwrap();
    send.send_data(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]), true)
        .unwrap();
    response.await.unwrap();
    let client = client.ready().await.unwrap();
    assert_eq!(
        client.current_max_send_streams(),
        fedaggregator::limits::LimitsSection::default().streams_per_connection as usize
    );
}
