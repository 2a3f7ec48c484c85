//! A tower layer around the gRPC server that counts calls and body bytes per method, so the
//! traffic figures are what actually crossed the wire (gRPC messages with their framing),
//! measured in one place rather than estimated in each handler.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use axum::http::{Request, Response};
use hyper::body::{Body, Bytes, Frame, SizeHint};

use super::telemetry::{Direction, Rpc};
use crate::service::Shared;

/// Wraps the gRPC routes with [`CountTraffic`].
#[derive(Clone)]
pub struct CountTrafficLayer {
    shared: Arc<Shared>,
}

impl CountTrafficLayer {
    pub fn new(shared: Arc<Shared>) -> Self {
        CountTrafficLayer { shared }
    }
}

impl<S> tower::Layer<S> for CountTrafficLayer {
    type Service = CountTraffic<S>;

    fn layer(&self, inner: S) -> CountTraffic<S> {
        CountTraffic {
            inner,
            shared: self.shared.clone(),
        }
    }
}

/// Counts each call and the bytes of its request and response bodies.
#[derive(Clone)]
pub struct CountTraffic<S> {
    inner: S,
    shared: Arc<Shared>,
}

impl<S, ResBody> tower::Service<Request<tonic::body::Body>> for CountTraffic<S>
where
    S: tower::Service<Request<tonic::body::Body>, Response = Response<ResBody>>,
    S::Future: Send + 'static,
{
    type Response = Response<Counted<ResBody>>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: Request<tonic::body::Body>) -> Self::Future {
        let rpc = Rpc::from_path(request.uri().path());
        self.shared.telemetry.call(rpc);
        let shared = self.shared.clone();
        let request = request.map(|body| {
            tonic::body::Body::new(Counted::new(body, shared.clone(), rpc, Direction::Received))
        });
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|body| Counted::new(body, shared, rpc, Direction::Sent)))
        })
    }
}

/// A body that reports the size of each data frame it yields.
pub struct Counted<B> {
    inner: Pin<Box<B>>,
    shared: Arc<Shared>,
    rpc: Rpc,
    direction: Direction,
}

impl<B> Counted<B> {
    fn new(inner: B, shared: Arc<Shared>, rpc: Rpc, direction: Direction) -> Self {
        Counted {
            inner: Box::pin(inner),
            shared,
            rpc,
            direction,
        }
    }
}

impl<B: Body<Data = Bytes>> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = self.get_mut();
        let polled = this.inner.as_mut().poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            this.shared
                .telemetry
                .bytes(this.rpc, this.direction, data.len());
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
