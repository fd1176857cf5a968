//! Test agents: a scripted one that the test drives step by step, and a
//! worker pool that completes everything it is given.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as pb};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use uuid::Uuid;

use crate::TaskQueueClient;

/// An agent whose every step the test performs itself.
pub struct ScriptedAgent {
    pub id: Uuid,
    pub client: TaskQueueClient,
    stream: Streaming<pb::WatchAssignmentsResponse>,
}

impl ScriptedAgent {
    pub async fn connect(client: &TaskQueueClient, capacity: i32, phases: Vec<i32>) -> anyhow::Result<Self> {
        Self::connect_as(client, Uuid::new_v4(), capacity, phases).await
    }

    pub async fn connect_as(
        client: &TaskQueueClient,
        id: Uuid,
        capacity: i32,
        phases: Vec<i32>,
    ) -> anyhow::Result<Self> {
        let mut client = client.clone();
        let stream = client
            .watch_assignments(pb::WatchAssignmentsRequest {
                agent_id: id.to_string(),
                phases,
                capacity,
            })
            .await?
            .into_inner();
        Ok(Self { id, client, stream })
    }

    /// The next message on the stream, or None after `within`.
    pub async fn next(&mut self, within: Duration) -> Option<StreamEvent> {
        match tokio::time::timeout(within, self.stream.message()).await {
            Ok(Ok(Some(msg))) => msg.event,
            _ => None,
        }
    }

    pub async fn next_assignment(&mut self, within: Duration) -> Option<pb::Assignment> {
        match self.next(within).await {
            Some(StreamEvent::Assignment(a)) => Some(a),
            Some(StreamEvent::Cancellation(c)) => {
                panic!("expected an assignment, got cancellation {c:?}")
            }
            None => None,
        }
    }

    pub async fn next_cancellation(&mut self, within: Duration) -> Option<pb::Cancellation> {
        match self.next(within).await {
            Some(StreamEvent::Cancellation(c)) => Some(c),
            Some(StreamEvent::Assignment(a)) => {
                panic!("expected a cancellation, got assignment {a:?}")
            }
            None => None,
        }
    }

    pub async fn start(&mut self, a: &pb::Assignment) -> Result<pb::Task, tonic::Status> {
        let task_id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let r = self
            .client
            .start_task(pb::StartTaskRequest {
                task_id,
                attempt: a.attempt,
            })
            .await?;
        Ok(r.into_inner().task.unwrap_or_default())
    }

    pub async fn complete(&mut self, a: &pb::Assignment) -> Result<pb::Task, tonic::Status> {
        let task_id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let r = self
            .client
            .complete_task(pb::CompleteTaskRequest {
                task_id,
                attempt: a.attempt,
                result: None,
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().task.unwrap_or_default())
    }

    /// Completes the attempt, reporting what it spent.
    pub async fn complete_spending(&mut self, a: &pb::Assignment, cost_usd: f64) -> Result<pb::Task, tonic::Status> {
        let task_id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let usage = omoi_proto::common::Usage {
            cost_usd,
            model: "stand-in".into(),
            ..Default::default()
        };
        let r = self
            .client
            .complete_task(pb::CompleteTaskRequest {
                task_id,
                attempt: a.attempt,
                usage: Some(usage),
                ..Default::default()
            })
            .await?;
        Ok(r.into_inner().task.unwrap_or_default())
    }

    pub async fn fail(&mut self, a: &pb::Assignment, message: &str, class: i32) -> Result<pb::Task, tonic::Status> {
        let request = pb::FailTaskRequest {
            error_message: message.to_owned(),
            error_class: class,
            ..Default::default()
        };
        self.send_failure(a, request).await
    }

    /// Reports that the attempt ran past the task's deadline.
    pub async fn timed_out(&mut self, a: &pb::Assignment) -> Result<pb::Task, tonic::Status> {
        let request = pb::FailTaskRequest {
            error_message: "deadline reached".to_owned(),
            timed_out: true,
            ..Default::default()
        };
        self.send_failure(a, request).await
    }

    /// FailTask for `a`'s attempt, with the rest of `request` as given.
    pub async fn send_failure(
        &mut self,
        a: &pb::Assignment,
        mut request: pb::FailTaskRequest,
    ) -> Result<pb::Task, tonic::Status> {
        request.task_id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        request.attempt = a.attempt;
        let r = self.client.fail_task(request).await?;
        Ok(r.into_inner().task.unwrap_or_default())
    }
}

/// Completions seen by a pool of workers: task id -> times completed.
#[derive(Clone, Default)]
pub struct Ledger {
    inner: Arc<Mutex<HashMap<String, u32>>>,
}

impl Ledger {
    pub fn record(&self, task_id: &str) {
        *self.inner.lock().unwrap().entry(task_id.to_owned()).or_insert(0) += 1;
    }

    pub fn completed(&self) -> usize {
        self.inner.lock().unwrap().len()
    }

    pub fn snapshot(&self) -> HashMap<String, u32> {
        self.inner.lock().unwrap().clone()
    }
}

/// Workers that start and complete every task they get, reconnecting (to
/// any of `urls`, round robin) whenever their stream or a report fails.
/// Stale-attempt refusals are expected after a requeue and are skipped.
pub fn spawn_workers(
    urls: Vec<String>,
    agents: usize,
    capacity: i32,
    ledger: Ledger,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..agents)
        .map(|i| {
            let (urls, ledger, stop) = (urls.clone(), ledger.clone(), stop.clone());
            tokio::spawn(async move {
                let id = Uuid::new_v4();
                let mut turn = i;
                while !stop.is_cancelled() {
                    let url = &urls[turn % urls.len()];
                    turn += 1;
                    let client = crate::client(url);
                    let Ok(mut agent) = ScriptedAgent::connect_as(&client, id, capacity, vec![]).await else {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    };
                    loop {
                        let event = tokio::select! {
                            _ = stop.cancelled() => return,
                            e = agent.next(Duration::from_secs(3600)) => e,
                        };
                        match event {
                            Some(StreamEvent::Assignment(a)) => {
                                let id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
                                let c = agent.client.clone();
                                let (ledger, stop) = (ledger.clone(), stop.clone());
                                tokio::spawn(async move {
                                    let attempt = a.attempt;
                                    let started = report(&stop, || {
                                        let mut c1 = c.clone();
                                        let task_id = id.clone();
                                        async move {
                                            c1.start_task(pb::StartTaskRequest { task_id, attempt })
                                                .await
                                                .map(|_| ())
                                        }
                                    })
                                    .await;
                                    if !started {
                                        return;
                                    }
                                    let completed = report(&stop, || {
                                        let task_id = id.clone();
                                        let mut c2 = c.clone();
                                        async move {
                                            c2.complete_task(pb::CompleteTaskRequest {
                                                task_id,
                                                attempt,
                                                result: None,
                                                ..Default::default()
                                            })
                                            .await
                                            .map(|_| ())
                                        }
                                    })
                                    .await;
                                    if completed {
                                        ledger.record(&id);
                                    }
                                });
                            }
                            Some(StreamEvent::Cancellation(_)) => {}
                            None => break,
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            })
        })
        .collect()
}

/// Sends a report until it is answered: a service that is restarting
/// (unavailable, connection refused, a stream reset) gets it again; a
/// refusal (the attempt was taken back) ends it. True when the report was
/// accepted.
async fn report<F, Fut>(stop: &CancellationToken, mut send: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<(), tonic::Status>>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        match send().await {
            Ok(()) => return true,
            // The executor's rule for what is worth sending again.
            Err(s) if omoi_runtime::status::transient(s.code()) => {
                if stop.is_cancelled() || tokio::time::Instant::now() > deadline {
                    return false;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Err(_) => return false,
        }
    }
}
