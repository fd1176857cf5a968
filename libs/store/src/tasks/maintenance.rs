//! Changes the queue makes on its own or on request: cancellation, timeouts,
//! and taking back a stale agent's work.

use chrono::{DateTime, Utc};
use omoi_domain::rules;
use uuid::Uuid;

use super::{Outcome, TaskRow, task_columns, unwrap_rows};
use crate::{Result, Store};

impl Store {
    /// Cancels a pending, assigned or running task and its pending dependents.
    pub async fn cancel(&self, task_id: Uuid, reason: &str) -> Result<Outcome> {
        self.change_one(task_id, |task| rules::on_cancel(task, reason)).await
    }

    /// Times out running tasks past their deadline (at most `limit` per call):
    /// each is retried like a retryable failure or failed when out of retries.
    pub async fn time_out_expired(&self, limit: i64) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<TaskRow> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t WHERE t.status = 'running' AND t.deadline_at < now()
             ORDER BY t.deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        self.change_locked(tx, unwrap_rows(rows), |task| rules::on_timeout(task, &mut rand::rng()))
            .await
    }

    /// Takes back the work of an agent that went stale at `stale_at`: its
    /// assigned and running tasks handed out before then are retried (the
    /// lost attempt counts as a retry) or failed when out of retries. Later
    /// reports for those attempts are refused by the attempt fence.
    pub async fn reclaim_agent(&self, agent_id: Uuid, stale_at: DateTime<Utc>) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<TaskRow> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE t.assigned_agent_id = $1 AND t.status IN ('assigned', 'running') AND t.assigned_at <= $2
             ORDER BY t.seq FOR UPDATE"
        ))
        .bind(agent_id)
        .bind(stale_at)
        .fetch_all(&mut *tx)
        .await?;
        self.change_locked(tx, unwrap_rows(rows), |task| {
            rules::on_stale_agent(task, agent_id, &mut rand::rng())
        })
        .await
    }
}
