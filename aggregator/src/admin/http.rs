//! The admin HTTP port: `/healthz`, `/metrics`, `/api/status` and the status page `/`.
//!
//! Plain HTTP, meant for localhost or an operator network: it shows participant names,
//! languages and traffic, never updates or keys, and changes nothing. It binds
//! `127.0.0.1` unless `[admin] listen` says otherwise.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{Html, IntoResponse, Json, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tracing::{info, warn};

use super::page;
use super::report::StatusReport;
use crate::service::Shared;

/// How long `/healthz` waits for the coordinator before answering 503.
const HEALTH_LOCK_WAIT: Duration = Duration::from_secs(2);

/// A running admin server.
pub struct AdminServer {
    local_addr: SocketAddr,
    shutdown: oneshot::Sender<()>,
    task: JoinHandle<std::io::Result<()>>,
}

impl AdminServer {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>/`, the status page.
    pub fn url(&self) -> String {
        format!("http://{}/", self.local_addr)
    }

    /// Stops serving and waits for in-flight requests.
    pub async fn shutdown(self) -> std::io::Result<()> {
        let _ = self.shutdown.send(());
        match self.task.await {
            Ok(result) => result,
            Err(e) => Err(std::io::Error::other(e)),
        }
    }
}

/// Binds `listen` (port 0 picks a free port) and serves the admin endpoints.
pub async fn serve(listen: SocketAddr, shared: Arc<Shared>) -> std::io::Result<AdminServer> {
    let listener = TcpListener::bind(listen).await?;
    let local_addr = listener.local_addr()?;
    if !local_addr.ip().is_loopback() {
        warn!(addr = %local_addr, "the admin port is plain HTTP and listens beyond loopback: keep it on an operator network");
    }
    let app = Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/status", get(api_status))
        .with_state(shared);
    let (shutdown, stop) = oneshot::channel::<()>();
    let task = tokio::spawn(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async {
                let _ = stop.await;
            })
            .await
    });
    info!(url = %format!("http://{local_addr}/"), "admin port serving (/healthz, /metrics, /api/status, status page)");
    Ok(AdminServer {
        local_addr,
        shutdown,
        task,
    })
}

/// The snapshot, taken under the coordinator's lock off the async workers.
async fn snapshot(shared: &Arc<Shared>) -> Option<StatusReport> {
    let shared = shared.clone();
    let job = tokio::task::spawn_blocking(move || {
        let c = shared.lock();
        shared.telemetry.report(&c, shared.now_ms())
    });
    tokio::time::timeout(HEALTH_LOCK_WAIT, job).await.ok()?.ok()
}

/// Healthy means: the aggregator is serving and its round state answers within
/// [`HEALTH_LOCK_WAIT`] (the coordinator is not wedged). A finished run is still healthy
/// while the process serves the final adapter.
async fn healthz(State(shared): State<Arc<Shared>>) -> Response {
    if shared.failed() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the state database could not be written; restart the aggregator to resume from it\n",
        )
            .into_response();
    }
    match snapshot(&shared).await {
        Some(s) => (
            StatusCode::OK,
            format!(
                "ok: federation {} {}, round {}/{}\n",
                s.federation, s.stage, s.round, s.rounds_total
            ),
        )
            .into_response(),
        None => (
            StatusCode::SERVICE_UNAVAILABLE,
            "unhealthy: the round coordinator did not answer within 2 s\n",
        )
            .into_response(),
    }
}

async fn api_status(State(shared): State<Arc<Shared>>) -> Response {
    match snapshot(&shared).await {
        Some(s) => Json(s).into_response(),
        None => busy(),
    }
}

async fn status_page(State(shared): State<Arc<Shared>>) -> Response {
    match snapshot(&shared).await {
        Some(s) => Html(page::render(&s)).into_response(),
        None => busy(),
    }
}

async fn metrics(State(shared): State<Arc<Shared>>) -> Response {
    let job = tokio::task::spawn_blocking(move || {
        {
            let c = shared.lock();
            shared.telemetry.refresh_gauges(&c, shared.now_ms());
        }
        shared.telemetry.metrics().encode()
    });
    match tokio::time::timeout(HEALTH_LOCK_WAIT, job).await {
        Ok(Ok(text)) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        _ => busy(),
    }
}

fn busy() -> Response {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        "the round coordinator did not answer within 2 s\n",
    )
        .into_response()
}
