//! The tonic implementation of `mekong.v1.Federation`: a thin shell around fedcore's
//! [`Coordinator`]. It assigns secret participant ids, turns wire messages into coordinator
//! inputs and coordinator events into files on disk and wake-ups of long-polling callers.
//!
//! One file per job, each an `impl FederationService` of its handlers, so that a newcomer
//! can name where a call is served:
//! - [`shared`]: the state the handlers share and the one transaction path
//!   (`Shared::transact`: lock, change, commit durably, answer, apply events, wake);
//! - `tasks`: joining, the task long-poll, the run's status, metrics reports, leaving;
//! - `plaintext`: plaintext updates, whole or streamed and resumed;
//! - `secure`: the secure-aggregation stages, masked streams folded as they arrive, and the
//!   sweep that takes never-completed masked inputs back out of the sum;
//! - `downloads`: the global adapter by reference, in resumable chunks.
//!
//! This file holds the service itself, the checks every handler makes first (the caller's
//! certificate, its id's owner, its membership), and the trait that routes each call.

mod downloads;
mod plaintext;
mod secure;
pub mod shared;
mod tasks;

use std::sync::Arc;

use fedcore::Coordinator;
use mekong_proto::tls::{PeerCertificate, Revocations};
use mekong_proto::v1::{self as pb, federation_server::Federation};
use tokio::sync::watch;
use tonic::{Request, Response, Status, Streaming};
use tracing::warn;

use crate::status_map::status_for;

pub(crate) use secure::sweep_held;
pub use shared::{Shared, StartError};

/// The gRPC service.
#[derive(Clone)]
pub struct FederationService {
    shared: Arc<Shared>,
    /// With mutual TLS on: the current revocation list. Every call must then come over a
    /// connection with a verified participant certificate that is not revoked since.
    revocations: Option<watch::Receiver<Revocations>>,
}

impl FederationService {
    /// A service for plaintext connections (calls carry no certificate).
    pub fn new(shared: Arc<Shared>) -> Self {
        FederationService {
            shared,
            revocations: None,
        }
    }

    /// A service behind mutual TLS: every call must carry the [`PeerCertificate`] of its
    /// connection, not revoked in the latest `revocations`, and a participant acts only
    /// under the name its certificate gives it.
    pub fn with_certificates(
        shared: Arc<Shared>,
        revocations: watch::Receiver<Revocations>,
    ) -> Self {
        FederationService {
            shared,
            revocations: Some(revocations),
        }
    }

    /// The participant the call's certificate names (`None` on plaintext connections).
    /// Every handler starts here, so it also refuses calls once the state could not be saved.
    fn certified<T>(&self, request: &Request<T>) -> Result<Option<String>, Status> {
        self.shared.check_healthy()?;
        let Some(revocations) = &self.revocations else {
            return Ok(None);
        };
        let Some(peer) = request.extensions().get::<PeerCertificate>() else {
            return Err(Status::unauthenticated(
                "this aggregator requires a participant certificate (mutual TLS)",
            ));
        };
        // The handshake checked the list of its day; a connection can outlive it.
        if revocations.borrow().is_revoked(&peer.serial) {
            warn!(participant = %peer.participant, peer = %peer.remote_addr, "call on a connection whose certificate has since been revoked");
            return Err(Status::permission_denied(format!(
                "the certificate of {:?} has been revoked",
                peer.participant
            )));
        }
        check_unexpired(peer, unix_now_s())?;
        Ok(Some(peer.participant.clone()))
    }
}

/// Seconds since the Unix epoch, by the system clock (certificates' validity is in it).
fn unix_now_s() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

/// The handshake checked the certificate's validity at its time; a connection can outlive
/// it, so every call checks again, as for revocation.
fn check_unexpired(peer: &PeerCertificate, now_unix_s: i64) -> Result<(), Status> {
    if peer.expired_at(now_unix_s) {
        warn!(participant = %peer.participant, peer = %peer.remote_addr, "call on a connection whose certificate has since expired");
        return Err(Status::permission_denied(format!(
            "the certificate of {:?} expired {} s ago; the lab needs a renewed certificate (`fedaggregator provision`) and a new connection",
            peer.participant,
            now_unix_s - peer.not_after_unix_s
        )));
    }
    Ok(())
}

/// The one membership check every call with a participant id goes through, before
/// anything of the call is buffered or a shared slot is taken: the id must be one a join
/// handed out (an unknown id is refused, so a caller cannot park data under fresh random
/// ids), and it must belong to the participant the connection's certificate names (a
/// leaked id is of no use without that participant's certificate).
fn check_owner(c: &Coordinator, token: &str, certified: Option<&str>) -> Result<(), Status> {
    let Some((name, _)) = c.participant(token) else {
        return Err(status_for(&fedcore::RoundError::UnknownParticipant(
            fedcore::roster::shown_input(token),
        )));
    };
    if let Some(cert) = certified
        && name != cert
    {
        warn!(certificate = %cert, participant = %name, "call with another participant's id refused");
        return Err(Status::permission_denied(format!(
            "this participant id belongs to {name:?}, not to {cert:?} whose certificate this connection carries"
        )));
    }
    Ok(())
}

/// Refuses a member that left the federation: it takes no part in this run again, so it is
/// served neither later global adapters nor metrics reports (the coordinator refuses it
/// everything else itself).
fn check_present(c: &Coordinator, token: &str) -> Result<(), Status> {
    if let Some((name, _)) = c.participant(token)
        && let Some(departure) = c.departures().get(name)
    {
        return Err(status_for(&fedcore::RoundError::Left {
            name: name.to_string(),
            departure: *departure,
        }));
    }
    Ok(())
}

#[tonic::async_trait]
impl Federation for FederationService {
    type DownloadAdapterStream = downloads::AdapterStream;

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinResponse>, Status> {
        self.handle_join(request).await
    }

    async fn fetch_task(
        &self,
        request: Request<pb::FetchTaskRequest>,
    ) -> Result<Response<pb::FetchTaskResponse>, Status> {
        self.handle_fetch_task(request).await
    }

    async fn submit_update(
        &self,
        request: Request<pb::SubmitUpdateRequest>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        self.handle_submit_update(request).await
    }

    async fn submit_update_stream(
        &self,
        request: Request<Streaming<pb::UpdateChunk>>,
    ) -> Result<Response<pb::SubmitUpdateResponse>, Status> {
        self.handle_submit_update_stream(request).await
    }

    async fn update_received(
        &self,
        request: Request<pb::UpdateReceivedRequest>,
    ) -> Result<Response<pb::UpdateReceivedResponse>, Status> {
        self.handle_update_received(request).await
    }

    async fn secure_aggregate(
        &self,
        request: Request<pb::SecureAggregateRequest>,
    ) -> Result<Response<pb::SecureAggregateResponse>, Status> {
        self.handle_secure_aggregate(request).await
    }

    async fn submit_masked(
        &self,
        request: Request<Streaming<pb::MaskedChunk>>,
    ) -> Result<Response<pb::SubmitMaskedResponse>, Status> {
        self.handle_submit_masked(request).await
    }

    async fn round_status(
        &self,
        request: Request<pb::RoundStatusRequest>,
    ) -> Result<Response<pb::RoundStatusResponse>, Status> {
        self.handle_round_status(request).await
    }

    async fn report_metrics(
        &self,
        request: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        self.handle_report_metrics(request).await
    }

    async fn masked_received(
        &self,
        request: Request<pb::MaskedReceivedRequest>,
    ) -> Result<Response<pb::MaskedReceivedResponse>, Status> {
        self.handle_masked_received(request).await
    }

    async fn download_adapter(
        &self,
        request: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<Self::DownloadAdapterStream>, Status> {
        self.handle_download_adapter(request).await
    }

    async fn leave(
        &self,
        request: Request<pb::LeaveRequest>,
    ) -> Result<Response<pb::LeaveResponse>, Status> {
        self.handle_leave(request).await
    }
}

fn participant_name(c: &Coordinator, token: &str) -> String {
    c.participant(token)
        .map(|(n, _)| n.to_string())
        .unwrap_or_else(|| "<unknown>".into())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::AggregatorConfig;
    use crate::db::StateDb;
    use crate::download::AdapterCache;
    use crate::limits::LimitsSection;
    use crate::store::AdapterStore;

    /// A connection that outlives its certificate is refused on its next call.
    #[test]
    fn a_call_after_the_certificate_expired_is_refused() {
        let peer = PeerCertificate {
            remote_addr: "127.0.0.1:9".parse().unwrap(),
            participant: "lab-a".into(),
            serial: vec![1],
            not_after_unix_s: 1_000,
        };
        assert!(check_unexpired(&peer, 999).is_ok());
        assert!(check_unexpired(&peer, 1_000).is_ok());
        let refused = check_unexpired(&peer, 1_061).unwrap_err();
        assert_eq!(refused.code(), tonic::Code::PermissionDenied);
        assert!(
            refused.message().contains("\"lab-a\" expired 61 s ago"),
            "{refused}"
        );
    }

    /// `transact`: a change that fails commits nothing and wakes nobody; one that succeeds
    /// is on disk before its answer is built, and long-polls wake only after that.
    #[test]
    fn a_transaction_commits_before_it_answers_and_tells() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let plan = AggregatorConfig::example().plan;
        let (db, _) = StateDb::open(&path, &plan, 0).unwrap();
        let shared = Shared::with_db(
            Coordinator::new(plan.clone(), [7; 32]).unwrap(),
            AdapterStore::new(dir.path()),
            db,
            AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
            LimitsSection::default(),
        )
        .unwrap();
        let mut changes = shared.subscribe();
        changes.borrow_and_update();
        let refused = shared
            .transact(
                |c| {
                    let events = c
                        .join("t-x".into(), "not a valid name!", "lo", 0)
                        .map_err(|e| status_for(&e))?;
                    Ok(((), events))
                },
                |_, ()| unreachable!("a failed change has no answer"),
            )
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::InvalidArgument, "{refused}");
        assert!(!changes.has_changed().unwrap(), "nobody is woken");

        let joined = shared
            .transact(
                |c| Ok(((), c.join("t-a".into(), "lab-a", "lo", 0).unwrap())),
                |c, ()| {
                    // Built from the committed state, before anyone is told.
                    assert!(!changes.has_changed().unwrap());
                    c.participant("t-a").map(|(name, _)| name.to_string())
                },
            )
            .unwrap();
        assert_eq!(joined.as_deref(), Some("lab-a"));
        assert!(
            changes.has_changed().unwrap(),
            "long-polls wake after the commit"
        );

        drop(shared);
        let (_, saved) = StateDb::open(&path, &plan, 0).unwrap();
        let saved = saved.unwrap();
        let (c, _) = saved.restore(plan, 0).unwrap();
        assert_eq!(c.participant("t-a"), Some(("lab-a", "lo")));
        assert_eq!(c.participant("t-x"), None);
    }

    /// A commit that fails (here: another process holds the database's write lock past the
    /// busy timeout) stops the service taking calls, and the state on disk is the last
    /// good one.
    #[test]
    fn a_state_change_that_cannot_be_committed_stops_the_service() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.sqlite");
        let plan = AggregatorConfig::example().plan;
        let (db, _) = StateDb::open(&path, &plan, 0).unwrap();
        let shared = Shared::with_db(
            Coordinator::new(plan.clone(), [7; 32]).unwrap(),
            AdapterStore::new(dir.path()),
            db.with_busy_timeout(Duration::from_millis(50)),
            AdapterCache::new(mekong_proto::DEFAULT_INLINE_ADAPTER_BYTES),
            LimitsSection::default(),
        )
        .unwrap();
        {
            let mut c = shared.lock();
            let events = c.join("t-a".into(), "lab-a", "lo", 0).unwrap();
            shared.settle(&c, events).unwrap();
        }
        assert!(!shared.failed());

        let other = rusqlite::Connection::open(&path).unwrap();
        other.execute_batch("BEGIN IMMEDIATE;").unwrap();
        {
            let mut c = shared.lock();
            let events = c.join("t-b".into(), "lab-b", "km", 0).unwrap();
            let refused = shared.settle(&c, events).unwrap_err();
            assert_eq!(refused.code(), tonic::Code::Unavailable);
            assert!(refused.message().contains("state.sqlite"), "{refused}");
        }
        assert!(shared.failed());
        let refused = shared.check_healthy().unwrap_err();
        assert_eq!(refused.code(), tonic::Code::Unavailable);
        other.execute_batch("ROLLBACK;").unwrap();
        drop(other);

        // What a restart finds: lab-a, not the join that could not be committed.
        drop(shared);
        let (_, saved) = StateDb::open(&path, &plan, 0).unwrap();
        let saved = saved.unwrap();
        let (c, _) = saved.restore(plan, 0).unwrap();
        assert_eq!(c.participant("t-a"), Some(("lab-a", "lo")));
        assert_eq!(c.participant("t-b"), None);
    }
}
