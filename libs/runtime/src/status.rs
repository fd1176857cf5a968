//! The one mapping from omoi's library errors to gRPC statuses.

use omoi_domain::DomainError;
use omoi_store::StoreError;
use tonic::Status;

/// A store error as the status a client sees; internal details are logged,
/// not sent.
pub fn from_store(err: StoreError) -> Status {
    match err {
        StoreError::Domain(d) => from_domain(d),
        StoreError::NotFound { .. } => Status::not_found(err.to_string()),
        StoreError::FailedPrecondition(_) => Status::failed_precondition(err.to_string()),
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

pub fn from_domain(err: DomainError) -> Status {
    match err {
        DomainError::InvalidArgument(_) | DomainError::Cycle { .. } => Status::invalid_argument(err.to_string()),
        DomainError::IllegalTransition { .. } | DomainError::StaleAttempt { .. } | DomainError::Concurrent { .. } => {
            Status::failed_precondition(err.to_string())
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use uuid::Uuid;

    #[test]
    fn codes() {
        let id = Uuid::nil();
        assert_eq!(
            from_store(StoreError::NotFound { entity: "task", id }).code(),
            Code::NotFound
        );
        assert_eq!(
            from_store(StoreError::Domain(DomainError::StaleAttempt {
                task_id: id,
                reported: 1,
                current: 2
            }))
            .code(),
            Code::FailedPrecondition
        );
        assert_eq!(
            from_store(StoreError::AlreadyExists("x".into())).code(),
            Code::AlreadyExists
        );
        assert_eq!(
            from_store(StoreError::Unavailable(sqlx::Error::PoolTimedOut)).code(),
            Code::Unavailable
        );
        let internal = from_store(StoreError::Corrupt("secret detail".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret"));
        let invalid = from_domain(DomainError::invalid("tasks[0].title", "must not be empty"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().contains("tasks[0].title"));
    }
}
