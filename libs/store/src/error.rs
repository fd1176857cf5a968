use omoi_domain::DomainError;
use uuid::Uuid;

/// Everything the store can refuse or fail with.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Domain(#[from] DomainError),
    #[error("{entity} {id} not found")]
    NotFound { entity: &'static str, id: Uuid },
    /// Something not named by an id (a concurrency key's limit).
    #[error("{0}")]
    Missing(String),
    #[error("{0}")]
    FailedPrecondition(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[source] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("corrupt row: {0}")]
    Corrupt(String),
}

impl From<sqlx::Error> for StoreError {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            sqlx::Error::Database(db) if db.code().as_deref() == Some("23505") => {
                StoreError::AlreadyExists(db.message().to_owned())
            }
            // admin_shutdown, crash_shutdown, cannot_connect_now: the server is going away.
            sqlx::Error::Database(db) if matches!(db.code().as_deref(), Some("57P01" | "57P02" | "57P03")) => {
                StoreError::Unavailable(err)
            }
            _ => StoreError::Database(err),
        }
    }
}

pub type Result<T, E = StoreError> = std::result::Result<T, E>;
