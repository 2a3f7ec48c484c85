//! A lab driven directly at the wire level, without training: it joins, takes part in
//! secure aggregation with a given update, and can be told to die in the middle of
//! streaming its masked input. Fault-injection tests and the aggregator memory benchmark
//! use it to play many labs cheaply.

use std::time::Duration;

use fedclient::download::{DownloadOptions, Fetched, fetch_adapter};
use fedcore::FederationPlan;
use fedcore::round::{Reply, SecureMessage, SecureTrain, SecureUpload, UploadSecrets};
use fedcore::secagg::participant::RoundRandomness;
use mekong_proto::MAX_MESSAGE_BYTES;
use mekong_proto::secure::{encode_words, message_to_wire, step_from_wire};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use sha2::Digest;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

/// How the lab behaves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WireBehaviour {
    /// Takes part honestly until the run finishes.
    Honest,
    /// Sends the first chunk of its masked update, then its connection dies.
    KilledMidStream,
    /// Streams its whole masked update with every chunk's own SHA-256 right but a wrong
    /// whole-vector SHA-256, checks that the aggregator refuses it with DATA_LOSS and holds
    /// nothing of it, then sends it again honestly.
    WrongVectorHashOnce,
}

/// Words per masked chunk sent by a wire lab.
pub const WIRE_CHUNK_WORDS: usize = 256 * 1024;

/// A joined wire-level lab.
pub struct WireLab {
    client: FederationClient<Channel>,
    id: String,
    name: String,
    plan: FederationPlan,
    identity: [u8; 32],
}

impl WireLab {
    /// Joins the aggregator at `url` as `name`.
    pub async fn join(url: &str, plan: FederationPlan, name: &str, identity: [u8; 32]) -> Self {
        let channel = Channel::from_shared(url.to_string())
            .expect("valid url")
            .connect()
            .await
            .expect("aggregator reachable");
        let mut client = FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let joined = client
            .join(pb::JoinRequest {
                participant_name: name.to_string(),
                language: "xx".into(),
                client_version: "wire-lab".into(),
            })
            .await
            .expect("join accepted")
            .into_inner();
        WireLab {
            client,
            id: joined.participant_id,
            name: name.to_string(),
            plan,
            identity,
        }
    }

    async fn next_task(&mut self) -> pb::fetch_task_response::Task {
        let mut broken = 0;
        loop {
            let answer = self
                .client
                .fetch_task(pb::FetchTaskRequest {
                    participant_id: self.id.clone(),
                    wait_ms: 5_000,
                })
                .await;
            let task = match answer {
                Ok(r) => r.into_inner().task.expect("a task"),
                // A connection broken under the call is retried, as fedclient does.
                Err(status) if status.code() == tonic::Code::Unknown && broken < 5 => {
                    broken += 1;
                    eprintln!("{}: fetch task retried after {status}", self.name);
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    continue;
                }
                Err(status) => panic!("fetch task: {status}"),
            };
            if !matches!(task, pb::fetch_task_response::Task::Wait(_)) {
                return task;
            }
        }
    }

    async fn send(&mut self, round: u64, attempt: u32, msg: SecureMessage) {
        self.client
            .secure_aggregate(pb::SecureAggregateRequest {
                participant_id: self.id.clone(),
                round,
                attempt,
                message: Some(message_to_wire(&msg)),
            })
            .await
            .expect("stage message accepted");
    }

    /// Takes part with update `delta` (the upload layout's length) until the run finishes,
    /// or until killed mid-stream.
    pub async fn run(mut self, delta: Vec<f32>, num_samples: u64, behaviour: WireBehaviour) {
        let template = self.plan.initial_model();
        let mut upload: Option<SecureUpload> = None;
        let mut seed = self.identity;
        loop {
            match self.next_task().await {
                pb::fetch_task_response::Task::Train(t) => {
                    let download = DownloadOptions {
                        patience: std::time::Duration::from_secs(30),
                        transient: &|s: &tonic::Status| s.code() == tonic::Code::Unavailable,
                        progress: &|_, _| {},
                    };
                    let fetched = fetch_adapter(
                        &self.client,
                        &self.id,
                        t.global_adapter.as_ref(),
                        &template,
                        &download,
                    )
                    .await
                    .expect("global adapter");
                    let Fetched::Adapter(global) = fetched else {
                        continue;
                    };
                    let secure = t.secure.expect("a secure federation");
                    seed[0] = seed[0].wrapping_add(1);
                    let (u, advert) = SecureUpload::open(
                        &self.plan,
                        &self.name,
                        SecureTrain {
                            session: secure.session.as_slice().try_into().expect("32 bytes"),
                            attempt: secure.attempt,
                            index: secure.index,
                        },
                        t.round,
                        &global.content_hash(),
                        &delta,
                        num_samples,
                        3,
                        UploadSecrets {
                            identity_seed: zeroize::Zeroizing::new(self.identity),
                            randomness: RoundRandomness {
                                c_secret: seed,
                                s_secret: [seed[0] ^ 0x55; 32],
                                self_mask_seed: [seed[0] ^ 0x33; 16],
                                shamir_seed: [seed[0] ^ 0x77; 32],
                            },
                            rounding_seed: seed,
                        },
                    )
                    .expect("session opens");
                    upload = Some(u);
                    self.send(t.round, secure.attempt, SecureMessage::Advertise(advert))
                        .await;
                }
                pb::fetch_task_response::Task::SecureStep(step) => {
                    let owned = step_from_wire(step.step.as_ref()).expect("well-formed step");
                    let mut u = upload.take().expect("a session");
                    let (u, reply) = tokio::task::spawn_blocking(move || {
                        let reply = u.respond(&owned.as_step()).expect("honest server");
                        (u, reply)
                    })
                    .await
                    .expect("masking task");
                    upload = Some(u);
                    match reply {
                        Reply::Message(m) => self.send(step.round, step.attempt, m).await,
                        Reply::Masked(m) => {
                            let killed = behaviour == WireBehaviour::KilledMidStream;
                            if behaviour == WireBehaviour::WrongVectorHashOnce {
                                self.refused_whole(step.round, step.attempt, &m.words).await;
                            }
                            self.stream(step.round, step.attempt, &m.words, killed)
                                .await;
                            if killed {
                                return;
                            }
                        }
                    }
                }
                pb::fetch_task_response::Task::Finished(_) => return,
                pb::fetch_task_response::Task::Wait(_) => unreachable!("filtered"),
            }
        }
    }

    /// Streams `words` with a whole-vector hash of something else: the aggregator must
    /// refuse the vector with DATA_LOSS and take every folded word back out.
    async fn refused_whole(&mut self, round: u64, attempt: u32, words: &[u32]) {
        let count = words.len().div_ceil(WIRE_CHUNK_WORDS);
        let wrong = sha2::Sha256::digest(b"not this vector").to_vec();
        let chunks: Vec<pb::MaskedChunk> = words
            .chunks(WIRE_CHUNK_WORDS)
            .enumerate()
            .map(|(k, c)| {
                let last = k + 1 == count;
                let whole = last.then(|| wrong.clone());
                self.masked_chunk(round, attempt, k, encode_words(c), last, whole)
            })
            .collect();
        let status = self
            .client
            .submit_masked(tokio_stream::iter(chunks))
            .await
            .expect_err("a wrong whole-vector hash is refused");
        assert_eq!(status.code(), tonic::Code::DataLoss, "{status}");
        assert!(status.message().contains("from word 0"), "{status}");
        let held = self
            .client
            .masked_received(pb::MaskedReceivedRequest {
                participant_id: self.id.clone(),
                round,
                attempt,
            })
            .await
            .expect("MaskedReceived")
            .into_inner();
        assert_eq!(
            (held.words_received, held.committed),
            (0, false),
            "nothing of a refused vector stays in the sum"
        );
    }

    /// Chunk `k` of this lab's masked upload, carrying its own hash and, when given, the
    /// whole vector's (sent on the last chunk).
    fn masked_chunk(
        &self,
        round: u64,
        attempt: u32,
        k: usize,
        words_u32_le: Vec<u8>,
        last: bool,
        vector_sha256: Option<Vec<u8>>,
    ) -> pb::MaskedChunk {
        pb::MaskedChunk {
            participant_id: self.id.clone(),
            round,
            attempt,
            offset: (k * WIRE_CHUNK_WORDS) as u64,
            sha256: sha2::Sha256::digest(&words_u32_le).to_vec(),
            words_u32_le,
            last,
            vector_sha256: vector_sha256.unwrap_or_default(),
        }
    }

    async fn stream(&mut self, round: u64, attempt: u32, words: &[u32], die_after_first: bool) {
        let count = words.len().div_ceil(WIRE_CHUNK_WORDS);
        let (tx, rx) = tokio::sync::mpsc::channel(2);
        let mut client = self.client.clone();
        let call = tokio::spawn(async move { client.submit_masked(ReceiverStream::new(rx)).await });
        // The whole vector's hash, built from the chunks as they go (100M words are 400 MB).
        let mut whole = sha2::Sha256::new();
        for (k, c) in words.chunks(WIRE_CHUNK_WORDS).enumerate() {
            let last = k + 1 == count;
            let words_u32_le = encode_words(if die_after_first && last {
                &c[..c.len() / 2]
            } else {
                c
            });
            whole.update(&words_u32_le);
            let vector_sha256 = last.then(|| whole.clone().finalize().to_vec());
            let chunk = self.masked_chunk(
                round,
                attempt,
                k,
                words_u32_le,
                last && !die_after_first,
                vector_sha256,
            );
            if tx.send(chunk).await.is_err() {
                break;
            }
            if die_after_first {
                // Let the aggregator fold the chunk, then die mid-stream.
                tokio::time::sleep(Duration::from_millis(800)).await;
                call.abort();
                return;
            }
        }
        drop(tx);
        call.await
            .expect("stream task")
            .expect("masked input accepted");
    }
}
