//! How errors become the gRPC status a client sees, for what every process
//! shares: the domain's refusals, and which codes are worth a retry. The
//! database services' handler error (`omoi_base::ApiError`) builds on it.

use omoi_domain::DomainError;
use tonic::Status;

/// Whether a call that failed with `code` may succeed when sent again:
/// the peer is restarting, overloaded, cut off mid-call, or not accepting
/// credentials yet (a token being rolled out). Any other code is an answer.
pub fn transient(code: tonic::Code) -> bool {
    use tonic::Code;
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Cancelled
            | Code::Unauthenticated
    )
}

/// A refusal of the domain's rules: bad input is INVALID_ARGUMENT naming
/// the field, a move the rules forbid FAILED_PRECONDITION.
pub fn domain(err: DomainError) -> Status {
    match err {
        DomainError::InvalidArgument(_) | DomainError::Cycle { .. } => Status::invalid_argument(err.to_string()),
        DomainError::IllegalTransition { .. }
        | DomainError::StaleAttempt { .. }
        | DomainError::Concurrent { .. }
        | DomainError::DependencyEnded { .. } => Status::failed_precondition(err.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use uuid::Uuid;

    #[test]
    fn only_failures_to_reach_the_peer_are_transient() {
        for code in [
            Code::Unavailable,
            Code::DeadlineExceeded,
            Code::Cancelled,
            Code::ResourceExhausted,
        ] {
            assert!(transient(code), "{code:?}");
        }
        for code in [
            Code::InvalidArgument,
            Code::FailedPrecondition,
            Code::NotFound,
            Code::AlreadyExists,
        ] {
            assert!(!transient(code), "{code:?}");
        }
    }

    #[test]
    fn the_domain_refusals_name_their_field_or_rule() {
        let invalid = domain(DomainError::invalid("tasks[0].title", "must not be empty"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().contains("tasks[0].title"));
        let stale = domain(DomainError::StaleAttempt {
            task_id: Uuid::nil(),
            reported: 1,
            current: 2,
        });
        assert_eq!(stale.code(), Code::FailedPrecondition);
    }
}
