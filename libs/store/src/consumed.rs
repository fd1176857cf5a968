//! Exactly-once application of consumed events: a consumer records each event
//! id in the same transaction as its effect.

use sqlx::PgConnection;
use uuid::Uuid;

use crate::statements::sql;
use crate::{Result, Store};

/// Records `event_id` for `consumer`; false when it was already applied.
pub async fn first_time(conn: &mut PgConnection, consumer: &str, event_id: Uuid) -> Result<bool> {
    let inserted = sqlx::query(sql!(
        "INSERT INTO processed_events (consumer, event_id) VALUES ($1, $2) ON CONFLICT DO NOTHING"
    ))
    .bind(consumer)
    .bind(event_id)
    .execute(conn)
    .await?;
    Ok(inserted.rows_affected() == 1)
}

impl Store {
    /// Forgets applied events older than `older_than` (once the stream can
    /// no longer redeliver them).
    pub async fn prune_processed_events(&self, older_than: std::time::Duration) -> Result<u64> {
        Ok(sqlx::query(sql!(
            "DELETE FROM processed_events WHERE processed_at < now() - make_interval(secs => $1)"
        ))
        .bind(older_than.as_secs_f64())
        .execute(self.pool())
        .await?
        .rows_affected())
    }
}
