//! The task queue's storage, by concern: `enqueue`, `claim` (dispatch),
//! `reports` (start, complete, fail), `maintenance` (timeouts, cancellation,
//! requeues, stale agents) and `query` (reads). The decisions are the
//! domain's (`omoi_domain::rules`); this module persists what they return.

mod claim;
mod enqueue;
mod maintenance;
mod query;
mod reports;

use omoi_domain::routing::Labels;
use omoi_domain::rules::{self, Change, Dependents, Revoked, Transition};
use omoi_domain::{DomainError, ErrorClass, Task, Usage};
use serde_json::Value;
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use crate::codes::phase_of;
use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError};

pub use claim::Slot;
pub use maintenance::Retried;
pub use query::{ListFilter, Stats, Unsatisfied};
pub use reports::{Completions, Report};

/// Columns of a task as every query returns it (`t` is the tasks alias).
macro_rules! task_fields {
    () => {
        "t.id, t.seq, t.ticket_id, t.title, t.description, t.phase, t.priority, t.status,
         t.unmet_deps, t.retry_count, t.max_retries, t.timeout_seconds, t.attempt,
         t.assigned_agent_id, t.error_message, t.error_class, t.result, t.usage, t.git, t.created_at,
         t.updated_at, t.started_at, t.completed_at, t.next_attempt_at, t.trace_context, t.concurrency_key,
         t.session, t.requires, t.candidate_of, t.candidate, t.lands_candidate"
    };
}
macro_rules! task_columns {
    () => {
        concat!(
            $crate::tasks::task_fields!(),
            ", ARRAY(SELECT d.depends_on FROM task_dependencies d WHERE d.task_id = t.id
                     ORDER BY d.depends_on) AS depends_on"
        )
    };
}
/// For rows whose dependencies the caller knows (being written by the
/// same statement, they are not visible to it).
macro_rules! task_columns_without_dependencies {
    () => {
        concat!($crate::tasks::task_fields!(), ", '{}'::uuid[] AS depends_on")
    };
}
pub(crate) use task_fields;
use {task_columns, task_columns_without_dependencies};

/// A task read from a row.
struct TaskRow(Task);

impl<'r> FromRow<'r, PgRow> for TaskRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let corrupt = |what: String| sqlx::Error::Decode(what.into());
        let status: String = row.try_get("status")?;
        let phase: i16 = row.try_get("phase")?;
        let error_class: Option<String> = row.try_get("error_class")?;
        Ok(TaskRow(Task {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            ticket_id: row.try_get("ticket_id")?,
            title: row.try_get("title")?,
            description: row.try_get("description")?,
            phase: phase_of(phase).ok_or_else(|| corrupt(format!("phase {phase}")))?,
            priority: row.try_get("priority")?,
            status: status.parse().map_err(corrupt)?,
            unmet_deps: row.try_get("unmet_deps")?,
            retry_count: row.try_get("retry_count")?,
            max_retries: row.try_get("max_retries")?,
            timeout_seconds: row.try_get("timeout_seconds")?,
            attempt: row.try_get("attempt")?,
            assigned_agent_id: row.try_get("assigned_agent_id")?,
            error_message: row.try_get("error_message")?,
            error_class: error_class.as_deref().and_then(ErrorClass::parse),
            result: row.try_get("result")?,
            usage: usage_of(row.try_get("usage")?).map_err(|e| corrupt(format!("usage: {e}")))?,
            git: row
                .try_get::<Option<Value>, _>("git")?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| corrupt(format!("git: {e}")))?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            completed_at: row.try_get("completed_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            trace_context: row.try_get("trace_context")?,
            depends_on: row.try_get("depends_on")?,
            concurrency_key: row.try_get("concurrency_key")?,
            session: row
                .try_get::<Option<Value>, _>("session")?
                .map(serde_json::from_value)
                .transpose()
                .map_err(|e| corrupt(format!("session: {e}")))?,
            requires: requires_of(row)?,
            candidate: match (
                row.try_get::<Option<Uuid>, _>("candidate_of")?,
                row.try_get::<Option<i16>, _>("candidate")?,
            ) {
                (Some(of), Some(n)) => Some((of, i32::from(n))),
                _ => None,
            },
            lands_candidate: row.try_get("lands_candidate")?,
        }))
    }
}

/// Required labels as stored (`requires` jsonb of tasks and ticket tasks).
pub(crate) fn requires_of(row: &PgRow) -> sqlx::Result<Labels> {
    row.try_get::<Option<Value>, _>("requires")?
        .map(serde_json::from_value)
        .transpose()
        .map(Option::unwrap_or_default)
        .map_err(|e| sqlx::Error::Decode(format!("requires: {e}").into()))
}

/// Required labels to store: none is NULL.
pub(crate) fn requires_json(requires: &Labels) -> Option<String> {
    (!requires.is_empty()).then(|| serde_json::to_string(requires).expect("labels always serialize"))
}

/// A stored usage (the `usage` jsonb of tasks and tickets).
pub(crate) fn usage_of(value: Option<Value>) -> std::result::Result<Option<Usage>, serde_json::Error> {
    value.map(serde_json::from_value).transpose()
}

/// A usage as the `usage_add` of the schema takes it.
pub(crate) fn usage_json(usage: Option<&Usage>) -> Option<String> {
    usage.map(|u| serde_json::to_string(u).expect("a usage always serializes"))
}

fn unwrap_rows(rows: Vec<TaskRow>) -> Vec<Task> {
    rows.into_iter().map(|TaskRow(t)| t).collect()
}

/// What a failure report, timeout, reclaim or cancellation did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub task: Task,
    /// The agent held the attempt and must be told to stop.
    pub revoked: Option<Revoked>,
    /// Dependents cancelled because this task failed or was cancelled.
    pub cancelled_dependents: Vec<Uuid>,
}

async fn select_tasks(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Task>> {
    let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.id = ANY($1)"
    )))
    .bind(ids)
    .fetch_all(conn)
    .await?;
    Ok(unwrap_rows(rows))
}

async fn lock_task(conn: &mut PgConnection, id: Uuid) -> Result<Task> {
    let row: Option<TaskRow> = sqlx::query_as(sql!(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.id = $1 FOR UPDATE"
    )))
    .bind(id)
    .fetch_optional(conn)
    .await?;
    row.map(|TaskRow(t)| t)
        .ok_or(StoreError::NotFound { entity: "task", id })
}

impl Store {
    /// Locks one task, lets `decide` say what becomes of it, and persists
    /// that in the same transaction.
    async fn change_one(
        &self,
        task_id: Uuid,
        decide: impl FnOnce(&Task) -> std::result::Result<Transition, DomainError>,
    ) -> Result<Outcome> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        let outcome = persist(&mut tx, decide(&task)?).await?;
        self.commit(tx).await?;
        Ok(outcome)
    }

    /// Persists what `decide` says of each of `tasks`, locked by `tx`, and
    /// commits.
    async fn change_locked(
        &self,
        mut tx: sqlx::Transaction<'_, sqlx::Postgres>,
        tasks: Vec<Task>,
        mut decide: impl FnMut(&Task) -> std::result::Result<Transition, DomainError>,
    ) -> Result<Vec<Outcome>> {
        let mut outcomes = Vec::with_capacity(tasks.len());
        for task in tasks {
            outcomes.push(persist(&mut tx, decide(&task)?).await?);
        }
        self.commit(tx).await?;
        Ok(outcomes)
    }
}

/// Writes a decided transition of a locked task: its new state, its events,
/// and the cancellation of its dependents.
async fn persist(conn: &mut PgConnection, tr: Transition) -> Result<Outcome> {
    match &tr.change {
        Change::Retry { delay, error, class } => {
            sqlx::query(
                sql!("UPDATE tasks SET status = 'pending', retry_count = retry_count + 1,
                     next_attempt_at = now() + make_interval(secs => $2::float8 / 1000.0),
                     assigned_agent_id = NULL, assignment_session = NULL, deadline_at = NULL,
                     started_at = NULL, lease_expires_at = NULL, error_message = $3, error_class = $4, updated_at = now(),
                     usage = usage_add(usage, $5::jsonb)
                 WHERE id = $1"),
            )
            .bind(tr.task_id)
            .bind(delay.as_millis() as f64)
            .bind(error)
            .bind(class.as_str())
            .bind(usage_json(tr.usage.as_ref()))
            .execute(&mut *conn)
            .await?;
        }
        Change::Fail { error, class } => {
            sqlx::query(sql!(
                "UPDATE tasks SET status = 'failed', error_message = $2, error_class = $3,
                     completed_at = now(), deadline_at = NULL, updated_at = now(),
                     usage = usage_add(usage, $4::jsonb)
                 WHERE id = $1"
            ))
            .bind(tr.task_id)
            .bind(error)
            .bind(class.as_str())
            .bind(usage_json(tr.usage.as_ref()))
            .execute(&mut *conn)
            .await?;
        }
        Change::Reset => {
            sqlx::query(
                sql!("UPDATE tasks SET status = 'pending', retry_count = 0, error_message = NULL,
                     error_class = NULL, result = NULL, git = NULL, completed_at = NULL, started_at = NULL, lease_expires_at = NULL,
                     deadline_at = NULL, assigned_agent_id = NULL, assignment_session = NULL,
                     cancelled_by = NULL, next_attempt_at = now(), updated_at = now()
                 WHERE id = $1"),
            )
            .bind(tr.task_id)
            .execute(&mut *conn)
            .await?;
            // A candidate going round again had released the task choosing
            // among them: that one, while still waiting, waits for it again
            // (it never chooses from a partial set).
            sqlx::query(sql!(
                "UPDATE tasks c SET unmet_deps = c.unmet_deps + 1, updated_at = now()
                 FROM tasks k
                 WHERE k.id = $1 AND c.id = k.candidate_of AND c.status = 'pending'"
            ))
            .bind(tr.task_id)
            .execute(&mut *conn)
            .await?;
            // And a choosing task going round again waits for whichever of
            // its candidates are not over.
            sqlx::query(sql!(
                "UPDATE tasks t SET unmet_deps = (
                     SELECT count(*) FROM task_dependencies d JOIN tasks k ON k.id = d.depends_on
                     WHERE d.task_id = t.id AND k.status NOT IN ('completed', 'failed', 'timed_out', 'cancelled'))
                 WHERE t.id = $1 AND EXISTS (SELECT 1 FROM tasks k WHERE k.candidate_of = t.id)"
            ))
            .bind(tr.task_id)
            .execute(&mut *conn)
            .await?;
        }
        Change::Cancel { reason } => {
            sqlx::query(sql!(
                "UPDATE tasks SET status = 'cancelled', error_message = $2, completed_at = now(),
                     updated_at = now(), deadline_at = NULL
                 WHERE id = $1"
            ))
            .bind(tr.task_id)
            .bind(reason)
            .execute(&mut *conn)
            .await?;
        }
    }
    events::insert(conn, &tr.events).await?;
    let cancelled_dependents = match &tr.dependents {
        Dependents::Cancelled(reason) => cancel_dependents(conn, tr.task_id, reason).await?,
        Dependents::Released => {
            release_dependents(conn, &[tr.task_id]).await?;
            Vec::new()
        }
        Dependents::Untouched => Vec::new(),
    };
    let task = lock_task(conn, tr.task_id).await?;
    debug_assert_eq!(task.status, tr.change.status());
    Ok(Outcome {
        task,
        revoked: tr.revoke,
        cancelled_dependents,
    })
}

/// Cancels the pending tasks that depend, directly or not, on `root`.
async fn cancel_dependents(conn: &mut PgConnection, root: Uuid, reason: &str) -> Result<Vec<Uuid>> {
    let rows: Vec<(Uuid, Option<Uuid>, Option<String>)> = sqlx::query_as(sql!(
        "WITH RECURSIVE down(id) AS (
             SELECT task_id FROM task_dependencies WHERE depends_on = $1
             UNION
             SELECT d.task_id FROM task_dependencies d JOIN down ON d.depends_on = down.id
         ), t AS (
             UPDATE tasks t
             SET status = 'cancelled', error_message = $2, completed_at = now(), updated_at = now(),
                 cancelled_by = $1
             FROM down WHERE t.id = down.id AND t.status = 'pending'
             RETURNING t.id, t.ticket_id, t.seq, t.trace_context
         )
         SELECT id, ticket_id, trace_context FROM t ORDER BY seq"
    ))
    .bind(root)
    .bind(reason)
    .fetch_all(&mut *conn)
    .await?;
    let (evs, traces): (Vec<_>, Vec<_>) = rows
        .iter()
        .map(|(id, ticket, trace)| (rules::dependent_cancelled(*id, *ticket, root, reason), trace.clone()))
        .unzip();
    events::insert_traced(conn, &evs, &traces).await?;
    Ok(rows.into_iter().map(|(id, _, _)| id).collect())
}

/// Decrements the unmet-dependency counters of the dependents of `done`;
/// a dependent reaching zero becomes ready now.
async fn release_dependents(conn: &mut PgConnection, done: &[Uuid]) -> Result<u64> {
    if done.is_empty() {
        return Ok(0);
    }
    let released = sqlx::query(sql!(
        "UPDATE tasks t
         SET unmet_deps = t.unmet_deps - c.n, updated_at = now(),
             next_attempt_at = CASE WHEN t.unmet_deps = c.n THEN greatest(t.next_attempt_at, now())
                                    ELSE t.next_attempt_at END
         FROM (SELECT task_id, count(*)::int AS n FROM task_dependencies
               WHERE depends_on = ANY($1) GROUP BY task_id ORDER BY task_id) c
         WHERE t.id = c.task_id"
    ))
    .bind(done)
    .execute(conn)
    .await?;
    Ok(released.rows_affected())
}
