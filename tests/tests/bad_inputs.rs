//! Bad updates over real gRPC: each is refused with a status that names the problem, nothing
//! of it reaches the aggregate, and the rounds complete with the other participants.

use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use fedclient::participant;
use fedcore::update::encode_f32_le;
use mekong_e2e::{
    RecordedUpload, Recorder, aggregator_config, corpus, participant_options, test_plan,
    train_task, weighted_mean, weighted_mean_f64,
};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use sha2::Digest;
use tonic::Code;

fn update(
    id: &str,
    round: u64,
    layout: &str,
    base: &str,
    values: &[f32],
) -> pb::SubmitUpdateRequest {
    pb::SubmitUpdateRequest {
        participant_id: id.to_string(),
        round,
        layout_hash: layout.to_string(),
        base_adapter_hash: base.to_string(),
        num_samples: 100,
        payload: Some(pb::submit_update_request::Payload::Plaintext(
            pb::PlaintextUpdate {
                values_f32_le: encode_f32_le(values),
            },
        )),
        metrics: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_updates_are_refused_by_name_and_rounds_complete_with_the_others() {
    let dir = tempfile::tempdir().unwrap();
    let plan = test_plan(3, 2, 2, 4_000);
    let server = fedaggregator::start(&aggregator_config(plan.clone(), dir.path()))
        .await
        .unwrap();
    let mut rogue = FederationClient::connect(server.url()).await.unwrap();
    let joined = rogue
        .join(pb::JoinRequest {
            participant_name: "lab-rogue".into(),
            language: "xx".into(),
            client_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let id = joined.participant_id.clone();
    let layout = joined.upload_layout_hash.clone();
    let len = plan.initial_adapter().b_manifest().len();

    let recorder = Arc::new(Recorder::default());
    let mut labs = Vec::new();
    for code in ["lo", "th"] {
        labs.push(tokio::spawn(participant::run(
            participant_options(&server.url(), &format!("lab-{code}"), code),
            corpus(code),
            Device::flex(),
            recorder.clone(),
        )));
    }

    let task = train_task(&mut rogue, &id).await;
    assert_eq!(task.round, 1);
    let base = task.global_adapter.unwrap().content_hash;

    let refused = |r: Result<tonic::Response<pb::SubmitUpdateResponse>, tonic::Status>| {
        r.expect_err("the update must be refused")
    };
    // Wrong length.
    let s = refused(
        rogue
            .submit_update(update(&id, 1, &layout, &base, &vec![0.0; len - 1]))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains(&format!("has {} values", len - 1)),
        "{}",
        s.message()
    );
    assert!(
        s.message().contains(&format!("expects {len}")),
        "{}",
        s.message()
    );
    // NaN and infinity.
    let mut v = vec![0.0f32; len];
    v[3] = f32::NAN;
    let s = refused(
        rogue
            .submit_update(update(&id, 1, &layout, &base, &v))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(s.message().contains("is NaN"), "{}", s.message());
    assert!(
        s.message().contains("q_proj.lora_B[0, 3]"),
        "{}",
        s.message()
    );
    v[3] = f32::INFINITY;
    let s = refused(
        rogue
            .submit_update(update(&id, 1, &layout, &base, &v))
            .await,
    );
    assert!(s.message().contains("+infinity"), "{}", s.message());
    // A participant that never joined.
    let s = refused(
        rogue
            .submit_update(update(
                "not-a-participant",
                1,
                &layout,
                &base,
                &vec![0.0; len],
            ))
            .await,
    );
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(s.message().contains("not-a-participant"), "{}", s.message());
    // No payload, wrong layout, wrong base adapter, a future round.
    let mut empty = update(&id, 1, &layout, &base, &[]);
    empty.payload = None;
    let s = refused(rogue.submit_update(empty).await);
    assert!(s.message().contains("no payload"), "{}", s.message());
    let s = refused(
        rogue
            .submit_update(update(&id, 1, "0000", &base, &vec![0.0; len]))
            .await,
    );
    assert!(s.message().contains("layout 0000"), "{}", s.message());
    let s = refused(
        rogue
            .submit_update(update(&id, 1, &layout, "beef", &vec![0.0; len]))
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message().contains("global adapter beef"),
        "{}",
        s.message()
    );
    let s = refused(
        rogue
            .submit_update(update(&id, 2, &layout, &base, &vec![0.0; len]))
            .await,
    );
    assert!(
        s.message().contains("round 2, which has not started"),
        "{}",
        s.message()
    );

    // Streamed: a whole-update hash that does not match keeps nothing; a broken stream's
    // prefix is held, and a resumption must start where it ends.
    let values = encode_f32_le(&vec![0.0f32; len]);
    let half = values.len() / 2 / 4 * 4;
    let chunk = |offset: usize, to: usize, last: bool, whole: &[u8]| {
        let bytes = &values[offset..to];
        let mut header = update(&id, 1, &layout, &base, &[]);
        header.payload = None;
        pb::UpdateChunk {
            header: Some(header),
            offset: offset as u64,
            values_f32_le: bytes.to_vec(),
            sha256: sha2::Sha256::digest(bytes).to_vec(),
            last,
            values_sha256: whole.to_vec(),
        }
    };
    let received = |mut c: FederationClient<tonic::transport::Channel>, id: String| async move {
        c.update_received(pb::UpdateReceivedRequest {
            participant_id: id,
            round: 1,
        })
        .await
        .unwrap()
        .into_inner()
    };
    let wrong_whole = vec![
        chunk(0, half, false, &[]),
        chunk(half, values.len(), true, &[7; 32]),
    ];
    let s = refused(
        rogue
            .submit_update_stream(tokio_stream::iter(wrong_whole))
            .await,
    );
    assert_eq!(s.code(), Code::DataLoss);
    assert!(s.message().contains("send it again from byte 0"), "{s}");
    let held = received(rogue.clone(), id.clone()).await;
    assert_eq!((held.bytes_received, held.accepted), (0, false));
    let s = refused(
        rogue
            .submit_update_stream(tokio_stream::iter(vec![chunk(0, half, false, &[])]))
            .await,
    );
    assert!(s.message().contains("without its last chunk"), "{s}");
    let held = received(rogue.clone(), id.clone()).await;
    assert_eq!((held.bytes_received, held.accepted), (half as u64, false));
    let s = refused(
        rogue
            .submit_update_stream(tokio_stream::iter(vec![chunk(4, half, false, &[])]))
            .await,
    );
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains(&format!(
            "resumes at byte 4, but the aggregator holds {half} bytes"
        )),
        "{s}"
    );
    assert_eq!(
        received(rogue.clone(), id.clone()).await.bytes_received,
        half as u64
    );

    // Round 1 closes at its deadline with the two honest labs; the rogue counts as dropped.
    while server.status().history.is_empty() {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let record = server.status().history[0].clone();
    assert_eq!(record.contributors, vec!["lab-lo", "lab-th"]);
    assert_eq!(record.dropped, vec!["lab-rogue"]);

    // A well-formed update for the closed round is stale.
    let s = refused(
        rogue
            .submit_update(update(&id, 1, &layout, &base, &vec![0.0; len]))
            .await,
    );
    assert_eq!(s.code(), Code::FailedPrecondition);
    assert!(
        s.message()
            .contains("round 1, which is closed; the current round is 2"),
        "{}",
        s.message()
    );

    // Errors cost the rogue nothing: a valid round-2 update is taken.
    let task = train_task(&mut rogue, &id).await;
    assert_eq!(task.round, 2);
    let base2 = task.global_adapter.unwrap().content_hash;
    let zeros = vec![0.0f32; len];
    rogue
        .submit_update(update(&id, 2, &layout, &base2, &zeros))
        .await
        .expect("a valid update after refused ones is accepted");

    for lab in labs {
        lab.await.unwrap().unwrap();
    }
    server.finished().await;

    let b_layout = plan.initial_adapter().b_manifest();
    let round1 = fedcore::peft::read_dir(&server.store().round_dir(1)).unwrap();
    assert_eq!(
        round1.flatten(&b_layout).unwrap(),
        weighted_mean(&recorder.round(1))
    );
    let mut round2_uploads = recorder.round(2);
    round2_uploads.push(RecordedUpload {
        name: "lab-rogue".into(),
        round: 2,
        values: zeros,
        num_samples: 100,
    });
    // Updates are differences from the round's global: the rogue's zeros pull toward it.
    let round2 = fedcore::peft::read_dir(&server.store().round_dir(2)).unwrap();
    let expected: Vec<f32> = round1
        .flatten(&b_layout)
        .unwrap()
        .iter()
        .zip(weighted_mean_f64(&round2_uploads))
        .map(|(b, d)| (*b as f64 + d) as f32)
        .collect();
    assert_eq!(round2.flatten(&b_layout).unwrap(), expected);
    server.shutdown().await.unwrap();
}
