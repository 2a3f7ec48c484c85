//! The operator's view of a running aggregator: an HTTP admin port with `/healthz`,
//! `/metrics` (Prometheus text format), `/api/status` (JSON) and a server-rendered status
//! page, and the client `fedaggregator status` reads it with.
//!
//! - `telemetry`: what the service records (joins, calls, rounds, stage timings, traffic,
//!   the held-out losses labs opt in to report).
//! - `traffic`: the tower layer that counts gRPC calls and body bytes per method.
//! - `hooks`: the handful of calls `service.rs` makes into the record.
//! - [`metrics`]: the Prometheus registry.
//! - [`report`]: the JSON snapshot shared by the page, the API and the CLI.
//! - `page`: the HTML page (inline CSS and SVG, no external resources).
//! - `http`: the axum server.
//! - [`client`]: `fedaggregator status`'s GET of `/api/status`.

pub mod client;
mod hooks;
mod http;
pub mod metrics;
mod page;
pub mod report;
mod telemetry;
mod traffic;

pub use http::{AdminServer, serve};
pub use page::escape;
pub use report::StatusReport;
pub use telemetry::{CONNECTED_WINDOW_MS, LossReport, Rpc, Telemetry};
pub use traffic::CountTrafficLayer;
