//! The task queue's storage: enqueue, dispatch claims, reports, retries,
//! timeouts, cancellation, listing and statistics.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use chrono::{DateTime, Utc};
use omoi_domain::validate::NewTask;
use omoi_domain::{Action, ErrorClass, Phase, TaskStatus, backoff, classify, graph};
use serde_json::{Value, json};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use crate::events::{self, NewEvent};
use crate::{Result, Store, StoreError};

/// Columns of a task as every query returns it (`t` is the tasks alias).
macro_rules! task_columns {
    () => {
        "t.id, t.seq, t.ticket_id, t.title, t.description, t.phase, t.priority, t.status,
         t.unmet_deps, t.retry_count, t.max_retries, t.timeout_seconds, t.attempt,
         t.assigned_agent_id, t.error_message, t.error_class, t.result, t.created_at,
         t.updated_at, t.started_at, t.completed_at, t.next_attempt_at, t.trace_context,
         ARRAY(SELECT d.depends_on FROM task_dependencies d WHERE d.task_id = t.id
               ORDER BY d.depends_on) AS depends_on"
    };
}

/// A stored task.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: Uuid,
    pub seq: i64,
    pub ticket_id: Option<Uuid>,
    pub title: String,
    pub description: String,
    pub phase: Phase,
    pub priority: i32,
    pub status: TaskStatus,
    pub unmet_deps: i32,
    pub retry_count: i32,
    pub max_retries: i32,
    pub timeout_seconds: i32,
    pub attempt: i32,
    pub assigned_agent_id: Option<Uuid>,
    pub error_message: Option<String>,
    pub error_class: Option<ErrorClass>,
    pub result: Option<Value>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    /// The `traceparent` of the request that enqueued it.
    pub trace_context: Option<String>,
    pub depends_on: Vec<Uuid>,
}

impl<'r> FromRow<'r, PgRow> for Task {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let corrupt = |what: String| sqlx::Error::Decode(what.into());
        let status: String = row.try_get("status")?;
        let phase: i16 = row.try_get("phase")?;
        let error_class: Option<String> = row.try_get("error_class")?;
        Ok(Task {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            ticket_id: row.try_get("ticket_id")?,
            title: row.try_get("title")?,
            description: row.try_get("description")?,
            phase: Phase::from_proto(i32::from(phase)).ok_or_else(|| corrupt(format!("phase {phase}")))?,
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
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            completed_at: row.try_get("completed_at")?,
            next_attempt_at: row.try_get("next_attempt_at")?,
            trace_context: row.try_get("trace_context")?,
            depends_on: row.try_get("depends_on")?,
        })
    }
}

/// Filters of `list`.
#[derive(Debug, Clone, Default)]
pub struct ListFilter {
    pub ticket_id: Option<Uuid>,
    pub status: Option<TaskStatus>,
    pub phase: Option<Phase>,
}

/// One free place on a connected agent's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot {
    pub agent_id: Uuid,
    pub session: Uuid,
}

/// An attempt that an agent must stop working on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub agent_id: Uuid,
    pub task_id: Uuid,
    pub attempt: i32,
    pub reason: String,
}

/// What a failure report, timeout or cancellation did.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub task: Task,
    /// The agent held the attempt and must be told to stop.
    pub revoked: Option<Revoked>,
    /// Dependents cancelled because this task failed or was cancelled.
    pub cancelled_dependents: Vec<Uuid>,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// (status, phase, count), non-zero only.
    pub counts: Vec<(TaskStatus, Phase, i64)>,
    pub ready: i64,
    pub oldest_ready_age: Duration,
}

/// A report of an attempt: task, attempt, and (for completions) the result.
#[derive(Debug, Clone)]
pub struct Report {
    pub task_id: Uuid,
    pub attempt: i32,
    pub result: Option<Value>,
    /// The reporting request's `traceparent`, for the event it causes.
    pub trace: Option<String>,
}

impl Store {
    /// Adds a batch of validated tasks, all or nothing.
    pub async fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<Task>> {
        let nodes: Vec<graph::BatchNode> = tasks
            .iter()
            .map(|t| graph::BatchNode {
                id: t.id,
                depends_on: t.depends_on.clone(),
            })
            .collect();
        let external = graph::external_dependencies(&nodes);
        let ids: Vec<Uuid> = tasks.iter().map(|t| t.id).collect();

        let mut tx = self.pool().begin().await?;
        // Locking the dependencies orders this insert against their
        // completion: whichever commits second sees the other.
        let existing: Vec<(Uuid, String)> =
            sqlx::query_as("SELECT id, status FROM tasks WHERE id = ANY($1) ORDER BY id FOR SHARE")
                .bind(&external)
                .fetch_all(&mut *tx)
                .await?;
        let known: HashSet<Uuid> = existing.iter().map(|(id, _)| *id).collect();
        graph::validate_batch("tasks", &nodes, &known)?;
        let mut completed = HashSet::new();
        for (id, status) in &existing {
            match status.as_str() {
                "completed" => {
                    completed.insert(*id);
                }
                "failed" | "cancelled" | "timed_out" => {
                    let field = dependency_field(tasks, *id);
                    return Err(StoreError::FailedPrecondition(format!(
                        "{field}: dependency {id} is {status} and will never complete"
                    )));
                }
                _ => {}
            }
        }
        let clash: Option<Uuid> = sqlx::query_scalar("SELECT id FROM tasks WHERE id = ANY($1) LIMIT 1")
            .bind(&ids)
            .fetch_optional(&mut *tx)
            .await?;
        if let Some(id) = clash {
            let i = ids.iter().position(|x| *x == id).unwrap_or(0);
            return Err(StoreError::AlreadyExists(format!(
                "tasks[{i}].id: task {id} already exists"
            )));
        }

        let unmet: Vec<i32> = tasks
            .iter()
            .map(|t| t.depends_on.iter().filter(|d| !completed.contains(d)).count() as i32)
            .collect();
        sqlx::query(
            "INSERT INTO tasks (id, ticket_id, title, description, phase, priority, status,
                                unmet_deps, max_retries, timeout_seconds, trace_context)
             SELECT n.id, n.ticket_id, n.title, n.description, n.phase, n.priority, 'pending',
                    n.unmet, n.max_retries, n.timeout_seconds, $10
             FROM unnest($1::uuid[], $2::uuid[], $3::text[], $4::text[], $5::int2[], $6::int4[],
                         $7::int4[], $8::int4[], $9::int4[]) WITH ORDINALITY
                  AS n(id, ticket_id, title, description, phase, priority, unmet, max_retries,
                       timeout_seconds, ord)
             ORDER BY n.ord",
        )
        .bind(&ids)
        .bind(tasks.iter().map(|t| t.ticket_id).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.title.as_str()).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.description.as_str()).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.phase.to_proto() as i16).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.priority).collect::<Vec<_>>())
        .bind(&unmet)
        .bind(tasks.iter().map(|t| t.max_retries).collect::<Vec<_>>())
        .bind(tasks.iter().map(|t| t.timeout_seconds).collect::<Vec<_>>())
        .bind(events::current_trace())
        .execute(&mut *tx)
        .await?;

        let (from, to): (Vec<Uuid>, Vec<Uuid>) = tasks
            .iter()
            .flat_map(|t| t.depends_on.iter().map(move |d| (t.id, *d)))
            .unzip();
        if !from.is_empty() {
            sqlx::query(
                "INSERT INTO task_dependencies (task_id, depends_on)
                 SELECT * FROM unnest($1::uuid[], $2::uuid[])",
            )
            .bind(&from)
            .bind(&to)
            .execute(&mut *tx)
            .await?;
        }

        let created: Vec<NewEvent> = tasks
            .iter()
            .zip(&unmet)
            .map(|(t, unmet)| {
                NewEvent::task(
                    "TASK_CREATED",
                    t.id,
                    t.ticket_id,
                    json!({
                        "title": t.title,
                        "phase": t.phase.as_str(),
                        "priority": t.priority,
                        "depends_on": t.depends_on,
                        "unmet_dependencies": unmet,
                    }),
                )
            })
            .collect();
        events::insert(&mut tx, &created).await?;

        let mut rows = select_tasks(&mut tx, &ids).await?;
        tx.commit().await?;
        let order: HashMap<Uuid, usize> = ids.iter().enumerate().map(|(i, id)| (*id, i)).collect();
        rows.sort_by_key(|t| order.get(&t.id).copied().unwrap_or(usize::MAX));
        Ok(rows)
    }

    pub async fn get(&self, id: Uuid) -> Result<Task> {
        let mut conn = self.pool().acquire().await?;
        select_tasks(&mut conn, &[id])
            .await?
            .pop()
            .ok_or(StoreError::NotFound { entity: "task", id })
    }

    /// A page of tasks in insertion order after `after_seq`; the second value
    /// is the cursor of the next page, if there is one.
    pub async fn list(&self, filter: &ListFilter, page_size: i64, after_seq: i64) -> Result<(Vec<Task>, Option<i64>)> {
        let mut rows: Vec<Task> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE ($1::uuid IS NULL OR t.ticket_id = $1)
               AND ($2::text IS NULL OR t.status = $2)
               AND ($3::int2 IS NULL OR t.phase = $3)
               AND t.seq > $4
             ORDER BY t.seq LIMIT $5"
        ))
        .bind(filter.ticket_id)
        .bind(filter.status.map(TaskStatus::as_str))
        .bind(filter.phase.map(|p| p.to_proto() as i16))
        .bind(after_seq)
        .bind(page_size + 1)
        .fetch_all(self.pool())
        .await?;
        let next = if rows.len() as i64 > page_size {
            rows.truncate(page_size as usize);
            rows.last().map(|t| t.seq)
        } else {
            None
        };
        Ok((rows, next))
    }

    /// Hands ready tasks to the given slots, highest priority then oldest
    /// first, one task per slot, in one statement. `phases` = None accepts
    /// every phase. Rows locked by another dispatcher are skipped, so
    /// replicas never hand out the same task.
    /// `stamp` becomes the tasks' `assigned_at`: when the statement's answer
    /// is lost, `assigned_in_round` finds what it did.
    pub async fn assign(&self, phases: Option<&[Phase]>, slots: &[Slot], stamp: DateTime<Utc>) -> Result<Vec<Task>> {
        if slots.is_empty() {
            return Ok(Vec::new());
        }
        let phases: Option<Vec<i16>> = phases.map(|p| p.iter().map(|p| p.to_proto() as i16).collect());
        let rows = sqlx::query_as(concat!(
            "WITH slots AS (
                 SELECT s.agent, s.session, s.ord
                 FROM unnest($1::uuid[], $2::uuid[]) WITH ORDINALITY AS s(agent, session, ord)
             ), picked AS MATERIALIZED (
                 SELECT id, priority, seq FROM tasks
                 WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at <= now()
                   AND ($3::int2[] IS NULL OR phase = ANY($3))
                 ORDER BY priority DESC, seq
                 LIMIT $4
                 FOR UPDATE SKIP LOCKED
             ), numbered AS (
                 SELECT id, row_number() OVER (ORDER BY priority DESC, seq) AS ord FROM picked
             ), t AS (
                 UPDATE tasks t
                 SET status = 'assigned', attempt = t.attempt + 1, assigned_agent_id = s.agent,
                     assignment_session = s.session, assigned_at = $5, updated_at = now()
                 FROM numbered n JOIN slots s ON s.ord = n.ord
                 WHERE t.id = n.id
                 RETURNING t.*
             ), ev AS (
                 INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
                 SELECT 'TASK_ASSIGNED', 'task', t.id, t.ticket_id,
                        jsonb_build_object('attempt', t.attempt, 'agent_id', t.assigned_agent_id,
                                           'priority', t.priority),
                        t.trace_context
                 FROM t ORDER BY t.priority DESC, t.seq
             )
             SELECT ",
            task_columns!(),
            " FROM t ORDER BY t.priority DESC, t.seq"
        ))
        .bind(slots.iter().map(|s| s.agent_id).collect::<Vec<_>>())
        .bind(slots.iter().map(|s| s.session).collect::<Vec<_>>())
        .bind(phases)
        .bind(slots.len() as i64)
        .bind(stamp)
        .fetch_all(self.pool())
        .await?;
        Ok(rows)
    }

    /// The tasks an `assign` with this stamp handed to these sessions and
    /// that are still waiting to start.
    pub async fn assigned_in_round(&self, stamp: DateTime<Utc>, sessions: &[Uuid]) -> Result<Vec<Task>> {
        Ok(sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t
             WHERE t.status = 'assigned' AND t.assigned_at = $1 AND t.assignment_session = ANY($2)"
        ))
        .bind(stamp)
        .bind(sessions)
        .fetch_all(self.pool())
        .await?)
    }

    /// Tasks held (assigned or running) by each of the given agents.
    pub async fn held_counts(&self, agents: &[Uuid]) -> Result<HashMap<Uuid, i64>> {
        let rows: Vec<(Uuid, i64)> = sqlx::query_as(
            "SELECT assigned_agent_id, count(*) FROM tasks
             WHERE assigned_agent_id = ANY($1) AND status IN ('assigned', 'running')
             GROUP BY assigned_agent_id",
        )
        .bind(agents)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().collect())
    }

    /// When the earliest backed-off task becomes ready, if any waits.
    pub async fn next_retry_at(&self) -> Result<Option<DateTime<Utc>>> {
        Ok(sqlx::query_scalar(
            "SELECT min(next_attempt_at) FROM tasks
             WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at > now()",
        )
        .fetch_one(self.pool())
        .await?)
    }

    /// Starts a batch of attempts in one statement; one result per report.
    pub async fn start_batch(&self, reports: &[Report]) -> Result<Vec<Result<Task>>> {
        let (ids, attempts) = ids_and_attempts(reports);
        let rows: Vec<Task> = sqlx::query_as(concat!(
            "WITH t AS (
                 UPDATE tasks t
                 SET status = 'running', started_at = now(), updated_at = now(),
                     deadline_at = CASE WHEN t.timeout_seconds > 0
                                        THEN now() + make_interval(secs => t.timeout_seconds) END
                 FROM unnest($1::uuid[], $2::int4[], $3::text[]) AS r(id, attempt, trace)
                 WHERE t.id = r.id AND t.attempt = r.attempt AND t.status = 'assigned'
                 RETURNING t.*, r.trace AS report_trace
             ), ev AS (
                 INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
                 SELECT 'TASK_STARTED', 'task', t.id, t.ticket_id,
                        jsonb_build_object('attempt', t.attempt, 'agent_id', t.assigned_agent_id),
                        coalesce(t.report_trace, t.trace_context)
                 FROM t
             )
             SELECT ",
            task_columns!(),
            " FROM t"
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(traces(reports))
        .fetch_all(self.pool())
        .await?;
        self.match_reports(reports, rows, Action::Start).await
    }

    /// Completes a batch of attempts in one transaction and releases their
    /// dependents; one result per report.
    pub async fn complete_batch(&self, reports: &[Report]) -> Result<Vec<Result<Task>>> {
        let (ids, attempts) = ids_and_attempts(reports);
        let results: Vec<Option<String>> = reports
            .iter()
            .map(|r| r.result.as_ref().map(Value::to_string))
            .collect();
        let mut tx = self.pool().begin().await?;
        let rows: Vec<Task> = sqlx::query_as(concat!(
            "WITH t AS (
                 UPDATE tasks t
                 SET status = 'completed', result = r.result::jsonb, completed_at = now(),
                     updated_at = now(), deadline_at = NULL, error_message = NULL, error_class = NULL
                 FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[]) AS r(id, attempt, result, trace)
                 WHERE t.id = r.id AND t.attempt = r.attempt AND t.status = 'running'
                 RETURNING t.*, r.trace AS report_trace
             ), ev AS (
                 INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
                 SELECT 'TASK_COMPLETED', 'task', t.id, t.ticket_id,
                        jsonb_build_object('attempt', t.attempt, 'agent_id', t.assigned_agent_id,
                                           'result', t.result),
                        coalesce(t.report_trace, t.trace_context)
                 FROM t
             )
             SELECT ",
            task_columns!(),
            " FROM t"
        ))
        .bind(&ids)
        .bind(&attempts)
        .bind(&results)
        .bind(traces(reports))
        .fetch_all(&mut *tx)
        .await?;
        // A separate statement, so that its snapshot includes dependents
        // enqueued by transactions that held our rows until just now.
        let done: Vec<Uuid> = rows.iter().map(|t| t.id).collect();
        release_dependents(&mut tx, &done).await?;
        tx.commit().await?;
        self.match_reports(reports, rows, Action::Complete).await
    }

    /// A failure report: retried with backoff when retryable and retries
    /// remain, otherwise failed for good with its dependents cancelled.
    pub async fn fail(
        &self,
        task_id: Uuid,
        attempt: i32,
        message: &str,
        explicit: Option<ErrorClass>,
    ) -> Result<Outcome> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        check_attempt(&task, attempt)?;
        let class = classify::classify(message, explicit);
        let retry = class == ErrorClass::Retryable && task.retry_count < task.max_retries;
        task.status.apply(Action::Fail { retry })?;
        let mut outcome = retry_or_fail(&mut tx, &task, message, class, "TASK_FAILED").await?;
        tx.commit().await?;
        // The reporter is the holder: it knows its attempt ended.
        outcome.revoked = None;
        Ok(outcome)
    }

    /// Cancels a pending, assigned or running task and its pending dependents.
    pub async fn cancel(&self, task_id: Uuid, reason: &str) -> Result<Outcome> {
        let mut tx = self.pool().begin().await?;
        let task = lock_task(&mut tx, task_id).await?;
        task.status.apply(Action::Cancel)?;
        let reason = if reason.is_empty() { "cancelled" } else { reason };
        let revoked = holder(&task, reason);
        sqlx::query(
            "UPDATE tasks SET status = 'cancelled', error_message = $2, completed_at = now(),
                 updated_at = now(), deadline_at = NULL
             WHERE id = $1",
        )
        .bind(task_id)
        .bind(reason)
        .execute(&mut *tx)
        .await?;
        events::insert(
            &mut tx,
            &[NewEvent::task(
                "TASK_CANCELLED",
                task.id,
                task.ticket_id,
                json!({
                    "reason": reason,
                    "previous_status": task.status.as_str(),
                    "attempt": task.attempt,
                    "agent_id": task.assigned_agent_id,
                }),
            )],
        )
        .await?;
        let cancelled_dependents = cancel_dependents(
            &mut tx,
            task.id,
            &format!("dependency {} was cancelled: {reason}", task.id),
        )
        .await?;
        let task = lock_task(&mut tx, task_id).await?;
        tx.commit().await?;
        Ok(Outcome {
            task,
            revoked,
            cancelled_dependents,
        })
    }

    /// Times out running tasks past their deadline (at most `limit` per call):
    /// each is retried like a retryable failure or failed when out of retries.
    pub async fn time_out_expired(&self, limit: i64) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let expired: Vec<Task> = sqlx::query_as(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks t WHERE t.status = 'running' AND t.deadline_at < now()
             ORDER BY t.deadline_at LIMIT $1 FOR UPDATE SKIP LOCKED"
        ))
        .bind(limit)
        .fetch_all(&mut *tx)
        .await?;
        let mut outcomes = Vec::with_capacity(expired.len());
        for task in expired {
            let reason = format!("timed out after {} s", task.timeout_seconds);
            events::insert(
                &mut tx,
                &[NewEvent::task(
                    "TASK_TIMED_OUT",
                    task.id,
                    task.ticket_id,
                    json!({
                        "attempt": task.attempt,
                        "agent_id": task.assigned_agent_id,
                        "timeout_seconds": task.timeout_seconds,
                    }),
                )],
            )
            .await?;
            let retry = task.retry_count < task.max_retries;
            task.status.apply(Action::TimeOut { retry })?;
            outcomes.push(retry_or_fail(&mut tx, &task, &reason, ErrorClass::Retryable, "TASK_FAILED").await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    /// Puts back the tasks delivered on an assignment stream that were not
    /// started; their attempt stays spent, so a late StartTask is refused.
    pub async fn requeue_session(&self, session: Uuid) -> Result<Vec<Uuid>> {
        self.requeue_where(None, session, "stream closed").await
    }

    /// Puts back an agent's assigned tasks delivered on any stream but
    /// `current` (an earlier connection that is gone).
    pub async fn requeue_agent_except(&self, agent_id: Uuid, current: Uuid) -> Result<Vec<Uuid>> {
        self.requeue_where(Some(agent_id), current, "agent reconnected").await
    }

    async fn requeue_where(&self, agent: Option<Uuid>, session: Uuid, reason: &str) -> Result<Vec<Uuid>> {
        Ok(sqlx::query_scalar(
            "WITH t AS (
                 UPDATE tasks t
                 SET status = 'pending', assigned_agent_id = NULL, assignment_session = NULL,
                     updated_at = now(), next_attempt_at = now()
                 WHERE t.status = 'assigned'
                   AND CASE WHEN $1::uuid IS NULL THEN t.assignment_session = $2
                            ELSE t.assigned_agent_id = $1 AND t.assignment_session IS DISTINCT FROM $2 END
                 RETURNING t.id, t.ticket_id, t.attempt, t.trace_context
             ), ev AS (
                 INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
                 SELECT 'TASK_REQUEUED', 'task', t.id, t.ticket_id,
                        jsonb_build_object('attempt', t.attempt, 'reason', $3::text), t.trace_context
                 FROM t
             )
             SELECT id FROM t",
        )
        .bind(agent)
        .bind(session)
        .bind(reason)
        .fetch_all(self.pool())
        .await?)
    }

    /// Takes back the work of an agent that went stale at `stale_at`: its
    /// assigned and running tasks handed out before then are retried (the
    /// lost attempt counts as a retry) or failed when out of retries. Later
    /// reports for those attempts are refused by the attempt fence.
    pub async fn reclaim_agent(&self, agent_id: Uuid, stale_at: DateTime<Utc>) -> Result<Vec<Outcome>> {
        let mut tx = self.pool().begin().await?;
        let held: Vec<Task> = sqlx::query_as(concat!(
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
        let mut outcomes = Vec::with_capacity(held.len());
        let reason = format!("agent {agent_id} stopped heartbeating");
        for task in held {
            task.status.apply(Action::Reclaim)?;
            outcomes.push(retry_or_fail(&mut tx, &task, &reason, ErrorClass::Retryable, "TASK_FAILED").await?);
        }
        tx.commit().await?;
        Ok(outcomes)
    }

    pub async fn stats(&self) -> Result<Stats> {
        let rows: Vec<(String, i16, i64)> =
            sqlx::query_as("SELECT status, phase, count(*) FROM tasks GROUP BY status, phase ORDER BY 1, 2")
                .fetch_all(self.pool())
                .await?;
        let mut counts = Vec::with_capacity(rows.len());
        for (status, phase, n) in rows {
            let status: TaskStatus = status.parse().map_err(StoreError::Corrupt)?;
            let phase =
                Phase::from_proto(i32::from(phase)).ok_or_else(|| StoreError::Corrupt(format!("phase {phase}")))?;
            counts.push((status, phase, n));
        }
        let (ready, age): (i64, Option<f64>) = sqlx::query_as(
            "SELECT count(*), extract(epoch FROM now() - min(next_attempt_at))::float8 FROM tasks
             WHERE status = 'pending' AND unmet_deps = 0 AND next_attempt_at <= now()",
        )
        .fetch_one(self.pool())
        .await?;
        Ok(Stats {
            counts,
            ready,
            oldest_ready_age: Duration::from_secs_f64(age.unwrap_or(0.0).max(0.0)),
        })
    }

    /// Explains the reports a batch statement did not apply.
    async fn match_reports(&self, reports: &[Report], rows: Vec<Task>, action: Action) -> Result<Vec<Result<Task>>> {
        let mut applied: HashMap<Uuid, Task> = rows.into_iter().map(|t| (t.id, t)).collect();
        let missing: Vec<Uuid> = reports
            .iter()
            .filter(|r| !applied.contains_key(&r.task_id))
            .map(|r| r.task_id)
            .collect();
        let current: HashMap<Uuid, Task> = if missing.is_empty() {
            HashMap::new()
        } else {
            let mut conn = self.pool().acquire().await?;
            select_tasks(&mut conn, &missing)
                .await?
                .into_iter()
                .map(|t| (t.id, t))
                .collect()
        };
        Ok(reports
            .iter()
            .map(|r| match applied.remove(&r.task_id) {
                Some(task) => Ok(task),
                None => match current.get(&r.task_id) {
                    None => Err(StoreError::NotFound {
                        entity: "task",
                        id: r.task_id,
                    }),
                    // A retried report of the same attempt that already
                    // took effect (its answer was lost) succeeds again.
                    Some(task) if task.attempt == r.attempt && Some(task.status) == already(action) => Ok(task.clone()),
                    Some(task) => Err(check_attempt(task, r.attempt)
                        .and_then(|()| task.status.apply(action).map_err(StoreError::from))
                        .err()
                        .unwrap_or_else(|| {
                            // The row changed between the batch and this read.
                            StoreError::FailedPrecondition(format!(
                                "task {} changed concurrently; it is now {}",
                                task.id, task.status
                            ))
                        })),
                },
            })
            .collect())
    }
}

/// The status a report leaves its task in, for recognising a retried report.
fn already(action: Action) -> Option<TaskStatus> {
    match action {
        Action::Start => Some(TaskStatus::Running),
        Action::Complete => Some(TaskStatus::Completed),
        _ => None,
    }
}

fn traces(reports: &[Report]) -> Vec<Option<&str>> {
    reports.iter().map(|r| r.trace.as_deref()).collect()
}

fn ids_and_attempts(reports: &[Report]) -> (Vec<Uuid>, Vec<i32>) {
    reports.iter().map(|r| (r.task_id, r.attempt)).unzip()
}

fn dependency_field(tasks: &[NewTask], dep: Uuid) -> String {
    for (i, t) in tasks.iter().enumerate() {
        if let Some(j) = t.depends_on.iter().position(|d| *d == dep) {
            return format!("tasks[{i}].depends_on[{j}]");
        }
    }
    "tasks".to_owned()
}

async fn select_tasks(conn: &mut PgConnection, ids: &[Uuid]) -> Result<Vec<Task>> {
    Ok(sqlx::query_as(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.id = ANY($1)"
    ))
    .bind(ids)
    .fetch_all(conn)
    .await?)
}

async fn lock_task(conn: &mut PgConnection, id: Uuid) -> Result<Task> {
    sqlx::query_as(concat!(
        "SELECT ",
        task_columns!(),
        " FROM tasks t WHERE t.id = $1 FOR UPDATE"
    ))
    .bind(id)
    .fetch_optional(conn)
    .await?
    .ok_or(StoreError::NotFound { entity: "task", id })
}

fn check_attempt(task: &Task, attempt: i32) -> Result<()> {
    if task.attempt != attempt {
        return Err(StoreError::StaleAttempt {
            task_id: task.id,
            reported: attempt,
            current: task.attempt,
        });
    }
    Ok(())
}

/// The agent holding the task's current attempt, if any.
fn holder(task: &Task, reason: &str) -> Option<Revoked> {
    match (task.status, task.assigned_agent_id) {
        (TaskStatus::Assigned | TaskStatus::Running, Some(agent_id)) => Some(Revoked {
            agent_id,
            task_id: task.id,
            attempt: task.attempt,
            reason: reason.to_owned(),
        }),
        _ => None,
    }
}

/// Decrements the unmet-dependency counters of the dependents of `done`;
/// a dependent reaching zero becomes ready now.
async fn release_dependents(conn: &mut PgConnection, done: &[Uuid]) -> Result<u64> {
    if done.is_empty() {
        return Ok(0);
    }
    let released = sqlx::query(
        "UPDATE tasks t
         SET unmet_deps = t.unmet_deps - c.n, updated_at = now(),
             next_attempt_at = CASE WHEN t.unmet_deps = c.n THEN greatest(t.next_attempt_at, now())
                                    ELSE t.next_attempt_at END
         FROM (SELECT task_id, count(*)::int AS n FROM task_dependencies
               WHERE depends_on = ANY($1) GROUP BY task_id ORDER BY task_id) c
         WHERE t.id = c.task_id",
    )
    .bind(done)
    .execute(conn)
    .await?;
    Ok(released.rows_affected())
}

/// Cancels the pending tasks that depend, directly or not, on `root`.
async fn cancel_dependents(conn: &mut PgConnection, root: Uuid, reason: &str) -> Result<Vec<Uuid>> {
    Ok(sqlx::query_scalar(
        "WITH RECURSIVE down(id) AS (
             SELECT task_id FROM task_dependencies WHERE depends_on = $1
             UNION
             SELECT d.task_id FROM task_dependencies d JOIN down ON d.depends_on = down.id
         ), t AS (
             UPDATE tasks t
             SET status = 'cancelled', error_message = $2, completed_at = now(), updated_at = now()
             FROM down WHERE t.id = down.id AND t.status = 'pending'
             RETURNING t.id, t.ticket_id, t.seq, t.trace_context
         ), ev AS (
             INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
             SELECT 'TASK_CANCELLED', 'task', t.id, t.ticket_id,
                    jsonb_build_object('reason', $2::text, 'cause_task_id', $1::uuid,
                                       'previous_status', 'pending'),
                    t.trace_context
             FROM t ORDER BY t.seq
         )
         SELECT id FROM t",
    )
    .bind(root)
    .bind(reason)
    .fetch_all(conn)
    .await?)
}

/// Sends a task whose attempt ended badly back to pending with a stored
/// backoff, or fails it for good and cancels its dependents.
async fn retry_or_fail(
    conn: &mut PgConnection,
    task: &Task,
    message: &str,
    class: ErrorClass,
    failed_event: &'static str,
) -> Result<Outcome> {
    let retry = class == ErrorClass::Retryable && task.retry_count < task.max_retries;
    let revoked = holder(task, message);
    let mut cancelled_dependents = Vec::new();
    if retry {
        let delay = backoff::delay(task.retry_count as u32, &mut rand::rng());
        let delay_ms = delay.as_millis() as i64;
        sqlx::query(
            "UPDATE tasks SET status = 'pending', retry_count = retry_count + 1,
                 next_attempt_at = now() + make_interval(secs => $2::float8 / 1000.0),
                 assigned_agent_id = NULL, assignment_session = NULL, deadline_at = NULL,
                 started_at = NULL, error_message = $3, error_class = $4, updated_at = now()
             WHERE id = $1",
        )
        .bind(task.id)
        .bind(delay_ms as f64)
        .bind(message)
        .bind(class.as_str())
        .execute(&mut *conn)
        .await?;
        events::insert(
            conn,
            &[NewEvent::task(
                "TASK_RETRIED",
                task.id,
                task.ticket_id,
                json!({
                    "attempt": task.attempt,
                    "agent_id": task.assigned_agent_id,
                    "error": message,
                    "error_class": class.as_str(),
                    "retry_count": task.retry_count + 1,
                    "max_retries": task.max_retries,
                    "delay_ms": delay_ms,
                }),
            )],
        )
        .await?;
    } else {
        sqlx::query(
            "UPDATE tasks SET status = 'failed', error_message = $2, error_class = $3,
                 completed_at = now(), deadline_at = NULL, updated_at = now()
             WHERE id = $1",
        )
        .bind(task.id)
        .bind(message)
        .bind(class.as_str())
        .execute(&mut *conn)
        .await?;
        events::insert(
            conn,
            &[NewEvent::task(
                failed_event,
                task.id,
                task.ticket_id,
                json!({
                    "attempt": task.attempt,
                    "agent_id": task.assigned_agent_id,
                    "error": message,
                    "error_class": class.as_str(),
                    "retry_count": task.retry_count,
                }),
            )],
        )
        .await?;
        cancelled_dependents =
            cancel_dependents(conn, task.id, &format!("dependency {} failed: {message}", task.id)).await?;
    }
    let task = lock_task(conn, task.id).await?;
    Ok(Outcome {
        task,
        revoked,
        cancelled_dependents,
    })
}
