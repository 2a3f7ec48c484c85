//! A plaintext update (secure aggregation explicitly off) larger than one message's worth
//! goes through `SubmitUpdateStream` in checksummed chunks, and the round's global adapter
//! is still the exact weighted mean of the labs' updates. One lab's connection breaks in the
//! middle of its update: it asks how much the aggregator holds (`UpdateReceived`) and sends
//! only the rest.

use std::net::SocketAddr;
use std::sync::Arc;

use burn::prelude::Device;
use fedaggregator::admin::client::get;
use fedaggregator::config::AdminSection;
use fedclient::participant;
use mekong_e2e::capture::{Cut, cutting_proxy};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, test_plan, weighted_mean, widen,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_plaintext_update_streams_in_chunks_and_aggregates_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let mut plan = test_plan(2, 1, 2, 120_000);
    // B: 12 layers × (5·512 + 2·1376) outputs × rank 32 ≈ 2M values, 8 MB: past the 4 MiB
    // sent as one message.
    widen(&mut plan, 12, 32);
    let b_len = plan.initial_adapter().b_manifest().len();
    assert!(4 * b_len > 4 * 1024 * 1024, "{b_len}");
    let mut config = aggregator_config(plan, dir.path());
    config.admin = Some(AdminSection::loopback(0));
    let server = fedaggregator::start(&config).await.unwrap();
    // lab-lo's first connection breaks once it has sent 5 MB: everything before its update
    // is a few kilobytes, so the break falls inside the update's fifth chunk.
    let upstream: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    let cut_after = 5_000_000;
    let (proxy, carried) = cutting_proxy(upstream, Cut::Upstream(cut_after)).await;
    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for code in ["lo", "km"] {
        let url = if code == "lo" {
            proxy.clone()
        } else {
            server.url()
        };
        labs.push(tokio::spawn(participant::run(
            participant_options(&url, &format!("lab-{code}"), code),
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;
    let record = server.status().history[0].clone();
    assert_eq!(record.contributors, vec!["lab-km", "lab-lo"]);
    // Both updates came through the stream, none as one message.
    let admin = format!("http://{}", server.admin_addr().unwrap());
    let (_, metrics) = get(&admin, "/metrics").await.unwrap();
    let calls = |rpc: &str| {
        metrics
            .lines()
            .find(|l| {
                l.starts_with("mekong_rpc_calls_total") && l.contains(&format!("rpc=\"{rpc}\""))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map_or(0.0, |v| v.parse::<f64>().unwrap())
    };
    // lab-km's stream, lab-lo's broken one and its resumption.
    assert_eq!(calls("SubmitUpdateStream"), 3.0, "{metrics}");
    assert_eq!(calls("UpdateReceived"), 1.0, "{metrics}");
    assert_eq!(calls("SubmitUpdate"), 0.0, "{metrics}");
    // The first connection carried at most `cut_after` bytes of an 8 MB update, so it broke
    // mid-upload; lab-lo then sent again at most the chunk in flight at the break: a restart
    // from zero would have sent the whole update after the 5 MB.
    let update_bytes = 4 * b_len as u64;
    let up = carried.up();
    assert!(update_bytes > cut_after && up > cut_after, "{up}");
    assert!(
        up < update_bytes + 1024 * 1024 + 256 * 1024,
        "{up} bytes sent for a {update_bytes}-byte update"
    );

    // FFA-LoRA from B = 0: the new B is the weighted mean of the two uploads.
    let expected = weighted_mean(&recorder.round(1));
    let adapter = fedcore::peft::read_dir(&dir.path().join("final")).unwrap();
    let b = adapter.flatten(&adapter.b_manifest()).unwrap();
    assert_eq!(b.len(), b_len);
    let worst = b
        .iter()
        .zip(&expected)
        .map(|(got, want)| (got - want).abs())
        .fold(0.0f32, f32::max);
    assert!(worst <= 1e-6, "largest difference {worst}");
    assert!(expected.iter().any(|v| *v != 0.0), "the labs trained");
}
