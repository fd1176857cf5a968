//! Tickets, their plans, and their status as task events report it.

use std::time::Duration;

use omoi_domain::gate::{Gate, gated_status};
use omoi_domain::ticket::{PlannedTask, TaskOutcome, TaskProgress, derive_status};
use omoi_domain::{Phase, Ticket, TicketStatus, Usage};
use serde_json::{Value, json};
use sqlx::postgres::PgRow;
use sqlx::{FromRow, PgConnection, Row};
use uuid::Uuid;

use omoi_domain::event::{TicketChanged, TicketCreated};
use omoi_domain::{Envelope, Event};

use crate::codes::{phase_code, phase_of};
use crate::events;
use crate::statements::sql;
use crate::{Result, Store, StoreError, consumed, gates};

/// The columns a `TicketRow` reads.
macro_rules! ticket_columns {
    () => {
        "id, seq, title, description, priority, status, repository, base_ref, branch, head_commit,
     pull_request, pull_request_url, pull_request_error, max_cost_usd, paused_reason, labels, request_id,
     tasks_enqueued, usage, created_at, updated_at, max_reactions, reactions, reaction_refused, source_kind, source_url,
     approvals, check_command, guardian, guardian_paused"
    };
}
pub(crate) use ticket_columns;
/// The columns a `TicketTask` reads.
macro_rules! ticket_task_columns {
    () => {
        "ticket_id, task_id, position, title, description, phase, priority, depends_on,
     max_retries, timeout_seconds, concurrency_key, started, outcome, follow_up, summary, requires,
     candidate_of, candidate, lands_candidate"
    };
}

/// A `tickets` row.
pub(crate) struct TicketRow(pub(crate) Ticket);

impl<'r> FromRow<'r, PgRow> for TicketRow {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let status: String = row.try_get("status")?;
        let priority: i16 = row.try_get("priority")?;
        let approvals: Vec<i16> = row.try_get("approvals")?;
        let approvals = approvals
            .into_iter()
            .map(|code| phase_of(code).ok_or_else(|| sqlx::Error::Decode(format!("phase {code}").into())))
            .collect::<sqlx::Result<Vec<_>>>()?;
        Ok(TicketRow(Ticket {
            id: row.try_get("id")?,
            seq: row.try_get("seq")?,
            title: row.try_get("title")?,
            description: row.try_get("description")?,
            priority: i32::from(priority),
            status: TicketStatus::parse(&status)
                .ok_or_else(|| sqlx::Error::Decode(format!("ticket status {status}").into()))?,
            repository: row.try_get("repository")?,
            base_ref: row.try_get("base_ref")?,
            branch: row.try_get("branch")?,
            head_commit: row.try_get("head_commit")?,
            pull_request: row.try_get("pull_request")?,
            pull_request_url: row.try_get("pull_request_url")?,
            pull_request_error: row.try_get("pull_request_error")?,
            max_cost_usd: row.try_get("max_cost_usd")?,
            paused_reason: row.try_get("paused_reason")?,
            max_reactions: row.try_get("max_reactions")?,
            reactions: row.try_get("reactions")?,
            reaction_refused: row.try_get("reaction_refused")?,
            source_kind: row.try_get("source_kind")?,
            source_url: row.try_get("source_url")?,
            approvals,
            // Read apart, for the tickets that have any (`gates::load`).
            gates: Vec::new(),
            check_command: row.try_get("check_command")?,
            guardian: serde_json::from_value(row.try_get("guardian")?)
                .map_err(|e| sqlx::Error::Decode(format!("guardian: {e}").into()))?,
            guardian_paused: row.try_get("guardian_paused")?,
            labels: row.try_get("labels")?,
            request_id: row.try_get("request_id")?,
            tasks_enqueued: row.try_get("tasks_enqueued")?,
            usage: crate::tasks::usage_of(row.try_get("usage")?)
                .map_err(|e| sqlx::Error::Decode(format!("ticket usage: {e}").into()))?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
        }))
    }
}

/// What one task event tells the ticket that owns the task.
#[derive(Debug, Clone, Copy)]
pub struct TaskReport<'a> {
    /// The task started.
    pub started: bool,
    /// The task ended so.
    pub outcome: Option<TaskOutcome>,
    /// What the attempt it ended spent.
    pub usage: Option<&'a Usage>,
    /// An operator sent the task round again: its outcome is open.
    pub reopened: bool,
    /// The commit the attempt it completed left on the ticket's branch.
    pub head_commit: Option<&'a str>,
    /// What the agent of the attempt it completed said it did.
    pub summary: Option<&'a str>,
    /// The result of the attempt it completed (a candidate's evidence, a
    /// choice among candidates).
    pub result: Option<&'a Value>,
    /// What it says of the guardian's pause of the ticket.
    pub guardian: Option<GuardianPause<'a>>,
}

/// The guardian's pause of a ticket, as a task event tells it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum GuardianPause<'a> {
    /// The guardian paused it (an attempt's spending), saying this.
    Paused(&'a str),
    /// A task of it started: a person sent it on.
    SentOn,
}

/// One task of a ticket's plan, with what its events reported.
#[derive(Debug, Clone, PartialEq)]
pub struct TicketTask {
    pub ticket_id: Uuid,
    pub task_id: Uuid,
    pub position: i32,
    pub planned: PlannedTask,
    pub progress: TaskProgress,
    /// What its agent said it did, once it completed.
    pub summary: String,
}

impl<'r> FromRow<'r, PgRow> for TicketTask {
    fn from_row(row: &'r PgRow) -> sqlx::Result<Self> {
        let phase: i16 = row.try_get("phase")?;
        let deps: Vec<i32> = row.try_get("depends_on")?;
        let outcome: Option<String> = row.try_get("outcome")?;
        Ok(TicketTask {
            ticket_id: row.try_get("ticket_id")?,
            task_id: row.try_get("task_id")?,
            position: row.try_get("position")?,
            planned: PlannedTask {
                title: row.try_get("title")?,
                description: row.try_get("description")?,
                phase: phase_of(phase).ok_or_else(|| sqlx::Error::Decode(format!("phase {phase}").into()))?,
                priority: row.try_get("priority")?,
                depends_on: deps.into_iter().filter_map(|d| usize::try_from(d).ok()).collect(),
                max_retries: row.try_get("max_retries")?,
                timeout_seconds: row.try_get("timeout_seconds")?,
                concurrency_key: row.try_get("concurrency_key")?,
                requires: crate::tasks::requires_of(row)?,
                candidate: match (
                    row.try_get::<Option<i32>, _>("candidate_of")?,
                    row.try_get::<Option<i16>, _>("candidate")?,
                ) {
                    (Some(of), Some(n)) => usize::try_from(of).ok().map(|of| (of, i32::from(n))),
                    _ => None,
                },
                lands_candidate: row.try_get("lands_candidate")?,
            },
            progress: TaskProgress {
                started: row.try_get("started")?,
                outcome: outcome.as_deref().and_then(TaskOutcome::parse),
                follow_up: row.try_get("follow_up")?,
                candidate: row.try_get::<Option<i32>, _>("candidate_of")?.is_some(),
            },
            summary: row.try_get("summary")?,
        })
    }
}

/// A validated ticket to create.
#[derive(Debug, Clone)]
pub struct NewTicket {
    pub id: Uuid,
    pub title: String,
    pub description: String,
    pub priority: i32,
    pub repository: String,
    pub base_ref: String,
    /// Empty without a repository.
    pub branch: String,
    pub pull_request: bool,
    pub max_cost_usd: Option<f64>,
    /// Most follow-ups the forge may start on it.
    pub max_reactions: i32,
    /// Where it came from (see `Ticket::source_kind`); empty: a caller.
    pub source_kind: String,
    pub source_url: String,
    /// Phases that wait for a person's approval.
    pub approvals: Vec<Phase>,
    /// Run after each agent's work; empty: none.
    pub check_command: String,
    /// The guardian's thresholds, where they differ from the deployment's.
    pub guardian: omoi_domain::guardian::Overrides,
    pub labels: Value,
    pub request_id: Option<String>,
}

/// What `create_ticket` did.
#[derive(Debug, Clone)]
pub enum Created {
    New(Ticket, Vec<TicketTask>),
    /// A create with the same request id happened before: that ticket.
    Existing(Ticket, Vec<TicketTask>),
}

/// The event of the ticket's change to its current status.
fn ticket_event(ticket: &Ticket, cause: impl FnOnce(&mut TicketChanged)) -> Envelope {
    Envelope::new(
        ticket.id,
        Some(ticket.id),
        Event::ticket(ticket.status, ticket.change(cause)),
    )
}

impl Store {
    /// Deletes up to `batch` tickets that ended (completed, failed or
    /// cancelled) more than `keep` ago, with their plans; a completed one
    /// whose pull request is still being opened stays. How many went.
    pub async fn prune_tickets(&self, keep: std::time::Duration, batch: i64) -> Result<u64> {
        Ok(sqlx::query(sql!(
            "DELETE FROM tickets WHERE id IN (
                 SELECT id FROM tickets
                 WHERE status IN ('completed', 'failed', 'cancelled')
                   AND updated_at < now() - make_interval(secs => $1)
                   AND NOT (status = 'completed' AND pull_request AND pull_request_url = ''
                            AND pull_request_next_at <> 'infinity')
                 ORDER BY seq LIMIT $2
                 FOR UPDATE SKIP LOCKED)"
        ))
        .bind(keep.as_secs_f64())
        .bind(batch)
        .execute(self.pool())
        .await?
        .rows_affected())
    }

    /// Stores a ticket and its plan (task ids chosen up front, so enqueueing
    /// them later is idempotent). A known request id returns that ticket.
    pub async fn create_ticket(&self, t: &NewTicket, plan: &[(Uuid, PlannedTask)]) -> Result<Created> {
        if let Some(rid) = &t.request_id
            && let Some(existing) = self.ticket_by_request(rid).await?
        {
            return Ok(Created::Existing(existing.0, existing.1));
        }
        let mut tx = self.pool().begin().await?;
        let inserted: Option<TicketRow> = sqlx::query_as(sql!(concat!(
            "INSERT INTO tickets (id, title, description, priority, status, repository, labels, request_id,
                                  base_ref, branch, pull_request, max_cost_usd, max_reactions, source_kind, source_url,
                                  approvals, check_command, guardian)
             VALUES ($1, $2, $3, $4, 'open', $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17)
             ON CONFLICT (request_id) DO NOTHING
             RETURNING ",
            ticket_columns!()
        )))
        .bind(t.id)
        .bind(&t.title)
        .bind(&t.description)
        .bind(t.priority as i16)
        .bind(&t.repository)
        .bind(&t.labels)
        .bind(&t.request_id)
        .bind(&t.base_ref)
        .bind(&t.branch)
        .bind(t.pull_request)
        .bind(t.max_cost_usd)
        .bind(t.max_reactions)
        .bind(&t.source_kind)
        .bind(&t.source_url)
        .bind(t.approvals.iter().map(|p| phase_code(*p)).collect::<Vec<_>>())
        .bind(&t.check_command)
        .bind(serde_json::json!(t.guardian))
        .fetch_optional(&mut *tx)
        .await?;
        let Some(TicketRow(mut ticket)) = inserted else {
            // A concurrent create with the same request id won.
            drop(tx);
            let rid = t.request_id.as_deref().unwrap_or_default();
            let (ticket, tasks) = self
                .ticket_by_request(rid)
                .await?
                .ok_or_else(|| StoreError::FailedPrecondition(format!("request_id {rid:?} conflicts")))?;
            return Ok(Created::Existing(ticket, tasks));
        };
        sqlx::query(sql!(
            "INSERT INTO ticket_tasks (ticket_id, task_id, position, title, description, phase, priority,
                                       depends_on, max_retries, timeout_seconds, concurrency_key, requires,
                                       candidate_of, candidate)
             SELECT $1, p.task_id, p.position, p.title, p.description, p.phase, p.priority,
                    ARRAY(SELECT jsonb_array_elements_text(p.deps::jsonb)::int), p.max_retries, p.timeout_seconds,
                    p.concurrency_key, p.requires::jsonb, p.candidate_of, p.candidate
             FROM unnest($2::uuid[], $3::int4[], $4::text[], $5::text[], $6::int2[], $7::int4[], $8::text[],
                         $9::int4[], $10::int4[], $11::text[], $12::text[], $13::int4[], $14::int2[])
                  AS p(task_id, position, title, description, phase, priority, deps, max_retries, timeout_seconds,
                       concurrency_key, requires, candidate_of, candidate)"
        ))
        .bind(ticket.id)
        .bind(plan.iter().map(|(id, _)| *id).collect::<Vec<_>>())
        .bind((0..plan.len() as i32).collect::<Vec<_>>())
        .bind(plan.iter().map(|(_, p)| p.title.as_str()).collect::<Vec<_>>())
        .bind(plan.iter().map(|(_, p)| p.description.as_str()).collect::<Vec<_>>())
        .bind(plan.iter().map(|(_, p)| phase_code(p.phase)).collect::<Vec<_>>())
        .bind(plan.iter().map(|(_, p)| p.priority).collect::<Vec<_>>())
        .bind(
            plan.iter()
                .map(|(_, p)| json!(p.depends_on).to_string())
                .collect::<Vec<_>>(),
        )
        .bind(plan.iter().map(|(_, p)| p.max_retries).collect::<Vec<_>>())
        .bind(plan.iter().map(|(_, p)| p.timeout_seconds).collect::<Vec<_>>())
        .bind(
            plan.iter()
                .map(|(_, p)| p.concurrency_key.as_deref())
                .collect::<Vec<_>>(),
        )
        .bind(
            plan.iter()
                .map(|(_, p)| crate::tasks::requires_json(&p.requires))
                .collect::<Vec<_>>(),
        )
        .bind(
            plan.iter()
                .map(|(_, p)| p.candidate.map(|(of, _)| of as i32))
                .collect::<Vec<_>>(),
        )
        .bind(
            plan.iter()
                .map(|(_, p)| p.candidate.map(|(_, n)| n as i16))
                .collect::<Vec<_>>(),
        )
        .execute(&mut *tx)
        .await?;
        let created = Event::TicketCreated(TicketCreated {
            status: ticket.status,
            title: ticket.title.clone(),
            priority: ticket.priority,
            repository: ticket.repository.clone(),
            branch: ticket.branch.clone(),
            task_ids: plan.iter().map(|(id, _)| *id).collect(),
        });
        events::insert(&mut tx, &[Envelope::new(ticket.id, Some(ticket.id), created)]).await?;
        if !t.approvals.is_empty() {
            // A gate on a phase that builds on nothing asks at once.
            gates::insert(&mut tx, ticket.id, &t.approvals).await?;
            gates::load(&mut tx, std::slice::from_mut(&mut ticket)).await?;
            ticket = settle_status(&mut tx, ticket, |_| {}).await?.ticket;
        }
        let tasks = select_ticket_tasks(&mut tx, ticket.id).await?;
        self.commit(tx).await?;
        Ok(Created::New(ticket, tasks))
    }

    pub async fn ticket_by_request(&self, request_id: &str) -> Result<Option<(Ticket, Vec<TicketTask>)>> {
        let mut conn = self.pool().acquire().await?;
        let ticket: Option<TicketRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets WHERE request_id = $1"
        )))
        .bind(request_id)
        .fetch_optional(&mut *conn)
        .await?;
        match ticket {
            Some(TicketRow(mut t)) => {
                gates::load(&mut conn, std::slice::from_mut(&mut t)).await?;
                let tasks = select_ticket_tasks(&mut conn, t.id).await?;
                Ok(Some((t, tasks)))
            }
            None => Ok(None),
        }
    }

    /// What the last `limit` finished tickets that spent anything spent,
    /// and on how many agent runs: every task that started, except a
    /// person's choice of a candidate and a choice among candidates made
    /// without a judge (no agent runs for those).
    pub async fn recent_spend(&self, limit: i64) -> Result<omoi_domain::candidates::Spent> {
        let (tickets, cost_usd, runs): (i64, f64, i64) = sqlx::query_as(sql!(
            "WITH recent AS (
                 SELECT id, (usage->>'cost_usd')::float8 AS cost FROM tickets
                 WHERE status IN ('completed', 'failed') AND (usage->>'cost_usd')::float8 > 0
                 ORDER BY seq DESC LIMIT $1
             )
             SELECT count(*), coalesce(sum(r.cost), 0)::float8,
                    coalesce(sum((SELECT count(*) FROM ticket_tasks t
                                  WHERE t.ticket_id = r.id AND t.started AND NOT t.lands_candidate
                                    AND NOT (coalesce(t.requires, '{}'::jsonb) = '{}'::jsonb AND EXISTS (
                                        SELECT 1 FROM ticket_tasks c
                                        WHERE c.ticket_id = t.ticket_id AND c.candidate_of = t.position)))), 0)::int8
             FROM recent r"
        ))
        .bind(limit)
        .fetch_one(self.pool())
        .await?;
        Ok(omoi_domain::candidates::Spent {
            cost_usd,
            runs,
            tickets,
        })
    }

    pub async fn get_ticket(&self, id: Uuid) -> Result<(Ticket, Vec<TicketTask>)> {
        let mut conn = self.pool().acquire().await?;
        let ticket = select_ticket(&mut conn, id, false).await?;
        let tasks = select_ticket_tasks(&mut conn, id).await?;
        Ok((ticket, tasks))
    }

    /// Newest first; `before_seq` is the cursor of the previous page.
    pub async fn list_tickets(
        &self,
        status: Option<TicketStatus>,
        page_size: i64,
        before_seq: Option<i64>,
    ) -> Result<(Vec<Ticket>, Option<i64>)> {
        let rows: Vec<TicketRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets
             WHERE ($1::text IS NULL OR status = $1) AND ($2::bigint IS NULL OR seq < $2)
             ORDER BY seq DESC LIMIT $3"
        )))
        .bind(status.map(TicketStatus::as_str))
        .bind(before_seq)
        .bind(page_size + 1)
        .fetch_all(self.pool())
        .await?;
        let mut tickets = unwrap_rows(rows);
        gates::load(&mut *self.pool().acquire().await?, &mut tickets).await?;
        Ok(crate::page(tickets, page_size, |t| t.seq))
    }

    pub async fn mark_tasks_enqueued(&self, id: Uuid) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE tickets SET tasks_enqueued = true, updated_at = now() WHERE id = $1"
        ))
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Removes a ticket whose tasks the task queue refused for good, with a
    /// TICKET_FAILED event so that watchers learn why.
    pub async fn discard_ticket(&self, id: Uuid, reason: &str) -> Result<()> {
        let mut tx = self.pool().begin().await?;
        let mut ticket = select_ticket(&mut tx, id, true).await?;
        sqlx::query(sql!("DELETE FROM tickets WHERE id = $1"))
            .bind(id)
            .execute(&mut *tx)
            .await?;
        ticket.status = TicketStatus::Failed;
        let discarded = ticket_event(&ticket, |c| {
            c.reason = Some(reason.to_owned());
            c.discarded = true;
        });
        events::insert(&mut tx, &[discarded]).await?;
        self.commit(tx).await?;
        Ok(())
    }

    /// Tickets whose tasks are not on the queue yet (the queue was down),
    /// created more than `older_than` ago (a younger one is still being
    /// enqueued by the request that created it).
    pub async fn tickets_to_enqueue(&self, limit: i64, older_than: Duration) -> Result<Vec<(Ticket, Vec<TicketTask>)>> {
        let tickets: Vec<TicketRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets WHERE NOT tasks_enqueued AND status <> 'cancelled'
               AND created_at < now() - make_interval(secs => $2)
             ORDER BY seq LIMIT $1"
        )))
        .bind(limit)
        .bind(older_than.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        let tickets = unwrap_rows(tickets);
        let mut out = Vec::with_capacity(tickets.len());
        let mut conn = self.pool().acquire().await?;
        for t in tickets {
            let tasks = select_ticket_tasks(&mut conn, t.id).await?;
            out.push((t, tasks));
        }
        Ok(out)
    }

    /// Adds a follow-up task (`task_id`, as `planned`, resuming the session
    /// of task `resumes`) to a ticket that is not cancelled, not yet on the
    /// queue (see [`Store::follow_up_enqueued`]). A final ticket is open
    /// again: IN_PROGRESS, with TICKET_REOPENED naming the follow-up and
    /// `reason`.
    pub async fn add_follow_up(
        &self,
        ticket_id: Uuid,
        task_id: Uuid,
        planned: &PlannedTask,
        resumes: Uuid,
        reason: &str,
    ) -> Result<(Ticket, TicketTask)> {
        let mut tx = self.pool().begin().await?;
        let ticket = select_ticket(&mut tx, ticket_id, true).await?;
        if ticket.status == TicketStatus::Cancelled {
            return Err(StoreError::FailedPrecondition(format!(
                "ticket {ticket_id} is cancelled: nothing follows up on it"
            )));
        }
        let added = insert_follow_up(&mut tx, ticket, task_id, planned, resumes, reason).await?;
        self.commit(tx).await?;
        Ok(added)
    }

    /// Starts a reaction of the forge on ticket `r.ticket_id`: a follow-up
    /// (as [`Store::add_follow_up`]) and TICKET_REACTION, once per delivery
    /// and once per thing it answers (`r.kind`, `r.key`), while the ticket is
    /// neither cancelled nor paused and has reactions left.
    pub async fn add_reaction(
        &self,
        r: &NewReaction<'_>,
        task_id: Uuid,
        planned: &PlannedTask,
        resumes: Uuid,
    ) -> Result<Reacted> {
        let mut tx = self.pool().begin().await?;
        // Locked first: a ticket's reactions are counted one at a time.
        let ticket = select_ticket(&mut tx, r.ticket_id, true).await?;
        let recorded: Option<i32> = sqlx::query_scalar(sql!(
            "INSERT INTO ticket_reactions (ticket_id, kind, key, delivery_id, url, task_id, reply_to, pull_number)
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT DO NOTHING RETURNING 1"
        ))
        .bind(r.ticket_id)
        .bind(r.kind)
        .bind(r.key)
        .bind(r.delivery_id)
        .bind(r.url)
        .bind(task_id)
        .bind(r.reply_to)
        .bind(r.pull_number)
        .fetch_optional(&mut *tx)
        .await?;
        if recorded.is_none() {
            return Ok(Reacted::Again);
        }
        let refused = match ticket.status {
            TicketStatus::Cancelled => Some("the ticket is cancelled".to_owned()),
            TicketStatus::Paused => Some(format!("the ticket is paused ({})", ticket.paused_reason)),
            _ => None,
        };
        if let Some(why) = refused {
            return Ok(Reacted::Refused(why));
        }
        if ticket.reactions >= ticket.max_reactions {
            // Not recorded as answered: once a person raises the cap, a
            // redelivery or the next look at the pull request answers it.
            sqlx::query(sql!(
                "DELETE FROM ticket_reactions WHERE ticket_id = $1 AND kind = $2 AND key = $3"
            ))
            .bind(r.ticket_id)
            .bind(r.kind)
            .bind(r.key)
            .execute(&mut *tx)
            .await?;
            let paused = hold_for_reactions(&mut tx, ticket, &format!("{}: {}", r.kind, r.url)).await?;
            self.commit(tx).await?;
            return Ok(Reacted::CapReached(Box::new(paused)));
        }
        sqlx::query(sql!("UPDATE tickets SET reactions = reactions + 1 WHERE id = $1"))
            .bind(r.ticket_id)
            .execute(&mut *tx)
            .await?;
        let reason = format!("{}: {}", r.kind, r.url);
        let (mut ticket, task) = insert_follow_up(&mut tx, ticket, task_id, planned, resumes, &reason).await?;
        ticket.reactions += 1;
        let reaction = Event::TicketReaction(omoi_domain::event::TicketReaction {
            kind: r.kind.to_owned(),
            url: r.url.to_owned(),
            task_id,
            reactions: ticket.reactions,
            max_reactions: ticket.max_reactions,
        });
        events::insert(&mut tx, &[Envelope::new(ticket.id, Some(ticket.id), reaction)]).await?;
        self.commit(tx).await?;
        Ok(Reacted::Started(Box::new((ticket, task))))
    }

    /// The reactions started on ticket `id`, oldest first: (kind, url,
    /// task, when).
    pub async fn reactions_of(&self, id: Uuid) -> Result<Vec<(String, String, Uuid, chrono::DateTime<chrono::Utc>)>> {
        Ok(sqlx::query_as(sql!(
            "SELECT kind, url, task_id, created_at FROM ticket_reactions WHERE ticket_id = $1 ORDER BY created_at, task_id"
        ))
        .bind(id)
        .fetch_all(self.pool())
        .await?)
    }

    /// Tickets with a pull request that may still react (not cancelled,
    /// reactions left), most recently changed first.
    pub async fn tickets_with_pull_requests(&self, limit: i64) -> Result<Vec<Ticket>> {
        let rows: Vec<TicketRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets
             WHERE pull_request_url <> '' AND status <> 'cancelled' AND reactions < max_reactions
             ORDER BY updated_at DESC LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows.into_iter().map(|r| r.0).collect())
    }

    /// Marks tickets `ids` for a look at whether their pull request still
    /// merges cleanly (its base moved).
    pub async fn check_mergeable(&self, ids: &[Uuid]) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE tickets SET merge_check_since = clock_timestamp() WHERE id = ANY($1)"
        ))
        .bind(ids)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Tickets marked by [`Store::check_mergeable`] that may still react,
    /// each with when it was marked.
    pub async fn merge_checks_due(&self, limit: i64) -> Result<Vec<(Ticket, chrono::DateTime<chrono::Utc>)>> {
        let rows = sqlx::query(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            ", merge_check_since FROM tickets
             WHERE merge_check_since IS NOT NULL AND pull_request_url <> '' AND status <> 'cancelled'
             ORDER BY merge_check_since LIMIT $1"
        )))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        rows.iter()
            .map(|row| Ok((TicketRow::from_row(row)?.0, row.try_get("merge_check_since")?)))
            .collect()
    }

    /// The forge said whether ticket `id`'s pull request merges cleanly,
    /// as its base was when marked `since` (a later mark stays).
    pub async fn merge_checked(&self, id: Uuid, since: chrono::DateTime<chrono::Utc>) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE tickets SET merge_check_since = NULL WHERE id = $1 AND merge_check_since = $2"
        ))
        .bind(id)
        .bind(since)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Reactions whose follow-up completed and whose review comments are
    /// not all answered yet: each with its ticket's repository.
    pub async fn replies_due(&self, limit: i64) -> Result<Vec<DueReplies>> {
        Ok(sqlx::query_as(sql!(
            "SELECT r.task_id, r.pull_number, t.repository,
                    ARRAY(SELECT c FROM unnest(r.reply_to) c WHERE c <> ALL (r.replied)) AS comments
             FROM ticket_reactions r
             JOIN ticket_tasks f ON f.task_id = r.task_id
             JOIN tickets t ON t.id = r.ticket_id
             WHERE cardinality(r.reply_to) > cardinality(r.replied) AND f.outcome = 'completed'
             ORDER BY r.created_at LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?)
    }

    /// Review comment `comment` of reaction task `task_id` is answered (or
    /// will never be).
    pub async fn replied(&self, task_id: Uuid, comment: i64) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE ticket_reactions SET replied = array_append(replied, $2)
             WHERE task_id = $1 AND $2 <> ALL (replied)"
        ))
        .bind(task_id)
        .bind(comment)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// The ticket whose pull request is `url`, or whose branch is `branch`
    /// in a repository whose URL ends in `repository` (`owner/name`).
    pub async fn ticket_for_forge(&self, url: &str, repository: &str, branch: &str) -> Result<Option<Ticket>> {
        let found: Option<TicketRow> = sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets
             WHERE ($1 <> '' AND pull_request_url = $1)
                OR ($3 <> '' AND branch = $3 AND (repository ILIKE '%/' || $2 OR repository ILIKE '%/' || $2 || '.git'))
             ORDER BY seq DESC LIMIT 1"
        )))
        .bind(url)
        .bind(repository)
        .bind(branch)
        .fetch_optional(self.pool())
        .await?;
        Ok(found.map(|r| r.0))
    }

    /// The queue holds the follow-up's task.
    pub async fn follow_up_enqueued(&self, task_id: Uuid) -> Result<()> {
        sqlx::query(sql!("UPDATE ticket_tasks SET enqueued = true WHERE task_id = $1"))
            .bind(task_id)
            .execute(self.pool())
            .await?;
        Ok(())
    }

    /// Removes a follow-up the queue refused for good; the ticket's status
    /// is what its other tasks say again.
    pub async fn discard_follow_up(&self, task_id: Uuid) -> Result<Option<Ticket>> {
        let mut tx = self.pool().begin().await?;
        let owner: Option<Uuid> = sqlx::query_scalar(sql!(
            "DELETE FROM ticket_tasks WHERE task_id = $1 AND follow_up AND NOT enqueued RETURNING ticket_id"
        ))
        .bind(task_id)
        .fetch_optional(&mut *tx)
        .await?;
        let Some(ticket_id) = owner else { return Ok(None) };
        let ticket = select_ticket(&mut tx, ticket_id, true).await?;
        let applied = settle_status(&mut tx, ticket, |c| c.task_id = Some(task_id)).await?;
        self.commit(tx).await?;
        Ok(Some(applied.ticket))
    }

    /// Follow-ups not on the queue yet, stored more than `older_than` ago
    /// (a younger one is still being enqueued by its request): each with
    /// its ticket and the task it resumes.
    pub async fn follow_ups_to_enqueue(
        &self,
        limit: i64,
        older_than: Duration,
    ) -> Result<Vec<(Ticket, TicketTask, Uuid)>> {
        let rows: Vec<(Uuid, Uuid)> = sqlx::query_as(sql!(
            "SELECT f.task_id, f.resumes FROM ticket_tasks f JOIN tickets t ON t.id = f.ticket_id
             WHERE NOT f.enqueued AND f.resumes IS NOT NULL AND t.status <> 'cancelled'
               AND f.added_at < now() - make_interval(secs => $2)
             ORDER BY f.added_at LIMIT $1"
        ))
        .bind(limit)
        .bind(older_than.as_secs_f64())
        .fetch_all(self.pool())
        .await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut conn = self.pool().acquire().await?;
        for (task_id, resumes) in rows {
            let task: TicketTask = sqlx::query_as(sql!(concat!(
                "SELECT ",
                ticket_task_columns!(),
                " FROM ticket_tasks WHERE task_id = $1"
            )))
            .bind(task_id)
            .fetch_one(&mut *conn)
            .await?;
            let ticket = select_ticket(&mut conn, task.ticket_id, false).await?;
            out.push((ticket, task, resumes));
        }
        Ok(out)
    }

    /// Sets a ticket's status to CANCELLED unless it already ended.
    pub async fn cancel_ticket(&self, id: Uuid, reason: &str) -> Result<Ticket> {
        let mut tx = self.pool().begin().await?;
        let mut ticket = select_ticket(&mut tx, id, true).await?;
        if ticket.status.is_final() {
            return Err(StoreError::FailedPrecondition(format!(
                "ticket {id} is already {}",
                ticket.status
            )));
        }
        ticket = set_status(&mut tx, id, TicketStatus::Cancelled, "").await?;
        events::insert(
            &mut tx,
            &[ticket_event(&ticket, |c| c.reason = Some(reason.to_owned()))],
        )
        .await?;
        self.commit(tx).await?;
        Ok(ticket)
    }

    /// Applies one task event to the ticket that owns the task, once per
    /// event id (a repeat changes nothing). Returns the ticket as it stands
    /// then, and whether its status changed; None for a task of no ticket.
    pub async fn apply_task_event(
        &self,
        consumer: &str,
        event_id: Uuid,
        task_id: Uuid,
        report: &TaskReport<'_>,
    ) -> Result<Option<Applied>> {
        let TaskReport {
            started,
            outcome,
            usage,
            reopened,
            head_commit,
            summary,
            result,
            guardian,
        } = *report;
        let mut tx = self.pool().begin().await?;
        if !consumed::first_time(&mut tx, consumer, event_id).await? {
            drop(tx);
            let owner: Option<Uuid> = sqlx::query_scalar(sql!("SELECT ticket_id FROM ticket_tasks WHERE task_id = $1"))
                .bind(task_id)
                .fetch_optional(self.pool())
                .await?;
            let Some(ticket_id) = owner else { return Ok(None) };
            let mut conn = self.pool().acquire().await?;
            let ticket = select_ticket(&mut conn, ticket_id, false).await?;
            return Ok(Some(Applied { ticket, changed: false }));
        }
        if usage.is_some() || head_commit.is_some() {
            sqlx::query(sql!(
                "UPDATE tickets SET usage = usage_add(usage, $2::jsonb), head_commit = COALESCE($3, head_commit)
                 WHERE id = (SELECT ticket_id FROM ticket_tasks WHERE task_id = $1)"
            ))
            .bind(task_id)
            .bind(crate::tasks::usage_json(usage))
            .bind(head_commit)
            .execute(&mut *tx)
            .await?;
        }
        // The guardian's pause waits for a person; a task starting again
        // means one sent the ticket on.
        if let Some(said) = guardian {
            let reason = match said {
                GuardianPause::Paused(reason) => reason,
                GuardianPause::SentOn => "",
            };
            sqlx::query(sql!(
                "UPDATE tickets SET guardian_paused = $2
                 WHERE id = (SELECT ticket_id FROM ticket_tasks WHERE task_id = $1) AND guardian_paused <> $2"
            ))
            .bind(task_id)
            .bind(reason)
            .execute(&mut *tx)
            .await?;
        }
        // The first outcome stands, until an operator's retry opens it again.
        let owner: Option<(Uuid, bool, Option<Uuid>, Option<i16>)> = sqlx::query_as(sql!(
            "WITH before AS (SELECT outcome FROM ticket_tasks WHERE task_id = $1 FOR UPDATE)
             UPDATE ticket_tasks t SET started = started OR $2,
                 outcome = CASE WHEN $4 THEN NULL ELSE COALESCE(t.outcome, $3) END,
                 summary = COALESCE(left($5, 4000), summary)
             WHERE task_id = $1
             RETURNING t.ticket_id,
                       (SELECT outcome FROM before) IS NULL AND t.outcome IS NOT NULL,
                       (SELECT c.task_id FROM ticket_tasks c
                        WHERE c.ticket_id = t.ticket_id AND c.position = t.candidate_of),
                       t.candidate"
        ))
        .bind(task_id)
        .bind(started)
        .bind(outcome.map(TaskOutcome::as_str))
        .bind(reopened)
        .bind(summary)
        .fetch_optional(&mut *tx)
        .await?;
        let Some((ticket_id, ended_now, candidate_of, candidate)) = owner else {
            self.commit(tx).await?;
            return Ok(None);
        };
        if let (true, Some(outcome)) = (ended_now, outcome) {
            let candidate = candidate_of.zip(candidate.map(i32::from));
            let said =
                omoi_domain::candidates::events(task_id, ticket_id, outcome, usage, result, head_commit, candidate);
            events::insert(&mut tx, &said).await?;
        }
        let ticket = select_ticket(&mut tx, ticket_id, true).await?;
        // A final ticket changes no more, but for a retry of one of its tasks.
        let applied = if !ticket.status.is_final() || reopened {
            settle_status(&mut tx, ticket, |c| c.task_id = Some(task_id)).await?
        } else {
            Applied { ticket, changed: false }
        };
        self.commit(tx).await?;
        Ok(Some(applied))
    }

    /// Changes what `update` names of a ticket: its priority, labels or
    /// budget. A budget raised above what it spent sends a PAUSED ticket
    /// on; one lowered to what it spent pauses it. Nothing is kept until the
    /// caller commits what this returns (after telling the task queue to
    /// pause or resume the ticket's dispatch).
    pub async fn update_ticket(&self, id: Uuid, update: &TicketUpdate) -> Result<PendingUpdate> {
        let mut tx = self.pool().begin().await?;
        let ticket = select_ticket(&mut tx, id, true).await?;
        sqlx::query(sql!(
            "UPDATE tickets SET priority = COALESCE($2, priority), labels = COALESCE($3, labels),
                 max_cost_usd = CASE WHEN $4 THEN $5 ELSE max_cost_usd END,
                 max_reactions = COALESCE($6, max_reactions),
                 reaction_refused = CASE WHEN COALESCE($6, max_reactions) > reactions THEN '' ELSE reaction_refused END,
                 guardian = COALESCE($7, guardian),
                 guardian_paused = CASE WHEN $4 OR $7 IS NOT NULL THEN '' ELSE guardian_paused END,
                 updated_at = now()
             WHERE id = $1"
        ))
        .bind(id)
        .bind(update.priority.map(|p| p as i16))
        .bind(&update.labels)
        .bind(update.max_cost_usd.is_some())
        .bind(update.max_cost_usd.flatten())
        .bind(update.max_reactions)
        .bind(update.guardian.map(|g| serde_json::to_value(g).unwrap_or_default()))
        .execute(&mut *tx)
        .await?;
        let updated = select_ticket(&mut tx, id, false).await?;
        let applied = if ticket.status.is_final() {
            Applied {
                ticket: updated,
                changed: false,
            }
        } else {
            let why = if update.max_reactions.is_some() && updated.max_reactions > ticket.max_reactions {
                format!("reactions raised to {}", updated.max_reactions)
            } else if update.guardian.is_some() && update.max_cost_usd.is_none() {
                "the guardian's settings changed".to_owned()
            } else {
                match updated.max_cost_usd {
                    Some(max) => format!("budget raised to ${max:.2}"),
                    None => "budget lifted".to_owned(),
                }
            };
            // A pause says why itself; anything else is the update's doing.
            settle_status(&mut tx, updated, |c| {
                c.reason.get_or_insert(why);
            })
            .await?
        };
        Ok(PendingUpdate {
            store: self.clone(),
            tx,
            applied,
        })
    }
}

/// An update made but not kept yet.
pub struct PendingUpdate {
    store: Store,
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub applied: Applied,
}

impl PendingUpdate {
    pub async fn commit(self) -> Result<Ticket> {
        self.store.commit(self.tx).await?;
        Ok(self.applied.ticket)
    }
}

/// What applying a change to a ticket came to.
#[derive(Debug, Clone)]
pub struct Applied {
    /// The ticket after it.
    pub ticket: Ticket,
    /// Its status changed (and an event says so).
    pub changed: bool,
}

/// A reaction to record: the delivery it came in, what it answers.
#[derive(Debug, Clone)]
pub struct NewReaction<'a> {
    pub ticket_id: Uuid,
    /// `ci_failure`, `review` or `mention`.
    pub kind: &'a str,
    /// What it answers, one reaction each: the commit whose checks failed,
    /// the comment.
    pub key: &'a str,
    pub delivery_id: &'a str,
    pub url: &'a str,
    /// Review comments to answer once the follow-up landed, on pull
    /// request `pull_number`.
    pub reply_to: &'a [i64],
    pub pull_number: i64,
}

/// Review comments to answer: the follow-up that addressed them, in which
/// repository's pull request.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct DueReplies {
    pub task_id: Uuid,
    pub pull_number: i64,
    pub repository: String,
    pub comments: Vec<i64>,
}

/// What recording a reaction came to.
#[derive(Debug, Clone)]
pub enum Reacted {
    /// Started: the ticket (reopened when it had ended) and the follow-up.
    Started(Box<(Ticket, TicketTask)>),
    /// The delivery, or what it answers, was acted on before.
    Again,
    /// Not started, and why.
    Refused(String),
    /// Not started: the ticket's reactions are used up, and it is PAUSED
    /// now (as returned) until a person raises its cap.
    CapReached(Box<Ticket>),
}

/// What UpdateTicket changes: `Some` for each field its mask names
/// (`max_cost_usd: Some(None)` lifts the budget).
#[derive(Debug, Clone, Default)]
pub struct TicketUpdate {
    pub priority: Option<i32>,
    pub labels: Option<Value>,
    pub max_cost_usd: Option<Option<f64>>,
    pub max_reactions: Option<i32>,
    /// The guardian's thresholds, in place of the ticket's (all of them).
    pub guardian: Option<omoi_domain::guardian::Overrides>,
}

/// Adds follow-up `task_id` to `ticket` (locked by the caller, not
/// cancelled); a final ticket is open again, with TICKET_REOPENED naming
/// the follow-up and `reason`.
pub(crate) async fn insert_follow_up(
    tx: &mut PgConnection,
    ticket: Ticket,
    task_id: Uuid,
    planned: &PlannedTask,
    resumes: Uuid,
    reason: &str,
) -> Result<(Ticket, TicketTask)> {
    let ticket_id = ticket.id;
    let task: TicketTask = sqlx::query_as(sql!(concat!(
        "INSERT INTO ticket_tasks (ticket_id, task_id, position, title, description, phase, priority,
                                   depends_on, max_retries, timeout_seconds, concurrency_key,
                                   follow_up, resumes, enqueued, requires, lands_candidate)
         SELECT $1, $2, coalesce(max(position), -1) + 1, $3, $4, $5, $6, $7, $8, $9, $10, true, $11, false,
                $12::jsonb, $13
         FROM ticket_tasks WHERE ticket_id = $1
         RETURNING ",
        ticket_task_columns!()
    )))
    .bind(ticket_id)
    .bind(task_id)
    .bind(&planned.title)
    .bind(&planned.description)
    .bind(phase_code(planned.phase))
    .bind(planned.priority)
    .bind(planned.depends_on.iter().map(|d| *d as i32).collect::<Vec<_>>())
    .bind(planned.max_retries)
    .bind(planned.timeout_seconds)
    .bind(planned.concurrency_key.as_deref())
    .bind(resumes)
    .bind(crate::tasks::requires_json(&planned.requires))
    .bind(planned.lands_candidate)
    .fetch_one(&mut *tx)
    .await?;
    if !ticket.status.is_final() {
        return Ok((ticket, task));
    }
    let previous = ticket.status;
    let reopened = set_status(&mut *tx, ticket_id, TicketStatus::InProgress, "").await?;
    let change = reopened.change(|c| {
        c.previous_status = Some(previous);
        c.task_id = Some(task_id);
        c.reason = Some(reason.to_owned());
    });
    let event = Envelope::new(ticket_id, Some(ticket_id), Event::TicketReopened(change));
    events::insert(&mut *tx, &[event]).await?;
    Ok((reopened, task))
}

/// Pauses `ticket` (locked by the caller) for a person: its cap turned
/// away reaction `refused`.
async fn hold_for_reactions(tx: &mut PgConnection, ticket: Ticket, refused: &str) -> Result<Ticket> {
    sqlx::query(sql!("UPDATE tickets SET reaction_refused = $2 WHERE id = $1"))
        .bind(ticket.id)
        .bind(refused)
        .execute(&mut *tx)
        .await?;
    let ticket = Ticket {
        reaction_refused: refused.to_owned(),
        ..ticket
    };
    Ok(settle_status(tx, ticket, |_| {}).await?.ticket)
}

/// Sets the status a ticket's tasks, budget and gates give it (with its
/// event) when it differs from the stored one; gates whose groundwork is
/// done ask for approval (TICKET_APPROVAL_REQUESTED, which also says a
/// change to AWAITING_APPROVAL).
pub(crate) async fn settle_status(
    conn: &mut PgConnection,
    mut ticket: Ticket,
    cause: impl FnOnce(&mut TicketChanged),
) -> Result<Applied> {
    let tasks = select_ticket_tasks(conn, ticket.id).await?;
    let progress: Vec<TaskProgress> = tasks.iter().map(|t| t.progress).collect();
    let derived = derive_status(&progress);
    let asked = if ticket.gates.is_empty() {
        Vec::new()
    } else {
        gates::ask_due(conn, &mut ticket, &tasks).await?
    };
    let status = gated_status(ticket.budgeted(derived), &ticket.gates);
    if status == ticket.status && asked.is_empty() {
        return Ok(Applied { ticket, changed: false });
    }
    let reason = if status == TicketStatus::Paused {
        ticket.pause_reason(derived).unwrap_or_default()
    } else {
        String::new()
    };
    let changed = status != ticket.status;
    let updated = if changed {
        set_status(conn, ticket.id, status, &reason).await?
    } else {
        ticket.clone()
    };
    let change = updated.change(|c| {
        if changed {
            c.previous_status = Some(ticket.status);
        }
        if !reason.is_empty() {
            c.reason = Some(reason.clone());
        }
        cause(c);
    });
    // Entering AWAITING_APPROVAL is said by the gates that await (those
    // that just asked, else all: e.g. a pause lifted).
    let asking: Vec<&Gate> = updated
        .gates
        .iter()
        .filter(|g| asked.contains(&g.phase) || (changed && status == TicketStatus::AwaitingApproval && g.awaiting()))
        .collect();
    let mut evs: Vec<Envelope> = asking
        .iter()
        .map(|g| gates::requested(&updated, g, &tasks, change.clone()))
        .collect();
    if changed && status != TicketStatus::AwaitingApproval {
        evs.insert(
            0,
            Envelope::new(updated.id, Some(updated.id), Event::ticket(status, change)),
        );
    }
    events::insert(conn, &evs).await?;
    Ok(Applied {
        ticket: updated,
        changed,
    })
}

pub(crate) async fn select_ticket(conn: &mut PgConnection, id: Uuid, lock: bool) -> Result<Ticket> {
    let query = if lock {
        sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets WHERE id = $1 FOR UPDATE"
        )))
    } else {
        sqlx::query_as(sql!(concat!(
            "SELECT ",
            ticket_columns!(),
            " FROM tickets WHERE id = $1"
        )))
    };
    let mut ticket = query
        .bind(id)
        .fetch_optional(&mut *conn)
        .await?
        .map(|TicketRow(t)| t)
        .ok_or(StoreError::NotFound { entity: "ticket", id })?;
    gates::load(conn, std::slice::from_mut(&mut ticket)).await?;
    Ok(ticket)
}

fn unwrap_rows(rows: Vec<TicketRow>) -> Vec<Ticket> {
    rows.into_iter().map(|TicketRow(t)| t).collect()
}

async fn select_ticket_tasks(conn: &mut PgConnection, ticket_id: Uuid) -> Result<Vec<TicketTask>> {
    Ok(sqlx::query_as(sql!(concat!(
        "SELECT ",
        ticket_task_columns!(),
        " FROM ticket_tasks WHERE ticket_id = $1 ORDER BY position"
    )))
    .bind(ticket_id)
    .fetch_all(conn)
    .await?)
}

async fn set_status(conn: &mut PgConnection, id: Uuid, status: TicketStatus, paused_reason: &str) -> Result<Ticket> {
    let TicketRow(ticket) = sqlx::query_as(sql!(concat!(
        "UPDATE tickets SET status = $2, paused_reason = $3, updated_at = now() WHERE id = $1
         RETURNING ",
        ticket_columns!()
    )))
    .bind(id)
    .bind(status.as_str())
    .bind(paused_reason)
    .fetch_one(&mut *conn)
    .await?;
    let mut ticket = ticket;
    gates::load(conn, std::slice::from_mut(&mut ticket)).await?;
    Ok(ticket)
}

/// The channel the tickets table's trigger announces each written ticket's
/// id on, once the write commits.
pub const CHANGED_CHANNEL: &str = "omoi_ticket_changed";
