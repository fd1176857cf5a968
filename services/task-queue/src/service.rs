//! TaskQueueService: maps gRPC requests to domain validation and store calls.

use std::sync::Arc;

use omoi_domain::validate::{self, MAX_BATCH, MAX_ERROR_MESSAGE_BYTES, MAX_REASON_BYTES, RawNewTask};
use omoi_domain::{ErrorClass, Phase, TaskStatus};
use omoi_proto::convert::struct_to_json;
use omoi_proto::taskqueue::{self as pb, task_queue_service_server::TaskQueueService};
use omoi_store::Store;
use omoi_store::tasks::{ListFilter, Outcome, Report};
use prost::Message;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::batcher::{Batcher, Kind};
use crate::convert;
use crate::dispatcher::{AgentStream, Dispatcher};
use crate::error::{domain_status, status};

/// Largest encoded `result` of a completion.
pub const MAX_RESULT_BYTES: usize = 256 * 1024;
pub const MAX_CAPACITY: i32 = 1000;
pub const DEFAULT_PAGE_SIZE: i32 = 100;
pub const MAX_PAGE_SIZE: i32 = 1000;

pub struct TaskQueue {
    store: Store,
    dispatcher: Arc<Dispatcher>,
    relay_wake: Arc<Notify>,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    starts: Batcher,
    completions: Batcher,
}

impl TaskQueue {
    pub fn new(
        store: Store,
        dispatcher: Arc<Dispatcher>,
        relay_wake: Arc<Notify>,
        nats: async_nats::Client,
        topology: omoi_bus::Topology,
    ) -> Self {
        let relay = Arc::clone(&relay_wake);
        let starts = Batcher::spawn(store.clone(), Kind::Start, move |_| relay.notify_one());
        let (relay, disp) = (Arc::clone(&relay_wake), Arc::clone(&dispatcher));
        let completions = Batcher::spawn(store.clone(), Kind::Complete, move |done| {
            omoi_runtime::metrics::TASK_OUTCOMES
                .with_label_values(&["completed"])
                .inc_by(done.len() as u64);
            relay.notify_one();
            // Capacity freed and dependents may be ready.
            disp.wake();
        });
        Self {
            store,
            dispatcher,
            relay_wake,
            nats,
            topology,
            starts,
            completions,
        }
    }

    fn after_outcome(&self, outcome: &Outcome) {
        crate::monitor::count(outcome);
        self.relay_wake.notify_one();
        if let Some(revoked) = &outcome.revoked {
            self.dispatcher.revoke(revoked);
        }
        self.dispatcher.wake();
    }
}

fn invalid(err: omoi_domain::DomainError) -> Status {
    domain_status(err)
}

fn report(task_id: &str, attempt: i32) -> Result<Report, Status> {
    Ok(Report {
        task_id: validate::uuid("task_id", task_id).map_err(invalid)?,
        attempt: validate::attempt("attempt", attempt).map_err(invalid)?,
        result: None,
        // Read here, in the RPC's span: the batch runs in a task of its own.
        trace: omoi_runtime::trace::current(),
    })
}

fn one_task(task: omoi_store::Task) -> Option<pb::Task> {
    Some(convert::task(&task))
}

#[tonic::async_trait]
impl TaskQueueService for TaskQueue {
    async fn enqueue_tasks(
        &self,
        request: Request<pb::EnqueueTasksRequest>,
    ) -> Result<Response<pb::EnqueueTasksResponse>, Status> {
        let req = request.into_inner();
        if req.tasks.is_empty() {
            return Err(Status::invalid_argument("tasks: at least one task is required"));
        }
        if req.tasks.len() > MAX_BATCH {
            return Err(Status::invalid_argument(format!(
                "tasks: {} tasks in one request; at most {MAX_BATCH} allowed",
                req.tasks.len()
            )));
        }
        let tasks = req
            .tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                validate::new_task(
                    &format!("tasks[{i}]"),
                    &RawNewTask {
                        id: &t.id,
                        ticket_id: &t.ticket_id,
                        title: &t.title,
                        description: &t.description,
                        phase: t.phase,
                        priority: t.priority,
                        depends_on: &t.depends_on,
                        max_retries: t.max_retries,
                        timeout_seconds: t.timeout_seconds,
                    },
                )
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(invalid)?;
        let created = self.store.enqueue(&tasks).await.map_err(status)?;
        self.relay_wake.notify_one();
        if created.iter().any(|t| t.unmet_deps == 0) {
            self.dispatcher.wake();
        }
        Ok(Response::new(pb::EnqueueTasksResponse {
            tasks: created.iter().map(convert::task).collect(),
        }))
    }

    async fn get_task(&self, request: Request<pb::GetTaskRequest>) -> Result<Response<pb::GetTaskResponse>, Status> {
        let id = validate::uuid("task_id", &request.get_ref().task_id).map_err(invalid)?;
        let task = self.store.get(id).await.map_err(status)?;
        Ok(Response::new(pb::GetTaskResponse { task: one_task(task) }))
    }

    async fn list_tasks(
        &self,
        request: Request<pb::ListTasksRequest>,
    ) -> Result<Response<pb::ListTasksResponse>, Status> {
        let req = request.into_inner();
        let filter = ListFilter {
            ticket_id: validate::optional_uuid("ticket_id", &req.ticket_id).map_err(invalid)?,
            status: validate::status_filter("status", req.status).map_err(invalid)?,
            phase: validate::phase_filter("phase", req.phase).map_err(invalid)?,
        };
        let page_size = match req.page_size {
            0 => DEFAULT_PAGE_SIZE,
            n => validate::range("page_size", n, 1, MAX_PAGE_SIZE).map_err(invalid)?,
        };
        let after = if req.page_token.is_empty() {
            0
        } else {
            req.page_token
                .parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| Status::invalid_argument("page_token: not a token from a previous response"))?
        };
        let (tasks, next) = self
            .store
            .list(&filter, i64::from(page_size), after)
            .await
            .map_err(status)?;
        Ok(Response::new(pb::ListTasksResponse {
            tasks: tasks.iter().map(convert::task).collect(),
            next_page_token: next.map(|n| n.to_string()).unwrap_or_default(),
        }))
    }

    async fn cancel_task(
        &self,
        request: Request<pb::CancelTaskRequest>,
    ) -> Result<Response<pb::CancelTaskResponse>, Status> {
        let req = request.into_inner();
        let id = validate::uuid("task_id", &req.task_id).map_err(invalid)?;
        let reason = validate::text("reason", &req.reason, MAX_REASON_BYTES).map_err(invalid)?;
        let outcome = self.store.cancel(id, &reason).await.map_err(status)?;
        self.after_outcome(&outcome);
        Ok(Response::new(pb::CancelTaskResponse {
            task: one_task(outcome.task),
        }))
    }

    type WatchAssignmentsStream = AgentStream;

    async fn watch_assignments(
        &self,
        request: Request<pb::WatchAssignmentsRequest>,
    ) -> Result<Response<Self::WatchAssignmentsStream>, Status> {
        let req = request.into_inner();
        let agent_id = validate::uuid("agent_id", &req.agent_id).map_err(invalid)?;
        let capacity = validate::range("capacity", req.capacity, 1, MAX_CAPACITY).map_err(invalid)?;
        let mut phases = req
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| validate::phase(&format!("phases[{i}]"), *p))
            .collect::<Result<Vec<Phase>, _>>()
            .map_err(invalid)?;
        phases.sort_unstable();
        phases.dedup();
        let phases = if phases.is_empty() || phases.len() == Phase::ALL.len() {
            None
        } else {
            Some(phases)
        };
        let stream = self
            .dispatcher
            .connect(agent_id, phases, i64::from(capacity))
            .await
            .map_err(status)?
            .ok_or_else(|| Status::unavailable("the task-queue is shutting down; reconnect"))?;
        Ok(Response::new(stream))
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
        let req = request.into_inner();
        let mut report = report(&req.task_id, req.attempt)?;
        if let Some(result) = &req.result {
            let size = result.encoded_len();
            if size > MAX_RESULT_BYTES {
                return Err(Status::invalid_argument(format!(
                    "result: {size} bytes encoded; at most {MAX_RESULT_BYTES} allowed"
                )));
            }
            report.result = Some(struct_to_json(result));
        }
        let task = self.completions.submit(report).await?;
        Ok(Response::new(pb::CompleteTaskResponse { task: one_task(task) }))
    }

    async fn fail_task(&self, request: Request<pb::FailTaskRequest>) -> Result<Response<pb::FailTaskResponse>, Status> {
        let req = request.into_inner();
        let report = report(&req.task_id, req.attempt)?;
        let message = validate::text("error_message", &req.error_message, MAX_ERROR_MESSAGE_BYTES).map_err(invalid)?;
        let class = match req.error_class {
            0 => None,
            n => Some(
                ErrorClass::from_proto(n)
                    .ok_or_else(|| Status::invalid_argument(format!("error_class: {n} is not a known error class")))?,
            ),
        };
        let outcome = self
            .store
            .fail(report.task_id, report.attempt, &message, class)
            .await
            .map_err(status)?;
        self.after_outcome(&outcome);
        Ok(Response::new(pb::FailTaskResponse {
            task: one_task(outcome.task),
        }))
    }

    type StreamTaskOutputStream = ReceiverStream<Result<pb::StreamTaskOutputResponse, Status>>;

    async fn stream_task_output(
        &self,
        request: Request<pb::StreamTaskOutputRequest>,
    ) -> Result<Response<Self::StreamTaskOutputStream>, Status> {
        let req = request.into_inner();
        let id = validate::uuid("task_id", &req.task_id).map_err(invalid)?;
        self.store.get(id).await.map_err(status)?;
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(crate::output::follow(
            self.nats.clone(),
            self.topology.clone(),
            self.store.clone(),
            id,
            req.follow,
            tx,
        ));
        Ok(Response::new(ReceiverStream::new(rx)))
    }

    async fn get_queue_stats(
        &self,
        _request: Request<pb::GetQueueStatsRequest>,
    ) -> Result<Response<pb::GetQueueStatsResponse>, Status> {
        let stats = self.store.stats().await.map_err(status)?;
        let mut resp = pb::GetQueueStatsResponse {
            ready: stats.ready,
            oldest_ready_age_seconds: stats.oldest_ready_age.as_secs_f64(),
            connected_agents: i32::try_from(self.dispatcher.connected_agents()).unwrap_or(i32::MAX),
            ..Default::default()
        };
        for (st, phase, count) in stats.counts {
            resp.counts.push(pb::StatusPhaseCount {
                status: st.to_proto(),
                phase: phase.to_proto(),
                count,
            });
            let total = match st {
                TaskStatus::Pending => &mut resp.pending,
                TaskStatus::Assigned => &mut resp.assigned,
                TaskStatus::Running => &mut resp.running,
                TaskStatus::Completed => &mut resp.completed,
                TaskStatus::Failed => &mut resp.failed,
                TaskStatus::Cancelled => &mut resp.cancelled,
                TaskStatus::TimedOut => &mut resp.timed_out,
            };
            *total += count;
        }
        Ok(Response::new(resp))
    }
}
