//! Shared harness of Mekong's end-to-end tests: real aggregators on loopback, real
//! participants training real burn models on the embedded UDHR text.

use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use fedaggregator::AggregatorConfig;
use fedaggregator::config::ServerSection;
use fedclient::data::{ByteTokenizer, LocalCorpus};
use fedclient::participant::{ParticipantObserver, ParticipantOptions};
use fedclient::train::TrainStats;
use fedcore::{FederationPlan, LoraSpec, ModelSpec, RoundSpec, TargetModule, TrainingSpec};

/// A small plan that trains in well under a second per round on two cores.
pub fn test_plan(
    participants: usize,
    rounds: u64,
    min_updates: usize,
    timeout_ms: u64,
) -> FederationPlan {
    FederationPlan {
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
        },
        training: TrainingSpec {
            local_steps: 3,
            batch_size: 4,
            seq_len: 32,
            learning_rate: 1e-2,
            weight_decay: 0.0,
            seed: 5,
        },
        rounds: RoundSpec {
            rounds,
            participants,
            min_updates,
            round_timeout_ms: timeout_ms,
        },
    }
}

/// An aggregator configuration on a free loopback port writing into `dir`.
pub fn aggregator_config(plan: FederationPlan, dir: &Path) -> AggregatorConfig {
    AggregatorConfig {
        server: ServerSection {
            listen: "127.0.0.1:0".parse().expect("valid address"),
            output_dir: dir.to_path_buf(),
            linger_after_finish_ms: 2_000,
        },
        plan,
    }
}

/// One language's UDHR, 10% held out.
pub fn corpus(code: &str) -> LocalCorpus {
    let (_, text) = mekong_examples::corpus::udhr(code).expect("embedded language");
    LocalCorpus::from_text(code, text, 0.1, &ByteTokenizer).expect("UDHR text is long enough")
}

/// Participant options for `name` against `url`.
pub fn participant_options(url: &str, name: &str, language: &str) -> ParticipantOptions {
    ParticipantOptions {
        aggregator_url: url.to_string(),
        name: name.to_string(),
        language: language.to_string(),
        evaluate: false,
        connect_patience: Duration::from_secs(20),
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

/// Σ n_i·x_i / Σ n_i computed directly, in f64, rounded once to f32.
pub fn weighted_mean(uploads: &[RecordedUpload]) -> Vec<f32> {
    let len = uploads[0].values.len();
    let total: u64 = uploads.iter().map(|u| u.num_samples).sum();
    (0..len)
        .map(|j| {
            let s: f64 = uploads
                .iter()
                .map(|u| u.num_samples as f64 * u.values[j] as f64)
                .sum();
            (s / total as f64) as f32
        })
        .collect()
}
