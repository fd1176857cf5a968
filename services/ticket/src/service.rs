//! TicketService: maps gRPC requests to validation, the domain's plans,
//! the ticket's tasks on the queue and the store.

use std::sync::Arc;

use omoi_base::{ApiError, ApiResult};
use omoi_bus::Topology;
use omoi_domain::ticket::{self as rules, PhaseInstructions, RawTaskSpec};
use omoi_domain::{Phase, TaskStatus, TicketStatus, git, validate};
use omoi_proto::common::TicketPriority;
use omoi_proto::domain::WireEnum;
use omoi_proto::events::Event;
use omoi_proto::ticket::{self as pb, ticket_service_server::TicketService};
use omoi_store::Store;
use omoi_store::tickets::{Created, NewTicket, TicketUpdate};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::queue::queue_unavailable;
use crate::tasks::{Enqueued, TicketTasks, planned_tasks};
use crate::{board, watch};

pub const MAX_REQUEST_ID: usize = 128;
pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;

pub struct Tickets {
    store: Store,
    tasks: Arc<TicketTasks>,
    nats: async_nats::Client,
    topology: Topology,
    watchers: CancellationToken,
    phase_instructions: PhaseInstructions,
    board: Arc<board::Hub>,
}

impl Tickets {
    pub fn new(
        store: Store,
        tasks: Arc<TicketTasks>,
        nats: async_nats::Client,
        topology: Topology,
        watchers: CancellationToken,
        phase_instructions: PhaseInstructions,
        board: Arc<board::Hub>,
    ) -> Self {
        Self {
            store,
            tasks,
            nats,
            topology,
            watchers,
            phase_instructions,
            board,
        }
    }

    async fn create(&self, req: pb::CreateTicketRequest) -> ApiResult<pb::CreateTicketResponse> {
        let title = validate::title("title", &req.title)?;
        let description = validate::text("description", &req.description, validate::MAX_DESCRIPTION_BYTES)?;
        let priority = match req.priority {
            0 => TicketPriority::Medium.into(),
            p => ticket_priority("priority", p)?,
        };
        let max_cost_usd = budget("max_cost_usd", req.max_cost_usd)?;
        let repository = repository(&req.repository)?;
        let base_ref = if req.base_ref.is_empty() {
            String::new()
        } else if repository.is_empty() {
            return Err(ApiError::invalid("base_ref", "needs a repository"));
        } else {
            git::git_ref("base_ref", &req.base_ref)?
        };
        if req.pull_request && git::forge_repo(&repository).is_none() {
            return Err(ApiError::invalid(
                "pull_request",
                "needs a GitHub repository URL (https://<host>/<owner>/<repo>)",
            ));
        }
        validate::labels("labels", req.labels.iter())?;
        let request_id = if req.request_id.is_empty() {
            None
        } else {
            Some(validate::token("request_id", &req.request_id, MAX_REQUEST_ID, "-_.:")?)
        };
        let plan = if req.plan.is_empty() {
            rules::default_plan(&title, &description, priority, &self.phase_instructions)
        } else {
            let specs: Vec<RawTaskSpec<'_>> = req.plan.iter().map(task_spec).collect();
            rules::explicit_plan(&specs, priority)?
        };
        let id = Uuid::now_v7();
        let branch = if repository.is_empty() {
            String::new()
        } else {
            git::branch_name(id, &title)
        };
        let new = NewTicket {
            id,
            base_ref,
            branch,
            pull_request: req.pull_request,
            max_cost_usd,
            title,
            description,
            priority,
            repository,
            labels: serde_json::to_value(&req.labels).unwrap_or_default(),
            request_id,
        };
        // A ticket's tasks share its repository's concurrency key unless
        // the plan names another.
        let plan: Vec<(Uuid, rules::PlannedTask)> = plan
            .into_iter()
            .map(|mut p| {
                if p.concurrency_key.is_none() && !new.repository.is_empty() {
                    p.concurrency_key = Some(new.repository.clone());
                }
                (Uuid::now_v7(), p)
            })
            .collect();
        let (t, planned) = match self.store.create_ticket(&new, &plan).await? {
            Created::Existing(t, planned) => {
                let tasks = self.tasks.of(&t, &planned).await?;
                let ticket = Some(pb::Ticket::from(&t));
                return Ok(pb::CreateTicketResponse { ticket, tasks });
            }
            Created::New(t, planned) => (t, planned),
        };
        let tasks = match self.tasks.enqueue(&t, &planned).await? {
            Enqueued::Done(tasks) => tasks,
            Enqueued::Deferred(s) => {
                tracing::warn!(ticket_id = %t.id, error = %s.message(), "task queue unreachable; tasks will be created when it is back");
                planned_tasks(&t, &planned)
            }
            Enqueued::Refused(s) => return Err(s.into()),
        };
        let (t, _) = self.store.get_ticket(t.id).await?;
        Ok(pb::CreateTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
            tasks,
        })
    }

    async fn get(&self, req: &pb::GetTicketRequest) -> ApiResult<pb::GetTicketResponse> {
        let id = validate::uuid("ticket_id", &req.ticket_id)?;
        let view = pb::TicketView::try_from(req.view)
            .map_err(|_| ApiError::invalid("view", format!("{} is not a ticket view (BASIC, FULL)", req.view)))?;
        let (t, planned) = self.store.get_ticket(id).await?;
        let tasks = match view {
            pb::TicketView::Basic => Vec::new(),
            pb::TicketView::Unspecified | pb::TicketView::Full => self.tasks.of(&t, &planned).await?,
        };
        Ok(pb::GetTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
            tasks,
        })
    }

    async fn list(&self, req: &pb::ListTicketsRequest) -> ApiResult<pb::ListTicketsResponse> {
        let status = validate::optional("status", TicketStatus::given(req.status), "ticket status")?;
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => validate::range("page_size", n, 1, MAX_PAGE_SIZE)?,
        };
        let before = if req.page_token.is_empty() {
            None
        } else {
            let token = req.page_token.parse::<i64>().ok().filter(|n| *n > 0);
            Some(token.ok_or_else(|| ApiError::invalid("page_token", "not a token from a previous response"))?)
        };
        let (tickets, next) = self.store.list_tickets(status, i64::from(page_size), before).await?;
        Ok(pb::ListTicketsResponse {
            tickets: tickets.iter().map(pb::Ticket::from).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn cancel(&self, req: &pb::CancelTicketRequest) -> ApiResult<pb::CancelTicketResponse> {
        let id = validate::uuid("ticket_id", &req.ticket_id)?;
        let reason = validate::text("reason", &req.reason, validate::MAX_REASON_BYTES)?;
        let reason = if reason.is_empty() {
            "ticket cancelled".to_owned()
        } else {
            reason
        };
        let (t, _) = self.store.get_ticket(id).await?;
        if t.status.is_final() {
            let already = format!("ticket {id} is already {}", t.status);
            return Err(Status::failed_precondition(already).into());
        }
        if t.tasks_enqueued {
            self.cancel_open_tasks(id, &reason).await?;
        }
        let t = match self.store.cancel_ticket(id, &reason).await {
            Ok(t) => t,
            // Its tasks' events got there first and already ended it.
            Err(omoi_store::StoreError::FailedPrecondition(_)) => self.store.get_ticket(id).await?.0,
            Err(e) => return Err(e.into()),
        };
        // A budget's pause has nothing left to hold back.
        if let Err(s) = self.tasks.queue.resume(id).await {
            tracing::warn!(ticket_id = %id, error = %s.message(), "the cancelled ticket's dispatch pause stays");
        }
        Ok(pb::CancelTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
        })
    }

    async fn update(&self, req: &pb::UpdateTicketRequest) -> ApiResult<pb::UpdateTicketResponse> {
        let given = req
            .ticket
            .as_ref()
            .ok_or_else(|| ApiError::invalid("ticket", "required: the ticket's id and the new values"))?;
        let id = validate::uuid("ticket.id", &given.id)?;
        let paths = req.update_mask.as_ref().map(|m| m.paths.as_slice()).unwrap_or_default();
        if paths.is_empty() {
            return Err(ApiError::invalid(
                "update_mask",
                "name at least one of priority, labels, max_cost_usd",
            ));
        }
        let mut update = TicketUpdate::default();
        for path in paths {
            match path.as_str() {
                "priority" => update.priority = Some(ticket_priority("ticket.priority", given.priority)?),
                "labels" => {
                    validate::labels("ticket.labels", given.labels.iter())?;
                    update.labels = Some(serde_json::to_value(&given.labels).unwrap_or_default());
                }
                "max_cost_usd" => update.max_cost_usd = Some(budget("ticket.max_cost_usd", given.max_cost_usd)?),
                other => {
                    let reason = format!("{other:?} cannot be updated; name priority, labels or max_cost_usd");
                    return Err(ApiError::invalid("update_mask", reason));
                }
            }
        }
        let pending = self.store.update_ticket(id, &update).await?;
        let applied = &pending.applied;
        // The queue first: should it be out of reach, nothing changes.
        if applied.changed {
            let t = &applied.ticket;
            let held = if t.status == TicketStatus::Paused {
                self.tasks.queue.pause(id, &t.paused_reason).await
            } else {
                self.tasks.queue.resume(id).await
            };
            held.map_err(queue_unavailable)?;
        }
        let t = pending.commit().await?;
        Ok(pb::UpdateTicketResponse {
            ticket: Some(pb::Ticket::from(&t)),
        })
    }

    async fn retry(&self, req: &pb::RetryTicketRequest) -> ApiResult<pb::RetryTicketResponse> {
        let id = validate::uuid("ticket_id", &req.ticket_id)?;
        let reason = validate::text("reason", &req.reason, validate::MAX_REASON_BYTES)?;
        let reason = if reason.is_empty() {
            "ticket retried".to_owned()
        } else {
            reason
        };
        let (t, _) = self.store.get_ticket(id).await?;
        let tasks = if t.tasks_enqueued {
            self.tasks.queue.list(id).await.map_err(queue_unavailable)?
        } else {
            Vec::new()
        };
        let ended = |t: &&omoi_proto::taskqueue::Task| {
            TaskStatus::given(t.status)
                .known()
                .is_some_and(TaskStatus::ended_unsuccessfully)
        };
        let mut retried = 0;
        // In plan order, so that a dependency goes round before what waits
        // for it; a dependent its retry brought back is refused, and skipped.
        for task in tasks.iter().filter(ended) {
            match self.tasks.queue.retry(&task.id, &reason).await {
                Ok(()) => retried += 1,
                Err(s) if s.code() == tonic::Code::FailedPrecondition => {}
                Err(s) => return Err(queue_unavailable(s).into()),
            }
        }
        if retried == 0 {
            let nothing = format!("ticket {id} has no failed, timed-out or cancelled task to retry");
            return Err(Status::failed_precondition(nothing).into());
        }
        let now = self
            .get(&pb::GetTicketRequest {
                ticket_id: id.to_string(),
                view: pb::TicketView::Full.into(),
            })
            .await?;
        Ok(pb::RetryTicketResponse {
            ticket: now.ticket,
            tasks: now.tasks,
        })
    }

    /// Cancels the ticket's unfinished tasks on the queue.
    async fn cancel_open_tasks(&self, id: Uuid, reason: &str) -> ApiResult<()> {
        let tasks = self.tasks.queue.list(id).await.map_err(queue_unavailable)?;
        let open =
            |t: &&omoi_proto::taskqueue::Task| TaskStatus::given(t.status).known().is_some_and(|s| !s.is_terminal());
        for task in tasks.iter().filter(open) {
            match self.tasks.queue.cancel(&task.id, reason).await {
                Ok(()) => {}
                // Finished meanwhile: nothing left to cancel.
                Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {}
                Err(s) => return Err(queue_unavailable(s).into()),
            }
        }
        Ok(())
    }

    async fn watch(&self, req: &pb::WatchTicketRequest) -> ApiResult<EventStream> {
        let id = validate::uuid("ticket_id", &req.ticket_id)?;
        self.store.get_ticket(id).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::follow(
            self.nats.clone(),
            self.topology.clone(),
            id.to_string(),
            tx,
            self.watchers.clone(),
        ));
        Ok(ReceiverStream::new(rx))
    }

    fn watch_all(&self, req: &pb::WatchTicketsRequest) -> ApiResult<BoardStream> {
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => validate::range("page_size", n, 1, MAX_PAGE_SIZE)?,
        };
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(board::follow(
            Arc::clone(&self.board),
            Arc::clone(&self.tasks),
            i64::from(page_size),
            tx,
            self.watchers.clone(),
        ));
        Ok(ReceiverStream::new(rx))
    }
}

type EventStream = ReceiverStream<Result<Event, Status>>;
type BoardStream = ReceiverStream<Result<pb::WatchTicketsResponse, Status>>;

fn task_spec(s: &pb::TaskSpec) -> RawTaskSpec<'_> {
    RawTaskSpec {
        title: &s.title,
        description: &s.description,
        phase: Phase::given(s.phase),
        priority: s.priority,
        depends_on: &s.depends_on,
        max_retries: s.max_retries,
        timeout_seconds: s.timeout_seconds,
        concurrency_key: &s.concurrency_key,
    }
}

/// A known ticket priority (LOW 1 .. CRITICAL 4).
fn ticket_priority(field: &str, value: i32) -> ApiResult<i32> {
    match TicketPriority::try_from(value) {
        Ok(TicketPriority::Unspecified) | Err(_) => Err(ApiError::invalid(
            field,
            format!("{value} is not a known ticket priority (LOW, MEDIUM, HIGH, CRITICAL)"),
        )),
        Ok(p) => Ok(i32::from(p)),
    }
}

/// A budget: more than 0 USD, or none.
fn budget(field: &str, value: Option<f64>) -> ApiResult<Option<f64>> {
    match value {
        Some(v) if !(v.is_finite() && v > 0.0) => {
            Err(ApiError::invalid(field, format!("must be more than 0 USD, got {v}")))
        }
        v => Ok(v),
    }
}

/// A repository is a git URL or an absolute local path (see the domain rules).
fn repository(value: &str) -> ApiResult<String> {
    validate::repository("repository", value)?;
    Ok(value.trim().to_owned())
}

#[tonic::async_trait]
impl TicketService for Tickets {
    async fn update_ticket(
        &self,
        request: Request<pb::UpdateTicketRequest>,
    ) -> Result<Response<pb::UpdateTicketResponse>, Status> {
        Ok(Response::new(self.update(request.get_ref()).await?))
    }

    async fn retry_ticket(
        &self,
        request: Request<pb::RetryTicketRequest>,
    ) -> Result<Response<pb::RetryTicketResponse>, Status> {
        Ok(Response::new(self.retry(request.get_ref()).await?))
    }

    async fn create_ticket(
        &self,
        request: Request<pb::CreateTicketRequest>,
    ) -> Result<Response<pb::CreateTicketResponse>, Status> {
        Ok(Response::new(self.create(request.into_inner()).await?))
    }

    async fn get_ticket(
        &self,
        request: Request<pb::GetTicketRequest>,
    ) -> Result<Response<pb::GetTicketResponse>, Status> {
        Ok(Response::new(self.get(request.get_ref()).await?))
    }

    async fn list_tickets(
        &self,
        request: Request<pb::ListTicketsRequest>,
    ) -> Result<Response<pb::ListTicketsResponse>, Status> {
        Ok(Response::new(self.list(request.get_ref()).await?))
    }

    async fn cancel_ticket(
        &self,
        request: Request<pb::CancelTicketRequest>,
    ) -> Result<Response<pb::CancelTicketResponse>, Status> {
        Ok(Response::new(self.cancel(request.get_ref()).await?))
    }

    type WatchTicketStream = EventStream;

    async fn watch_ticket(
        &self,
        request: Request<pb::WatchTicketRequest>,
    ) -> Result<Response<Self::WatchTicketStream>, Status> {
        Ok(Response::new(self.watch(request.get_ref()).await?))
    }

    type WatchTicketsStream = BoardStream;

    async fn watch_tickets(
        &self,
        request: Request<pb::WatchTicketsRequest>,
    ) -> Result<Response<Self::WatchTicketsStream>, Status> {
        Ok(Response::new(self.watch_all(request.get_ref())?))
    }
}
