//! Getting a ticket's tasks onto the task queue, and reading them back.
//!
//! A ticket is stored with its plan (task ids chosen up front) before its
//! tasks are enqueued. When the task queue cannot be reached the ticket
//! stays, marked not enqueued, and a loop enqueues it once the queue is
//! back; the fixed task ids make a repeated enqueue harmless (the queue
//! answers ALREADY_EXISTS). Only a permanent refusal removes the ticket.

use std::sync::Arc;
use std::time::Duration;

use omoi_domain::ticket::TicketStatus;
use omoi_domain::validate::NewTask;
use omoi_domain::{Phase, Ticket};
use omoi_proto::taskqueue as pb;
use omoi_runtime::background::every;
use omoi_store::tickets::TicketTask;
use omoi_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use uuid::Uuid;

use crate::queue::{Queue, queue_unavailable};

/// How long the request that created a ticket has to enqueue its tasks
/// before the loop that enqueues waiting tickets takes it on: before then
/// both would send them (harmlessly, but twice, and a list to learn what
/// the first did).
const CREATE_GRACE: Duration = Duration::from_secs(5);

/// What the queue is to hold of a ticket: its plan's tasks by id.
pub fn new_tasks(ticket: &Ticket, plan: &[TicketTask]) -> Vec<NewTask> {
    let ids: Vec<Uuid> = plan.iter().map(|t| t.task_id).collect();
    plan.iter()
        .map(|t| t.planned.new_task(t.task_id, ticket.id, &ids))
        .collect()
}

/// The tasks of a ticket not on the queue yet, as the queue will show them.
pub fn planned_tasks(ticket: &Ticket, plan: &[TicketTask]) -> Vec<pb::Task> {
    new_tasks(ticket, plan)
        .into_iter()
        .map(|new| pb::Task::from(&new.pending(ticket.created_at)))
        .collect()
}

/// What became of an attempt to enqueue a ticket's tasks.
pub enum Enqueued {
    /// The queue has them.
    Done(Vec<pb::Task>),
    /// The queue is unreachable; the retry loop will try again.
    Deferred(Status),
    /// The queue refused them for good; the ticket was removed.
    Refused(Status),
}

/// A ticket's tasks, on the queue or planned: the store and the queue.
pub struct TicketTasks {
    pub store: Store,
    pub queue: Queue,
}

impl TicketTasks {
    pub fn new(store: Store, queue: Queue) -> Self {
        Self { store, queue }
    }

    /// The ticket's tasks from the queue, or as planned (`plan`) when not
    /// enqueued yet.
    pub async fn of(&self, ticket: &Ticket, plan: &[TicketTask]) -> Result<Vec<pb::Task>, Status> {
        if !ticket.tasks_enqueued {
            return Ok(planned_tasks(ticket, plan));
        }
        self.queue.list(ticket.id).await.map_err(queue_unavailable)
    }

    pub async fn enqueue(&self, ticket: &Ticket, tasks: &[TicketTask]) -> Result<Enqueued, StoreError> {
        // Its gates hold their phases before any task can be handed out
        // (read afresh: one approved meanwhile is not held again).
        if !ticket.approvals.is_empty()
            && let Err(s) = self.hold_gates(ticket.id).await?
        {
            return Ok(Enqueued::Deferred(s));
        }
        let created = match self.queue.enqueue(&new_tasks(ticket, tasks)).await {
            Ok(created) => created,
            // An earlier try got through (its answer was lost).
            Err(s) if s.code() == Code::AlreadyExists => match self.queue.list(ticket.id).await {
                Ok(existing) => existing,
                Err(s) => return Ok(Enqueued::Deferred(s)),
            },
            Err(s) if omoi_runtime::status::transient(s.code()) => return Ok(Enqueued::Deferred(s)),
            Err(s) => {
                tracing::warn!(ticket_id = %ticket.id, error = %s.message(), "task queue refused the ticket's tasks");
                self.store.discard_ticket(ticket.id, s.message()).await?;
                return Ok(Enqueued::Refused(s));
            }
        };
        self.store.mark_tasks_enqueued(ticket.id).await?;
        // Cancelled while its tasks were on their way: cancel them too.
        let (now, _) = self.store.get_ticket(ticket.id).await?;
        if now.status == TicketStatus::Cancelled {
            for t in &created {
                let _ = self.queue.cancel(&t.id, "ticket cancelled").await;
            }
        }
        Ok(Enqueued::Done(created))
    }

    /// Puts a follow-up's task on the queue: the task it follows read for
    /// the session to resume, the task enqueued, the follow-up marked as
    /// on the queue. A refusal for good removes the follow-up.
    pub async fn enqueue_follow_up(
        &self,
        ticket: &Ticket,
        follow_up: &TicketTask,
        resumes: Uuid,
    ) -> Result<Enqueued, StoreError> {
        let source = match self.queue.get(resumes).await {
            Ok(t) => t,
            Err(s) if omoi_runtime::status::transient(s.code()) => return Ok(Enqueued::Deferred(s)),
            Err(s) => {
                self.store.discard_follow_up(follow_up.task_id).await?;
                return Ok(Enqueued::Refused(s));
            }
        };
        let mut new = follow_up.planned.new_task(follow_up.task_id, ticket.id, &[]);
        new.depends_on = vec![resumes];
        new.session = source
            .session
            .and_then(|s| omoi_proto::domain::agent_session("session", s).ok());
        let created = match self.queue.enqueue(std::slice::from_ref(&new)).await {
            Ok(created) => created,
            Err(s) if s.code() == Code::AlreadyExists => match self.queue.get(follow_up.task_id).await {
                Ok(existing) => vec![existing],
                Err(s) => return Ok(Enqueued::Deferred(s)),
            },
            Err(s) if omoi_runtime::status::transient(s.code()) => return Ok(Enqueued::Deferred(s)),
            Err(s) => {
                tracing::warn!(ticket_id = %ticket.id, error = %s.message(), "task queue refused the follow-up");
                self.store.discard_follow_up(follow_up.task_id).await?;
                return Ok(Enqueued::Refused(s));
            }
        };
        self.store.follow_up_enqueued(follow_up.task_id).await?;
        Ok(Enqueued::Done(created))
    }

    /// Has the queue hold the phases of the ticket's gates not approved
    /// (again: pausing a paused scope is harmless); the queue's refusal when
    /// it could not.
    pub async fn hold_gates(&self, ticket_id: Uuid) -> Result<Result<(), Status>, StoreError> {
        for phase in self.store.held_phases(ticket_id).await? {
            let reason = format!("ticket {ticket_id} waits for approval of its {} phase", phase.name());
            if let Err(s) = self.queue.pause_phase(ticket_id, phase, &reason).await {
                return Ok(Err(s));
            }
            self.store.set_gate_released(ticket_id, phase, false).await?;
        }
        Ok(Ok(()))
    }

    /// Lets the queue dispatch a gate's phase again (approved, or its
    /// ticket cancelled). Should the queue be out of reach, the gate stays
    /// listed for [`TicketTasks::enqueue_waiting`] to release.
    pub async fn release_gate(&self, ticket_id: Uuid, phase: Phase) {
        let released = match self.queue.resume_phase(ticket_id, phase).await {
            Ok(()) => self
                .store
                .set_gate_released(ticket_id, phase, true)
                .await
                .map_err(|e| e.to_string()),
            Err(s) => Err(s.message().to_owned()),
        };
        if let Err(error) = released {
            tracing::warn!(%ticket_id, phase = phase.name(), %error, "gate not released yet; will retry");
        }
    }

    /// Enqueues the tickets stored while the queue was unreachable, every
    /// `period` until `shutdown`; a pass ends at the first ticket the queue
    /// still cannot take.
    pub async fn enqueue_waiting(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let this = &self;
        every("enqueueing tickets' tasks", period, &shutdown, move || async move {
            for (ticket, tasks) in this.store.tickets_to_enqueue(50, CREATE_GRACE).await? {
                match this.enqueue(&ticket, &tasks).await? {
                    Enqueued::Done(_) => tracing::info!(ticket_id = %ticket.id, "ticket's tasks enqueued"),
                    Enqueued::Refused(_) => {}
                    Enqueued::Deferred(s) => {
                        tracing::debug!(error = %s.message(), "task queue still unreachable");
                        return Ok(());
                    }
                }
            }
            for (ticket_id, phase) in this.store.gates_to_release(50).await? {
                this.release_gate(ticket_id, phase).await;
            }
            for (ticket, follow_up, resumes) in this.store.follow_ups_to_enqueue(50, CREATE_GRACE).await? {
                match this.enqueue_follow_up(&ticket, &follow_up, resumes).await? {
                    Enqueued::Done(_) => tracing::info!(ticket_id = %ticket.id, "follow-up enqueued"),
                    Enqueued::Refused(_) => {}
                    Enqueued::Deferred(s) => {
                        tracing::debug!(error = %s.message(), "task queue still unreachable");
                        break;
                    }
                }
            }
            Ok::<_, StoreError>(())
        })
        .await
    }
}
