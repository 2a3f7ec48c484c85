//! Starting, watching and stopping the aggregator: binds the listener, serves gRPC with tonic,
//! and runs the deadline ticker that lets fedcore's coordinator see time pass.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use fedcore::Coordinator;
use fedcore::round::{Stage, Status};
use mekong_proto::MAX_MESSAGE_BYTES;
use mekong_proto::tls::{Revocations, ServerTlsFiles};
use mekong_proto::v1::federation_server::FederationServer;
use rand::RngCore;
use thiserror::Error;
use tokio::net::TcpListener;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tracing::info;

use crate::config::AggregatorConfig;
use crate::db::{DbError, StateDb};
use crate::service::{FederationService, Shared};
use crate::store::AdapterStore;
use fedcore::round::snapshot::Resumed;

/// Why the server could not start or stopped with an error.
#[derive(Debug, Error)]
pub enum ServeError {
    #[error("invalid plan: {0}")]
    Plan(#[from] fedcore::ConfigError),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot listen on {addr} (admin.listen): {source}")]
    AdminBind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare {dir}: {message}")]
    Store { dir: String, message: String },
    #[error("gRPC server failed: {0}")]
    Transport(#[from] tonic::transport::Error),
    #[error("gRPC server task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error("TLS: {0}")]
    Tls(#[from] mekong_proto::tls::TlsError),
    #[error("state database: {0}")]
    State(#[from] crate::db::DbError),
}

impl From<crate::service::StartError> for ServeError {
    fn from(e: crate::service::StartError) -> Self {
        match e {
            crate::service::StartError::State(e) => ServeError::State(e),
            crate::service::StartError::Store { dir, message } => {
                ServeError::Store { dir, message }
            }
        }
    }
}

/// HTTP/2 pings on an idle connection, and how long the answer may take before the
/// connection is closed: a peer that vanished without closing (a lab's machine powered
/// off, a middlebox that dropped the flow) releases what its calls held within a minute.
const HTTP2_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(30);
const HTTP2_KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(20);

/// HTTP/2 flow-control window per stream: 256 KiB keeps a 4 MiB masked upload at full
/// speed up to ~25 ms round trip per slot, and bounds what a waiting stream buffers.
const STREAM_WINDOW_BYTES: u32 = 256 * 1024;
/// HTTP/2 flow-control window per connection (one per lab).
const CONNECTION_WINDOW_BYTES: u32 = 512 * 1024;

/// How often the revocation list is re-read.
pub const CRL_POLL: Duration = Duration::from_secs(1);

/// How long `drain` keeps serving after the last participant was handed the final adapter.
const FINAL_FLUSH_GRACE: Duration = Duration::from_secs(2);

/// A running aggregator.
pub struct RunningServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    store: AdapterStore,
    shutdown: oneshot::Sender<()>,
    server: JoinHandle<Result<(), tonic::transport::Error>>,
    ticker: JoinHandle<()>,
    crl_watcher: Option<JoinHandle<()>>,
    admin: Option<crate::admin::AdminServer>,
}

/// Binds `config.server.listen` (port 0 picks a free port) and starts serving.
pub async fn start(config: &AggregatorConfig) -> Result<RunningServer, ServeError> {
    if config.plan.secure_aggregation.enabled {
        info!(
            threshold = config
                .plan
                .secure_aggregation
                .threshold_for(config.plan.roster.len()),
            roster = config.plan.roster.len(),
            max_colluding = config.plan.secure_aggregation.max_colluding,
            dropouts_tolerated = config
                .plan
                .secure_aggregation
                .dropout_tolerance(config.plan.roster.len()),
            "secure aggregation on: the aggregator learns only the sum of each round's updates"
        );
    } else {
        tracing::warn!(
            "SECURE AGGREGATION IS OFF (plan.secure_aggregation.enabled = false): every lab's update reaches this aggregator in plaintext"
        );
    }
    let tls = match config.tls.files() {
        Some(files) => {
            let tls_config = mekong_proto::tls::server_config(&files)?;
            info!(
                ca = %files.ca.display(),
                crl = %files.crl.as_ref().map_or("none".into(), |p| p.display().to_string()),
                "mutual TLS on: only participants with an unexpired, unrevoked certificate from the federation CA connect, each under its certificate's name"
            );
            Some((files, tls_config))
        }
        None => {
            tracing::warn!(
                "TLS IS OFF (tls.enabled = false): plaintext gRPC; anyone who reaches this port can join under any roster name and read the traffic"
            );
            None
        }
    };
    // After the TLS files are checked: a configuration that cannot serve touches no state.
    let (coordinator, db) = open_state(config)?;
    let store = AdapterStore::new(&config.server.output_dir);
    let adapters = crate::download::AdapterCache::new(config.server.inline_adapter_max_bytes);
    let shared = Shared::with_db(
        coordinator,
        store.clone(),
        db,
        adapters,
        config.limits.clone(),
    )?;
    let listener = TcpListener::bind(config.server.listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: config.server.listen,
            source,
        })?;
    let local_addr = listener.local_addr().map_err(|source| ServeError::Bind {
        addr: config.server.listen,
        source,
    })?;
    let admin = match &config.admin {
        Some(admin) => Some(
            crate::admin::serve(admin.listen, shared.clone())
                .await
                .map_err(|source| ServeError::AdminBind {
                    addr: admin.listen,
                    source,
                })?,
        ),
        None => None,
    };
    let revocations = match tls.as_ref().and_then(|(files, _)| files.crl.as_ref()) {
        Some(path) => Revocations::load(path)?,
        None => Revocations::default(),
    };
    let (revoked, revoked_rx) = watch::channel(revocations);
    let service = if tls.is_some() {
        FederationService::with_certificates(shared.clone(), revoked_rx)
    } else {
        FederationService::new(shared.clone())
    };
    // Each method's own limit is enforced by `MessageLimitLayer` as bytes arrive; tonic's
    // service-wide one stays behind it at the largest of them.
    let service = FederationServer::new(service)
        .max_decoding_message_size(config.limits.largest_message())
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let secure = shared.lock().secure();
    let (shutdown, shutdown_rx) = oneshot::channel::<()>();
    let router = tonic::transport::Server::builder()
        // What a lab may have in flight before the aggregator reads it. hyper's default
        // (1 MiB per stream and per connection) would let every lab waiting for a
        // masked-input slot park a MiB here, making memory grow with the number of labs.
        .initial_stream_window_size(STREAM_WINDOW_BYTES)
        .initial_connection_window_size(CONNECTION_WINDOW_BYTES)
        // A lab needs a handful of streams (the task long-poll, an upload, a download, a
        // report); the limit keeps one connection from parking thousands of calls (hyper's
        // default is unlimited). Calls beyond it wait in the client, as HTTP/2 asks.
        .max_concurrent_streams(Some(config.limits.streams_per_connection))
        .http2_keepalive_interval(Some(HTTP2_KEEPALIVE_INTERVAL))
        .http2_keepalive_timeout(Some(HTTP2_KEEPALIVE_TIMEOUT))
        .layer(crate::admin::CountTrafficLayer::new(shared.clone()))
        .layer(crate::message_limits::MessageLimitLayer::new(
            config.limits.clone(),
            secure,
        ))
        .add_service(service);
    let stop = async {
        let _ = shutdown_rx.await;
    };
    let (server, crl_watcher) = match tls {
        Some((files, tls_config)) => {
            // What the configuration was built from; the watcher reloads when it changes.
            let seen = files.crl.as_ref().and_then(|p| std::fs::read(p).ok());
            let (configs, current) = watch::channel(tls_config);
            let incoming = mekong_proto::tls::incoming(listener, current);
            (
                tokio::spawn(router.serve_with_incoming_shutdown(incoming, stop)),
                Some(tokio::spawn(watch_crl(files, seen, configs, revoked))),
            )
        }
        None => (
            tokio::spawn(
                router.serve_with_incoming_shutdown(TcpListenerStream::new(listener), stop),
            ),
            None,
        ),
    };
    let ticker = tokio::spawn(run_ticker(shared.clone()));
    info!(
        addr = %local_addr,
        federation = %config.plan.federation,
        participants = config.plan.rounds.participants,
        rounds = config.plan.rounds.rounds,
        plan_sha256 = %config.plan.fingerprint(),
        output = %store.dir().display(),
        database = %config.database_path().display(),
        "aggregator serving"
    );
    Ok(RunningServer {
        local_addr,
        shared,
        store,
        shutdown,
        server,
        ticker,
        crl_watcher,
        admin,
    })
}

/// Opens the state database and resumes its run, or starts a new run (fresh random session
/// id) when it holds none.
fn open_state(config: &AggregatorConfig) -> Result<(Coordinator, StateDb), ServeError> {
    config.plan.validate()?;
    let path = config.database_path();
    let (db, saved) = StateDb::open(&path, &config.plan, config.state.adapter_history)?;
    let Some(saved) = saved else {
        let mut session = [0u8; 32];
        rand::rng().fill_bytes(&mut session);
        info!(database = %path.display(), "new run");
        return Ok((Coordinator::new(config.plan.clone(), session)?, db));
    };
    let saved_session = saved.session;
    let (coordinator, resumed) =
        saved
            .restore(config.plan.clone(), 0)
            .map_err(|source| DbError::Snapshot {
                path: path.display().to_string(),
                source,
            })?;
    debug_assert_eq!(coordinator.session(), saved_session);
    let rounds = coordinator.rounds_closed();
    let database = path.display().to_string();
    match resumed {
        Resumed::Waiting => {
            info!(%database, "resuming the run: waiting for participants")
        }
        Resumed::Finished => info!(%database, rounds, "resuming a finished run"),
        Resumed::RoundRestarted { round } => {
            info!(%database, round, "resuming the run: round collects its updates again")
        }
        Resumed::AttemptRestarted { round, attempt } => info!(
            %database, round, attempt,
            "resuming the run: the secure attempt had not closed its masked input; restarting it with fresh keys"
        ),
        Resumed::AttemptResumed {
            round,
            attempt,
            stage,
        } => info!(
            %database, round, attempt, stage = ?stage,
            "resuming the run: the secure attempt goes on where it was"
        ),
        Resumed::Paused { after_round } => tracing::warn!(
            %database, after_round,
            "resuming the run: it stays paused by the operator; no round opens until `fedaggregator resume`"
        ),
    }
    if let Some(reason) = coordinator.finish_reason() {
        info!(%reason, "the run had finished");
    }
    if !coordinator.departures().is_empty() {
        let left: Vec<&String> = coordinator.departures().keys().collect();
        info!(
            ?left,
            "members that left the federation stay away: never sampled, refused if they join again"
        );
    }
    Ok((coordinator, db))
}

/// Re-reads the revocation list every [`CRL_POLL`] and, when its contents change, rebuilds
/// the TLS configuration that new connections are accepted under and the serials that
/// calls on open connections are checked against. A list that does not load is logged and
/// the previous one stays in force.
async fn watch_crl(
    files: ServerTlsFiles,
    mut seen: Option<Vec<u8>>,
    configs: watch::Sender<Arc<rustls::ServerConfig>>,
    revoked: watch::Sender<Revocations>,
) {
    let Some(crl) = files.crl.clone() else {
        return;
    };
    loop {
        tokio::time::sleep(CRL_POLL).await;
        let now = std::fs::read(&crl).ok();
        if now == seen {
            continue;
        }
        seen = now;
        match mekong_proto::tls::server_config(&files)
            .and_then(|config| Revocations::load(&crl).map(|revocations| (config, revocations)))
        {
            Ok((config, revocations)) => {
                info!(crl = %crl.display(), "revocation list changed; connections and calls are checked against it");
                configs.send_replace(config);
                revoked.send_replace(revocations);
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot reload the revocation list; the previous one stays in force");
            }
        }
    }
}

/// How often the ticker looks for operator requests in the state database.
const CONTROL_POLL: Duration = Duration::from_millis(500);

/// Calls the coordinator's `tick` at each deadline (and at least every 250 ms), and applies
/// the operator's requests (`fedaggregator pause|resume|stop`) every [`CONTROL_POLL`], the
/// first at once: a request made while no server ran is applied at start.
async fn run_ticker(shared: Arc<Shared>) {
    let mut next_poll = tokio::time::Instant::now();
    loop {
        if tokio::time::Instant::now() >= next_poll {
            next_poll = tokio::time::Instant::now() + CONTROL_POLL;
            let mut c = shared.lock();
            if shared.failed() {
                return;
            }
            shared.apply_control(&mut c);
        }
        // Woken by the coordinator's next deadline; the 250 ms cap is for what has no
        // event here: operator requests written to the database by another process
        // (`fedaggregator pause`, polled every CONTROL_POLL) and masked inputs held from
        // broken streams, which `sweep_held` takes back once their stage has closed (a
        // stage can close on a deadline this loop itself drives, or on a call).
        let sleep_ms = {
            let c = shared.lock();
            c.next_deadline()
                .map_or(250, |d| d.saturating_sub(shared.now_ms()).clamp(1, 250))
        };
        tokio::time::sleep(Duration::from_millis(sleep_ms)).await;
        let mut c = shared.lock();
        if shared.failed() {
            return;
        }
        match c.tick(shared.now_ms()) {
            // A failed commit is logged and stops the service (see `Shared::settle`).
            Ok(events) => {
                let _ = shared.settle(&c, events);
            }
            Err(e) => tracing::error!(error = %e, "closing a round failed"),
        }
        drop(c);
        // Masked inputs left incomplete when their stage closed come out of the sum.
        crate::service::sweep_held(&shared);
    }
}

impl RunningServer {
    /// The address actually bound.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// `http://<addr>`, what a participant connects to (without TLS).
    pub fn url(&self) -> String {
        format!("http://{}", self.local_addr)
    }

    /// The admin port's address, when `[admin]` is configured.
    pub fn admin_addr(&self) -> Option<SocketAddr> {
        self.admin.as_ref().map(|a| a.local_addr())
    }

    /// The adapter store (round and final directories).
    pub fn store(&self) -> &AdapterStore {
        &self.store
    }

    /// A snapshot of the coordinator's status.
    pub fn status(&self) -> Status {
        self.shared.lock().status()
    }

    /// Resolves when the service stopped taking calls because its state could not be
    /// saved; the process should exit (and be restarted, resuming from the database).
    pub async fn failed(&self) {
        let mut changes = self.shared.subscribe();
        while !self.shared.failed() {
            if changes.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }

    /// Resolves when the last round has closed.
    pub async fn finished(&self) {
        let mut changes = self.shared.subscribe();
        loop {
            if self.status().stage == Stage::Finished {
                return;
            }
            if changes.changed().await.is_err() {
                return;
            }
        }
    }

    /// After the run finished: resolves once every participant has fetched the final
    /// adapter, or after `linger`, whichever comes first.
    pub async fn drain(&self, linger: Duration) {
        let mut changes = self.shared.subscribe();
        let until = tokio::time::Instant::now() + linger;
        while !self.shared.everyone_told() {
            if tokio::time::timeout_at(until, changes.changed())
                .await
                .is_err()
            {
                return;
            }
        }
        // "Told" means the answer was built; give the last final adapters time to travel
        // before the connections close.
        tokio::time::sleep_until(until.min(tokio::time::Instant::now() + FINAL_FLUSH_GRACE)).await;
    }

    /// Stops serving and waits for the server task.
    pub async fn shutdown(self) -> Result<(), ServeError> {
        self.ticker.abort();
        if let Some(w) = &self.crl_watcher {
            w.abort();
        }
        let _ = self.shutdown.send(());
        if let Some(admin) = self.admin
            && let Err(e) = admin.shutdown().await
        {
            tracing::warn!(error = %e, "admin port stopped with an error");
        }
        self.server.await??;
        Ok(())
    }
}
