//! TicketService: maps gRPC requests to validation, the planner and the store.

use std::collections::HashMap;
use std::sync::Arc;

use omoi_bus::Topology;
use omoi_domain::ticket::{self as rules, RawTaskSpec, TicketStatus};
use omoi_domain::validate;
use omoi_proto::convert::timestamp;
use omoi_proto::events::Event;
use omoi_proto::ticket::{self as pb, ticket_service_server::TicketService};
use omoi_runtime::status::{from_domain, from_store};
use omoi_store::Store;
use omoi_store::tickets::{Created, NewTicket, Ticket, TicketTask};
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::planner::{Enqueued, Planner, planned_tasks};
use crate::watch;

pub const MAX_REQUEST_ID: usize = 128;
pub const DEFAULT_PAGE_SIZE: i32 = 50;
pub const MAX_PAGE_SIZE: i32 = 1000;

pub struct Tickets {
    store: Store,
    planner: Arc<Planner>,
    nats: async_nats::Client,
    topology: Topology,
    watchers: CancellationToken,
}

impl Tickets {
    pub fn new(
        store: Store,
        planner: Arc<Planner>,
        nats: async_nats::Client,
        topology: Topology,
        watchers: CancellationToken,
    ) -> Self {
        Self {
            store,
            planner,
            nats,
            topology,
            watchers,
        }
    }

    /// The ticket's tasks from the queue, or as planned when not enqueued yet.
    async fn tasks_of(&self, ticket: &Ticket, plan: &[TicketTask]) -> Result<Vec<omoi_proto::taskqueue::Task>, Status> {
        if !ticket.tasks_enqueued {
            return Ok(planned_tasks(ticket, plan));
        }
        self.planner
            .queue
            .list(ticket.id)
            .await
            .map_err(|s| Status::unavailable(format!("task queue: {}", s.message())))
    }
}

fn ticket(t: &Ticket) -> pb::Ticket {
    pb::Ticket {
        id: t.id.to_string(),
        title: t.title.clone(),
        description: t.description.clone(),
        priority: t.priority,
        status: t.status.to_proto(),
        repository: t.repository.clone(),
        labels: match &t.labels {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            _ => HashMap::new(),
        },
        created_at: Some(timestamp(t.created_at)),
        updated_at: Some(timestamp(t.updated_at)),
    }
}

/// A repository is a git URL or an absolute local path (see the domain rules).
fn repository(value: &str) -> Result<String, Status> {
    validate::repository("repository", value).map_err(from_domain)?;
    Ok(value.trim().to_owned())
}

fn ticket_id(value: &str) -> Result<Uuid, Status> {
    validate::uuid("ticket_id", value).map_err(from_domain)
}

#[tonic::async_trait]
impl TicketService for Tickets {
    async fn create_ticket(
        &self,
        request: Request<pb::CreateTicketRequest>,
    ) -> Result<Response<pb::CreateTicketResponse>, Status> {
        let req = request.into_inner();
        let title = validate::title("title", &req.title).map_err(from_domain)?;
        let description =
            validate::text("description", &req.description, validate::MAX_DESCRIPTION_BYTES).map_err(from_domain)?;
        let priority = match req.priority {
            0 => 2,
            p @ 1..=4 => p,
            p => {
                return Err(Status::invalid_argument(format!(
                    "priority: {p} is not a known ticket priority"
                )));
            }
        };
        let repository = repository(&req.repository)?;
        validate::labels("labels", req.labels.iter()).map_err(from_domain)?;
        let request_id = if req.request_id.is_empty() {
            None
        } else {
            Some(validate::token("request_id", &req.request_id, MAX_REQUEST_ID, "-_.:").map_err(from_domain)?)
        };
        let plan = if req.plan.is_empty() {
            rules::default_plan(&title, &description, priority)
        } else {
            let specs: Vec<RawTaskSpec<'_>> = req
                .plan
                .iter()
                .map(|s| RawTaskSpec {
                    title: &s.title,
                    description: &s.description,
                    phase: s.phase,
                    priority: s.priority,
                    depends_on: &s.depends_on,
                    max_retries: s.max_retries,
                    timeout_seconds: s.timeout_seconds,
                })
                .collect();
            rules::explicit_plan(&specs, priority).map_err(from_domain)?
        };
        let new = NewTicket {
            id: Uuid::now_v7(),
            title,
            description,
            priority,
            repository,
            labels: serde_json::to_value(&req.labels).unwrap_or_default(),
            request_id,
        };
        let plan: Vec<(Uuid, rules::PlannedTask)> = plan.into_iter().map(|p| (Uuid::now_v7(), p)).collect();
        let (t, planned) = match self.store.create_ticket(&new, &plan).await.map_err(from_store)? {
            Created::Existing(t, planned) => {
                let tasks = self.tasks_of(&t, &planned).await?;
                return Ok(Response::new(pb::CreateTicketResponse {
                    ticket: Some(ticket(&t)),
                    tasks,
                }));
            }
            Created::New(t, planned) => (t, planned),
        };
        self.planner.relay();
        let tasks = match self.planner.enqueue(&t, &planned).await.map_err(from_store)? {
            Enqueued::Done(tasks) => tasks,
            Enqueued::Deferred(s) => {
                tracing::warn!(ticket_id = %t.id, error = %s.message(), "task queue unreachable; tasks will be created when it is back");
                planned_tasks(&t, &planned)
            }
            Enqueued::Refused(s) => return Err(s),
        };
        let (t, _) = self.store.get_ticket(t.id).await.map_err(from_store)?;
        Ok(Response::new(pb::CreateTicketResponse {
            ticket: Some(ticket(&t)),
            tasks,
        }))
    }

    async fn get_ticket(
        &self,
        request: Request<pb::GetTicketRequest>,
    ) -> Result<Response<pb::GetTicketResponse>, Status> {
        let id = ticket_id(&request.get_ref().ticket_id)?;
        let (t, planned) = self.store.get_ticket(id).await.map_err(from_store)?;
        let tasks = self.tasks_of(&t, &planned).await?;
        Ok(Response::new(pb::GetTicketResponse {
            ticket: Some(ticket(&t)),
            tasks,
        }))
    }

    async fn list_tickets(
        &self,
        request: Request<pb::ListTicketsRequest>,
    ) -> Result<Response<pb::ListTicketsResponse>, Status> {
        let req = request.into_inner();
        let status = match req.status {
            0 => None,
            n => Some(
                TicketStatus::from_proto(n)
                    .ok_or_else(|| Status::invalid_argument(format!("status: {n} is not a known ticket status")))?,
            ),
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => validate::range("page_size", n, 1, MAX_PAGE_SIZE).map_err(from_domain)?,
        };
        let before = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .parse::<i64>()
                    .ok()
                    .filter(|n| *n > 0)
                    .ok_or_else(|| Status::invalid_argument("page_token: not a token from a previous response"))?,
            )
        };
        let (tickets, next) = self
            .store
            .list_tickets(status, i64::from(page_size), before)
            .await
            .map_err(from_store)?;
        Ok(Response::new(pb::ListTicketsResponse {
            tickets: tickets.iter().map(ticket).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_ticket(
        &self,
        request: Request<pb::CancelTicketRequest>,
    ) -> Result<Response<pb::CancelTicketResponse>, Status> {
        let req = request.into_inner();
        let id = ticket_id(&req.ticket_id)?;
        let reason = validate::text("reason", &req.reason, validate::MAX_REASON_BYTES).map_err(from_domain)?;
        let reason = if reason.is_empty() {
            "ticket cancelled".to_owned()
        } else {
            reason
        };
        let (t, _) = self.store.get_ticket(id).await.map_err(from_store)?;
        if t.status.is_final() {
            return Err(Status::failed_precondition(format!(
                "ticket {id} is already {}",
                t.status
            )));
        }
        if t.tasks_enqueued {
            let tasks = self
                .planner
                .queue
                .list(id)
                .await
                .map_err(|s| Status::unavailable(format!("task queue: {}", s.message())))?;
            let open = [1, 2, 3]; // pending, assigned, running
            for task in tasks.iter().filter(|t| open.contains(&t.status)) {
                match self.planner.queue.cancel(&task.id, &reason).await {
                    Ok(()) => {}
                    // Finished meanwhile: nothing left to cancel.
                    Err(s) if matches!(s.code(), tonic::Code::FailedPrecondition | tonic::Code::NotFound) => {}
                    Err(s) => return Err(Status::unavailable(format!("task queue: {}", s.message()))),
                }
            }
        }
        let t = match self.store.cancel_ticket(id, &reason).await {
            Ok(t) => t,
            // Its tasks' events got there first and already ended it.
            Err(omoi_store::StoreError::FailedPrecondition(_)) => {
                self.store.get_ticket(id).await.map_err(from_store)?.0
            }
            Err(e) => return Err(from_store(e)),
        };
        self.planner.relay();
        Ok(Response::new(pb::CancelTicketResponse {
            ticket: Some(ticket(&t)),
        }))
    }

    type WatchTicketStream = ReceiverStream<Result<Event, Status>>;

    async fn watch_ticket(
        &self,
        request: Request<pb::WatchTicketRequest>,
    ) -> Result<Response<Self::WatchTicketStream>, Status> {
        let id = ticket_id(&request.get_ref().ticket_id)?;
        self.store.get_ticket(id).await.map_err(from_store)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(watch::follow(
            self.nats.clone(),
            self.topology.clone(),
            id.to_string(),
            tx,
            self.watchers.clone(),
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }
}
