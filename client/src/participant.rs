//! The participant runtime: what a lab runs to take part in a federation.
//!
//! Join, then loop: fetch the round's task (long-poll), load the global adapter into the
//! local model, train on local text, hand in the update, repeat until the aggregator says the
//! run is finished. Local text never leaves this module: the only things sent are the
//! participant's name and language label, the update built by [`crate::upload`], its sample
//! weight and aggregate training losses.

use std::sync::Arc;
use std::time::Duration;

use burn::prelude::Device;
use fedcore::{FederationPlan, LoraAdapter};
use mekong_proto::MAX_MESSAGE_BYTES;
use mekong_proto::convert::{PayloadError, decode_adapter_payload};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use thiserror::Error;
use tonic::transport::Channel;
use tracing::{info, warn};

use crate::data::LocalCorpus;
use crate::error::ModelError;
use crate::eval::{EvalStats, evaluate};
use crate::model::LoraLlama;
use crate::train::{TrainStats, train_local};
use crate::upload;

/// Why a participant stopped.
#[derive(Debug, Error)]
pub enum ParticipantError {
    #[error("cannot reach the aggregator at {url}: {message}")]
    Connect { url: String, message: String },
    #[error("aggregator refused {call}: {status}")]
    Refused {
        call: &'static str,
        status: tonic::Status,
    },
    #[error("the aggregator's plan is invalid: {0}")]
    Plan(#[from] fedcore::ConfigError),
    #[error("the aggregator sent an unusable adapter: {0}")]
    Adapter(#[from] PayloadError),
    #[error("the aggregator sent an empty answer to {0}")]
    EmptyAnswer(&'static str),
    #[error("model: {0}")]
    Model(#[from] ModelError),
    #[error("local training task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// How to take part.
#[derive(Debug, Clone)]
pub struct ParticipantOptions {
    /// `http://host:port` of the aggregator.
    pub aggregator_url: String,
    /// Stable lab name (1-64 of `[A-Za-z0-9._-]`).
    pub name: String,
    /// Language label of the local data, for reports.
    pub language: String,
    /// Evaluate the held-out text before the first round and with the final adapter.
    pub evaluate: bool,
    /// How long to keep retrying an unreachable aggregator before giving up.
    pub connect_patience: Duration,
}

/// Progress notifications, for progress displays and tests.
pub trait ParticipantObserver: Send + Sync {
    /// Called after local training of a round, with exactly the values about to be uploaded.
    fn round_trained(
        &self,
        _name: &str,
        _round: u64,
        _stats: &TrainStats,
        _upload: &[f32],
        _num_samples: u64,
    ) {
    }
    /// Called when the aggregator has accepted the round's update.
    fn update_accepted(&self, _name: &str, _round: u64, _round_closed: bool) {}
}

/// An observer that ignores everything.
pub struct Quiet;
impl ParticipantObserver for Quiet {}

/// One round as this participant saw it.
#[derive(Debug, Clone)]
pub struct RoundReport {
    pub round: u64,
    pub train: TrainStats,
}

/// What a participant ends with.
#[derive(Debug, Clone)]
pub struct ParticipantReport {
    pub name: String,
    pub language: String,
    pub plan: FederationPlan,
    pub rounds: Vec<RoundReport>,
    /// Held-out evaluation of the starting adapter (the base model), when asked for.
    pub initial_eval: Option<EvalStats>,
    /// Held-out evaluation of the final global adapter, when asked for.
    pub final_eval: Option<EvalStats>,
    pub final_adapter: LoraAdapter,
}

/// Takes part in a federation until it finishes.
pub async fn run(
    options: ParticipantOptions,
    corpus: LocalCorpus,
    device: Device,
    observer: Arc<dyn ParticipantObserver>,
) -> Result<ParticipantReport, ParticipantError> {
    let client = connect(&options).await?;
    let joined = call_with_retry(&options, "Join", || {
        let mut c = client.clone();
        let req = pb::JoinRequest {
            participant_name: options.name.clone(),
            language: options.language.clone(),
            client_version: env!("CARGO_PKG_VERSION").to_string(),
        };
        async move { c.join(req).await }
    })
    .await?;
    let plan = FederationPlan::from_json(&joined.plan_json)?;
    let template = plan.initial_adapter();
    if template.b_manifest().hash_hex() != joined.upload_layout_hash {
        return Err(ParticipantError::Plan(fedcore::ConfigError::field(
            "plan",
            "the upload layout derived from the plan differs from the aggregator's",
        )));
    }
    info!(participant = %options.name, federation = %joined.federation, "joined");
    let id = joined.participant_id;

    let corpus = Arc::new(corpus);
    let mut model = LoraLlama::new(&plan.model, &plan.lora, &device)?;
    let initial_eval = if options.evaluate {
        let (m, stats) = evaluate_blocking(model, &corpus, plan.training.seq_len, &device).await?;
        model = m;
        Some(stats)
    } else {
        None
    };
    let mut rounds = Vec::new();

    loop {
        let task = call_with_retry(&options, "FetchTask", || {
            let mut c = client.clone();
            let req = pb::FetchTaskRequest {
                participant_id: id.clone(),
                wait_ms: 10_000,
            };
            async move { c.fetch_task(req).await }
        })
        .await?
        .task
        .ok_or(ParticipantError::EmptyAnswer("FetchTask"))?;

        match task {
            pb::fetch_task_response::Task::Wait(w) => {
                tracing::debug!(participant = %options.name, reason = %w.reason, "waiting");
                tokio::time::sleep(Duration::from_millis(w.retry_after_ms.min(5_000).into())).await;
            }
            pb::fetch_task_response::Task::Train(t) => {
                let global = decode_adapter_payload(t.global_adapter.as_ref(), &template)?;
                let global_hash = global.content_hash();
                let seed = plan.training.local_seed(&options.name, t.round);
                let spec = plan.training.clone();
                let data = corpus.clone();
                let dev = device.clone();
                let (trained, stats) = tokio::task::spawn_blocking(move || {
                    let m = model.load_adapter(&global)?;
                    train_local(m, &data.train, &spec, seed, &dev)
                })
                .await??;
                model = trained;
                let local = model.export_adapter();
                let manifest = template.b_manifest();
                let values = local.flatten(&manifest).map_err(ModelError::Adapter)?;
                let num_samples = corpus.train_samples() as u64;
                observer.round_trained(&options.name, t.round, &stats, &values, num_samples);
                let request = pb::SubmitUpdateRequest {
                    participant_id: id.clone(),
                    round: t.round,
                    layout_hash: manifest.hash_hex(),
                    base_adapter_hash: global_hash,
                    num_samples,
                    payload: Some(upload::encode(&values)),
                    metrics: Some(pb::TrainingMetrics {
                        steps: stats.steps as u32,
                        tokens: stats.tokens as u64,
                        train_loss_first: stats.first_loss,
                        train_loss_last: stats.last_loss,
                    }),
                };
                let submitted = call_with_retry(&options, "SubmitUpdate", || {
                    let mut c = client.clone();
                    let req = request.clone();
                    async move { c.submit_update(req).await }
                })
                .await;
                match submitted {
                    Ok(r) => {
                        info!(
                            participant = %options.name,
                            round = t.round,
                            loss_first = stats.first_loss,
                            loss_last = stats.last_loss,
                            received = r.updates_received,
                            cohort = r.cohort_size,
                            "update accepted"
                        );
                        observer.update_accepted(&options.name, t.round, r.round_closed);
                        rounds.push(RoundReport {
                            round: t.round,
                            train: stats,
                        });
                    }
                    // The round closed without us (deadline): the next task tells us what next.
                    Err(ParticipantError::Refused { status, .. })
                        if status.code() == tonic::Code::FailedPrecondition =>
                    {
                        warn!(participant = %options.name, round = t.round, %status, "update not taken");
                    }
                    Err(e) => return Err(e),
                }
            }
            pb::fetch_task_response::Task::Finished(f) => {
                let final_adapter = decode_adapter_payload(f.final_adapter.as_ref(), &template)?;
                let final_eval = if options.evaluate {
                    let m = model.load_adapter(&final_adapter)?;
                    Some(
                        evaluate_blocking(m, &corpus, plan.training.seq_len, &device)
                            .await?
                            .1,
                    )
                } else {
                    None
                };
                info!(participant = %options.name, rounds = f.rounds_completed, "run finished");
                return Ok(ParticipantReport {
                    name: options.name,
                    language: options.language,
                    plan,
                    rounds,
                    initial_eval,
                    final_eval,
                    final_adapter,
                });
            }
        }
    }
}

/// Evaluates on the held-out text off the async runtime's worker threads.
async fn evaluate_blocking(
    model: LoraLlama,
    corpus: &Arc<LocalCorpus>,
    seq_len: usize,
    device: &Device,
) -> Result<(LoraLlama, EvalStats), ParticipantError> {
    let corpus = corpus.clone();
    let device = device.clone();
    tokio::task::spawn_blocking(move || {
        let stats = evaluate(&model, &corpus.heldout, seq_len, &device)?;
        Ok((model, stats))
    })
    .await?
}

async fn connect(
    options: &ParticipantOptions,
) -> Result<FederationClient<Channel>, ParticipantError> {
    let endpoint = Channel::from_shared(options.aggregator_url.clone()).map_err(|e| {
        ParticipantError::Connect {
            url: options.aggregator_url.clone(),
            message: e.to_string(),
        }
    })?;
    let channel = endpoint
        .connect_timeout(Duration::from_secs(5))
        .connect_lazy();
    Ok(FederationClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES))
}

/// Calls `f` until it succeeds, retrying with exponential backoff (200 ms doubling to 5 s)
/// while the aggregator is unreachable, for at most `connect_patience`.
async fn call_with_retry<T, F, Fut>(
    options: &ParticipantOptions,
    call: &'static str,
    mut f: F,
) -> Result<T, ParticipantError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let give_up = tokio::time::Instant::now() + options.connect_patience;
    let mut backoff = Duration::from_millis(200);
    loop {
        match f().await {
            Ok(r) => return Ok(r.into_inner()),
            Err(status) if status.code() == tonic::Code::Unavailable => {
                if tokio::time::Instant::now() + backoff > give_up {
                    return Err(ParticipantError::Connect {
                        url: options.aggregator_url.clone(),
                        message: status.message().to_string(),
                    });
                }
                warn!(participant = %options.name, call, "aggregator unavailable; retrying in {backoff:?}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            Err(status) => return Err(ParticipantError::Refused { call, status }),
        }
    }
}
