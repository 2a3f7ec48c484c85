//! Secure aggregation end to end over gRPC on loopback, with real burn training: five labs,
//! one killed during key sharing and one killed in the middle of streaming its masked update.
//! The aggregator must still produce the plaintext weighted mean of the three survivors'
//! updates, within the quantisation bound, having never seen any of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use burn::prelude::Device;
use fedclient::participant::{self, ParticipantObserver};
use fedclient::train::TrainStats;
use fedcore::secagg::protocol::Stage;
use mekong_e2e::wire_lab::{WireBehaviour, WireLab};
use mekong_e2e::{
    Recorder, aggregator_config, corpus, participant_options, secure_test_plan, test_identity,
};

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
    let mut plan = secure_test_plan(&roster, 1, 120_000, 4_000);
    // Two dropouts of five need t = 3: a plan that tolerates no colluding lab (the default,
    // one, gives t = 4; see tests/tests/cheating_center.rs).
    plan.secure_aggregation.max_colluding = 0;
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
    let killed = WireLab::join(
        &server.url(),
        plan.clone(),
        "lab-vi",
        *test_identity(4).bytes(),
    )
    .await;
    let len = plan.initial_adapter().b_manifest().len();
    let killed = tokio::spawn(killed.run(vec![0.5; len], 5_000, WireBehaviour::KilledMidStream));
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
    let record: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(record["strategy"]["mode"], "ffa_lora", "{json}");
    assert_eq!(
        record["strategy"]["trained"],
        serde_json::json!(["b"]),
        "{json}"
    );
    // ... and where the round's time went at the center: every secure stage of the attempt
    // that succeeded, in order, tiling the round.
    let timing = &record["timing"];
    let spans = timing["stages"]
        .as_array()
        .unwrap_or_else(|| panic!("no timing in round.json: {json}"));
    let stages: Vec<&str> = spans.iter().map(|s| s["stage"].as_str().unwrap()).collect();
    assert_eq!(
        stages,
        [
            "advertise_keys",
            "share_keys",
            "masked_input",
            "consistency_check",
            "unmask"
        ],
        "{json}"
    );
    let sum: f64 = spans.iter().map(|s| s["seconds"].as_f64().unwrap()).sum();
    let duration = timing["duration_s"].as_f64().unwrap();
    assert!(duration > 0.0, "{json}");
    assert!((sum - duration).abs() < 1e-6, "{json}");
    server.shutdown().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secure_federation_refuses_strangers_plaintext_and_malformed_messages() {
    use mekong_proto::v1::{self as pb, federation_client::FederationClient};
    use tonic::Code;

    let dir = tempfile::tempdir().unwrap();
    let identities: Vec<_> = (0..3).map(test_identity).collect();
    let names = ["lab-a", "lab-b", "lab-c"];
    let roster: Vec<(&str, _)> = names.iter().copied().zip(&identities).collect();
    let plan = secure_test_plan(&roster, 1, 60_000, 4_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let mut client = FederationClient::connect(server.url()).await.unwrap();
    let join = |name: &str| pb::JoinRequest {
        participant_name: name.to_string(),
        language: "lo".into(),
        client_version: "test".into(),
    };
    let err = client.join(join("lab-z")).await.unwrap_err();
    assert_eq!(err.code(), Code::PermissionDenied);
    assert!(
        err.message().contains("not on the federation's roster"),
        "{err}"
    );
    let id = client
        .join(join("lab-a"))
        .await
        .unwrap()
        .into_inner()
        .participant_id;

    let err = client
        .submit_update(pb::SubmitUpdateRequest {
            participant_id: id.clone(),
            round: 1,
            layout_hash: String::new(),
            base_adapter_hash: String::new(),
            num_samples: 1,
            payload: Some(pb::submit_update_request::Payload::Plaintext(
                pb::PlaintextUpdate {
                    values_f32_le: vec![0; 4],
                },
            )),
            metrics: None,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition);
    assert!(
        err.message().contains("plaintext updates are refused"),
        "{err}"
    );

    let err = client
        .secure_aggregate(pb::SecureAggregateRequest {
            participant_id: id.clone(),
            round: 1,
            attempt: 0,
            message: Some(pb::secure_aggregate_request::Message::Advertise(
                pb::AdvertisedKeys {
                    from: 1,
                    c_public: vec![0; 32],
                    s_public: vec![0; 31],
                    signature: vec![0; 64],
                },
            )),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(
        err.message()
            .contains("`s_public` has 31 bytes, expected 32"),
        "{err}"
    );

    // A participant with the wrong identity key refuses to take part at all.
    let mut options = participant_options(&server.url(), "lab-b", "km");
    options.identity = Some(Arc::new(test_identity(7)));
    let err = participant::run(
        options,
        corpus("km"),
        Device::flex(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap_err();
    assert!(
        err.to_string()
            .contains("not the one the roster lists for lab-b"),
        "{err}"
    );
    // And one pinned to another plan refuses it.
    let mut options = participant_options(&server.url(), "lab-b", "km");
    options.identity = Some(Arc::new(test_identity(1)));
    options.plan_sha256 = Some("00".repeat(32));
    let err = participant::run(
        options,
        corpus("km"),
        Device::flex(),
        Arc::new(Recorder::default()),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("refusing to take part"), "{err}");
    server.shutdown().await.unwrap();
}
