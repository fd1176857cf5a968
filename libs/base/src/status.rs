//! The one error type of a database service's RPC handlers, and its one
//! mapping to the gRPC status a client sees.

use omoi_domain::DomainError;
use omoi_store::StoreError;
use tonic::Status;

/// What an RPC handler can fail with. Handlers return it and use `?` on
/// domain and store results; the service trait turns it into a `Status`
/// with `?` too.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A status the handler decided itself or passes on from a peer.
    #[error("{}", .0.message())]
    Status(#[from] Status),
}

impl ApiError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        ApiError::Domain(DomainError::invalid(field, reason))
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// The status of an error sent where a `Status` travels by itself (a
/// stream's item, a batch's reply).
pub fn status(err: impl Into<ApiError>) -> Status {
    Status::from(err.into())
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Domain(d) => omoi_runtime::status::domain(d),
            ApiError::Store(s) => store(s),
            ApiError::Status(s) => s,
        }
    }
}

/// Internal details are logged, not sent.
fn store(err: StoreError) -> Status {
    match err {
        StoreError::Domain(d) => omoi_runtime::status::domain(d),
        StoreError::NotFound { .. } | StoreError::Missing(_) => Status::not_found(err.to_string()),
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

#[cfg(test)]
mod tests {
    use super::*;
    use tonic::Code;
    use uuid::Uuid;

    #[test]
    fn codes() {
        let id = Uuid::nil();
        assert_eq!(
            store(StoreError::NotFound { entity: "task", id }).code(),
            Code::NotFound
        );
        assert_eq!(
            store(StoreError::Domain(DomainError::StaleAttempt {
                task_id: id,
                reported: 1,
                current: 2
            }))
            .code(),
            Code::FailedPrecondition
        );
        assert_eq!(store(StoreError::AlreadyExists("x".into())).code(), Code::AlreadyExists);
        assert_eq!(
            store(StoreError::Unavailable(sqlx::Error::PoolTimedOut)).code(),
            Code::Unavailable
        );
        let internal = store(StoreError::Corrupt("secret detail".into()));
        assert_eq!(internal.code(), Code::Internal);
        assert!(!internal.message().contains("secret"));
        let invalid = Status::from(ApiError::invalid("tasks[0].title", "must not be empty"));
        assert_eq!(invalid.code(), Code::InvalidArgument);
        assert!(invalid.message().contains("tasks[0].title"));
    }
}
