//! The one mapping from the task-queue's errors to gRPC statuses.

use omoi_domain::DomainError;
use omoi_store::StoreError;
use tonic::Status;

pub fn status(err: StoreError) -> Status {
    match err {
        StoreError::Domain(d) => domain_status(d),
        StoreError::NotFound { .. } => Status::not_found(err.to_string()),
        StoreError::StaleAttempt { .. } | StoreError::FailedPrecondition(_) => {
            Status::failed_precondition(err.to_string())
        }
        StoreError::AlreadyExists(_) => Status::already_exists(err.to_string()),
        StoreError::Unavailable(_) => {
            tracing::warn!(error = %err, "database unavailable");
            Status::unavailable("database unavailable; retry later")
        }
        StoreError::Database(_) | StoreError::Migrate(_) | StoreError::Corrupt(_) => {
            tracing::error!(error = %err, "internal error");
            Status::internal("internal error")
        }
    }
}

pub fn domain_status(err: DomainError) -> Status {
    match err {
        DomainError::InvalidArgument(_) | DomainError::Cycle { .. } => Status::invalid_argument(err.to_string()),
        DomainError::IllegalTransition { .. } => Status::failed_precondition(err.to_string()),
    }
}
