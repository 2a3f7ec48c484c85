//! How fedcore's refusals become gRPC statuses: the code says what kind of problem it is,
//! the message (fedcore's own) says exactly what was wrong.

use fedcore::RoundError;
use fedcore::secagg::protocol::ProtocolError;
use tonic::{Code, Status};

/// The gRPC status a participant receives for a refused request.
pub fn status_for(error: &RoundError) -> Status {
    let code = match error {
        RoundError::UnknownParticipant(_) => Code::Unauthenticated,
        RoundError::BadName(_)
        | RoundError::BadLanguage(_)
        | RoundError::LayoutMismatch { .. }
        | RoundError::SampleWeight(_)
        | RoundError::Update(_) => Code::InvalidArgument,
        RoundError::DuplicateUpdate { .. } => Code::AlreadyExists,
        RoundError::RunFinished
        | RoundError::NoRoundOpen
        | RoundError::Paused { .. }
        | RoundError::StaleRound { .. }
        | RoundError::FutureRound { .. }
        | RoundError::NotInCohort { .. }
        | RoundError::Left { .. }
        | RoundError::WrongBaseAdapter { .. } => Code::FailedPrecondition,
        RoundError::Aggregate(_)
        | RoundError::SecureSum(_)
        | RoundError::Strategy(_)
        | RoundError::Accountant(_) => Code::Internal,
        RoundError::NotOnRoster(_) => Code::PermissionDenied,
        RoundError::SecureAggregationRequired | RoundError::SecureAggregationOff => {
            Code::FailedPrecondition
        }
        RoundError::WrongAttempt { .. } => Code::FailedPrecondition,
        // A message out of its stage is late or early; anything else is a bad message.
        RoundError::Protocol(ProtocolError::OutOfOrder { .. }) => Code::FailedPrecondition,
        // Most often a retried message whose first copy arrived.
        RoundError::Protocol(ProtocolError::Duplicate(_)) => Code::AlreadyExists,
        RoundError::Protocol(_) => Code::InvalidArgument,
    };
    Status::new(code, error.to_string())
}
