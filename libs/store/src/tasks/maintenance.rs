//! Changes the queue makes on its own or on request: cancellation, timeouts,
//! and taking back a stale agent's work.

use chrono::{DateTime, Utc};
use omoi_domain::{AgentSession, Task, TaskStatus, rules};
use serde_json::json;
use uuid::Uuid;

use super::{Outcome, TaskRow, lock_task, persist, select_tasks, task_columns, unwrap_rows};
use crate::events;
use crate::statements::sql;
use crate::{Result, Store};

/// What an operator's retry did.
#[derive(Debug, Clone)]
pub struct Retried {
    pub task: Task,
    /// Dependents cancelled because of the task, pending again with it.
    pub restored: Vec<Uuid>,
}

fn status(s: &str) -> std::result::Result<TaskStatus, sqlx::Error> {
    s.parse().map_err(|e: String| sqlx::Error::Decode(e.into()))
}

impl Store {
    /// Deletes up to `batch` tasks finished more than `keep` ago, with their
    /// dependency links, when every task tied to them (the rest of their
    /// ticket, their dependencies and their dependents) finished that long
    /// ago too: a ticket's tasks go together, and nothing still in play
    /// loses a link. How many went. Finished tasks past retention can no
    /// longer be read or retried.
    pub async fn prune_tasks(&self, keep: std::time::Duration, batch: i64) -> Result<u64> {
        let mut tx = self.pool().begin().await?;
        let ids: Vec<Uuid> = sqlx::query_scalar(
            sql!("WITH cutoff AS (SELECT now() - make_interval(secs => $1) AS at)
             SELECT t.id FROM tasks t, cutoff
             WHERE t.status IN ('completed', 'failed', 'timed_out', 'cancelled') AND t.updated_at < cutoff.at
               AND NOT EXISTS (SELECT 1 FROM tasks o
                   WHERE t.ticket_id IS NOT NULL AND o.ticket_id = t.ticket_id
                     AND (o.status NOT IN ('completed', 'failed', 'timed_out', 'cancelled') OR o.updated_at >= cutoff.at))
               AND NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks o ON o.id = d.depends_on
                   WHERE d.task_id = t.id
                     AND (o.status NOT IN ('completed', 'failed', 'timed_out', 'cancelled') OR o.updated_at >= cutoff.at))
               AND NOT EXISTS (SELECT 1 FROM task_dependencies d JOIN tasks o ON o.id = d.task_id
                   WHERE d.depends_on = t.id
                     AND (o.status NOT IN ('completed', 'failed', 'timed_out', 'cancelled') OR o.updated_at >= cutoff.at))
             ORDER BY t.seq LIMIT $2
             FOR UPDATE OF t SKIP LOCKED"),
        )
        .bind(keep.as_secs_f64())
        .bind(batch)
        .fetch_all(&mut *tx)
        .await?;
        if ids.is_empty() {
            tx.rollback().await?;
            return Ok(0);
        }
        sqlx::query(sql!(
            "DELETE FROM task_dependencies WHERE task_id = ANY($1) OR depends_on = ANY($1)"
        ))
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let gone = sqlx::query(sql!("DELETE FROM tasks WHERE id = ANY($1)"))
            .bind(&ids)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        self.commit(tx).await?;
        Ok(gone)
    }

    /// Cancels a pending, assigned or running task and its pending dependents.
    pub async fn cancel(&self, task_id: Uuid, reason: &str) -> Result<Outcome> {
        self.change_one(task_id, |task| rules::on_cancel(task, reason)).await
    }

    /// An operator's retry: a failed, timed-out or cancelled task back to
    /// pending with a fresh retry budget, and with it the dependents its end
    /// cancelled (unless something else they wait for ended too).
    pub async fn retry(&self, task_id: Uuid, reason: &str, fresh: bool) -> Result<Retried> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        if fresh && task.status.ended_unsuccessfully() {
            // Its next attempt starts a new conversation.
            sqlx::query(sql!("UPDATE tasks SET session = NULL WHERE id = $1"))
                .bind(task_id)
                .execute(&mut *tx)
                .await?;
        }
        let ended: Option<(Uuid, String)> = sqlx::query_as(sql!(
            // A candidate's end, whatever it is, is met for the task
            // choosing among them: it may go round again.
            "SELECT p.id, p.status FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
             WHERE d.task_id = $1 AND p.status IN ('failed', 'timed_out', 'cancelled')
               AND p.candidate_of IS DISTINCT FROM $1
             ORDER BY p.seq LIMIT 1"
        ))
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?;
        let ended = match ended {
            Some((id, s)) => Some((id, status(&s)?)),
            None => None,
        };
        let outcome = persist(&mut tx, rules::on_manual_retry(&task, reason, ended)?).await?;
        let cancelled: Vec<Uuid> = sqlx::query_scalar(sql!(
            "SELECT id FROM tasks WHERE cancelled_by = $1 AND status = 'cancelled' ORDER BY seq FOR UPDATE"
        ))
        .bind(task_id)
        .fetch_all(&mut *tx)
        .await?;
        let mut candidates = Vec::with_capacity(cancelled.len());
        for id in cancelled {
            let deps: Vec<(Uuid, String)> = sqlx::query_as(sql!(
                "SELECT p.id, p.status FROM task_dependencies d JOIN tasks p ON p.id = d.depends_on
                 WHERE d.task_id = $1"
            ))
            .bind(id)
            .fetch_all(&mut *tx)
            .await?;
            let deps = deps
                .into_iter()
                .map(|(dep, s)| Ok((dep, status(&s)?)))
                .collect::<std::result::Result<Vec<_>, sqlx::Error>>()?;
            candidates.push((id, deps));
        }
        let restored = rules::restorable(task_id, &candidates);
        let because = format!("dependency {task_id} retried");
        for dependent in select_tasks(&mut tx, &restored).await? {
            persist(&mut tx, rules::on_manual_retry(&dependent, &because, None)?).await?;
        }
        self.commit(tx).await?;
        Ok(Retried {
            task: outcome.task,
            restored,
        })
    }

    /// Times out running tasks past their deadline (at most `limit` per call):
    /// each is retried like a retryable failure or failed when out of retries.
    pub async fn time_out_expired(&self, limit: i64) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t WHERE t.status = 'running' AND t.deadline_at < now()
             ORDER BY t.deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        )))
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
        let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE t.assigned_agent_id = $1 AND t.status IN ('assigned', 'running') AND t.assigned_at <= $2
             ORDER BY t.seq FOR UPDATE"
        )))
        .bind(agent_id)
        .bind(stale_at)
        .fetch_all(&mut *tx)
        .await?;
        self.change_locked(tx, unwrap_rows(rows), |task| {
            rules::on_stale_agent(task, agent_id, &mut rand::rng())
        })
        .await
    }

    /// Takes back running tasks nobody holds (at most `limit` per call):
    /// those of an agent that deregistered, at once; the others started
    /// more than `lease_seconds` ago, without an ExtendLease still in
    /// force, and whose agent is unknown or stale, or whose
    /// agent's heartbeats since (`slack_seconds` after the start) no longer
    /// list them. Each is retried, or failed when out of retries. An agent
    /// the health service has not heard from since the start holds its
    /// tasks: a health-service outage takes nothing back.
    pub async fn reclaim_unheld(&self, lease_seconds: f64, slack_seconds: f64, limit: i64) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let rows: Vec<(TaskRow, String)> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            task_columns!(),
            ", CASE WHEN a.id IS NULL THEN 'unknown'
                    WHEN a.status = 'deregistered' THEN 'deregistered'
                    WHEN a.status = 'stale' THEN 'stale'
                    ELSE 'unlisted' END AS unheld
             FROM tasks t LEFT JOIN agents a ON a.id = t.assigned_agent_id
             WHERE t.status = 'running'
               AND ((t.started_at < now() - make_interval(secs => $1)
                     AND (t.lease_expires_at IS NULL OR t.lease_expires_at < now()))
                    -- Its agent said it is gone: nothing holds it any more.
                    OR a.status = 'deregistered')
               AND (a.id IS NULL OR a.status <> 'healthy'
                    OR (a.last_heartbeat_at > t.started_at + make_interval(secs => $2)
                        AND NOT t.id = ANY(a.running_task_ids)))
             ORDER BY t.started_at LIMIT $3 FOR UPDATE OF t SKIP LOCKED"
        )))
        .bind(lease_seconds)
        .bind(slack_seconds)
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .map(|r: UnheldRow| (r.0, r.1))
        .collect();
        let (tasks, why): (Vec<Task>, Vec<rules::Unheld>) = rows
            .into_iter()
            .map(|(TaskRow(t), w)| (t, rules::Unheld::parse(&w).unwrap_or(rules::Unheld::NotListed)))
            .unzip();
        let mut why = why.into_iter();
        self.change_locked(tx, tasks, |task| {
            let w = why.next().unwrap_or(rules::Unheld::NotListed);
            rules::on_lease_lapsed(task, w, &mut rand::rng())
        })
        .await
    }

    /// Holds a running attempt until at least `seconds` from now.
    /// Records the agent session of a running attempt (see
    /// [`rules::on_session`]); the task as it stands after.
    pub async fn record_session(&self, task_id: Uuid, attempt: i32, session: &AgentSession) -> Result<Task> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        let resumed = rules::on_session(&task, attempt, session)?;
        let TaskRow(task) = sqlx::query_as(sql!(concat!(
            "UPDATE tasks t SET session = $2::jsonb WHERE id = $1 RETURNING ",
            task_columns!()
        )))
        .bind(task_id)
        .bind(json!(session).to_string())
        .fetch_one(&mut *tx)
        .await?;
        if let Some(event) = resumed {
            events::insert(&mut tx, &[event]).await?;
        }
        self.commit(tx).await?;
        Ok(task)
    }

    /// The guardian's intervention in running attempt `i.attempt`:
    /// TASK_GUARDIAN_INTERVENED, once for each (attempt, seq) however often
    /// it is reported.
    pub async fn record_intervention(&self, task_id: Uuid, i: omoi_domain::event::GuardianIntervened) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        let (attempt, seq) = (i.attempt, i.seq);
        let event = rules::on_intervention(&task, i)?;
        let first: Option<i32> = sqlx::query_scalar(sql!(
            "UPDATE tasks SET intervened_attempt = $2, intervened_seq = $3
             WHERE id = $1 AND (intervened_attempt, intervened_seq) < ($2, $3) RETURNING 1"
        ))
        .bind(task_id)
        .bind(attempt)
        .bind(seq)
        .fetch_optional(&mut *tx)
        .await?;
        if first.is_some() {
            events::insert(&mut tx, &[event]).await?;
        }
        self.commit(tx).await?;
        Ok(())
    }

    pub async fn extend_lease(&self, task_id: Uuid, attempt: i32, seconds: i32) -> Result<(Task, DateTime<Utc>)> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        rules::extendable(&task, attempt)?;
        let until: DateTime<Utc> = sqlx::query_scalar(sql!(
            "UPDATE tasks SET lease_expires_at = greatest(lease_expires_at, now() + make_interval(secs => $2))
             WHERE id = $1 RETURNING lease_expires_at"
        ))
        .bind(task_id)
        .bind(f64::from(seconds))
        .fetch_one(&mut *tx)
        .await?;
        self.commit(tx).await?;
        Ok((task, until))
    }
}

/// A task row and why nobody holds it.
struct UnheldRow(TaskRow, String);

impl<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> for UnheldRow {
    fn from_row(row: &'r sqlx::postgres::PgRow) -> sqlx::Result<Self> {
        use sqlx::Row;
        Ok(Self(TaskRow::from_row(row)?, row.try_get("unheld")?))
    }
}
