//! A tower layer that enforces [`LimitsSection`] on every request body as its bytes
//! arrive, before tonic buffers a message and before a handler sees it (issue #26).
//!
//! tonic's own decoding limit is one number for the whole service, checked once a message
//! is buffered; here each method gets its own, read from the 5-byte gRPC frame header, so a
//! call that announces more than its method takes is refused before its payload is read.
//! Each caller's unfinished messages (announced, not yet arrived whole) count against its
//! budget across all its connections and streams, and a unary request must arrive whole in
//! time. Plaintext uploads are refused at their header when the run aggregates securely.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::http::Request;
use hyper::body::{Body, Bytes, Frame, SizeHint};
use tonic::Status;
use tracing::warn;

use crate::admin::Rpc;
use crate::limits::LimitsSection;
use crate::status_map::status_for;

/// Bytes of the gRPC length prefix: a compression flag and a big-endian u32 length.
const FRAME_HEADER_BYTES: usize = 5;

/// Wraps the gRPC routes with [`LimitMessages`].
#[derive(Clone)]
pub struct MessageLimitLayer {
    rules: Arc<Rules>,
}

struct Rules {
    limits: LimitsSection,
    /// The run aggregates securely: plaintext uploads are refused at their header.
    secure: bool,
    budgets: CallerBudgets,
}

impl MessageLimitLayer {
    pub fn new(limits: LimitsSection, secure: bool) -> Self {
        let budgets = CallerBudgets::new(limits.unfinished_bytes_per_caller);
        MessageLimitLayer {
            rules: Arc::new(Rules {
                limits,
                secure,
                budgets,
            }),
        }
    }
}

impl<S> tower::Layer<S> for MessageLimitLayer {
    type Service = LimitMessages<S>;

    fn layer(&self, inner: S) -> LimitMessages<S> {
        LimitMessages {
            inner,
            rules: self.rules.clone(),
        }
    }
}

/// Wraps each request body in a [`Limited`] body for its method and caller.
#[derive(Clone)]
pub struct LimitMessages<S> {
    inner: S,
    rules: Arc<Rules>,
}

impl<S> tower::Service<Request<tonic::body::Body>> for LimitMessages<S>
where
    S: tower::Service<Request<tonic::body::Body>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        let Some((limit, field)) = self.rules.limits.message_limit(rpc) else {
            // Not a method of the service: the router answers it without reading the body.
            return self.inner.call(request);
        };
        let refusal = (self.rules.secure
            && matches!(rpc, Rpc::SubmitUpdate | Rpc::SubmitUpdateStream))
        .then(|| status_for(&fedcore::RoundError::SecureAggregationRequired));
        let caller = caller_of(&request);
        let unary = !matches!(rpc, Rpc::SubmitUpdateStream | Rpc::SubmitMasked);
        let timeout = self.rules.limits.request_body_timeout();
        let rules = self.rules.clone();
        let request = request.map(|body| {
            tonic::body::Body::new(Limited {
                inner: Box::pin(body),
                frames: FrameReader::default(),
                method: MethodRule {
                    rpc,
                    limit,
                    field,
                    refusal,
                },
                caller,
                charged: 0,
                rules,
                deadline: unary.then(|| (Box::pin(tokio::time::sleep(timeout)), timeout)),
                failed: false,
            })
        });
        self.inner.call(request)
    }
}

/// Who a request counts against: the certificate's participant under mutual TLS. Without
/// TLS there is no identity before the message is read, and labs on one host or behind one
/// NAT share an address, so each connection counts alone: the per-caller bound holds
/// under mutual TLS only (plaintext serving is for loopback pilots and tests).
fn caller_of<B>(request: &Request<B>) -> String {
    if let Some(peer) = request
        .extensions()
        .get::<mekong_proto::tls::PeerCertificate>()
    {
        return format!("participant {}", peer.participant);
    }
    match request
        .extensions()
        .get::<tonic::transport::server::TcpConnectInfo>()
        .and_then(|info| info.remote_addr())
    {
        Some(addr) => format!("connection {addr}"),
        None => "an unidentified caller".to_string(),
    }
}

/// What one method takes.
struct MethodRule {
    rpc: Rpc,
    limit: usize,
    field: &'static str,
    /// Set when the method is refused outright (a plaintext upload under secure
    /// aggregation).
    refusal: Option<Status>,
}

/// A request body checked frame by frame.
pub struct Limited<B> {
    inner: Pin<Box<B>>,
    frames: FrameReader,
    method: MethodRule,
    caller: String,
    /// Bytes of the message in progress charged to the caller's budget.
    charged: usize,
    rules: Arc<Rules>,
    /// Unary requests: when the whole request must have arrived, and the allowance.
    deadline: Option<(Pin<Box<tokio::time::Sleep>>, Duration)>,
    /// An error was returned; nothing more is read.
    failed: bool,
}

impl<B> Limited<B> {
    /// Checks one message's announced length against the method and the caller's budget,
    /// and charges it.
    fn start_message(&mut self, len: usize) -> Result<(), Status> {
        let method = &self.method;
        if let Some(refusal) = &method.refusal {
            return Err(refusal.clone());
        }
        if len > method.limit {
            warn!(caller = %self.caller, method = method.rpc.name(), bytes = len, limit = method.limit, "message over its method's limit refused at its header");
            return Err(Status::resource_exhausted(format!(
                "{}: a message of {len} bytes is over this aggregator's limit of {} bytes for \
                 it ({})",
                method.rpc.name(),
                method.limit,
                method.field
            )));
        }
        if let Err(in_flight) = self.rules.budgets.charge(&self.caller, len) {
            warn!(caller = %self.caller, method = method.rpc.name(), bytes = len, in_flight, "caller's unfinished messages over its budget; message refused");
            return Err(Status::resource_exhausted(format!(
                "{}: {} already has {in_flight} bytes of unfinished messages in flight; {len} \
                 more would pass its limit of {} bytes (limits.unfinished_bytes_per_caller)",
                method.rpc.name(),
                self.caller,
                self.rules.limits.unfinished_bytes_per_caller
            )));
        }
        self.charged = len;
        Ok(())
    }

    fn finish_message(&mut self) {
        self.rules.budgets.release(&self.caller, self.charged);
        self.charged = 0;
    }

    /// Reads one data frame's bytes through the framing.
    fn check(&mut self, data: &[u8]) -> Result<(), Status> {
        let mut frames = std::mem::take(&mut self.frames);
        let result = frames.feed(data, |event| match event {
            FrameEvent::Header { len } => self.start_message(len),
            FrameEvent::Complete => {
                self.finish_message();
                Ok(())
            }
        });
        self.frames = frames;
        result
    }
}

impl<B> Drop for Limited<B> {
    fn drop(&mut self) {
        self.finish_message();
    }
}

impl<B> Body for Limited<B>
where
    B: Body<Data = Bytes, Error = Status>,
{
    type Data = Bytes;
    type Error = Status;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Status>>> {
        let this = self.get_mut();
        if this.failed {
            return Poll::Ready(None);
        }
        let polled = this.inner.as_mut().poll_frame(cx);
        let outcome = match polled {
            Poll::Ready(Some(Ok(frame))) => match frame.data_ref().map(|d| this.check(d)) {
                Some(Err(status)) => Err(status),
                _ => Ok(Poll::Ready(Some(Ok(frame)))),
            },
            Poll::Ready(None) => {
                this.deadline = None;
                Ok(Poll::Ready(None))
            }
            Poll::Ready(Some(Err(status))) => Ok(Poll::Ready(Some(Err(status)))),
            Poll::Pending => {
                let expired = match &mut this.deadline {
                    Some((sleep, allowed)) => {
                        sleep.as_mut().poll(cx).is_ready().then_some(*allowed)
                    }
                    None => None,
                };
                match expired {
                    Some(allowed) => {
                        warn!(caller = %this.caller, method = this.method.rpc.name(), "unary request not complete in time; cut");
                        Err(Status::deadline_exceeded(format!(
                            "{}: the request did not arrive whole within {} s \
                             (limits.request_body_timeout_ms)",
                            this.method.rpc.name(),
                            allowed.as_secs_f64()
                        )))
                    }
                    None => Ok(Poll::Pending),
                }
            }
        };
        match outcome {
            Ok(poll) => poll,
            Err(status) => {
                this.failed = true;
                this.finish_message();
                Poll::Ready(Some(Err(status)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.failed || self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Bytes of unfinished messages per caller.
struct CallerBudgets {
    cap: usize,
    in_flight: Mutex<HashMap<String, usize>>,
}

impl CallerBudgets {
    fn new(cap: usize) -> Self {
        CallerBudgets {
            cap,
            in_flight: Mutex::new(HashMap::new()),
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<String, usize>> {
        self.in_flight.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Charges `bytes` to `caller`, or answers what it already has in flight when that
    /// would pass the cap.
    fn charge(&self, caller: &str, bytes: usize) -> Result<(), usize> {
        let mut map = self.map();
        let used = map.get(caller).copied().unwrap_or(0);
        if used + bytes > self.cap {
            return Err(used);
        }
        if bytes > 0 {
            map.insert(caller.to_string(), used + bytes);
        }
        Ok(())
    }

    fn release(&self, caller: &str, bytes: usize) {
        if bytes == 0 {
            return;
        }
        let mut map = self.map();
        if let Some(used) = map.get_mut(caller) {
            *used = used.saturating_sub(bytes);
            if *used == 0 {
                map.remove(caller);
            }
        }
    }

    #[cfg(test)]
    fn used(&self, caller: &str) -> usize {
        self.map().get(caller).copied().unwrap_or(0)
    }
}

/// What the framing says as bytes pass.
#[derive(Debug, PartialEq, Eq)]
enum FrameEvent {
    /// A message's length prefix was read: `len` bytes follow.
    Header { len: usize },
    /// The message begun by the last header has arrived whole.
    Complete,
}

/// Follows gRPC's length-prefixed framing across data frames of any size.
#[derive(Debug, Default)]
struct FrameReader {
    header: [u8; FRAME_HEADER_BYTES],
    header_len: usize,
    /// Payload bytes of the current message still to come.
    remaining: usize,
}

impl FrameReader {
    fn feed<E>(
        &mut self,
        mut data: &[u8],
        mut on: impl FnMut(FrameEvent) -> Result<(), E>,
    ) -> Result<(), E> {
        while !data.is_empty() {
            if self.remaining > 0 {
                let n = self.remaining.min(data.len());
                self.remaining -= n;
                data = &data[n..];
                if self.remaining == 0 {
                    on(FrameEvent::Complete)?;
                }
                continue;
            }
            let n = (FRAME_HEADER_BYTES - self.header_len).min(data.len());
            self.header[self.header_len..self.header_len + n].copy_from_slice(&data[..n]);
            self.header_len += n;
            data = &data[n..];
            if self.header_len == FRAME_HEADER_BYTES {
                self.header_len = 0;
                let len = u32::from_be_bytes([
                    self.header[1],
                    self.header[2],
                    self.header[3],
                    self.header[4],
                ]) as usize;
                on(FrameEvent::Header { len })?;
                if len == 0 {
                    on(FrameEvent::Complete)?;
                } else {
                    self.remaining = len;
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn events(reader: &mut FrameReader, data: &[u8]) -> Vec<FrameEvent> {
        let mut seen = Vec::new();
        reader
            .feed(data, |e| {
                seen.push(e);
                Ok::<_, ()>(())
            })
            .unwrap();
        seen
    }

    #[test]
    fn framing_is_followed_across_any_split() {
        // Three messages: 3 bytes, empty, 300 bytes.
        let mut wire = vec![0, 0, 0, 0, 3, 7, 7, 7, 0, 0, 0, 0, 0, 0, 0, 0, 1, 44];
        wire.extend(std::iter::repeat_n(9u8, 300));
        let whole = {
            let mut r = FrameReader::default();
            events(&mut r, &wire)
        };
        assert_eq!(
            whole,
            [
                FrameEvent::Header { len: 3 },
                FrameEvent::Complete,
                FrameEvent::Header { len: 0 },
                FrameEvent::Complete,
                FrameEvent::Header { len: 300 },
                FrameEvent::Complete,
            ]
        );
        for split in [1, 2, 4, 5, 6, 17, 100] {
            let mut r = FrameReader::default();
            let mut seen = Vec::new();
            for piece in wire.chunks(split) {
                seen.extend(events(&mut r, piece));
            }
            assert_eq!(seen, whole, "pieces of {split} bytes");
        }
    }

    #[test]
    fn a_header_announcing_too_much_stops_the_reader_before_its_payload() {
        let mut r = FrameReader::default();
        let wire = [0u8, 0x10, 0, 0, 0, 1, 2, 3];
        let mut headers = 0;
        let result = r.feed(&wire, |e| match e {
            FrameEvent::Header { len } if len > 1024 => Err(len),
            FrameEvent::Header { .. } => {
                headers += 1;
                Ok(())
            }
            FrameEvent::Complete => Ok(()),
        });
        assert_eq!(result, Err(0x1000_0000));
        assert_eq!(headers, 0);
    }

    #[test]
    fn a_callers_budget_counts_across_its_messages_and_is_given_back() {
        let budgets = CallerBudgets::new(100);
        budgets.charge("a", 60).unwrap();
        assert_eq!(budgets.charge("a", 41), Err(60), "60 + 41 passes 100");
        budgets.charge("b", 100).unwrap();
        budgets.charge("a", 40).unwrap();
        budgets.release("a", 60);
        assert_eq!(budgets.used("a"), 40);
        budgets.release("a", 40);
        assert_eq!(budgets.used("a"), 0);
        assert!(budgets.map().get("a").is_none(), "no entry left behind");
    }
}
