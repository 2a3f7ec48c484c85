//! A global adapter too large to go inline is downloaded by reference in checksummed chunks;
//! when the connection breaks in the middle, the download resumes at the first byte it
//! lacks: nothing already received crosses the wire again.

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::Duration;

use fedclient::download::{DownloadOptions, Fetched, fetch_adapter};
use fedclient::participant::transient;
use mekong_e2e::capture::{Cut, cutting_proxy};
use mekong_e2e::{aggregator_config, test_plan, train_task, widen};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_download_resumes_where_it_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = test_plan(1, 1, 1, 60_000);
    // About 1.9M values (A and B): 7.5 MB, thirty 256 KiB chunks.
    widen(&mut plan, 24, 8);
    let template = plan.initial_model();
    let total = 4 * template.manifest().len() as u64;
    let mut config = aggregator_config(plan, dir.path());
    config.server.inline_adapter_max_bytes = 1024 * 1024;
    let server = fedaggregator::start(&config).await.unwrap();
    let upstream: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    // The first connection breaks after about 3.5 chunks of the download have gone through.
    let cut_after = 3 * 1024 * 1024 + 512 * 1024;
    let (url, carried) = cutting_proxy(upstream, Cut::Downstream(cut_after)).await;
    let mut client = FederationClient::connect(url).await.unwrap();
    let id = client
        .join(pb::JoinRequest {
            participant_name: "lab-lo".into(),
            language: "lo".into(),
            client_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .participant_id;
    let task = train_task(&mut client, &id).await;
    let payload = task.global_adapter.unwrap();
    assert!(payload.values_f32_le.is_empty(), "sent by reference");
    assert_eq!(payload.values_bytes, total);

    let seen = Mutex::new(Vec::new());
    let progress = |received: u64, of: u64| {
        assert_eq!(of, total);
        seen.lock().unwrap().push(received);
    };
    let options = DownloadOptions {
        patience: Duration::from_secs(20),
        transient: &transient,
        progress: &progress,
    };
    let fetched = fetch_adapter(&client, &id, Some(&payload), &template, &options)
        .await
        .unwrap();
    let Fetched::Adapter(adapter) = fetched else {
        panic!("the global adapter did not change");
    };
    // Checked against the announced content hash inside; and it is the aggregator's.
    assert_eq!(adapter.content_hash(), payload.content_hash);
    assert_eq!(adapter.content_hash(), server.status().global_hash);

    let seen = seen.into_inner().unwrap();
    assert_eq!(seen.last(), Some(&total));
    assert!(
        seen.windows(2).all(|w| w[0] < w[1]),
        "progress went back (a chunk was fetched twice): {seen:?}"
    );
    // The first connection carried at most `cut_after` bytes, so the rest came over a new
    // one: the download was broken and resumed...
    let carried = carried.down();
    assert!(total > cut_after && carried > cut_after, "{carried}");
    // ...and what crossed the wire is the adapter once, plus at most the one chunk that was
    // in flight at the cut and the protocol's own bytes.
    assert!(
        carried < total + 1024 * 1024 + 64 * 1024,
        "{carried} bytes carried for a {total}-byte adapter"
    );

    // A download of anything but the current global adapter is refused by name.
    let mut c = client.clone();
    let status = c
        .download_adapter(pb::DownloadAdapterRequest {
            participant_id: id.clone(),
            content_hash: "00".repeat(32),
            offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::FailedPrecondition);
    assert!(
        status.message().contains("not the current global adapter"),
        "{status}"
    );
    let status = c
        .download_adapter(pb::DownloadAdapterRequest {
            participant_id: id,
            content_hash: payload.content_hash.clone(),
            offset: 6,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("offset 6"), "{status}");
    server.shutdown().await.unwrap();
}
