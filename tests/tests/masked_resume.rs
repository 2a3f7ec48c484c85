//! A lab's connection breaks in the middle of streaming its 1M-word masked update; it asks
//! the aggregator how much it holds (`MaskedReceived`) and sends only the rest. The round
//! then completes with all three labs: the folded prefix was kept, not taken back, and the
//! finished chunks did not cross the wire twice.

use std::net::SocketAddr;
use std::sync::Arc;

use burn::prelude::Device;
use fedclient::participant;
use mekong_e2e::capture::{Cut, cutting_proxy};
use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
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

/// A masked vector whose chunks each pass their own SHA-256 but whose whole-vector SHA-256
/// does not match is refused as a whole: the aggregator takes every folded word back out of
/// the sum (`MaskedReceived` then says 0), and the lab's honest resend makes the round's
/// sum exactly the three labs' weighted mean again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vector_whose_whole_hash_differs_is_taken_back_and_sent_again() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let names = ["lab-lo", "lab-km", "lab-th"];
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().copied().zip(&identities).collect();
    let plan = secure_test_plan(&roster, 1, 120_000, 30_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let len = plan.initial_adapter().b_manifest().len();
    let deltas = [0.01f32, -0.02, 0.04];
    let samples = [100u64, 200, 300];
    let mut labs = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let lab = WireLab::join(&server.url(), plan.clone(), name, *identities[i].bytes()).await;
        let behaviour = if i == 1 {
            WireBehaviour::WrongVectorHashOnce
        } else {
            WireBehaviour::Honest
        };
        labs.push(tokio::spawn(lab.run(
            vec![deltas[i]; len],
            samples[i],
            behaviour,
        )));
    }
    for lab in labs {
        lab.await.unwrap();
    }
    server.finished().await;
    let record = server.status().history[0].clone();
    assert_eq!(record.contributors, vec!["lab-km", "lab-lo", "lab-th"]);
    let bound = record.secure.as_ref().unwrap().error_bound;
    let template = plan.initial_adapter();
    let layout = template.b_manifest();
    let start = template.flatten(&layout).unwrap();
    let written = fedcore::peft::read_dir(&server.store().round_dir(1)).unwrap();
    let got = written.flatten(&layout).unwrap();
    let mean: f64 = deltas
        .iter()
        .zip(samples)
        .map(|(d, n)| *d as f64 * n as f64)
        .sum::<f64>()
        / samples.iter().sum::<u64>() as f64;
    for (k, (g, s)) in got.iter().zip(&start).enumerate() {
        let expected = *s as f64 + mean;
        assert!(
            (*g as f64 - expected).abs() <= bound + 1e-6,
            "value {k}: {g} vs {expected} (bound {bound}): the refused vector left a trace"
        );
    }
    server.shutdown().await.unwrap();
}
