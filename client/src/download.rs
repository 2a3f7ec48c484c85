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

/// Bad chunks in a row (failing their checksum, empty, or the aggregator's DATA_LOSS) that
/// end the download.
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
        "adapter {hash}: the chunk at byte {offset} came bad {MAX_BAD_CHUNKS} times in a row (empty, too long, failing its SHA-256, or the aggregator's DATA_LOSS)"
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
/// `None` when the aggregator no longer serves it. How it waits and when it gives up is
/// [`Pacing`]'s.
async fn download(
    client: &FederationClient<Channel>,
    participant_id: &str,
    hash: &str,
    total: u64,
    options: &DownloadOptions<'_>,
) -> Result<Option<Vec<u8>>, DownloadError> {
    let mut values = Vec::with_capacity(total as usize);
    let mut pacing = Pacing::new(options.patience, tokio::time::Instant::now());
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
                            // An empty chunk is no progress: it must not buy more patience.
                            if chunk.values_f32_le.is_empty()
                                || !fits
                                || Sha256::digest(&chunk.values_f32_le)[..] != chunk.sha256[..]
                            {
                                tracing::warn!(
                                    offset = at,
                                    bytes = chunk.values_f32_le.len(),
                                    "adapter chunk empty, too long or failing its checksum; fetching it again"
                                );
                                break tonic::Status::data_loss(format!(
                                    "chunk at byte {at} is empty, too long or fails its SHA-256"
                                ));
                            }
                            values.extend_from_slice(&chunk.values_f32_le);
                            (options.progress)(values.len() as u64, total);
                            pacing.progressed(tokio::time::Instant::now());
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
        let transient = (options.transient)(&failure);
        match pacing.after_failure(failure.code(), transient, tokio::time::Instant::now()) {
            Next::Stale => return Ok(None),
            Next::Retry(wait) => {
                tracing::warn!(
                    received = values.len(),
                    total,
                    status = %failure,
                    "adapter download interrupted; resuming in {wait:?}"
                );
                tokio::time::sleep(wait).await;
            }
            Next::TooManyBadChunks => {
                return Err(DownloadError::Checksum {
                    hash: hash.to_string(),
                    offset: values.len() as u64,
                });
            }
            Next::Stalled => {
                return Err(DownloadError::Stalled {
                    hash: hash.to_string(),
                    patience: options.patience,
                    message: failure.message().to_string(),
                });
            }
            Next::Refused => {
                return Err(DownloadError::Refused {
                    hash: hash.to_string(),
                    status: failure,
                });
            }
        }
    }
    Ok(Some(values))
}

/// What the download does after a call or stream failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Next {
    /// Ask again from the first missing byte after this pause.
    Retry(Duration),
    /// The aggregator serves another global adapter now.
    Stale,
    /// [`MAX_BAD_CHUNKS`] bad chunks in a row (from the aggregator or found here).
    TooManyBadChunks,
    /// No progress for the whole patience.
    Stalled,
    /// A refusal that asking again would not change.
    Refused,
}

/// How the download loop waits and when it gives up: pure, so its rules are tested without
/// a server. Every retry waits (200 ms, doubling to 5 s), bad chunks (an aggregator's
/// DATA_LOSS, or an empty, oversized or mis-hashed chunk found here) count towards
/// [`MAX_BAD_CHUNKS`], and only a chunk that adds bytes resets the count and the patience.
#[derive(Debug, Clone)]
struct Pacing {
    patience: Duration,
    give_up: tokio::time::Instant,
    backoff: Duration,
    bad_chunks: u32,
}

impl Pacing {
    const FIRST_BACKOFF: Duration = Duration::from_millis(200);
    const MAX_BACKOFF: Duration = Duration::from_secs(5);

    fn new(patience: Duration, now: tokio::time::Instant) -> Self {
        Pacing {
            patience,
            give_up: now + patience,
            backoff: Self::FIRST_BACKOFF,
            bad_chunks: 0,
        }
    }

    /// A chunk added bytes.
    fn progressed(&mut self, now: tokio::time::Instant) {
        self.give_up = now + self.patience;
        self.backoff = Self::FIRST_BACKOFF;
        self.bad_chunks = 0;
    }

    /// The call or stream failed with `code`; `transient` says whether the caller deems it
    /// worth retrying (UNAVAILABLE always is).
    fn after_failure(
        &mut self,
        code: tonic::Code,
        transient: bool,
        now: tokio::time::Instant,
    ) -> Next {
        match code {
            tonic::Code::FailedPrecondition => return Next::Stale,
            tonic::Code::DataLoss => {
                self.bad_chunks += 1;
                if self.bad_chunks >= MAX_BAD_CHUNKS {
                    return Next::TooManyBadChunks;
                }
            }
            tonic::Code::Unavailable => {}
            _ if transient => {}
            _ => return Next::Refused,
        }
        if now + self.backoff > self.give_up {
            return Next::Stalled;
        }
        let wait = self.backoff;
        self.backoff = (self.backoff * 2).min(Self::MAX_BACKOFF);
        Next::Retry(wait)
    }
}

#[cfg(test)]
mod pacing_tests {
    use super::*;
    use tonic::Code;

    #[test]
    fn bad_chunks_back_off_and_end_the_download() {
        let t0 = tokio::time::Instant::now();
        let mut p = Pacing::new(Duration::from_secs(60), t0);
        // The aggregator keeps answering DATA_LOSS: no tight loop, and an end.
        assert_eq!(
            p.after_failure(Code::DataLoss, false, t0),
            Next::Retry(Duration::from_millis(200))
        );
        assert_eq!(
            p.after_failure(Code::DataLoss, false, t0),
            Next::Retry(Duration::from_millis(400))
        );
        assert_eq!(
            p.after_failure(Code::DataLoss, false, t0),
            Next::TooManyBadChunks
        );
        // Progress forgives earlier bad chunks.
        let mut p = Pacing::new(Duration::from_secs(60), t0);
        p.after_failure(Code::DataLoss, false, t0);
        p.after_failure(Code::DataLoss, false, t0);
        p.progressed(t0);
        assert_eq!(
            p.after_failure(Code::DataLoss, false, t0),
            Next::Retry(Duration::from_millis(200))
        );
    }

    #[test]
    fn without_progress_patience_runs_out_and_refusals_end_at_once() {
        let t0 = tokio::time::Instant::now();
        let mut p = Pacing::new(Duration::from_secs(10), t0);
        let mut waited = Duration::ZERO;
        let end = loop {
            match p.after_failure(Code::Unavailable, false, t0 + waited) {
                Next::Retry(wait) => waited += wait,
                other => break other,
            }
        };
        assert_eq!(end, Next::Stalled);
        assert!(
            waited <= Duration::from_secs(10) && waited >= Duration::from_secs(5),
            "{waited:?}"
        );
        // Backoff is capped.
        let mut p = Pacing::new(Duration::from_secs(3600), t0);
        let waits: Vec<_> = (0..8)
            .map(|_| p.after_failure(Code::Unavailable, false, t0))
            .collect();
        assert_eq!(waits[7], Next::Retry(Duration::from_secs(5)));
        // Only progress buys patience: what the stream loop does with an empty chunk is
        // not to call `progressed`, so the clock keeps running.
        let mut p = Pacing::new(Duration::from_secs(1), t0);
        assert_eq!(
            p.after_failure(Code::Unavailable, false, t0 + Duration::from_secs(2)),
            Next::Stalled
        );
        let mut p = Pacing::new(Duration::from_secs(60), t0);
        assert_eq!(
            p.after_failure(Code::FailedPrecondition, false, t0),
            Next::Stale
        );
        assert_eq!(
            p.after_failure(Code::PermissionDenied, false, t0),
            Next::Refused
        );
        assert!(matches!(
            p.after_failure(Code::Internal, true, t0),
            Next::Retry(_)
        ));
    }
}
