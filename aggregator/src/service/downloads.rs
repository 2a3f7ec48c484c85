//! The global adapter by reference: `DownloadAdapter`, in resumable checksummed chunks.

use mekong_proto::v1::{self as pb};
use tonic::{Request, Response, Status};

use super::{FederationService, check_owner, check_present};

/// The chunks of one `DownloadAdapter` answer.
pub(super) type AdapterStream = std::pin::Pin<
    Box<dyn tokio_stream::Stream<Item = Result<pb::AdapterChunk, Status>> + Send + 'static>,
>;

impl FederationService {
    pub(super) async fn handle_download_adapter(
        &self,
        request: Request<pb::DownloadAdapterRequest>,
    ) -> Result<Response<AdapterStream>, Status> {
        let certified = self.certified(&request)?;
        let req = request.into_inner();
        let encoded = {
            let c = self.shared.lock();
            check_owner(&c, &req.participant_id, certified.as_deref())?;
            check_present(&c, &req.participant_id)?;
            self.shared.seen(&c, &req.participant_id);
            if req.content_hash != c.global_hash() {
                return Err(Status::failed_precondition(format!(
                    "adapter {} is not the current global adapter ({}); fetch the task again",
                    req.content_hash,
                    c.global_hash()
                )));
            }
            self.shared.adapters.encoded(c.global(), c.global_hash())
        };
        let chunks = crate::download::chunks(encoded, req.offset)?;
        Ok(Response::new(Box::pin(chunks)))
    }
}
