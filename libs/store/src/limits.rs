//! Concurrency limits: the most tasks of a key ASSIGNED or RUNNING at once
//! (`concurrency_limits`; the claim statement honours them).

use chrono::{DateTime, Utc};
use omoi_domain::rules;
pub use omoi_domain::rules::Limit;

use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError};

type LimitRow = (String, i32, i64, DateTime<Utc>);

fn limit_of((key, max_running, held, updated_at): LimitRow) -> Limit {
    Limit {
        key,
        max_running,
        held,
        updated_at,
    }
}

/// A key's tasks out now.
macro_rules! held {
    () => {
        "(SELECT count(*) FROM tasks h
                    WHERE h.concurrency_key = l.key AND h.status IN ('assigned', 'running'))"
    };
}

impl Store {
    /// Caps `key` at `max_running` (QUEUE_LIMIT_SET when it changed).
    pub async fn set_limit(&self, key: &str, max_running: i32) -> Result<Limit> {
        let mut tx = self.pool().begin().await?;
        let before: Option<i32> = sqlx::query_scalar(sql!("SELECT max_running FROM concurrency_limits WHERE key = $1"))
            .bind(key)
            .fetch_optional(&mut *tx)
            .await?;
        let row: LimitRow = sqlx::query_as(sql!(concat!(
            "INSERT INTO concurrency_limits AS l (key, max_running) VALUES ($1, $2)
             ON CONFLICT (key) DO UPDATE SET max_running = EXCLUDED.max_running, updated_at = now()
             RETURNING l.key, l.max_running, ",
            held!(),
            ", l.updated_at"
        )))
        .bind(key)
        .bind(max_running)
        .fetch_one(&mut *tx)
        .await?;
        if before != Some(max_running) {
            events::insert(&mut tx, &[rules::limit_set(key, Some(max_running))]).await?;
        }
        self.commit(tx).await?;
        Ok(limit_of(row))
    }

    /// Removes `key`'s cap (QUEUE_LIMIT_SET without a limit).
    pub async fn clear_limit(&self, key: &str) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let removed = sqlx::query(sql!("DELETE FROM concurrency_limits WHERE key = $1"))
            .bind(key)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        if removed == 0 {
            return Err(StoreError::Missing(format!("key {key:?} has no concurrency limit")));
        }
        events::insert(&mut tx, &[rules::limit_set(key, None)]).await?;
        self.commit(tx).await
    }

    /// Every cap, by key.
    pub async fn limits(&self) -> Result<Vec<Limit>> {
        let rows: Vec<LimitRow> = sqlx::query_as(sql!(concat!(
            "SELECT l.key, l.max_running, ",
            held!(),
            ", l.updated_at FROM concurrency_limits l ORDER BY l.key"
        )))
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(limit_of).collect())
    }
}
