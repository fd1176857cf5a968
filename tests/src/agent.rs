//! Test agents: a scripted one that the test drives step by step, and a
//! worker pool that completes everything it is given.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as pb};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;
use uuid::Uuid;

use crate::{HealthClient, TaskQueueClient};

/// Registers an agent of `agent_type` with the health service behind any
/// transport; its id.
pub async fn register<T>(
    health: &mut omoi_proto::health::agent_health_service_client::AgentHealthServiceClient<T>,
    agent_type: &str,
    capacity: i32,
) -> anyhow::Result<String>
where
    T: tonic::client::GrpcService<tonic::body::Body>,
    T::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    T::ResponseBody: hyper::body::Body<Data = bytes::Bytes> + Send + 'static,
    <T::ResponseBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>> + Send,
{
    let agent = health
        .register_agent(omoi_proto::health::RegisterAgentRequest {
            agent_type: agent_type.to_owned(),
            capacity,
            ..Default::default()
        })
        .await?
        .into_inner()
        .agent
        .ok_or_else(|| anyhow::anyhow!("RegisterAgent answered no agent"))?;
    Ok(agent.id)
}

/// An agent registered with the health service, heartbeating every 300 ms
/// (listing the tasks it started and has not reported) until dropped.
pub struct Registered {
    pub id: Uuid,
    running: Arc<Mutex<HashSet<String>>>,
    beats: tokio::task::AbortHandle,
}

impl Registered {
    pub async fn new(health: &HealthClient, capacity: i32) -> anyhow::Result<Self> {
        let mut h = health.clone();
        let id: Uuid = register(&mut h, "scripted", capacity).await?.parse()?;
        let running = Arc::new(Mutex::new(HashSet::new()));
        let listed = Arc::clone(&running);
        let beats = tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let running_task_ids = listed.lock().unwrap().iter().cloned().collect();
                // A health service that is down or restarting hears the next one.
                let _ = h
                    .heartbeat(omoi_proto::health::HeartbeatRequest {
                        agent_id: id.to_string(),
                        running_task_ids,
                    })
                    .await;
            }
        })
        .abort_handle();
        Ok(Self { id, running, beats })
    }

    fn started(&self, task_id: &str) {
        self.running.lock().unwrap().insert(task_id.to_owned());
    }

    fn reported(&self, task_id: &str) {
        self.running.lock().unwrap().remove(task_id);
    }
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.beats.abort();
    }
}

/// An agent whose every step the test performs itself.
pub struct ScriptedAgent {
    pub id: Uuid,
    pub client: TaskQueueClient,
    stream: Streaming<pb::WatchAssignmentsResponse>,
    registered: Option<Registered>,
}

impl ScriptedAgent {
    /// A new agent, registered with the health service and heartbeating
    /// while it lives.
    pub async fn connect(
        client: &TaskQueueClient,
        health: &HealthClient,
        capacity: i32,
        phases: Vec<i32>,
    ) -> anyhow::Result<Self> {
        let registered = Registered::new(health, capacity).await?;
        let mut agent = Self::connect_as(client, registered.id, capacity, phases).await?;
        agent.registered = Some(registered);
        Ok(agent)
    }

    /// The stream of an agent the test registered (and heartbeats for)
    /// itself.
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
        Ok(Self {
            id,
            client,
            stream,
            registered: None,
        })
    }

    fn note(&self, task_id: &str, started: bool) {
        if let Some(r) = &self.registered {
            if started {
                r.started(task_id);
            } else {
                r.reported(task_id);
            }
        }
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
                task_id: task_id.clone(),
                attempt: a.attempt,
            })
            .await?;
        self.note(&task_id, true);
        Ok(r.into_inner().task.unwrap_or_default())
    }

    pub async fn complete(&mut self, a: &pb::Assignment) -> Result<pb::Task, tonic::Status> {
        self.send_completion(a, None).await
    }

    /// Completes the attempt, reporting what it spent.
    pub async fn complete_spending(&mut self, a: &pb::Assignment, cost_usd: f64) -> Result<pb::Task, tonic::Status> {
        let usage = omoi_proto::common::Usage {
            cost_usd,
            model: "stand-in".into(),
            ..Default::default()
        };
        self.send_completion(a, Some(usage)).await
    }

    async fn send_completion(
        &mut self,
        a: &pb::Assignment,
        usage: Option<omoi_proto::common::Usage>,
    ) -> Result<pb::Task, tonic::Status> {
        let task_id = a.task.as_ref().map(|t| t.id.clone()).unwrap_or_default();
        let r = self
            .client
            .complete_task(pb::CompleteTaskRequest {
                task_id: task_id.clone(),
                attempt: a.attempt,
                usage,
                ..Default::default()
            })
            .await;
        // Reported, accepted or not: the agent is done with it.
        self.note(&task_id, false);
        Ok(r?.into_inner().task.unwrap_or_default())
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
        let task_id = request.task_id.clone();
        let r = self.client.fail_task(request).await;
        self.note(&task_id, false);
        Ok(r?.into_inner().task.unwrap_or_default())
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

/// Workers, each registered with `health`, that start and complete every
/// task they get, reconnecting (to any of `urls`, round robin) whenever
/// their stream or a report fails.
/// Stale-attempt refusals are expected after a requeue and are skipped.
pub fn spawn_workers(
    urls: Vec<String>,
    health: HealthClient,
    agents: usize,
    capacity: i32,
    ledger: Ledger,
    stop: CancellationToken,
) -> Vec<tokio::task::JoinHandle<()>> {
    (0..agents)
        .map(|i| {
            let (urls, ledger, stop, health) = (urls.clone(), ledger.clone(), stop.clone(), health.clone());
            tokio::spawn(async move {
                // Heartbeats listing nothing: tasks here end in moments.
                let registered = loop {
                    match Registered::new(&health, capacity).await {
                        Ok(r) => break r,
                        Err(_) if !stop.is_cancelled() => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(_) => return,
                    }
                };
                let id = registered.id;
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
