//! Mekong's one test kit: what starts an aggregator (in process here, or as the real
//! `fedaggregator` binary in [`process`]), provisions labs and runs them, used by the
//! end-to-end tests in tests/tests/ and by the aggregator's own tests in aggregator/tests/.
//! Real aggregators on loopback, real participants training real burn models.

pub mod capture;
pub mod cheating_center;
pub mod process;
pub mod wire_lab;

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fedaggregator::AggregatorConfig;
use fedaggregator::config::{ServerSection, TlsSection};
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::identity::IdentitySeed;
use fedclient::participant::{ParticipantObserver, ParticipantOptions};
use fedclient::train::TrainStats;
use fedcore::roster::RosterEntry;
use fedcore::secagg::spec::SecureAggregationSpec;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TargetModule, TrainingSpec};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};

/// A small plan that trains in well under a second per round on two cores.
pub fn test_plan(
    participants: usize,
    rounds: u64,
    min_updates: usize,
    timeout_ms: u64,
) -> FederationPlan {
    FederationPlan {
        privacy: Default::default(),
        federation: "e2e".into(),
        model: ModelSpec {
            hidden_size: 32,
            intermediate_size: 64,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            max_position_embeddings: 64,
            ..ModelSpec::tiny()
        },
        lora: LoraSpec {
            rank: 4,
            alpha: 8.0,
            target_modules: vec![TargetModule::Q, TargetModule::V, TargetModule::Down],
            a_seed: 11,
            dropout: 0.0,
        },
        training: TrainingSpec {
            local_steps: 3,
            batch_size: 4,
            seq_len: 32,
            learning_rate: 1e-2,
            weight_decay: 0.0,
            seed: 5,
            ..TrainingSpec::default()
        },
        rounds: RoundSpec {
            rounds,
            participants,
            min_updates,
            round_timeout_ms: timeout_ms,
        },
        roster: Vec::new(),
        // The exactness tests compare plaintext aggregation bit for bit; secure
        // aggregation has its own end-to-end tests.
        secure_aggregation: SecureAggregationSpec {
            enabled: false,
            ..Default::default()
        },
        strategy: Default::default(),
    }
}

/// [`test_plan`] with secure aggregation on, one roster entry per `(name, identity)`.
pub fn secure_test_plan(
    labs: &[(&str, &IdentitySeed)],
    rounds: u64,
    timeout_ms: u64,
    stage_timeout_ms: u64,
) -> FederationPlan {
    let mut plan = test_plan(labs.len(), rounds, 1, timeout_ms);
    plan.roster = labs
        .iter()
        .map(|(name, id)| RosterEntry {
            name: name.to_string(),
            public_key: id.public_key_hex(),
        })
        .collect();
    plan.secure_aggregation = SecureAggregationSpec {
        stage_timeout_ms,
        ..Default::default()
    };
    plan
}

/// A deterministic identity for test lab `i`.
pub fn test_identity(i: u8) -> IdentitySeed {
    IdentitySeed::from_bytes([i.wrapping_mul(37).wrapping_add(1); 32])
}

/// An aggregator configuration on a free loopback port writing into `dir`.
pub fn aggregator_config(plan: FederationPlan, dir: &Path) -> AggregatorConfig {
    AggregatorConfig {
        server: ServerSection {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            output_dir: dir.to_path_buf(),
            linger_after_finish_ms: 2_000,
            inline_adapter_max_bytes: mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES,
        },
        tls: TlsSection::plaintext(),
        admin: None,
        state: Default::default(),
        limits: Default::default(),
        plan,
    }
}

/// [`test_plan`]'s labs on a model wide enough for adapters of megabytes: 512 wide,
/// `layers` deep, LoRA of `rank` on every projection (B ≈ layers × rank × 5,312 values).
pub fn widen(plan: &mut FederationPlan, layers: usize, rank: usize) {
    plan.model = ModelSpec {
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: layers,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        ..ModelSpec::tiny()
    };
    plan.lora.rank = rank;
    plan.lora.target_modules = TargetModule::ALL.to_vec();
}

/// Long-polls as participant `id` until the aggregator hands it a round to train.
pub async fn train_task(
    client: &mut FederationClient<tonic::transport::Channel>,
    id: &str,
) -> pb::TrainTask {
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
        if let pb::fetch_task_response::Task::Train(t) = task {
            return t;
        }
    }
}

/// One language's UDHR, 10% held out.
pub fn corpus(code: &str) -> LocalCorpus {
    let (_, text) = mekong_examples::corpus::udhr(code).expect("embedded language");
    LocalCorpus::from_text(code, text, 0.1, &ByteTokenizer).expect("UDHR text is long enough")
}

/// Participant options for `name` against `url`. They trust the aggregator's plan
/// (`trust_aggregator_plan`), as these tests run their own honest aggregator and most test
/// something else; the secure federations pin the plan (`plan_sha256`) as labs must, and
/// `cheating_center.rs` tests what an unpinned lab does.
pub fn participant_options(url: &str, name: &str, language: &str) -> ParticipantOptions {
    ParticipantOptions {
        connect_patience: Duration::from_secs(20),
        trust_aggregator_plan: true,
        ..ParticipantOptions::new(url, name, language)
    }
}

/// One upload exactly as it was handed to the wire.
#[derive(Debug, Clone)]
pub struct RecordedUpload {
    pub name: String,
    pub round: u64,
    pub values: Vec<f32>,
    pub num_samples: u64,
}

/// Records every upload the participants make.
#[derive(Default)]
pub struct Recorder {
    pub uploads: Mutex<Vec<RecordedUpload>>,
}

impl Recorder {
    /// Uploads of one round.
    pub fn round(&self, round: u64) -> Vec<RecordedUpload> {
        self.uploads
            .lock()
            .expect("recorder lock")
            .iter()
            .filter(|u| u.round == round)
            .cloned()
            .collect()
    }
}

impl ParticipantObserver for Recorder {
    fn round_trained(&self, name: &str, round: u64, _: &TrainStats, upload: &[f32], n: u64) {
        self.uploads
            .lock()
            .expect("recorder lock")
            .push(RecordedUpload {
                name: name.to_string(),
                round,
                values: upload.to_vec(),
                num_samples: n,
            });
    }
}

/// Σ n_i·x_i / Σ n_i computed directly, in f64.
pub fn weighted_mean_f64(uploads: &[RecordedUpload]) -> Vec<f64> {
    let len = uploads[0].values.len();
    let total: u64 = uploads.iter().map(|u| u.num_samples).sum();
    (0..len)
        .map(|j| {
            let s: f64 = uploads
                .iter()
                .map(|u| u.num_samples as f64 * u.values[j] as f64)
                .sum();
            s / total as f64
        })
        .collect()
}

/// Σ n_i·x_i / Σ n_i computed directly, in f64, rounded once to f32.
pub fn weighted_mean(uploads: &[RecordedUpload]) -> Vec<f32> {
    weighted_mean_f64(uploads)
        .into_iter()
        .map(|v| v as f32)
        .collect()
}

/// A federation made the way a real one is: each lab runs `fedclient enroll` (its library
/// call) in its own directory under `labs`, the center provisions `fed` from the labs'
/// requests alone, and each lab installs its kit beside its keys.
pub struct Enrolled {
    pub provisioned: fedaggregator::provision::Provisioned,
    /// Each lab's directory (keys, request, installed kit), in roster order: what
    /// `ParticipantKit::load` and `fedclient join --config` take.
    pub labs: Vec<std::path::PathBuf>,
}

/// [`Enrolled`] for `(name, language)` labs, provisioned with `options` (whose `out` is the
/// center's directory and whose `requests` are filled in here).
pub fn enroll_and_provision(
    labs: &Path,
    names: &[(&str, &str)],
    mut options: fedaggregator::provision::ProvisionOptions,
) -> Enrolled {
    let mut lab_dirs = Vec::new();
    for (name, language) in names {
        let made = fedclient::enroll::enroll(&fedclient::enroll::EnrollOptions {
            name: name.to_string(),
            language: language.to_string(),
            out: labs.join(name),
        })
        .expect("enroll");
        options.requests.push(made.request);
        lab_dirs.push(made.dir);
    }
    let provisioned = fedaggregator::provision::provision(&options).expect("provisioning");
    for (kit, lab) in provisioned.kits.iter().zip(&lab_dirs) {
        fedclient::enroll::install_kit(kit, lab).expect("the kit installs beside the lab's keys");
    }
    Enrolled {
        provisioned,
        labs: lab_dirs,
    }
}

/// Provisioning options for a loopback federation of short-lived certificates, before
/// the requests are added.
pub fn loopback_provision(
    fed: &Path,
    federation: &str,
) -> fedaggregator::provision::ProvisionOptions {
    provision_options(fed, federation, "127.0.0.1:0", &[], 1)
}

/// Provisioning options for federation `federation` into `fed`, the aggregator at
/// `aggregator_address` (with `sans` besides), certificates valid for `validity_days`,
/// before the requests are added.
pub fn provision_options(
    fed: &Path,
    federation: &str,
    aggregator_address: &str,
    sans: &[&str],
    validity_days: u32,
) -> fedaggregator::provision::ProvisionOptions {
    fedaggregator::provision::ProvisionOptions {
        out: fed.to_path_buf(),
        federation: federation.into(),
        aggregator_address: aggregator_address.into(),
        extra_sans: sans.iter().map(|s| s.to_string()).collect(),
        requests: Vec::new(),
        plan: None,
        validity_days,
        ca_validity_days: validity_days.max(1),
        share_metrics: Vec::new(),
    }
}

/// Joins `client`'s aggregator as `name` with `language`; the participant id it hands out.
pub async fn join_as(
    client: &mut FederationClient<tonic::transport::Channel>,
    name: &str,
    language: &str,
) -> String {
    client
        .join(pb::JoinRequest {
            participant_name: name.into(),
            language: language.into(),
            client_version: "test".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .participant_id
}

/// The first chunk of a plaintext update stream under participant id `id` for round 1
/// (made-up layout and base hashes), carrying `values` and not the last.
pub fn first_update_chunk(id: &str, values: Vec<u8>) -> pb::UpdateChunk {
    use sha2::Digest;
    pb::UpdateChunk {
        header: Some(pb::SubmitUpdateRequest {
            participant_id: id.to_string(),
            round: 1,
            layout_hash: "x".into(),
            base_adapter_hash: "y".into(),
            num_samples: 1,
            payload: None,
            metrics: None,
        }),
        offset: 0,
        sha256: sha2::Sha256::digest(&values).to_vec(),
        values_f32_le: values,
        last: false,
        ..Default::default()
    }
}
