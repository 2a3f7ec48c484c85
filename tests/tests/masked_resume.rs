//! A lab's connection breaks in the middle of streaming its 1M-word masked update; it asks
//! the aggregator how much it holds (`MaskedReceived`) and sends only the rest. The round
//! then completes with all three labs: the folded prefix was kept, not taken back, and the
//! finished chunks did not cross the wire twice.

use std::net::SocketAddr;
use std::sync::Arc;

use burn::prelude::Device;
use fedclient::participant;
use mekong_e2e::capture::{Cut, cutting_proxy};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
    widen,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broken_masked_upload_resumes_without_resending_finished_chunks() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,fedaggregator=info,fedclient=info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let codes = ["lo", "km", "th"];
    let names: Vec<String> = codes.iter().map(|c| format!("lab-{c}")).collect();
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let mut plan = secure_test_plan(&roster, 1, 300_000, 60_000);
    // B: 12 layers × (5·512 + 2·1376) outputs × rank 16 ≈ 1.02M words, four 1 MiB chunks.
    widen(&mut plan, 12, 16);
    // The masked vector: B and the sample weight.
    let vector_bytes = 4 * (plan.initial_adapter().b_manifest().len() as u64 + 1);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let upstream: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    // lab-lo's first connection breaks once it has sent 2.5 MB: everything before its
    // masked update is a few kilobytes, so the break falls inside the update's third chunk.
    let cut_after = 2_500_000;
    let (proxy, carried) = cutting_proxy(upstream, Cut::Upstream(cut_after)).await;
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for (i, code) in codes.iter().enumerate() {
        let url = if i == 0 { proxy.clone() } else { server.url() };
        let mut options = participant_options(&url, &names[i], code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    for lab in labs {
        let report = lab.await.unwrap().unwrap();
        assert_eq!(report.rounds.len(), 1, "{}", report.name);
    }
    server.finished().await;
    let record = server.status().history[0].clone();
    assert_eq!(record.contributors, vec!["lab-km", "lab-lo", "lab-th"]);
    assert!(record.dropped.is_empty(), "{record:?}");

    // The first connection carried at most `cut_after` bytes, and the update is longer than
    // that, so it was broken mid-upload and finished over a new connection...
    let up = carried.up();
    assert!(vector_bytes > cut_after && up > cut_after, "{up}");
    // ...sending again at most the chunk that was in flight at the break: a restart from
    // zero would have sent the whole update after the 2.5 MB.
    assert!(
        up < vector_bytes + 1024 * 1024 + 256 * 1024,
        "{up} bytes sent for a {vector_bytes}-byte masked update"
    );
    assert!(up < cut_after + vector_bytes, "{up}");
}
