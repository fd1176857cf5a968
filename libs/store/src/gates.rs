//! Approval gates of tickets (`ticket_gates`): read with their ticket,
//! moved to AWAITING_APPROVAL when their groundwork is done (as a ticket's
//! status settles), decided by a person, and released on the task queue.

use chrono::{DateTime, Utc};
use omoi_domain::event::{ApprovalRequested, GateDecided, ReviewedTask, TicketChanged};
use omoi_domain::gate::{ChangeRequest, Gate, GateState};
use omoi_domain::ticket::PlannedTask;
use omoi_domain::{Envelope, Event, Phase, Ticket};
use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::codes::{phase_code, phase_of};
use crate::events;
use crate::statements::sql;
use crate::tickets::{TicketTask, insert_follow_up, select_ticket, settle_status};
use crate::{Result, Store, StoreError};

type GateRow = (
    Uuid,
    i16,
    String,
    i32,
    Option<DateTime<Utc>>,
    Vec<Uuid>,
    String,
    Option<DateTime<Utc>>,
    String,
    Value,
    bool,
);

fn gate_of(row: GateRow) -> Result<(Uuid, Gate)> {
    let (
        ticket_id,
        phase,
        state,
        rounds,
        requested_at,
        review_task_ids,
        decided_by,
        decided_at,
        comment,
        changes,
        released,
    ) = row;
    let bad = |what: String| StoreError::from(sqlx::Error::Decode(what.into()));
    Ok((
        ticket_id,
        Gate {
            phase: phase_of(phase).ok_or_else(|| bad(format!("phase {phase}")))?,
            state: GateState::parse(&state).ok_or_else(|| bad(format!("gate state {state}")))?,
            rounds,
            requested_at,
            review_task_ids,
            decided_by,
            decided_at,
            comment,
            change_requests: serde_json::from_value(changes).map_err(|e| bad(format!("change requests: {e}")))?,
            released,
        },
    ))
}

/// Reads the gates of `tickets` (those that have any) into them.
pub(crate) async fn load(conn: &mut PgConnection, tickets: &mut [Ticket]) -> Result<()> {
    let ids: Vec<Uuid> = tickets
        .iter()
        .filter(|t| !t.approvals.is_empty())
        .map(|t| t.id)
        .collect();
    if ids.is_empty() {
        return Ok(());
    }
    let rows: Vec<GateRow> = sqlx::query_as(sql!(
        "SELECT ticket_id, phase, state, rounds, requested_at, review_task_ids, decided_by, decided_at, comment,
                change_requests, released
         FROM ticket_gates WHERE ticket_id = ANY($1) ORDER BY ticket_id, phase"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    for row in rows {
        let (ticket_id, gate) = gate_of(row)?;
        if let Some(t) = tickets.iter_mut().find(|t| t.id == ticket_id) {
            t.gates.push(gate);
        }
    }
    Ok(())
}

/// Stores the gates of a new ticket, none decided.
pub(crate) async fn insert(conn: &mut PgConnection, ticket_id: Uuid, phases: &[Phase]) -> Result<()> {
    if phases.is_empty() {
        return Ok(());
    }
    sqlx::query(sql!(
        "INSERT INTO ticket_gates (ticket_id, phase) SELECT $1, unnest($2::int2[])"
    ))
    .bind(ticket_id)
    .bind(phases.iter().map(|p| phase_code(*p)).collect::<Vec<_>>())
    .execute(conn)
    .await?;
    Ok(())
}

/// Moves the gates of `ticket` (locked by the caller) whose groundwork is
/// done to AWAITING_APPROVAL; the phases that asked now.
pub(crate) async fn ask_due(conn: &mut PgConnection, ticket: &mut Ticket, tasks: &[TicketTask]) -> Result<Vec<Phase>> {
    if ticket.status.is_final() {
        return Ok(Vec::new());
    }
    let view = task_view(tasks);
    let mut due = Vec::new();
    for gate in ticket.gates.iter_mut().filter(|g| g.due(&view)) {
        let review = gate.review_tasks(&view);
        let (rounds, requested_at): (i32, DateTime<Utc>) = sqlx::query_as(sql!(
            "UPDATE ticket_gates SET state = 'awaiting_approval', rounds = rounds + 1, requested_at = now(),
                 review_task_ids = $3
             WHERE ticket_id = $1 AND phase = $2 RETURNING rounds, requested_at"
        ))
        .bind(ticket.id)
        .bind(phase_code(gate.phase))
        .bind(&review)
        .fetch_one(&mut *conn)
        .await?;
        gate.state = GateState::AwaitingApproval;
        gate.rounds = rounds;
        gate.requested_at = Some(requested_at);
        gate.review_task_ids = review;
        due.push(gate.phase);
    }
    Ok(due)
}

/// TICKET_APPROVAL_REQUESTED for `gate` of `ticket` (as it stands after
/// `change`): what is to be approved.
pub(crate) fn requested(ticket: &Ticket, gate: &Gate, tasks: &[TicketTask], change: TicketChanged) -> Envelope {
    let reviewed = gate
        .review_task_ids
        .iter()
        .filter_map(|id| tasks.iter().find(|t| t.task_id == *id))
        .map(|t| ReviewedTask {
            task_id: t.task_id,
            title: t.planned.title.clone(),
            phase: t.planned.phase,
            summary: t.summary.clone(),
        })
        .collect();
    let event = Event::TicketApprovalRequested(ApprovalRequested {
        change,
        phase: gate.phase,
        round: gate.rounds,
        tasks: reviewed,
        branch: ticket.branch.clone(),
        head_commit: ticket.head_commit.clone(),
    });
    Envelope::new(ticket.id, Some(ticket.id), event)
}

fn task_view(tasks: &[TicketTask]) -> Vec<(Uuid, &PlannedTask, omoi_domain::ticket::TaskProgress)> {
    tasks.iter().map(|t| (t.task_id, &t.planned, t.progress)).collect()
}

/// The gate of `ticket` a person decides on: `phase`'s, or the only one
/// awaiting; refused when it does not await a decision.
fn awaiting(ticket: &Ticket, phase: Option<Phase>) -> Result<Vec<Phase>> {
    let waiting: Vec<Phase> = omoi_domain::gate::deciding(&ticket.gates, phase)
        .iter()
        .map(|g| g.phase)
        .collect();
    if waiting.is_empty() {
        let what = match phase {
            Some(p) => format!("its {} phase does not await approval", p.name()),
            None => "nothing of it awaits approval".to_owned(),
        };
        return Err(StoreError::FailedPrecondition(format!(
            "ticket {} is {}: {what}",
            ticket.id, ticket.status
        )));
    }
    Ok(waiting)
}

/// A person's decision, as the store records it.
#[derive(Debug, Clone, Copy)]
pub struct Decision<'a> {
    pub ticket_id: Uuid,
    /// None: every gate awaiting (approval), the only one (changes).
    pub phase: Option<Phase>,
    pub by: &'a str,
    pub comment: &'a str,
}

/// What approving did: the ticket after it, and the phases approved.
#[derive(Debug, Clone)]
pub struct Approved {
    pub ticket: Ticket,
    pub phases: Vec<Phase>,
}

impl Store {
    /// Approves the gates `d` names (TICKET_APPROVED each; the ticket goes
    /// on unless something else holds it). The queue still holds their
    /// phases: [`Store::gates_to_release`] lists them until
    /// [`Store::set_gate_released`].
    pub async fn approve(&self, d: &Decision<'_>) -> Result<Approved> {
        let mut tx = self.pool().begin().await?;
        let ticket = select_ticket(&mut tx, d.ticket_id, true).await?;
        let phases = awaiting(&ticket, d.phase)?;
        sqlx::query(sql!(
            "UPDATE ticket_gates SET state = 'approved', decided_by = $3, decided_at = now(), comment = $4
             WHERE ticket_id = $1 AND phase = ANY($2)"
        ))
        .bind(d.ticket_id)
        .bind(phases.iter().map(|p| phase_code(*p)).collect::<Vec<_>>())
        .bind(d.by)
        .bind(d.comment)
        .execute(&mut *tx)
        .await?;
        let ticket = select_ticket(&mut tx, d.ticket_id, true).await?;
        let why = format!("approved by {}", d.by);
        let settled = settle_status(&mut tx, ticket, |c| c.reason = Some(why.clone())).await?;
        let decided: Vec<Envelope> = phases
            .iter()
            .map(|phase| decided(&settled.ticket, *phase, d, None, Event::TicketApproved))
            .collect();
        events::insert(&mut tx, &decided).await?;
        self.commit(tx).await?;
        Ok(Approved {
            ticket: settled.ticket,
            phases,
        })
    }

    /// Asks for changes before the gate `d` names: follow-up `task_id` (as
    /// `planned`) resumes task `resumes`, and the gate asks again once it
    /// completed (TICKET_CHANGES_REQUESTED).
    pub async fn request_changes(
        &self,
        d: &Decision<'_>,
        task_id: Uuid,
        planned: &PlannedTask,
        resumes: Uuid,
    ) -> Result<(Ticket, TicketTask)> {
        let mut tx = self.pool().begin().await?;
        let ticket = select_ticket(&mut tx, d.ticket_id, true).await?;
        let phases = awaiting(&ticket, d.phase)?;
        let [phase] = phases[..] else {
            return Err(StoreError::FailedPrecondition(format!(
                "ticket {} has {} phases awaiting approval: name one in phase",
                ticket.id,
                phases.len()
            )));
        };
        let change = ChangeRequest {
            comment: d.comment.to_owned(),
            requested_by: d.by.to_owned(),
            requested_at: Utc::now(),
            task_id,
        };
        sqlx::query(sql!(
            "UPDATE ticket_gates SET state = 'changes_requested', decided_by = $3, decided_at = now(),
                 comment = $4, change_requests = change_requests || jsonb_build_array($5::jsonb)
             WHERE ticket_id = $1 AND phase = $2"
        ))
        .bind(d.ticket_id)
        .bind(phase_code(phase))
        .bind(d.by)
        .bind(d.comment)
        .bind(serde_json::to_value(&change).map_err(|e| StoreError::from(sqlx::Error::Encode(Box::new(e))))?)
        .execute(&mut *tx)
        .await?;
        let reason = format!("changes requested before the {} phase", phase.name());
        let (_, task) = insert_follow_up(&mut tx, ticket, task_id, planned, resumes, &reason).await?;
        let ticket = select_ticket(&mut tx, d.ticket_id, true).await?;
        let settled = settle_status(&mut tx, ticket, |c| c.reason = Some(reason.clone())).await?;
        let event = decided(&settled.ticket, phase, d, Some(task_id), Event::TicketChangesRequested);
        events::insert(&mut tx, &[event]).await?;
        self.commit(tx).await?;
        Ok((settled.ticket, task))
    }

    /// The phases of ticket `id` the queue is to hold back: its gates not
    /// approved.
    pub async fn held_phases(&self, id: Uuid) -> Result<Vec<Phase>> {
        let codes: Vec<i16> = sqlx::query_scalar(sql!(
            "SELECT phase FROM ticket_gates WHERE ticket_id = $1 AND state <> 'approved' ORDER BY phase"
        ))
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        Ok(codes.into_iter().filter_map(phase_of).collect())
    }

    /// Approved gates whose phase the queue may still hold; only of
    /// tickets whose tasks are on the queue (before then, enqueueing holds
    /// what is not approved).
    pub async fn gates_to_release(&self, limit: i64) -> Result<Vec<(Uuid, Phase)>> {
        let rows: Vec<(Uuid, i16)> = sqlx::query_as(sql!(
            "SELECT g.ticket_id, g.phase FROM ticket_gates g JOIN tickets t ON t.id = g.ticket_id
             WHERE NOT g.released AND t.tasks_enqueued AND g.state = 'approved'
             LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(rows
            .into_iter()
            .filter_map(|(id, code)| phase_of(code).map(|p| (id, p)))
            .collect())
    }

    /// Whether the queue lets the gate's phase go now (released: approved,
    /// or its ticket cancelled) or holds it (again: a cancelled ticket
    /// retried).
    pub async fn set_gate_released(&self, ticket_id: Uuid, phase: Phase, released: bool) -> Result<()> {
        sqlx::query(sql!(
            "UPDATE ticket_gates SET released = $3 WHERE ticket_id = $1 AND phase = $2"
        ))
        .bind(ticket_id)
        .bind(phase_code(phase))
        .bind(released)
        .execute(self.pool())
        .await?;
        Ok(())
    }
}

/// A person's decision on `phase` of `ticket` (as it stands after it).
fn decided(
    ticket: &Ticket,
    phase: Phase,
    d: &Decision<'_>,
    follow_up: Option<Uuid>,
    kind: fn(GateDecided) -> Event,
) -> Envelope {
    let change = ticket.change(|c| c.task_id = follow_up);
    let event = kind(GateDecided {
        change,
        phase,
        by: d.by.to_owned(),
        comment: d.comment.to_owned(),
    });
    Envelope::new(ticket.id, Some(ticket.id), event)
}
