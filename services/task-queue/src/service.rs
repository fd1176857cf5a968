//! TaskQueueService: maps gRPC requests to domain validation and store calls.

use std::sync::Arc;

use omoi_base::{ApiError, ApiResult};
use omoi_domain::rules::{self, Failure, Scope};
use omoi_domain::validate::{self, MAX_BATCH, MAX_ERROR_MESSAGE_BYTES, MAX_REASON_BYTES, RawNewTask};
use omoi_domain::{AgentStatus, ErrorClass, GitChange, Phase, TaskStatus, Usage};
use omoi_proto::convert::struct_to_json;
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue::{self as pb, task_queue_service_server::TaskQueueService};
use omoi_store::Store;
use omoi_store::tasks::{ListFilter, Outcome, Report};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::batcher::{Batcher, Kind};
use crate::dispatcher::{AgentStream, Dispatcher};
use crate::stats::{self, StatsStream};

/// Largest encoded `result` of a completion.
pub const MAX_RESULT_BYTES: usize = 256 * 1024;
pub const MAX_CAPACITY: i32 = 1000;
pub const DEFAULT_PAGE_SIZE: i32 = 100;
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Most ids one BatchGetTasks names.
pub const MAX_BATCH_GET: usize = 1000;

pub struct TaskQueue {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    starts: Batcher,
    completions: Batcher,
    default_timeout_seconds: i32,
    /// The WatchQueueStats streams and their reader.
    stats: stats::Hub,
}

impl TaskQueue {
    pub fn new(
        store: Store,
        dispatcher: Arc<Dispatcher>,
        nats: async_nats::Client,
        topology: omoi_bus::Topology,
        default_timeout_seconds: i32,
        watchers: CancellationToken,
    ) -> Self {
        let starts = Batcher::spawn(store.clone(), Kind::Start, |_, _| {});
        let disp = Arc::clone(&dispatcher);
        let completions = Batcher::spawn(store.clone(), Kind::Complete, move |done, released| {
            omoi_runtime::metrics::TASK_OUTCOMES
                .with_label_values(&["completed"])
                .inc_by(done.len() as u64);
            // Dependents may be ready, or a limited key has room again:
            // work for any replica. Otherwise only capacity was freed,
            // which matters to a replica whose agents had none left.
            if released > 0 || done.iter().any(|t| t.concurrency_key.is_some()) {
                disp.wake();
            } else {
                disp.capacity_freed();
            }
        });
        let source = stats::Source {
            store: store.clone(),
            dispatcher: Arc::clone(&dispatcher),
        };
        let stats = stats::Hub::new(source, nats.clone(), topology.clone(), watchers);
        Self {
            store,
            dispatcher,
            nats,
            topology,
            starts,
            completions,
            default_timeout_seconds,
            stats,
        }
    }

    fn after_outcome(&self, outcome: &Outcome) {
        crate::monitor::count(outcome);
        if let Some(revoked) = &outcome.revoked {
            self.dispatcher.revoke(revoked);
        }
        self.dispatcher.wake();
    }
}

fn report(task_id: &str, attempt: i32) -> ApiResult<Report> {
    Ok(Report {
        task_id: validate::uuid("task_id", task_id)?,
        attempt: validate::attempt("attempt", attempt)?,
        result: None,
        usage: None,
        git: None,
        // Read here, in the RPC's span: the batch runs in a task of its own.
        trace: omoi_runtime::trace::current(),
    })
}

/// A pause's scope as a request gives it: an optional phase and ticket.
fn scope(phase: i32, ticket_id: &str) -> ApiResult<Scope> {
    Ok(Scope {
        phase: validate::optional("phase", Phase::given(phase), "phase")?,
        ticket_id: validate::optional_uuid("ticket_id", ticket_id)?,
    })
}

/// Largest concurrency limit a key may have.
const MAX_CONCURRENCY_LIMIT: i32 = 1_000_000;

/// A reported usage, checked.
fn usage(given: Option<&omoi_proto::common::Usage>) -> ApiResult<Option<Usage>> {
    Ok(given.map(|u| Usage::from(u.clone()).validated("usage")).transpose()?)
}

fn one_task(task: omoi_store::Task) -> Option<pb::Task> {
    Some(pb::Task::from(&task))
}

fn new_task(field: &str, t: &pb::NewTask) -> Result<omoi_domain::validate::NewTask, omoi_domain::DomainError> {
    let raw = RawNewTask {
        id: &t.id,
        ticket_id: &t.ticket_id,
        title: &t.title,
        description: &t.description,
        phase: Phase::given(t.phase),
        priority: t.priority,
        depends_on: &t.depends_on,
        max_retries: t.max_retries,
        timeout_seconds: t.timeout_seconds,
        concurrency_key: &t.concurrency_key,
    };
    validate::new_task(field, &raw)
}

/// The phases an agent takes; `None` for all of them.
fn phases(given: &[i32]) -> ApiResult<Option<Vec<Phase>>> {
    let phases = validate::phase_set("phases", given.iter().map(|p| Phase::given(*p)))?;
    let some = !phases.is_empty() && phases.len() < Phase::ALL.len();
    Ok(some.then(|| phases.into_iter().collect()))
}

impl TaskQueue {
    async fn enqueue(&self, req: &pb::EnqueueTasksRequest) -> ApiResult<pb::EnqueueTasksResponse> {
        if req.tasks.is_empty() {
            return Err(ApiError::invalid("tasks", "at least one task is required"));
        }
        if req.tasks.len() > MAX_BATCH {
            let reason = format!("{} tasks in one request; at most {MAX_BATCH} allowed", req.tasks.len());
            return Err(ApiError::invalid("tasks", reason));
        }
        let mut tasks = req
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| new_task(&format!("tasks[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()?;
        for t in tasks.iter_mut().filter(|t| t.timeout_seconds == 0) {
            t.timeout_seconds = self.default_timeout_seconds;
        }
        let created = self.store.enqueue(&tasks).await?;
        if created.iter().any(|t| t.unmet_deps == 0) {
            self.dispatcher.wake();
        }
        Ok(pb::EnqueueTasksResponse {
            tasks: created.iter().map(pb::Task::from).collect(),
        })
    }

    async fn get(&self, req: &pb::GetTaskRequest) -> ApiResult<pb::GetTaskResponse> {
        let id = validate::uuid("task_id", &req.task_id)?;
        let task = self.store.get(id).await?;
        Ok(pb::GetTaskResponse { task: one_task(task) })
    }

    async fn batch_get(&self, req: &pb::BatchGetTasksRequest) -> ApiResult<pb::BatchGetTasksResponse> {
        if req.task_ids.is_empty() || req.task_ids.len() > MAX_BATCH_GET {
            let reason = format!("1 to {MAX_BATCH_GET} ids, got {}", req.task_ids.len());
            return Err(ApiError::invalid("task_ids", reason));
        }
        let ids = req
            .task_ids
            .iter()
            .enumerate()
            .map(|(i, id)| validate::uuid(&format!("task_ids[{i}]"), id))
            .collect::<Result<Vec<_>, _>>()?;
        let tasks = self.store.get_many(&ids).await?;
        Ok(pb::BatchGetTasksResponse {
            tasks: tasks.iter().map(pb::Task::from).collect(),
        })
    }

    async fn list(&self, req: &pb::ListTasksRequest) -> ApiResult<pb::ListTasksResponse> {
        let filter = ListFilter {
            ticket_id: validate::optional_uuid("ticket_id", &req.ticket_id)?,
            status: validate::optional("status", TaskStatus::given(req.status), "task status")?,
            phase: validate::optional("phase", Phase::given(req.phase), "phase")?,
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => validate::range("page_size", n, 1, MAX_PAGE_SIZE)?,
        };
        let after = if req.page_token.is_empty() {
            0
        } else {
            let token = req.page_token.parse::<i64>().ok().filter(|n| *n >= 0);
            token.ok_or_else(|| ApiError::invalid("page_token", "not a token from a previous response"))?
        };
        let (tasks, next) = self.store.list(&filter, i64::from(page_size), after).await?;
        Ok(pb::ListTasksResponse {
            tasks: tasks.iter().map(pb::Task::from).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn cancel(&self, req: &pb::CancelTaskRequest) -> ApiResult<pb::CancelTaskResponse> {
        let id = validate::uuid("task_id", &req.task_id)?;
        let reason = validate::text("reason", &req.reason, MAX_REASON_BYTES)?;
        let outcome = self.store.cancel(id, &reason).await?;
        self.after_outcome(&outcome);
        Ok(pb::CancelTaskResponse {
            task: one_task(outcome.task),
        })
    }

    async fn retry(&self, req: &pb::RetryTaskRequest) -> ApiResult<pb::RetryTaskResponse> {
        let id = validate::uuid("task_id", &req.task_id)?;
        let reason = validate::text("reason", &req.reason, MAX_REASON_BYTES)?;
        let retried = self.store.retry(id, &reason).await?;
        self.dispatcher.wake();
        Ok(pb::RetryTaskResponse {
            task: one_task(retried.task),
            restored_dependents: retried.restored.iter().map(ToString::to_string).collect(),
        })
    }

    async fn connect(&self, req: &pb::WatchAssignmentsRequest) -> ApiResult<AgentStream> {
        let agent_id = validate::uuid("agent_id", &req.agent_id)?;
        let capacity = validate::range("capacity", req.capacity, 1, MAX_CAPACITY)?;
        let phases = phases(&req.phases)?;
        // Only agents the health service knows take work: one it never
        // registered (or that left) would hold tasks nobody watches.
        match self.store.agent_status(agent_id).await? {
            None => {
                return Err(Status::not_found(format!(
                    "agent {agent_id} is not registered with the health service; RegisterAgent first"
                ))
                .into());
            }
            Some(AgentStatus::Deregistered) => {
                return Err(Status::not_found(format!(
                    "agent {agent_id} deregistered; register it again before taking work"
                ))
                .into());
            }
            Some(_) => {}
        }
        let stream = self.dispatcher.connect(agent_id, phases, i64::from(capacity)).await?;
        Ok(stream.ok_or_else(|| Status::unavailable("the task-queue is shutting down; reconnect"))?)
    }

    async fn complete(&self, req: &pb::CompleteTaskRequest) -> ApiResult<pb::CompleteTaskResponse> {
        let mut report = report(&req.task_id, req.attempt)?;
        if let Some(result) = &req.result {
            let size = result.encoded_len();
            if size > MAX_RESULT_BYTES {
                let reason = format!("{size} bytes encoded; at most {MAX_RESULT_BYTES} allowed");
                return Err(ApiError::invalid("result", reason));
            }
            report.result = Some(struct_to_json(result));
        }
        report.usage = usage(req.usage.as_ref())?;
        report.git = req
            .git
            .clone()
            .map(|g| GitChange::from(g).validated("git"))
            .transpose()?;
        let task = self.completions.submit(report).await?;
        Ok(pb::CompleteTaskResponse { task: one_task(task) })
    }

    async fn fail(&self, req: &pb::FailTaskRequest) -> ApiResult<pb::FailTaskResponse> {
        let report = report(&req.task_id, req.attempt)?;
        let message = validate::text("error_message", &req.error_message, MAX_ERROR_MESSAGE_BYTES)?;
        let class = validate::optional("error_class", ErrorClass::given(req.error_class), "error class")?;
        let usage = usage(req.usage.as_ref())?;
        let outcome = if req.timed_out {
            self.store
                .time_out_attempt(report.task_id, report.attempt, usage)
                .await?
        } else {
            let retry_after = req
                .retry_after
                .map(|d| validate::duration("retry_after", d.seconds, d.nanos))
                .transpose()?;
            let failure = Failure {
                attempt: report.attempt,
                message,
                class,
                usage,
                retry_after,
            };
            self.store.fail(report.task_id, &failure).await?
        };
        self.after_outcome(&outcome);
        Ok(pb::FailTaskResponse {
            task: one_task(outcome.task),
        })
    }

    async fn output(&self, req: &pb::StreamTaskOutputRequest) -> ApiResult<OutputStream> {
        let id = validate::uuid("task_id", &req.task_id)?;
        self.store.get(id).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(crate::output::follow(
            self.nats.clone(),
            self.topology.clone(),
            self.store.clone(),
            id,
            req.follow,
            tx,
        ));
        Ok(ReceiverStream::new(rx))
    }

    async fn pause(&self, req: &pb::PauseDispatchRequest) -> ApiResult<pb::PauseDispatchResponse> {
        let scope = scope(req.phase, &req.ticket_id)?;
        let reason = validate::text("reason", &req.reason, MAX_REASON_BYTES)?;
        let pause = self.store.pause(scope, &reason).await?;
        tracing::info!(%scope, reason, "dispatch paused");
        Ok(pb::PauseDispatchResponse {
            pause: Some(pb::Pause::from(&pause)),
        })
    }

    async fn resume(&self, req: &pb::ResumeDispatchRequest) -> ApiResult<pb::ResumeDispatchResponse> {
        let scope = scope(req.phase, &req.ticket_id)?;
        let lifted = self.store.resume(scope).await?;
        if lifted.is_empty() {
            return Err(Status::failed_precondition(format!("{scope} is not paused")).into());
        }
        tracing::info!(%scope, lifted = lifted.len(), "dispatch resumed");
        // Every replica looks for work again.
        self.dispatcher.wake();
        Ok(pb::ResumeDispatchResponse {
            resumed: lifted.iter().map(pb::Pause::from).collect(),
        })
    }

    async fn set_limit(&self, req: &pb::SetConcurrencyLimitRequest) -> ApiResult<pb::SetConcurrencyLimitResponse> {
        let key = validate::concurrency_key("key", &req.key)?;
        if req.clear {
            self.store.clear_limit(&key).await?;
            tracing::info!(key, "concurrency limit removed");
            self.dispatcher.wake();
            return Ok(pb::SetConcurrencyLimitResponse { limit: None });
        }
        let max_running = validate::range("max_running", req.max_running, 0, MAX_CONCURRENCY_LIMIT)?;
        let limit = self.store.set_limit(&key, max_running).await?;
        tracing::info!(key, max_running, "concurrency limit set");
        // A raised limit may let waiting tasks out, on any replica.
        self.dispatcher.wake();
        Ok(pb::SetConcurrencyLimitResponse {
            limit: Some(pb::ConcurrencyLimit::from(&limit)),
        })
    }

    async fn stats(&self) -> ApiResult<pb::GetQueueStatsResponse> {
        // A request reads them itself: it must see what it just did.
        self.stats.source().read().await
    }

    fn watch_stats(&self) -> StatsStream {
        self.stats.watch()
    }
}

type OutputStream = ReceiverStream<Result<pb::StreamTaskOutputResponse, Status>>;

#[tonic::async_trait]
impl TaskQueueService for TaskQueue {
    async fn enqueue_tasks(
        &self,
        request: Request<pb::EnqueueTasksRequest>,
    ) -> Result<Response<pb::EnqueueTasksResponse>, Status> {
        Ok(Response::new(self.enqueue(request.get_ref()).await?))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::GetTaskResponse>, Status> {
        Ok(Response::new(self.get(request.get_ref()).await?))
    }

    async fn batch_get_tasks(
        &self,
        request: Request<pb::BatchGetTasksRequest>,
    ) -> Result<Response<pb::BatchGetTasksResponse>, Status> {
        Ok(Response::new(self.batch_get(request.get_ref()).await?))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        Ok(Response::new(self.list(request.get_ref()).await?))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        Ok(Response::new(self.cancel(request.get_ref()).await?))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        Ok(Response::new(self.retry(request.get_ref()).await?))
    }

    async fn pause_dispatch(
        &self,
        request: Request<pb::PauseDispatchRequest>,
    ) -> Result<Response<pb::PauseDispatchResponse>, Status> {
        Ok(Response::new(self.pause(request.get_ref()).await?))
    }

    async fn resume_dispatch(
        &self,
        request: Request<pb::ResumeDispatchRequest>,
    ) -> Result<Response<pb::ResumeDispatchResponse>, Status> {
        Ok(Response::new(self.resume(request.get_ref()).await?))
    }

    async fn set_concurrency_limit(
        &self,
        request: Request<pb::SetConcurrencyLimitRequest>,
    ) -> Result<Response<pb::SetConcurrencyLimitResponse>, Status> {
        Ok(Response::new(self.set_limit(request.get_ref()).await?))
    }

    type WatchAssignmentsStream = AgentStream;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        Ok(Response::new(self.connect(request.get_ref()).await?))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        let req = request.get_ref();
        let task_id = validate::uuid("task_id", &req.task_id).map_err(ApiError::from)?;
        let attempt = validate::attempt("attempt", req.attempt).map_err(ApiError::from)?;
        let seconds = validate::range("seconds", req.seconds, 1, rules::MAX_LEASE_SECONDS).map_err(ApiError::from)?;
        let (task, until) = self
            .store
            .extend_lease(task_id, attempt, seconds)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(pb::ExtendLeaseResponse {
            task: one_task(task),
            lease_expires_at: Some(omoi_proto::convert::timestamp(until)),
        }))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        let req = request.get_ref();
        let task = self.starts.submit(report(&req.task_id, req.attempt)?).await?;
        Ok(Response::new(pb::StartTaskResponse { task: one_task(task) }))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        Ok(Response::new(self.complete(request.get_ref()).await?))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::FailTaskResponse>, Status> {
        Ok(Response::new(self.fail(request.get_ref()).await?))
    }

    type StreamTaskOutputStream = OutputStream;

    async fn stream_task_output(
        &self,
        request: Request<pb::StreamTaskOutputRequest>,
    ) -> Result<Response<Self::StreamTaskOutputStream>, Status> {
        Ok(Response::new(self.output(request.get_ref()).await?))
    }

    async fn get_queue_stats(
        &self,
        _request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        Ok(Response::new(self.stats().await?))
    }

    type WatchQueueStatsStream = StatsStream;

    async fn watch_queue_stats(
        &self,
        _request: Request<pb::WatchQueueStatsRequest>,
    ) -> Result<Response<Self::WatchQueueStatsStream>, Status> {
        Ok(Response::new(self.watch_stats()))
    }
}
