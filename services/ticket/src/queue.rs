//! The task queue, as the ticket service calls it: enqueue a ticket's
//! tasks, list them, retry, cancel, pause and resume them.

use omoi_domain::Phase;
use omoi_domain::validate::NewTask;
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue::{self as pb, task_queue_service_client::TaskQueueServiceClient};
use tonic::{Code, Status};
use uuid::Uuid;

type Client = TaskQueueServiceClient<omoi_runtime::grpc::Client>;

/// The task queue's client.
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

    /// Enqueues `tasks` (all or nothing).
    pub async fn enqueue(&self, tasks: &[NewTask]) -> Result<Vec<pb::Task>, Status> {
        let request = pb::EnqueueTasksRequest {
            tasks: tasks.iter().map(pb::NewTask::from).collect(),
        };
        let mut c = self.client.clone();
        Ok(c.enqueue_tasks(request).await?.into_inner().tasks)
    }

    pub async fn get(&self, task_id: Uuid) -> Result<pb::Task, Status> {
        let mut c = self.client.clone();
        let got = c
            .get_task(pb::GetTaskRequest {
                task_id: task_id.to_string(),
            })
            .await?;
        got.into_inner()
            .task
            .ok_or_else(|| Status::internal("GetTask answered no task"))
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
            fresh: false,
        })
        .await?;
        Ok(())
    }

    /// Holds back the ticket's tasks; a paused ticket stays paused (its
    /// reason updated), so this may be said again.
    pub async fn pause(&self, ticket_id: Uuid, reason: &str) -> Result<(), Status> {
        self.pause_scope(ticket_id, None, reason).await
    }

    /// Holds back the ticket's tasks of `phase` (a gate), as `pause`.
    pub async fn pause_phase(&self, ticket_id: Uuid, phase: Phase, reason: &str) -> Result<(), Status> {
        self.pause_scope(ticket_id, Some(phase), reason).await
    }

    async fn pause_scope(&self, ticket_id: Uuid, phase: Option<Phase>, reason: &str) -> Result<(), Status> {
        let mut c = self.client.clone();
        c.pause_dispatch(pb::PauseDispatchRequest {
            ticket_id: ticket_id.to_string(),
            reason: reason.to_owned(),
            phase: phase.map_or(0, Phase::wire),
        })
        .await?;
        Ok(())
    }

    /// Lets the ticket's tasks go again; one that is not paused is fine.
    pub async fn resume(&self, ticket_id: Uuid) -> Result<(), Status> {
        self.resume_scope(ticket_id, None).await
    }

    /// Lets the ticket's tasks of `phase` go again, as `resume`.
    pub async fn resume_phase(&self, ticket_id: Uuid, phase: Phase) -> Result<(), Status> {
        self.resume_scope(ticket_id, Some(phase)).await
    }

    async fn resume_scope(&self, ticket_id: Uuid, phase: Option<Phase>) -> Result<(), Status> {
        let mut c = self.client.clone();
        match c
            .resume_dispatch(pb::ResumeDispatchRequest {
                ticket_id: ticket_id.to_string(),
                phase: phase.map_or(0, Phase::wire),
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
