//! Receiving a global adapter: inline in the task answer when it is small, otherwise by
//! reference through `DownloadAdapter`, in chunks that are each checked against their
//! SHA-256 as they arrive. A broken connection resumes at the first byte not yet received
//! (nothing received and checked is fetched again), and the assembled whole is checked
//! against the adapter's content hash by [`decode_adapter_payload`].

use std::time::Duration;

use fedcore::strategy::GlobalModel;
use mekong_proto::convert::{PayloadError, decode_adapter_payload};
use mekong_proto::v1::{self as pb, federation_client::FederationClient};
use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::transport::Channel;

/// A chunk failing its checksum this many times in a row ends the download.
const MAX_BAD_CHUNKS: u32 = 3;

/// Why a download failed.
#[derive(Debug, Error)]
pub enum DownloadError {
    #[error("the aggregator sent an unusable adapter: {0}")]
    Payload(#[from] PayloadError),
    #[error(
        "adapter {hash}: the aggregator announced {announced} bytes of values, but the plan's layout has {expected}"
    )]
    Size {
        hash: String,
        announced: u64,
        expected: u64,
    },
    #[error(
        "adapter {hash}: chunk at byte {offset} failed its SHA-256 check {MAX_BAD_CHUNKS} times"
    )]
    Checksum { hash: String, offset: u64 },
    #[error("adapter {hash}: expected a chunk at byte {expected}, got one at {got}")]
    Order {
        hash: String,
        expected: u64,
        got: u64,
    },
    #[error("adapter {hash}: the download made no progress for {patience:?}: {message}")]
    Stalled {
        hash: String,
        patience: Duration,
        message: String,
    },
    #[error("adapter {hash}: the aggregator refused the download: {status}")]
    Refused { hash: String, status: tonic::Status },
}

/// What a download ended with.
#[derive(Debug)]
pub enum Fetched {
    Adapter(GlobalModel),
    /// The aggregator moved on to another global adapter: fetch the task again.
    Stale,
}

/// How a download retries and reports.
pub struct DownloadOptions<'a> {
    /// How long to keep retrying without receiving a byte.
    pub patience: Duration,
    /// Whether a failed call is worth retrying (an unreachable or restarted aggregator).
    pub transient: &'a (dyn Fn(&tonic::Status) -> bool + Sync),
    /// Called with (bytes received, total) after each checked chunk.
    pub progress: &'a (dyn Fn(u64, u64) + Sync),
}

/// The adapter `payload` describes: decoded at once when it is inline, downloaded when it
/// is a reference. `template` (the plan's initial model) gives names and shapes.
pub async fn fetch_adapter(
    client: &FederationClient<Channel>,
    participant_id: &str,
    payload: Option<&pb::AdapterPayload>,
    template: &GlobalModel,
    options: &DownloadOptions<'_>,
) -> Result<Fetched, DownloadError> {
    let payload = payload.ok_or(PayloadError::Missing)?;
    if !payload.values_f32_le.is_empty() || payload.values_bytes == 0 {
        return Ok(Fetched::Adapter(decode_adapter_payload(
            Some(payload),
            template,
        )?));
    }
    let hash = payload.content_hash.clone();
    let expected = 4 * template.manifest().len() as u64;
    if payload.values_bytes != expected {
        return Err(DownloadError::Size {
            hash,
            announced: payload.values_bytes,
            expected,
        });
    }
    let Some(values) = download(client, participant_id, &hash, expected, options).await? else {
        return Ok(Fetched::Stale);
    };
    let whole = pb::AdapterPayload {
        values_f32_le: values,
        ..payload.clone()
    };
    Ok(Fetched::Adapter(decode_adapter_payload(
        Some(&whole),
        template,
    )?))
}

/// The `total` bytes of adapter `hash`, chunk by chunk, resuming after broken connections.
/// `None` when the aggregator no longer serves it.
async fn download(
    client: &FederationClient<Channel>,
    participant_id: &str,
    hash: &str,
    total: u64,
    options: &DownloadOptions<'_>,
) -> Result<Option<Vec<u8>>, DownloadError> {
    let mut values = Vec::with_capacity(total as usize);
    let mut bad_chunks = 0;
    let mut backoff = Duration::from_millis(200);
    let mut give_up = tokio::time::Instant::now() + options.patience;
    while (values.len() as u64) < total {
        let request = pb::DownloadAdapterRequest {
            participant_id: participant_id.to_string(),
            content_hash: hash.to_string(),
            offset: values.len() as u64,
        };
        let mut c = client.clone();
        let failure = match c.download_adapter(request).await {
            Err(status) => status,
            Ok(stream) => {
                let mut stream = stream.into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(chunk)) => {
                            let at = values.len() as u64;
                            if chunk.offset != at {
                                return Err(DownloadError::Order {
                                    hash: hash.to_string(),
                                    expected: at,
                                    got: chunk.offset,
                                });
                            }
                            let fits = at + chunk.values_f32_le.len() as u64 <= total;
                            if !fits || Sha256::digest(&chunk.values_f32_le)[..] != chunk.sha256[..]
                            {
                                bad_chunks += 1;
                                if bad_chunks >= MAX_BAD_CHUNKS {
                                    return Err(DownloadError::Checksum {
                                        hash: hash.to_string(),
                                        offset: at,
                                    });
                                }
                                tracing::warn!(
                                    offset = at,
                                    "adapter chunk failed its checksum; fetching it again"
                                );
                                break tonic::Status::data_loss("chunk checksum");
                            }
                            bad_chunks = 0;
                            values.extend_from_slice(&chunk.values_f32_le);
                            (options.progress)(values.len() as u64, total);
                            give_up = tokio::time::Instant::now() + options.patience;
                            backoff = Duration::from_millis(200);
                        }
                        // The stream ended: complete, or cut short (asked again below).
                        Ok(None) => {
                            break tonic::Status::unavailable("download stream ended early");
                        }
                        Err(status) => break status,
                    }
                }
            }
        };
        if values.len() as u64 == total {
            break;
        }
        match failure.code() {
            tonic::Code::FailedPrecondition => return Ok(None),
            tonic::Code::DataLoss => continue,
            _ if (options.transient)(&failure) || failure.code() == tonic::Code::Unavailable => {
                if tokio::time::Instant::now() + backoff > give_up {
                    return Err(DownloadError::Stalled {
                        hash: hash.to_string(),
                        patience: options.patience,
                        message: failure.message().to_string(),
                    });
                }
                tracing::warn!(
                    received = values.len(),
                    total,
                    "adapter download interrupted; resuming in {backoff:?}"
                );
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            _ => {
                return Err(DownloadError::Refused {
                    hash: hash.to_string(),
                    status: failure,
                });
            }
        }
    }
    Ok(Some(values))
}
