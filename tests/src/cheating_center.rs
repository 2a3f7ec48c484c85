//! A cheating center for tests: a real gRPC server on loopback that labs connect to as
//! their aggregator. It forwards every call to a real, honest aggregator behind it, and
//! deviates on purpose where the test says, by rewriting what the labs are told (the plan
//! at `Join`, the tasks of `FetchTask`). It records every call the labs make, so a test
//! can show what the center received.
//!
//! This is how a modified aggregator looks to a lab: the same service, the same messages,
//! some of them changed. The labs under test are the real participant runtime.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Mutex};

use mekong_proto::MAX_MESSAGE_BYTES;
use mekong_proto::v1::{
    self as pb,
    federation_client::FederationClient,
    federation_server::{Federation, FederationServer},
};
use tokio::task::JoinHandle;
use tokio_stream::{Stream, StreamExt, wrappers::TcpListenerStream};
use tonic::transport::Channel;
use tonic::{Request, Response, Status, Streaming};

/// Rewrites the plan and roster a lab is sent at `Join`.
pub type JoinTamper = Box<dyn Fn(&mut pb::JoinResponse) + Send + Sync>;
/// Rewrites a task before the lab sees it; called with the lab's name (its participant id
/// if it never joined through this center).
pub type TaskTamper = Box<dyn Fn(&str, &mut pb::FetchTaskResponse) + Send + Sync>;
/// Decides whether a lab's secure-aggregation message reaches the aggregator (`true`) or is
/// kept by the center, which answers it as accepted (`false`); called with the lab's name.
pub type SecureTamper = Box<dyn Fn(&str, &pb::SecureAggregateRequest) -> bool + Send + Sync>;

/// How the center deviates.
#[derive(Default)]
pub struct Deviation {
    pub join: Option<JoinTamper>,
    pub task: Option<TaskTamper>,
    pub secure: Option<SecureTamper>,
}

/// One call a lab made to the center.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Call {
    pub method: &'static str,
    pub participant_id: String,
    /// The round the call names, where it names one.
    pub round: Option<u64>,
}

/// Everything the center received.
#[derive(Debug, Default)]
pub struct Received {
    pub calls: Vec<Call>,
    /// Values of plaintext updates (`SubmitUpdate` payloads and update-stream chunks), as
    /// bytes: empty when no lab sent its update in the clear.
    pub plaintext_bytes: usize,
    /// Participant ids by name, from the `Join` answers.
    pub ids: BTreeMap<String, String>,
    /// Every secure-aggregation message, forwarded or kept.
    pub secure_messages: Vec<pb::SecureAggregateRequest>,
    /// Masked inputs as streamed, by (participant id, round, attempt): little-endian words.
    pub masked: BTreeMap<(String, u64, u32), Vec<u8>>,
}

impl Received {
    /// Calls of one method.
    pub fn count(&self, method: &str) -> usize {
        self.calls.iter().filter(|c| c.method == method).count()
    }

    /// Calls of one method naming `round`.
    pub fn count_in_round(&self, method: &str, round: u64) -> usize {
        self.calls
            .iter()
            .filter(|c| c.method == method && c.round == Some(round))
            .count()
    }
}

struct Service {
    upstream: FederationClient<Channel>,
    deviation: Deviation,
    received: Arc<Mutex<Received>>,
}

impl Service {
    fn record(&self, method: &'static str, participant_id: &str, round: Option<u64>) {
        self.received.lock().unwrap().calls.push(Call {
            method,
            participant_id: participant_id.to_string(),
            round,
        });
    }

    fn upstream(&self) -> FederationClient<Channel> {
        self.upstream.clone()
    }

    /// The name a participant id was given to at `Join`, else the id itself.
    fn name_of(&self, id: &str) -> String {
        let received = self.received.lock().unwrap();
        received
            .ids
            .iter()
            .find(|(_, i)| i.as_str() == id)
            .map_or_else(|| id.to_string(), |(n, _)| n.clone())
    }
}

/// A running cheating center.
pub struct CheatingCenter {
    addr: SocketAddr,
    received: Arc<Mutex<Received>>,
    handle: JoinHandle<()>,
}

impl CheatingCenter {
    /// Serves on a free loopback port, forwarding to the aggregator at `upstream_url`.
    pub async fn start(upstream_url: &str, deviation: Deviation) -> Self {
        let channel = Channel::from_shared(upstream_url.to_string())
            .unwrap()
            .connect_lazy();
        let upstream = FederationClient::new(channel)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let received = Arc::new(Mutex::new(Received::default()));
        let service = Service {
            upstream,
            deviation,
            received: received.clone(),
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = FederationServer::new(service)
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES);
        let handle = tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(server)
                .serve_with_incoming(TcpListenerStream::new(listener))
                .await
                .unwrap();
        });
        CheatingCenter {
            addr,
            received,
            handle,
        }
    }

    /// The address labs dial.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// What the labs sent it so far.
    pub fn received(&self) -> std::sync::MutexGuard<'_, Received> {
        self.received.lock().unwrap()
    }
}

impl Drop for CheatingCenter {
    fn drop(&mut self) {
        self.handle.abort();
    }
}

/// Items of a lab's client stream, forwarded until it ends or breaks.
fn forward<T: Send + 'static>(
    inbound: Streaming<T>,
    mut seen: impl FnMut(&T) + Send + 'static,
) -> impl Stream<Item = T> + Send + 'static {
    inbound.map_while(|item| item.ok()).map(move |item| {
        seen(&item);
        item
    })
}

#[tonic::async_trait]
impl Federation for Service {
    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        let req = request.into_inner();
        let name = req.participant_name.clone();
        self.record("Join", &name, None);
        let mut answer = self.upstream().join(req).await?.into_inner();
        self.received
            .lock()
            .unwrap()
            .ids
            .insert(name, answer.participant_id.clone());
        if let Some(tamper) = &self.deviation.join {
            tamper(&mut answer);
        }
        Ok(Response::new(answer))
    }

    async fn fetch_task(
        &self,
        request: Request<pb::FetchTaskRequest>,
    ) -> Result<Response<pb::FetchTaskResponse>, Status> {
        let req = request.into_inner();
        let id = req.participant_id.clone();
        self.record("FetchTask", &id, None);
        let mut answer = self.upstream().fetch_task(req).await?.into_inner();
        if let Some(tamper) = &self.deviation.task {
            tamper(&self.name_of(&id), &mut answer);
        }
        Ok(Response::new(answer))
    }

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let req = request.into_inner();
        self.record("SubmitUpdate", &req.participant_id, Some(req.round));
        let bytes = match &req.payload {
            Some(pb::submit_update_request::Payload::Plaintext(p)) => p.values_f32_le.len(),
            None => 0,
        };
        self.received.lock().unwrap().plaintext_bytes += bytes;
        Ok(Response::new(
            self.upstream().submit_update(req).await?.into_inner(),
        ))
    }

    async fn submit_update_stream(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        let received = self.received.clone();
        let stream = forward(request.into_inner(), move |chunk: &pb::UpdateChunk| {
            let mut r = received.lock().unwrap();
            r.plaintext_bytes += chunk.values_f32_le.len();
            if let Some(h) = &chunk.header {
                r.calls.push(Call {
                    method: "SubmitUpdateStream",
                    participant_id: h.participant_id.clone(),
                    round: Some(h.round),
                });
            }
        });
        Ok(Response::new(
            self.upstream()
                .submit_update_stream(stream)
                .await?
                .into_inner(),
        ))
    }

    async fn update_received(
        &self,
        request: Request<pb::UpdateReceivedRequest>,
    ) -> Result<Response<pb::UpdateReceivedResponse>, Status> {
        let req = request.into_inner();
        self.record("UpdateReceived", &req.participant_id, Some(req.round));
        Ok(Response::new(
            self.upstream().update_received(req).await?.into_inner(),
        ))
    }

    async fn secure_aggregate(
        &self,
        request: Request<pb::SecureAggregateRequest>,
    ) -> Result<Response<pb::SecureAggregateResponse>, Status> {
        let req = request.into_inner();
        self.record("SecureAggregate", &req.participant_id, Some(req.round));
        self.received
            .lock()
            .unwrap()
            .secure_messages
            .push(req.clone());
        if let Some(tamper) = &self.deviation.secure
            && !tamper(&self.name_of(&req.participant_id), &req)
        {
            return Ok(Response::new(pb::SecureAggregateResponse {}));
        }
        Ok(Response::new(
            self.upstream().secure_aggregate(req).await?.into_inner(),
        ))
    }

    async fn submit_masked(
        &self,
        request: Request<Streaming<pb::MaskedChunk>>,
    ) -> Result<Response<pb::SubmitMaskedResponse>, Status> {
        let received = self.received.clone();
        let mut first: Option<(String, u64, u32)> = None;
        let stream = forward(request.into_inner(), move |chunk: &pb::MaskedChunk| {
            let mut r = received.lock().unwrap();
            let key = first
                .get_or_insert_with(|| {
                    r.calls.push(Call {
                        method: "SubmitMasked",
                        participant_id: chunk.participant_id.clone(),
                        round: Some(chunk.round),
                    });
                    (chunk.participant_id.clone(), chunk.round, chunk.attempt)
                })
                .clone();
            let words = r.masked.entry(key).or_default();
            let offset = 4 * chunk.offset as usize;
            words.truncate(offset);
            words.extend_from_slice(&chunk.words_u32_le);
        });
        Ok(Response::new(
            self.upstream().submit_masked(stream).await?.into_inner(),
        ))
    }

    async fn masked_received(
        &self,
        request: Request<pb::MaskedReceivedRequest>,
    ) -> Result<Response<pb::MaskedReceivedResponse>, Status> {
        let req = request.into_inner();
        self.record("MaskedReceived", &req.participant_id, Some(req.round));
        Ok(Response::new(
            self.upstream().masked_received(req).await?.into_inner(),
        ))
    }

    async fn round_status(
        &self,
        request: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatusResponse>, Status> {
        Ok(Response::new(
            self.upstream()
                .round_status(request.into_inner())
                .await?
                .into_inner(),
        ))
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        let req = request.into_inner();
        self.record("ReportMetrics", &req.participant_id, Some(req.round));
        Ok(Response::new(
            self.upstream().report_metrics(req).await?.into_inner(),
        ))
    }

    type DownloadAdapterStream =
        Pin<Box<dyn Stream<Item = Result<pb::AdapterChunk, Status>> + Send + 'static>>;

    async fn download_adapter(
        &self,
        request: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        let stream = self
            .upstream()
            .download_adapter(request.into_inner())
            .await?
            .into_inner();
        Ok(Response::new(Box::pin(stream)))
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        let req = request.into_inner();
        self.record("Leave", &req.participant_id, None);
        Ok(Response::new(
            self.upstream().leave(req).await?.into_inner(),
        ))
    }
}
