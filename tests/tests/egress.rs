//! Sovereignty on the wire: every byte a participant sends to the aggregator is captured
//! (a recording proxy between them) and searched for the lab's training text, its update
//! and its training losses.
//!
//! The federation runs without TLS so that the capture is exactly what TLS would encrypt:
//! HTTP/2 frames whose DATA payloads are reassembled per stream before searching. Under
//! secure aggregation (the default) none of the three may appear. The same search over a
//! plaintext federation (secure aggregation explicitly off) must find the update and the
//! losses, which shows the capture and the search would see them if they were sent; the
//! text must stay absent there too, since it never leaves in either mode.

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use burn::prelude::Device;
use fedclient::participant::{self, ParticipantObserver};
use fedclient::train::TrainStats;
use fedcore::FederationPlan;
use mekong_e2e::capture::{Captured, find_any, http2_payloads, recording_proxy, windows};
use mekong_e2e::test_plan;
use mekong_e2e::{aggregator_config, corpus, participant_options, secure_test_plan, test_identity};

const CODES: [&str; 3] = ["lo", "km", "th"];

/// What one lab computed and must not have sent.
#[derive(Default)]
struct Secrets {
    updates: Vec<Vec<f32>>,
    losses: Vec<f64>,
}

/// Records each lab's updates and losses as the participant runtime hands them over.
#[derive(Default)]
struct Watch(Mutex<BTreeMap<String, Secrets>>);

impl ParticipantObserver for Watch {
    fn round_trained(&self, name: &str, _round: u64, s: &TrainStats, upload: &[f32], _n: u64) {
        let mut all = self.0.lock().unwrap();
        let lab = all.entry(name.to_string()).or_default();
        lab.updates.push(upload.to_vec());
        lab.losses.extend([s.first_loss, s.last_loss, s.mean_loss]);
    }
}

/// Where in one lab's capture a secret was found.
#[derive(Debug, Default)]
struct Findings {
    text: Option<String>,
    update: Option<String>,
    loss: Option<String>,
    bytes: usize,
}

/// Runs a 2-round federation of three labs, each talking to the aggregator through its own
/// recording proxy, and searches each lab's capture for its own secrets.
async fn federate_and_search(plan: FederationPlan) -> BTreeMap<String, Findings> {
    let dir = tempfile::tempdir().unwrap();
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let upstream: SocketAddr = server.url().trim_start_matches("http://").parse().unwrap();
    let watch = Arc::new(Watch::default());
    let mut labs = Vec::new();
    let mut captures: Vec<(String, &str, Captured)> = Vec::new();
    for (i, code) in CODES.iter().enumerate() {
        let name = format!("lab-{code}");
        let (url, captured) = recording_proxy(upstream).await;
        let mut options = participant_options(&url, &name, code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            watch.clone(),
        )));
        captures.push((name, code, captured));
    }
    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;

    let secrets = watch.0.lock().unwrap();
    let mut findings = BTreeMap::new();
    for (name, code, captured) in captures {
        let lab = &secrets[&name];
        assert_eq!(lab.updates.len(), plan.rounds.rounds as usize, "{name}");
        let (_, text) = mekong_examples::corpus::udhr(code).unwrap();
        // The text as UTF-8 (16 bytes: 5 or more characters of any script here), and as the
        // byte tokenizer's token ids in u32 little-endian (4 tokens).
        let text_needles = windows(text.as_bytes(), 16);
        let tokens: Vec<u8> = text
            .bytes()
            .flat_map(|b| u32::from(b).to_le_bytes())
            .collect();
        let token_needles: HashSet<Vec<u8>> = tokens
            .chunks(4)
            .collect::<Vec<_>>()
            .windows(4)
            .map(|w| w.concat())
            .collect();
        // The update: two consecutive non-zero f32 values, or one as f64. (Its quantised
        // form before masking is covered by fedcore's uniformity test of masked vectors.)
        let mut update_needles = HashSet::new();
        for update in &lab.updates {
            for pair in update.windows(2).filter(|p| p[0] != 0.0 && p[1] != 0.0) {
                update_needles.insert([pair[0].to_le_bytes(), pair[1].to_le_bytes()].concat());
            }
            for v in update.iter().filter(|v| **v != 0.0) {
                update_needles.insert(f64::from(*v).to_le_bytes().to_vec());
            }
        }
        assert!(
            update_needles.len() > 100,
            "{name}: too few non-zero update values to search for"
        );
        let loss_needles: HashSet<Vec<u8>> = lab
            .losses
            .iter()
            .flat_map(|l| {
                [
                    l.to_le_bytes().to_vec(),
                    (*l as f32).to_le_bytes().repeat(2),
                ]
            })
            .collect();

        let mut found = Findings {
            bytes: captured.total_bytes(),
            ..Default::default()
        };
        for (c, connection) in captured.connections().iter().enumerate() {
            let frames = http2_payloads(connection);
            let places = frames
                .data
                .iter()
                .map(|(stream, data)| (format!("connection {c}, stream {stream}"), data))
                .chain([(format!("connection {c}, non-DATA frames"), &frames.other)]);
            for (place, bytes) in places {
                let at = |needles: &HashSet<Vec<u8>>, width: usize| {
                    find_any(bytes, needles, width).map(|at| format!("{place}, offset {at}"))
                };
                found.text = found.text.take().or_else(|| at(&text_needles, 16));
                found.text = found.text.take().or_else(|| at(&token_needles, 16));
                found.update = found.update.take().or_else(|| at(&update_needles, 8));
                found.loss = found.loss.take().or_else(|| at(&loss_needles, 8));
            }
        }
        findings.insert(name, found);
    }
    findings
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn under_secure_aggregation_no_update_loss_or_text_leaves_a_lab() {
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let names: Vec<String> = CODES.iter().map(|c| format!("lab-{c}")).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let plan = secure_test_plan(&roster, 2, 120_000, 10_000);
    let len = plan.initial_adapter().b_manifest().len();
    for (name, found) in federate_and_search(plan).await {
        // The masked update went through the proxy: the capture is not just the handshake.
        assert!(
            found.bytes > 2 * 4 * len,
            "{name}: only {} bytes captured for two rounds of {len} words",
            found.bytes
        );
        assert_eq!(found.text, None, "{name}: training text on the wire");
        assert_eq!(found.update, None, "{name}: plaintext update on the wire");
        assert_eq!(found.loss, None, "{name}: a training loss on the wire");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_search_finds_the_update_and_losses_of_a_plaintext_federation() {
    let plan = test_plan(3, 2, 3, 120_000);
    for (name, found) in federate_and_search(plan).await {
        assert!(found.update.is_some(), "{name}: plaintext update not found");
        assert!(found.loss.is_some(), "{name}: plaintext losses not found");
        assert_eq!(found.text, None, "{name}: training text on the wire");
    }
}
