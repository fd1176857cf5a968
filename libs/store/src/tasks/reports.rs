//! Agents' reports of their attempts: start and completion in batches (one
//! statement for many reports), failure one at a time.

use std::collections::{HashMap, HashSet};

use omoi_domain::rules::Failure;
use omoi_domain::{Action, Entity, Event, EventType, GitChange, Task, Usage, rules};
use serde_json::Value;
use sqlx::{Acquire, PgConnection};
use uuid::Uuid;

use super::{Outcome, TaskRow, release_dependents, select_tasks, task_columns, unwrap_rows, usage_json};
use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError};

/// A report of an attempt: task, attempt, and (for completions) the result.
#[derive(Debug, Clone)]
pub struct Report {
    pub task_id: Uuid,
    pub attempt: i32,
    pub result: Option<Value>,
    /// What a completed attempt spent.
    pub usage: Option<Usage>,
    /// What a completed attempt left on its ticket's branch.
    pub git: Option<GitChange>,
    /// The reporting request's `traceparent`, for the event it causes.
    pub trace: Option<String>,
}

/// What a completion batch did.
#[derive(Debug)]
pub struct Completions {
    /// One per report, in order.
    pub results: Vec<Result<Task>>,
    /// Dependents of the completed tasks that had one dependency fewer to
    /// wait for (some may be ready now).
    pub released: u64,
}

impl Store {
    /// Starts a batch of attempts in one statement, their events written
    /// by the same statement; one result per report.
    pub async fn start_batch(&self, reports: &[Report]) -> Result<Vec<Result<Task>>> {
        let (ids, attempts) = ids_and_attempts(reports);
        let events = ReportEvents::new(reports, |r| rules::start_event(r.attempt, None));
        let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
            "WITH r AS (
                 SELECT * FROM unnest($1::uuid[], $2::int4[], $3::uuid[], $4::text[], $5::text[])
                          WITH ORDINALITY AS r(id, attempt, event_id, event_payload, trace, ord)
             ), t AS (
                 UPDATE tasks t
                 SET status = 'running', started_at = now(), updated_at = now(),
                     deadline_at = CASE WHEN t.timeout_seconds > 0
                                        THEN now() + make_interval(secs => t.timeout_seconds) END
                 FROM r
                 WHERE t.id = r.id AND t.attempt = r.attempt AND t.status = 'assigned'
                 RETURNING t.*, r.event_id, r.event_payload, r.trace AS report_trace, r.ord AS report_ord
             ), ev AS (",
            report_events!(),
            "), outbox AS (",
            events::insert_events!("$6", "$7"),
            ")
             SELECT ",
            task_columns!(),
            " FROM t"
        )))
        .bind(&ids)
        .bind(&attempts)
        .bind(&events.ids)
        .bind(&events.payloads)
        .bind(&events.traces)
        .bind(EventType::TaskStarted.as_str())
        .bind(Entity::Task.as_str())
        .fetch_all(self.pool())
        .await?;
        self.wrote();
        self.match_reports(reports, unwrap_rows(rows), Action::Start).await
    }

    /// Completes a batch of attempts; one result per report, and how many
    /// dependents it released. The tasks nothing depends on are completed
    /// by one autocommit statement (the completions and their events); the
    /// rest in a transaction that also releases their dependents.
    pub async fn complete_batch(&self, reports: &[Report]) -> Result<Completions> {
        let mut conn = self.pool().acquire().await?;
        let mut tasks = complete(&mut conn, reports, Completable::Leaves).await?;
        if !tasks.is_empty() {
            self.wrote();
        }
        let mut released = 0;
        let applied: HashSet<Uuid> = tasks.iter().map(|t| t.id).collect();
        let rest: Vec<Report> = reports
            .iter()
            .filter(|r| !applied.contains(&r.task_id))
            .cloned()
            .collect();
        if !rest.is_empty() {
            let mut tx = conn.begin().await?;
            let done = complete(&mut tx, &rest, Completable::Any).await?;
            // A separate statement, so that its snapshot includes
            // dependents enqueued by transactions that held our rows until
            // just now.
            let ids: Vec<Uuid> = done.iter().map(|t| t.id).collect();
            released = release_dependents(&mut tx, &ids).await?;
            self.commit(tx).await?;
            tasks.extend(done);
        }
        // Back to the pool before explaining the reports not applied, which
        // may take a connection of its own.
        drop(conn);
        Ok(Completions {
            results: self.match_reports(reports, tasks, Action::Complete).await?,
            released,
        })
    }

    /// A failure report: retried with backoff when retryable and retries
    /// remain, otherwise failed for good with its dependents cancelled.
    pub async fn fail(&self, task_id: Uuid, report: &Failure) -> Result<Outcome> {
        self.change_one(task_id, |task| rules::on_failure(task, report, &mut rand::rng()))
            .await
    }

    /// An agent's report that the attempt ran past the task's deadline.
    pub async fn time_out_attempt(&self, task_id: Uuid, attempt: i32, usage: Option<Usage>) -> Result<Outcome> {
        self.change_one(task_id, |task| {
            rules::on_reported_timeout(task, attempt, usage, &mut rand::rng())
        })
        .await
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
                    // A retried report of the same attempt that already took
                    // effect (its answer was lost) succeeds again.
                    Some(task) => rules::explain_report(task, r.attempt, action)
                        .map(|()| task.clone())
                        .map_err(StoreError::from),
                },
            })
            .collect())
    }
}

/// Which tasks a completion statement may complete.
#[derive(Clone, Copy, PartialEq)]
enum Completable {
    /// Only those nothing depends on (no dependents to release).
    Leaves,
    /// Any.
    Any,
}

/// Completes the attempts of `reports` that are running, with their
/// events, in one statement; the tasks it completed.
async fn complete(conn: &mut PgConnection, reports: &[Report], which: Completable) -> Result<Vec<Task>> {
    let (ids, attempts) = ids_and_attempts(reports);
    let results: Vec<Option<String>> = reports
        .iter()
        .map(|r| r.result.as_ref().map(Value::to_string))
        .collect();
    let usages: Vec<Option<String>> = reports.iter().map(|r| usage_json(r.usage.as_ref())).collect();
    let gits: Vec<Option<String>> = reports
        .iter()
        .map(|r| {
            r.git
                .as_ref()
                .map(|g| serde_json::to_string(g).expect("a git change always serializes"))
        })
        .collect();
    let events = ReportEvents::new(reports, |r| {
        rules::completion_event(r.attempt, None, r.result.clone(), r.usage.clone(), r.git.as_ref())
    });
    let rows: Vec<TaskRow> = sqlx::query_as(sql!(concat!(
        "WITH r AS (
             SELECT * FROM unnest($1::uuid[], $2::int4[], $3::text[], $4::text[], $5::text[],
                                  $6::uuid[], $7::text[], $8::text[])
                      WITH ORDINALITY AS r(id, attempt, result, usage, git, event_id, event_payload, trace, ord)
         ), t AS (
             UPDATE tasks t
             SET status = 'completed', result = r.result::jsonb, completed_at = now(),
                 updated_at = now(), deadline_at = NULL, error_message = NULL, error_class = NULL,
                 usage = usage_add(t.usage, r.usage::jsonb), git = r.git::jsonb
             FROM r
             WHERE t.id = r.id AND t.attempt = r.attempt AND t.status = 'running'
               -- Checked again on the row's latest version when the update
               -- waited for it: an enqueue adding a dependent marks it.
               AND ($11 OR NOT t.has_dependents)
             RETURNING t.*, r.event_id, r.event_payload, r.trace AS report_trace, r.ord AS report_ord
         ), ev AS (",
        report_events!(),
        "), outbox AS (",
        events::insert_events!("$9", "$10"),
        ")
         SELECT ",
        task_columns!(),
        " FROM t"
    )))
    .bind(&ids)
    .bind(&attempts)
    .bind(&results)
    .bind(&usages)
    .bind(&gits)
    .bind(&events.ids)
    .bind(&events.payloads)
    .bind(&events.traces)
    .bind(EventType::TaskCompleted.as_str())
    .bind(Entity::Task.as_str())
    .bind(which == Completable::Any)
    .fetch_all(conn)
    .await?;
    Ok(unwrap_rows(rows))
}

/// The events of a batch of reports, made before the statement that
/// applies them (one per report, as if each applied; the statement keeps
/// those of the reports it did apply): ids, payloads without the agent
/// (the statement adds the task's), and the reporting requests' trace
/// contexts.
struct ReportEvents {
    ids: Vec<Uuid>,
    payloads: Vec<String>,
    traces: Vec<Option<String>>,
}

impl ReportEvents {
    fn new(reports: &[Report], event: impl Fn(&Report) -> Event) -> Self {
        Self {
            ids: events::event_ids(reports.len()),
            payloads: reports.iter().map(|r| event(r).payload().to_string()).collect(),
            traces: reports.iter().map(|r| r.trace.clone()).collect(),
        }
    }
}

/// The `ev` rows (see `events::insert_events`) of a report statement whose
/// CTE `t` returns the applied rows with their report's `event_id`,
/// `event_payload`, `report_trace` and `report_ord`: the payload gets the
/// task's agent, and an event without the request's trace context takes
/// the task's (its enqueue's), in report order.
macro_rules! report_events {
    () => {
        "SELECT t.event_id AS id, t.report_ord AS ord, t.id AS entity_id, t.ticket_id,
                (t.event_payload::jsonb || jsonb_build_object('agent_id', t.assigned_agent_id))::json AS payload,
                coalesce(t.report_trace, t.trace_context) AS trace
         FROM t"
    };
}
use report_events;

fn ids_and_attempts(reports: &[Report]) -> (Vec<Uuid>, Vec<i32>) {
    reports.iter().map(|r| (r.task_id, r.attempt)).unzip()
}
