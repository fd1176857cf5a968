//! TaskQueueService: maps gRPC requests to domain validation and store calls.

use std::sync::Arc;

use omoi_base::ApiResult;
use omoi_domain::AgentStatus;
use omoi_proto::taskqueue::{self as pb, task_queue_service_server::TaskQueueService};
use omoi_store::Store;
use omoi_store::tasks::Outcome;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::batcher::{Batcher, Kind};
use crate::dispatcher::{AgentStream, Dispatcher};
use crate::requests::{self, Failed, LimitChange};
use crate::stats::{self, StatsStream};

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

fn one_task(task: omoi_store::Task) -> Option<pb::Task> {
    Some(pb::Task::from(&task))
}

impl TaskQueue {
    async fn enqueue(&self, req: pb::EnqueueTasksRequest) -> ApiResult<pb::EnqueueTasksResponse> {
        let tasks = requests::enqueue(req, self.default_timeout_seconds)?;
        let created = self.store.enqueue(&tasks).await?;
        if created.iter().any(|t| t.unmet_deps == 0) {
            self.dispatcher.wake();
        }
        Ok(pb::EnqueueTasksResponse {
            tasks: created.iter().map(pb::Task::from).collect(),
        })
    }

    async fn get(&self, req: pb::GetTaskRequest) -> ApiResult<pb::GetTaskResponse> {
        let task = self.store.get(requests::get(req)?).await?;
        Ok(pb::GetTaskResponse { task: one_task(task) })
    }

    async fn batch_get(&self, req: pb::BatchGetTasksRequest) -> ApiResult<pb::BatchGetTasksResponse> {
        let tasks = self.store.get_many(&requests::batch_get(req)?).await?;
        Ok(pb::BatchGetTasksResponse {
            tasks: tasks.iter().map(pb::Task::from).collect(),
        })
    }

    async fn list(&self, req: pb::ListTasksRequest) -> ApiResult<pb::ListTasksResponse> {
        let page = requests::list(req)?;
        let (tasks, next) = self.store.list(&page.filter, page.size, page.after).await?;
        Ok(pb::ListTasksResponse {
            tasks: tasks.iter().map(pb::Task::from).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        })
    }

    async fn cancel(&self, req: pb::CancelTaskRequest) -> ApiResult<pb::CancelTaskResponse> {
        let (id, reason) = requests::cancel(req)?;
        let outcome = self.store.cancel(id, &reason).await?;
        self.after_outcome(&outcome);
        Ok(pb::CancelTaskResponse {
            task: one_task(outcome.task),
        })
    }

    async fn retry(&self, req: pb::RetryTaskRequest) -> ApiResult<pb::RetryTaskResponse> {
        let (id, reason, fresh) = requests::retry(req)?;
        let retried = self.store.retry(id, &reason, fresh).await?;
        self.dispatcher.wake();
        Ok(pb::RetryTaskResponse {
            task: one_task(retried.task),
            restored_dependents: retried.restored.iter().map(ToString::to_string).collect(),
        })
    }

    async fn connect(&self, req: pb::WatchAssignmentsRequest) -> ApiResult<AgentStream> {
        let requests::Watch {
            agent_id,
            phases,
            capacity,
        } = requests::watch(req)?;
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
        let stream = self.dispatcher.connect(agent_id, phases, capacity).await?;
        Ok(stream.ok_or_else(|| Status::unavailable("the task-queue is shutting down; reconnect"))?)
    }

    async fn start(&self, req: pb::StartTaskRequest) -> ApiResult<pb::StartTaskResponse> {
        let task = self.starts.submit(requests::start(req)?).await?;
        Ok(pb::StartTaskResponse { task: one_task(task) })
    }

    async fn extend(&self, req: pb::ExtendLeaseRequest) -> ApiResult<pb::ExtendLeaseResponse> {
        let e = requests::extend_lease(req)?;
        let (task, until) = self.store.extend_lease(e.task_id, e.attempt, e.seconds).await?;
        Ok(pb::ExtendLeaseResponse {
            task: one_task(task),
            lease_expires_at: Some(omoi_proto::convert::timestamp(until)),
        })
    }

    async fn record(&self, req: pb::RecordSessionRequest) -> ApiResult<pb::RecordSessionResponse> {
        let (id, attempt, session) = requests::record_session(req)?;
        let task = self.store.record_session(id, attempt, &session).await?;
        Ok(pb::RecordSessionResponse { task: one_task(task) })
    }

    async fn intervene(&self, req: pb::RecordInterventionRequest) -> ApiResult<pb::RecordInterventionResponse> {
        let (id, intervention) = requests::record_intervention(req)?;
        self.store.record_intervention(id, intervention).await?;
        Ok(pb::RecordInterventionResponse {})
    }

    async fn complete(&self, req: pb::CompleteTaskRequest) -> ApiResult<pb::CompleteTaskResponse> {
        let task = self.completions.submit(requests::complete(req)?).await?;
        Ok(pb::CompleteTaskResponse { task: one_task(task) })
    }

    async fn fail(&self, req: pb::FailTaskRequest) -> ApiResult<pb::FailTaskResponse> {
        let outcome = match requests::fail(req)? {
            Failed::TimedOut {
                task_id,
                attempt,
                usage,
            } => self.store.time_out_attempt(task_id, attempt, usage).await?,
            Failed::Failed { task_id, failure } => self.store.fail(task_id, &failure).await?,
        };
        self.after_outcome(&outcome);
        Ok(pb::FailTaskResponse {
            task: one_task(outcome.task),
        })
    }

    async fn output(&self, req: pb::StreamTaskOutputRequest) -> ApiResult<OutputStream> {
        let (id, follow) = requests::output(req)?;
        self.store.get(id).await?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(crate::output::follow(
            self.nats.clone(),
            self.topology.clone(),
            self.store.clone(),
            id,
            follow,
            tx,
        ));
        Ok(ReceiverStream::new(rx))
    }

    async fn pause(&self, req: pb::PauseDispatchRequest) -> ApiResult<pb::PauseDispatchResponse> {
        let (scope, reason) = requests::pause(req)?;
        let pause = self.store.pause(scope, &reason).await?;
        tracing::info!(%scope, reason, "dispatch paused");
        Ok(pb::PauseDispatchResponse {
            pause: Some(pb::Pause::from(&pause)),
        })
    }

    async fn resume(&self, req: pb::ResumeDispatchRequest) -> ApiResult<pb::ResumeDispatchResponse> {
        let scope = requests::resume(req)?;
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

    async fn set_limit(&self, req: pb::SetConcurrencyLimitRequest) -> ApiResult<pb::SetConcurrencyLimitResponse> {
        let limit = match requests::set_limit(req)? {
            LimitChange::Clear { key } => {
                self.store.clear_limit(&key).await?;
                tracing::info!(key, "concurrency limit removed");
                None
            }
            LimitChange::Set { key, max_running } => {
                let limit = self.store.set_limit(&key, max_running).await?;
                tracing::info!(key, max_running, "concurrency limit set");
                Some(pb::ConcurrencyLimit::from(&limit))
            }
        };
        // A raised or lifted limit may let waiting tasks out, on any replica.
        self.dispatcher.wake();
        Ok(pb::SetConcurrencyLimitResponse { limit })
    }

    async fn stats(&self, req: pb::GetQueueStatsRequest) -> ApiResult<pb::GetQueueStatsResponse> {
        requests::stats(req);
        // A request reads them itself: it must see what it just did.
        self.stats.source().read().await
    }

    fn watch_stats(&self, req: pb::WatchQueueStatsRequest) -> StatsStream {
        requests::watch_stats(req);
        self.stats.watch()
    }
}

type OutputStream = ReceiverStream<Result<pb::StreamTaskOutputResponse, Status>>;

/// Each RPC: its request read (`requests`), its work, its answer; an error
/// becomes its status through `ApiError`.
#[tonic::async_trait]
impl TaskQueueService for TaskQueue {
    async fn enqueue_tasks(
        &self,
        request: Request<pb::EnqueueTasksRequest>,
    ) -> Result<Response<pb::EnqueueTasksResponse>, Status> {
        Ok(Response::new(self.enqueue(request.into_inner()).await?))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::GetTaskResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn batch_get_tasks(
        &self,
        request: Request<pb::BatchGetTasksRequest>,
    ) -> Result<Response<pb::BatchGetTasksResponse>, Status> {
        Ok(Response::new(self.batch_get(request.into_inner()).await?))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        Ok(Response::new(self.cancel(request.into_inner()).await?))
    }

    async fn retry_task(
        &self,
        request: Request<pb::RetryTaskRequest>,
    ) -> Result<Response<pb::RetryTaskResponse>, Status> {
        Ok(Response::new(self.retry(request.into_inner()).await?))
    }

    async fn pause_dispatch(
        &self,
        request: Request<pb::PauseDispatchRequest>,
    ) -> Result<Response<pb::PauseDispatchResponse>, Status> {
        Ok(Response::new(self.pause(request.into_inner()).await?))
    }

    async fn resume_dispatch(
        &self,
        request: Request<pb::ResumeDispatchRequest>,
    ) -> Result<Response<pb::ResumeDispatchResponse>, Status> {
        Ok(Response::new(self.resume(request.into_inner()).await?))
    }

    async fn set_concurrency_limit(
        &self,
        request: Request<pb::SetConcurrencyLimitRequest>,
    ) -> Result<Response<pb::SetConcurrencyLimitResponse>, Status> {
        Ok(Response::new(self.set_limit(request.into_inner()).await?))
    }

    type WatchAssignmentsStream = AgentStream;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        Ok(Response::new(self.connect(request.into_inner()).await?))
    }

    async fn extend_lease(
        &self,
        request: Request<pb::ExtendLeaseRequest>,
    ) -> Result<Response<pb::ExtendLeaseResponse>, Status> {
        Ok(Response::new(self.extend(request.into_inner()).await?))
    }

    async fn start_task(
        &self,
        request: Request<pb::StartTaskRequest>,
    ) -> Result<Response<pb::StartTaskResponse>, Status> {
        Ok(Response::new(self.start(request.into_inner()).await?))
    }

    async fn record_session(
        &self,
        request: Request<pb::RecordSessionRequest>,
    ) -> Result<Response<pb::RecordSessionResponse>, Status> {
        Ok(Response::new(self.record(request.into_inner()).await?))
    }

    async fn record_intervention(
        &self,
        request: Request<pb::RecordInterventionRequest>,
    ) -> Result<Response<pb::RecordInterventionResponse>, Status> {
        Ok(Response::new(self.intervene(request.into_inner()).await?))
    }

    async fn complete_task(
        &self,
        request: Request<pb::CompleteTaskRequest>,
    ) -> Result<Response<pb::CompleteTaskResponse>, Status> {
        Ok(Response::new(self.complete(request.into_inner()).await?))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::FailTaskResponse>, Status> {
        Ok(Response::new(self.fail(request.into_inner()).await?))
    }

    type StreamTaskOutputStream = OutputStream;

    async fn stream_task_output(
        &self,
        request: Request<pb::StreamTaskOutputRequest>,
    ) -> Result<Response<Self::StreamTaskOutputStream>, Status> {
        Ok(Response::new(self.output(request.into_inner()).await?))
    }

    async fn get_queue_stats(
        &self,
        request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        Ok(Response::new(self.stats(request.into_inner()).await?))
    }

    type WatchQueueStatsStream = StatsStream;

    async fn watch_queue_stats(
        &self,
        request: Request<pb::WatchQueueStatsRequest>,
    ) -> Result<Response<Self::WatchQueueStatsStream>, Status> {
        Ok(Response::new(self.watch_stats(request.into_inner())))
    }
}
