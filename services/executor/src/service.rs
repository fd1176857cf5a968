//! ExecutorService: what this executor is doing, its recent runs, stopping
//! a run, and following a run's output.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use omoi_proto::executor::{self as pb, executor_service_server::ExecutorService};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status};

use crate::executions::StopRequest;
use crate::requests;
use crate::worker::Worker;

pub struct Executor {
    worker: Arc<Worker>,
    runner: &'static str,
}

impl Executor {
    pub fn new(worker: Arc<Worker>, runner: &'static str) -> Self {
        Self { worker, runner }
    }

    fn list(&self, req: pb::ListExecutionsRequest) -> Result<pb::ListExecutionsResponse, Status> {
        let runs = self.worker.executions.recent(requests::list(req)?);
        Ok(pb::ListExecutionsResponse {
            executions: runs.iter().map(|r| r.to_proto()).collect(),
        })
    }

    fn cancel(&self, req: pb::CancelExecutionRequest) -> Result<pb::CancelExecutionResponse, Status> {
        let (task_id, reason) = requests::cancel(req)?;
        let run = self
            .worker
            .executions
            .get_active(task_id)
            .ok_or_else(|| Status::not_found(format!("no run of task {task_id} in progress here")))?;
        let reason = if reason.is_empty() {
            "cancelled by an operator".to_owned()
        } else {
            format!("cancelled by an operator: {reason}")
        };
        // Reported as a retryable failure: the task queue decides whether the
        // task runs again (CancelTask is the way to cancel a task itself).
        run.stop_with(StopRequest { reason, report: true });
        Ok(pb::CancelExecutionResponse {
            execution: Some(run.to_proto()),
        })
    }

    fn output(&self, req: pb::StreamExecutionOutputRequest) -> Result<OutputStream, Status> {
        let task_id = requests::output(req)?;
        let run = self
            .worker
            .executions
            .latest(task_id)
            .ok_or_else(|| Status::not_found(format!("no run of task {task_id} on this executor")))?;
        let (past, mut live) = run.subscribe();
        let (tx, rx) = mpsc::channel(256);
        tokio::spawn(async move {
            let mut next_seq = 0;
            for event in past {
                next_seq = event.seq + 1;
                if tx
                    .send(Ok(pb::StreamExecutionOutputResponse { event: Some(event) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            loop {
                if run.is_finished() && live.is_empty() {
                    return;
                }
                let next = tokio::select! {
                    _ = tx.closed() => return,
                    l = tokio::time::timeout(std::time::Duration::from_millis(500), live.recv()) => l,
                };
                match next {
                    Ok(Ok(event)) if event.seq >= next_seq => {
                        next_seq = event.seq + 1;
                        if tx
                            .send(Ok(pb::StreamExecutionOutputResponse { event: Some(event) }))
                            .await
                            .is_err()
                        {
                            return;
                        }
                    }
                    Ok(Ok(_)) => {}
                    Ok(Err(broadcast::error::RecvError::Lagged(n))) => {
                        let _ = tx
                            .send(Err(Status::resource_exhausted(format!(
                                "fell {n} events behind; stream again to resume from the start"
                            ))))
                            .await;
                        return;
                    }
                    Ok(Err(broadcast::error::RecvError::Closed)) => return,
                    Err(_) => {}
                }
            }
        });
        Ok(ReceiverStream::new(rx))
    }
}

type OutputStream = ReceiverStream<Result<pb::StreamExecutionOutputResponse, Status>>;

#[tonic::async_trait]
impl ExecutorService for Executor {
    async fn get_executor_status(
        &self,
        request: Request<pb::GetExecutorStatusRequest>,
    ) -> Result<Response<pb::GetExecutorStatusResponse>, Status> {
        requests::status(request.into_inner());
        let w = &self.worker;
        Ok(Response::new(pb::GetExecutorStatusResponse {
            agent_id: w.agent_id.to_string(),
            capacity: w.config.capacity,
            running: w.executions.active().iter().map(|r| r.to_proto()).collect(),
            runner: self.runner.to_owned(),
            accepting: w.accepting.load(Ordering::Relaxed),
        }))
    }

    async fn list_executions(
        &self,
        request: Request<pb::ListExecutionsRequest>,
    ) -> Result<Response<pb::ListExecutionsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner())?))
    }

    async fn cancel_execution(
        &self,
        request: Request<pb::CancelExecutionRequest>,
    ) -> Result<Response<pb::CancelExecutionResponse>, Status> {
        Ok(Response::new(self.cancel(request.into_inner())?))
    }

    type StreamExecutionOutputStream = OutputStream;

    async fn stream_execution_output(
        &self,
        request: Request<pb::StreamExecutionOutputRequest>,
    ) -> Result<Response<Self::StreamExecutionOutputStream>, Status> {
        Ok(Response::new(self.output(request.into_inner())?))
    }
}
