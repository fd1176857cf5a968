//! Getting a ticket's tasks onto the task queue, and keeping the ticket's
//! status in step with its tasks' events.
//!
//! A ticket is stored with its plan (task ids chosen up front) before its
//! tasks are enqueued. When the task queue cannot be reached the ticket
//! stays, marked not enqueued, and a retry loop enqueues it once the queue is
//! back; the fixed task ids make a repeated enqueue harmless (the queue
//! answers ALREADY_EXISTS). Only a permanent refusal removes the ticket.

use std::sync::Arc;
use std::time::Duration;

use omoi_domain::Ticket;
use omoi_domain::ticket::{TaskOutcome, TicketStatus, event_starts};
use omoi_domain::{Entity, Event};
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue::{self as pb, task_queue_service_client::TaskQueueServiceClient};
use omoi_runtime::background::every;
use omoi_store::tickets::{TaskReport, TicketTask};
use omoi_store::{Store, StoreError};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use uuid::Uuid;

const CONSUMER: &str = "omoi-ticket-status";

type Client = TaskQueueServiceClient<omoi_runtime::grpc::Client>;

/// The task-queue, as the ticket service uses it.
#[derive(Clone)]
pub struct Queue {
    client: Client,
}

impl Queue {
    pub fn connect(url: &str, connector: &omoi_runtime::grpc::Connector) -> anyhow::Result<Self> {
        Ok(Self {
            client: TaskQueueServiceClient::new(connector.client(url, "OMOI_TASK_QUEUE_URL")?),
        })
    }

    async fn enqueue(&self, ticket: &Ticket, tasks: &[TicketTask]) -> Result<Vec<pb::Task>, Status> {
        let request = pb::EnqueueTasksRequest {
            tasks: tasks
                .iter()
                .map(|t| pb::NewTask {
                    id: t.task_id.to_string(),
                    ticket_id: ticket.id.to_string(),
                    title: t.planned.title.clone(),
                    description: t.planned.description.clone(),
                    phase: t.planned.phase.wire(),
                    priority: t.planned.priority,
                    depends_on: dependency_ids(t, tasks),
                    max_retries: Some(t.planned.max_retries),
                    timeout_seconds: t.planned.timeout_seconds,
                    concurrency_key: t.planned.concurrency_key.clone().unwrap_or_default(),
                })
                .collect(),
        };
        let mut c = self.client.clone();
        Ok(c.enqueue_tasks(request).await?.into_inner().tasks)
    }

    /// Every task of the ticket, in creation order.
    pub async fn list(&self, ticket_id: Uuid) -> Result<Vec<pb::Task>, Status> {
        let mut c = self.client.clone();
        let mut out = Vec::new();
        let mut token = String::new();
        loop {
            let page = c
                .list_tasks(pb::ListTasksRequest {
                    ticket_id: ticket_id.to_string(),
                    page_size: 1000,
                    page_token: token,
                    ..Default::default()
                })
                .await?
                .into_inner();
            out.extend(page.tasks);
            if page.next_page_token.is_empty() {
                return Ok(out);
            }
            token = page.next_page_token;
        }
    }

    pub async fn retry(&self, task_id: &str, reason: &str) -> Result<(), Status> {
        let mut c = self.client.clone();
        c.retry_task(pb::RetryTaskRequest {
            task_id: task_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await?;
        Ok(())
    }

    /// Holds back the ticket's tasks; a paused ticket stays paused (its
    /// reason updated), so this may be said again.
    pub async fn pause(&self, ticket_id: Uuid, reason: &str) -> Result<(), Status> {
        let mut c = self.client.clone();
        c.pause_dispatch(pb::PauseDispatchRequest {
            ticket_id: ticket_id.to_string(),
            reason: reason.to_owned(),
            ..Default::default()
        })
        .await?;
        Ok(())
    }

    /// Lets the ticket's tasks go again; one that is not paused is fine.
    pub async fn resume(&self, ticket_id: Uuid) -> Result<(), Status> {
        let mut c = self.client.clone();
        match c
            .resume_dispatch(pb::ResumeDispatchRequest {
                ticket_id: ticket_id.to_string(),
                ..Default::default()
            })
            .await
        {
            Ok(_) => Ok(()),
            Err(s) if s.code() == Code::FailedPrecondition => Ok(()),
            Err(s) => Err(s),
        }
    }

    pub async fn cancel(&self, task_id: &str, reason: &str) -> Result<(), Status> {
        let mut c = self.client.clone();
        c.cancel_task(pb::CancelTaskRequest {
            task_id: task_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await?;
        Ok(())
    }
}

/// The task queue's refusal as the caller's: it is unavailable.
pub fn queue_unavailable(s: Status) -> Status {
    Status::unavailable(format!("task queue: {}", s.message()))
}

fn dependency_ids(task: &TicketTask, all: &[TicketTask]) -> Vec<String> {
    task.planned
        .depends_on
        .iter()
        .filter_map(|i| all.get(*i))
        .map(|d| d.task_id.to_string())
        .collect()
}

/// The tasks of a ticket not on the queue yet, as the queue will show them.
pub fn planned_tasks(ticket: &Ticket, tasks: &[TicketTask]) -> Vec<pb::Task> {
    tasks
        .iter()
        .map(|t| pb::Task {
            id: t.task_id.to_string(),
            ticket_id: ticket.id.to_string(),
            title: t.planned.title.clone(),
            description: t.planned.description.clone(),
            phase: t.planned.phase.wire(),
            priority: t.planned.priority,
            status: omoi_domain::TaskStatus::Pending.wire(),
            depends_on: dependency_ids(t, tasks),
            max_retries: t.planned.max_retries,
            timeout_seconds: t.planned.timeout_seconds,
            unmet_dependencies: t.planned.depends_on.len() as i32,
            concurrency_key: t.planned.concurrency_key.clone().unwrap_or_default(),
            ..Default::default()
        })
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

pub struct Planner {
    pub store: Store,
    pub queue: Queue,
}

impl Planner {
    pub fn new(store: Store, queue: Queue) -> Self {
        Self { store, queue }
    }

    /// The ticket's tasks from the queue, or as planned (`plan`) when not
    /// enqueued yet.
    pub async fn tasks_of(&self, ticket: &Ticket, plan: &[TicketTask]) -> Result<Vec<pb::Task>, Status> {
        if !ticket.tasks_enqueued {
            return Ok(planned_tasks(ticket, plan));
        }
        self.queue.list(ticket.id).await.map_err(queue_unavailable)
    }

    pub async fn enqueue(&self, ticket: &Ticket, tasks: &[TicketTask]) -> Result<Enqueued, StoreError> {
        let created = match self.queue.enqueue(ticket, tasks).await {
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

    /// Enqueues the tickets stored while the queue was unreachable, every
    /// `period` until `shutdown`; a pass ends at the first ticket the queue
    /// still cannot take.
    pub async fn retry_loop(self: Arc<Self>, period: Duration, shutdown: CancellationToken) {
        let this = &self;
        every("enqueueing tickets' tasks", period, &shutdown, move || async move {
            for (ticket, tasks) in this.store.tickets_to_enqueue(50).await? {
                match this.enqueue(&ticket, &tasks).await? {
                    Enqueued::Done(_) => tracing::info!(ticket_id = %ticket.id, "ticket's tasks enqueued"),
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

    /// Keeps ticket statuses in step with task events (durable consumer).
    pub async fn follow_tasks(
        self: Arc<Self>,
        nats: async_nats::Client,
        topology: omoi_bus::Topology,
        shutdown: CancellationToken,
    ) {
        let filter = topology.entity_filter(Entity::Task);
        let this = Arc::clone(&self);
        omoi_bus::consumer::consume(
            nats,
            topology,
            CONSUMER.to_owned(),
            filter,
            shutdown,
            move |event_id, envelope| {
                let this = Arc::clone(&this);
                async move {
                    let event_type = envelope.event.event_type();
                    let started = event_starts(event_type);
                    let outcome = TaskOutcome::of_event(event_type);
                    let usage = envelope.event.attempt_usage();
                    // An operator's retry: the task's outcome is open again.
                    let reopened = matches!(&envelope.event, Event::TaskRetried(r) if r.manual);
                    let head_commit = match &envelope.event {
                        Event::TaskCompleted(c) => c.git.as_ref().filter(|g| g.committed()).map(|g| g.commit.as_str()),
                        _ => None,
                    };
                    if envelope.ticket_id.is_none() || (!started && outcome.is_none() && usage.is_none() && !reopened) {
                        return Ok(());
                    }
                    let task_id = envelope.entity_id;
                    let report = TaskReport {
                        started,
                        outcome,
                        usage,
                        reopened,
                        head_commit,
                    };
                    let applied = this
                        .store
                        .apply_task_event(CONSUMER, event_id, task_id, &report)
                        .await
                        .map_err(|e| e.to_string())?;
                    let Some(applied) = applied else { return Ok(()) };
                    let ticket = &applied.ticket;
                    if applied.changed {
                        tracing::info!(ticket_id = %ticket.id, status = %ticket.status, "ticket status changed");
                    }
                    // Its budget is spent: the queue holds its tasks back. Said
                    // again on every event of a paused ticket (a redelivery
                    // included), so a crash between the two is made good.
                    if ticket.status == TicketStatus::Paused {
                        this.queue
                            .pause(ticket.id, &ticket.paused_reason)
                            .await
                            .map_err(|s| format!("pausing the ticket's dispatch: {}", s.message()))?;
                    }
                    Ok(())
                }
            },
        )
        .await;
    }
}
