//! Secure aggregation end to end over gRPC on loopback, with real burn training: five labs,
//! one killed during key sharing and one killed in the middle of streaming its masked update.
//! The aggregator must still produce the plaintext weighted mean of the three survivors'
//! updates, within the quantisation bound, having never seen any of them.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use fedclient::participant::{self, ParticipantObserver};
use fedclient::train::TrainStats;
use fedcore::round::{Reply, SecureMessage, SecureTrain, SecureUpload, UploadSecrets};
use fedcore::secagg::participant::RoundRandomness;
use fedcore::secagg::protocol::Stage;
use fedcore::{FederationPlan, LoraAdapter};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};
use mekong_proto::convert::decode_adapter_payload;
use mekong_proto::secure::{encode_words, message_to_wire, step_from_wire};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// Records uploads, and makes chosen labs go silent at a chosen stage.
struct Faults {
    recorder: Recorder,
    silent_at: BTreeMap<String, Stage>,
}

impl ParticipantObserver for Faults {
    fn round_trained(&self, name: &str, round: u64, s: &TrainStats, upload: &[f32], n: u64) {
        self.recorder.round_trained(name, round, s, upload, n);
    }

    fn secure_step(&self, name: &str, _round: u64, stage: Stage) -> bool {
        self.silent_at.get(name) != Some(&stage)
    }
}

async fn next_task(
    client: &mut FederationClient<Channel>,
    id: &str,
) -> pb::fetch_task_response::Task {
    loop {
        let task = client
            .fetch_task(pb::FetchTaskRequest {
                participant_id: id.to_string(),
                wait_ms: 5_000,
            })
            .await
            .unwrap()
            .into_inner()
            .task
            .unwrap();
        if !matches!(task, pb::fetch_task_response::Task::Wait(_)) {
            return task;
        }
    }
}

async fn send(
    client: &mut FederationClient<Channel>,
    id: &str,
    round: u64,
    attempt: u32,
    msg: SecureMessage,
) {
    client
        .secure_aggregate(pb::SecureAggregateRequest {
            participant_id: id.to_string(),
            round,
            attempt,
            message: Some(message_to_wire(&msg)),
        })
        .await
        .unwrap();
}

/// A lab driven at the wire level that takes part honestly until masked input, sends the
/// first chunk of its masked update and is killed mid-stream.
async fn lab_killed_mid_stream(url: String, plan: FederationPlan, name: &str, identity: [u8; 32]) {
    let mut client = FederationClient::connect(url).await.unwrap();
    let joined = client
        .join(pb::JoinRequest {
            participant_name: name.to_string(),
            language: "vi".into(),
            client_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = joined.participant_id;
    let pb::fetch_task_response::Task::Train(t) = next_task(&mut client, &id).await else {
        panic!("expected a training task");
    };
    let template = plan.initial_adapter();
    let global: LoraAdapter = decode_adapter_payload(t.global_adapter.as_ref(), &template).unwrap();
    let secure = t.secure.unwrap();
    let delta = vec![0.5f32; template.b_manifest().len()];
    let (mut upload, advert) = SecureUpload::open(
        &plan,
        name,
        SecureTrain {
            session: secure.session.as_slice().try_into().unwrap(),
            attempt: secure.attempt,
            index: secure.index,
        },
        t.round,
        &global.content_hash(),
        &delta,
        5_000,
        3,
        UploadSecrets {
            identity_seed: zeroize::Zeroizing::new(identity),
            randomness: RoundRandomness {
                c_secret: [21; 32],
                s_secret: [22; 32],
                self_mask_seed: [23; 16],
                shamir_seed: [24; 32],
            },
            rounding_seed: [25; 32],
        },
    )
    .unwrap();
    send(
        &mut client,
        &id,
        t.round,
        secure.attempt,
        SecureMessage::Advertise(advert),
    )
    .await;
    loop {
        let pb::fetch_task_response::Task::SecureStep(step) = next_task(&mut client, &id).await
        else {
            panic!("expected a secure-aggregation step");
        };
        let owned = step_from_wire(step.step.as_ref()).unwrap();
        match upload.respond(&owned.as_step()).unwrap() {
            Reply::Message(m) => send(&mut client, &id, step.round, step.attempt, m).await,
            Reply::Masked(m) => {
                let (tx, rx) = tokio::sync::mpsc::channel(4);
                tx.send(pb::MaskedChunk {
                    participant_id: id.clone(),
                    round: step.round,
                    attempt: step.attempt,
                    offset: 0,
                    words_u32_le: encode_words(&m.words[..100]),
                    last: false,
                })
                .await
                .unwrap();
                let mut streaming = client.clone();
                let call =
                    tokio::spawn(
                        async move { streaming.submit_masked(ReceiverStream::new(rx)).await },
                    );
                // Let the aggregator fold the first chunk, then die mid-stream.
                tokio::time::sleep(Duration::from_millis(800)).await;
                call.abort();
                drop(tx);
                return;
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kills_during_key_sharing_and_masked_input_leave_the_survivors_weighted_mean() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("warn,fedaggregator=info")
        .with_test_writer()
        .try_init();
    let dir = tempfile::tempdir().unwrap();
    let codes = ["lo", "km", "th", "id", "vi"];
    let names: Vec<String> = codes.iter().map(|c| format!("lab-{c}")).collect();
    let identities: Vec<_> = (0..5).map(test_identity).collect();
    let roster: Vec<(&str, _)> = names.iter().map(String::as_str).zip(&identities).collect();
    let plan = secure_test_plan(&roster, 1, 120_000, 4_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let faults = Arc::new(Faults {
        recorder: Recorder::default(),
        silent_at: BTreeMap::from([("lab-id".to_string(), Stage::ShareKeys)]),
    });
    let mut labs = Vec::new();
    for (i, code) in codes.iter().enumerate().take(4) {
        let mut options = participant_options(&server.url(), &names[i], code);
        options.identity = Some(Arc::new(test_identity(i as u8)));
        options.plan_sha256 = Some(plan.fingerprint());
        labs.push(tokio::spawn(participant::run(
            options,
            corpus(code),
            Device::flex(),
            faults.clone(),
        )));
    }
    let killed = tokio::spawn(lab_killed_mid_stream(
        server.url(),
        plan.clone(),
        "lab-vi",
        *test_identity(4).bytes(),
    ));
    killed.await.unwrap();
    let mut reports = Vec::new();
    for lab in labs {
        reports.push(lab.await.unwrap().unwrap());
    }
    server.finished().await;

    let status = server.status();
    let record = &status.history[0];
    assert_eq!(record.contributors, vec!["lab-km", "lab-lo", "lab-th"]);
    assert_eq!(record.dropped, vec!["lab-id", "lab-vi"]);
    let secure = record.secure.as_ref().expect("securely aggregated");
    assert_eq!(
        secure.attempt, 0,
        "two dropouts within the threshold need no retry"
    );

    // The plaintext computation over the survivors, from what they trained.
    let uploads: Vec<_> = faults
        .recorder
        .round(1)
        .into_iter()
        .filter(|u| record.contributors.contains(&u.name))
        .collect();
    assert_eq!(uploads.len(), 3);
    let template = plan.initial_adapter();
    let layout = template.b_manifest();
    let start = template.flatten(&layout).unwrap();
    let total: f64 = uploads.iter().map(|u| u.num_samples as f64).sum();
    let written = fedcore::peft::read_dir(&server.store().round_dir(1)).unwrap();
    let got = written.flatten(&layout).unwrap();
    let mut moved = 0;
    for (k, g) in got.iter().enumerate() {
        let mean: f64 = uploads
            .iter()
            .map(|u| u.num_samples as f64 * u.values[k] as f64)
            .sum::<f64>()
            / total;
        let expected = start[k] as f64 + mean;
        assert!(
            (*g as f64 - expected).abs() <= secure.error_bound + 1e-6,
            "value {k}: {g} vs {expected} (bound {})",
            secure.error_bound
        );
        if mean.abs() > 1e-4 {
            moved += 1;
        }
    }
    assert!(
        moved > got.len() / 2,
        "training moved most of B ({moved} of {})",
        got.len()
    );
    for r in &reports {
        assert_eq!(r.final_adapter, written);
    }
    // round.json records how the round was aggregated.
    let json = std::fs::read_to_string(server.store().round_dir(1).join("round.json")).unwrap();
    assert!(json.contains("quantisation_error_bound"), "{json}");
    server.shutdown().await.unwrap();
}
