//! Harness for omoi's integration tests (and the drivers under bench/):
//! isolated databases and NATS topologies, services started in-process or
//! as real processes, clients, scripted agents, stand-ins for the model
//! APIs and GitHub, and readers of the events stream.

pub mod agent;
pub mod browser;
pub mod console;
pub mod events;
pub mod git_http;
pub mod github;
pub mod http;
pub mod infra;
pub mod kube;
pub mod mesh;
pub mod model_api;
pub mod nats_jwt;
pub mod openhands;
pub mod pki;
pub mod process;
pub mod receiver;
pub mod repo;

use std::time::Duration;

use omoi_proto::health::agent_health_service_client::AgentHealthServiceClient;
use omoi_proto::taskqueue::task_queue_service_client::TaskQueueServiceClient;
use omoi_proto::ticket::ticket_service_client::TicketServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::transport::server::TcpIncoming;

pub use infra::{Infra, TestDb};

/// The Python of the pinned test tools (helm-python-sdk,
/// openapi-spec-validator, selenium): `OMOI_HELM_PYTHON`, which tests/run.sh
/// and .ci/run set, or the workspace's `.ci/.venv`.
pub fn tools_python() -> std::path::PathBuf {
    let p = std::env::var("OMOI_HELM_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.ci/.venv/bin/python"));
    assert!(
        p.exists(),
        "{} not found: run the tests with `bash tests/run.sh`, which installs the pinned tools",
        p.display()
    );
    p
}

pub type TaskQueueClient = TaskQueueServiceClient<Channel>;

/// A service served inside the test process.
pub struct InProcess {
    pub url: String,
    pub shutdown: CancellationToken,
    pub handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl InProcess {
    /// Starts a task-queue on a free loopback port and waits until it
    /// reports SERVING.
    pub async fn start(config: omoi_task_queue::Config) -> anyhow::Result<Self> {
        Self::spawn(move |incoming, stop| omoi_task_queue::serve(config, incoming, stop)).await
    }

    pub async fn health(config: omoi_health::Config) -> anyhow::Result<Self> {
        Self::spawn(move |incoming, stop| omoi_health::serve(config, incoming, stop)).await
    }

    pub async fn ticket(config: omoi_ticket::Config) -> anyhow::Result<Self> {
        Self::spawn(move |incoming, stop| omoi_ticket::serve(config, incoming, stop)).await
    }

    /// Serves `serve` on a free loopback port and waits for SERVING.
    pub async fn spawn<F, Fut>(serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpIncoming, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        Self::spawn_on(tokio::net::TcpListener::bind("127.0.0.1:0").await?, serve).await
    }

    /// Serves `serve` on `listener` and waits for SERVING.
    pub async fn spawn_on<F, Fut>(listener: tokio::net::TcpListener, serve: F) -> anyhow::Result<Self>
    where
        F: FnOnce(TcpIncoming, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
    {
        let _ = omoi_runtime::telemetry::init("omoi-tests", omoi_runtime::config::LogFormat::Text, "info");
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let handle = tokio::spawn(serve(omoi_runtime::grpc::incoming(listener), shutdown.clone()));
        wait_serving(&url, Duration::from_secs(30)).await?;
        Ok(Self { url, shutdown, handle })
    }

    pub fn client(&self) -> TaskQueueClient {
        client(&self.url)
    }

    /// Graceful stop, as on SIGTERM.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        self.handle.await?
    }
}

pub type TicketClient = TicketServiceClient<Channel>;
pub type HealthClient = AgentHealthServiceClient<Channel>;

/// A lazily connecting plaintext (or, for `https://`, system-trusted)
/// channel to `url`.
pub fn channel(url: &str) -> Channel {
    omoi_runtime::grpc::Connector::default()
        .channel(url)
        .expect("valid url")
}

/// The grpc.health.v1 status of `service` at `url`.
pub async fn health_status(url: &str, service: &str) -> Result<tonic_health::ServingStatus, String> {
    omoi_runtime::grpc::Connector::default()
        .health_status(url, service)
        .await
}

pub fn ticket_client(url: &str) -> TicketClient {
    TicketServiceClient::new(channel(url))
}

pub fn health_client(url: &str) -> HealthClient {
    AgentHealthServiceClient::new(channel(url))
}

/// The task-queue, health and ticket services of one test, in-process.
pub struct Mesh {
    pub task_queue: InProcess,
    pub health: InProcess,
    pub ticket: InProcess,
}

impl Mesh {
    /// Starts the three services; `tune` adjusts the health configuration
    /// (stale windows for tests).
    pub async fn start(infra: &Infra, tune: impl FnOnce(&mut omoi_health::Config)) -> anyhow::Result<Self> {
        let task_queue = InProcess::start(infra.task_queue_config()).await?;
        let mut health_config = infra.health_config();
        tune(&mut health_config);
        let health = InProcess::health(health_config).await?;
        let ticket = InProcess::ticket(infra.ticket_config(&task_queue.url)).await?;
        Ok(Self {
            task_queue,
            health,
            ticket,
        })
    }

    pub fn tickets(&self) -> TicketClient {
        ticket_client(&self.ticket.url)
    }

    pub fn agents(&self) -> HealthClient {
        health_client(&self.health.url)
    }

    pub fn queue(&self) -> TaskQueueClient {
        self.task_queue.client()
    }

    pub async fn stop(self) -> anyhow::Result<()> {
        self.ticket.stop().await?;
        self.health.stop().await?;
        self.task_queue.stop().await
    }
}

pub fn client(url: &str) -> TaskQueueClient {
    let channel = channel(url);
    TaskQueueServiceClient::new(channel)
        .max_decoding_message_size(64 * 1024 * 1024)
        .max_encoding_message_size(64 * 1024 * 1024)
}

/// Every output line a task's attempts wrote so far, as the queue at
/// `queue_url` streams them.
pub async fn task_output(queue_url: &str, task_id: &str) -> Vec<String> {
    task_events(queue_url, task_id)
        .await
        .into_iter()
        .map(|e| e.text)
        .collect()
}

/// Every event of a task's attempts, as the task queue keeps them.
pub async fn task_events(queue_url: &str, task_id: &str) -> Vec<omoi_proto::common::AgentEvent> {
    use futures::StreamExt;
    client(queue_url)
        .stream_task_output(omoi_proto::taskqueue::StreamTaskOutputRequest {
            task_id: task_id.to_owned(),
            follow: false,
        })
        .await
        .expect("the task's output")
        .into_inner()
        .map(|m| m.expect("an output message").event.expect("an event"))
        .collect()
        .await
}

/// Waits until the server's overall grpc.health.v1 status is SERVING.
pub async fn wait_serving(url: &str, within: Duration) -> anyhow::Result<()> {
    omoi_runtime::grpc::Connector::default()
        .wait_serving(url, within)
        .await
        .map_err(anyhow::Error::msg)
}

/// Polls `check` until it returns Some, or fails after `within`.
pub async fn eventually<T, F, Fut>(within: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Files a ticket; the answer (the ticket and its tasks). Panics with the
/// status when it is refused.
pub async fn file_ticket(
    c: &TicketClient,
    req: omoi_proto::ticket::CreateTicketRequest,
) -> omoi_proto::ticket::CreateTicketResponse {
    c.clone().create_ticket(req).await.expect("CreateTicket").into_inner()
}

/// A ticket with its tasks, as GetTicket answers.
pub async fn read_ticket(c: &TicketClient, id: &str) -> Result<omoi_proto::ticket::GetTicketResponse, tonic::Status> {
    let req = omoi_proto::ticket::GetTicketRequest {
        ticket_id: id.to_owned(),
        ..Default::default()
    };
    Ok(c.clone().get_ticket(req).await?.into_inner())
}

/// The payloads of the ticket's TASK_GUARDIAN_INTERVENED events, in order.
pub async fn interventions(c: &TicketClient, id: &str) -> Vec<serde_json::Value> {
    ticket_history(c, id)
        .await
        .iter()
        .filter(|e| e.event_type == "TASK_GUARDIAN_INTERVENED")
        .map(|e| omoi_proto::convert::struct_to_json(e.payload.as_ref().expect("a payload")))
        .collect()
}

/// Every event of a final ticket, its tasks' included (WatchTicket's
/// history, which ends with the ticket).
pub async fn ticket_history(c: &TicketClient, id: &str) -> Vec<omoi_proto::events::Event> {
    use futures::StreamExt;
    let stream = c
        .clone()
        .watch_ticket(omoi_proto::ticket::WatchTicketRequest { ticket_id: id.into() })
        .await
        .expect("WatchTicket")
        .into_inner();
    tokio::time::timeout(
        Duration::from_secs(30),
        stream.map(|e| e.expect("an event")).collect::<Vec<_>>(),
    )
    .await
    .expect("a final ticket's history ends")
}

/// Waits (up to a minute) until `holds` says yes of the ticket; returns it.
pub async fn wait_ticket_where(
    c: &TicketClient,
    id: &str,
    what: &str,
    holds: impl Fn(&omoi_proto::ticket::Ticket) -> bool,
) -> omoi_proto::ticket::Ticket {
    eventually(Duration::from_secs(60), what, || async {
        let t = read_ticket(c, id).await.ok()?.ticket?;
        holds(&t).then_some(t)
    })
    .await
}

/// Waits (up to a minute) until the ticket has `status`; returns it.
pub async fn wait_ticket(c: &TicketClient, id: &str, status: i32) -> omoi_proto::ticket::GetTicketResponse {
    eventually(
        Duration::from_secs(60),
        &format!("ticket {id} status {status}"),
        || async {
            let t = read_ticket(c, id).await.expect("GetTicket");
            let now = t.ticket.as_ref()?.status;
            // A ticket that failed instead stays failed: say why at once.
            let failed = omoi_proto::common::TicketStatus::Failed as i32;
            if now == failed && status != failed {
                let errors: Vec<&str> = t.tasks.iter().map(|task| task.error_message.as_str()).collect();
                panic!("ticket {id} failed, waiting for status {status}: {errors:?}");
            }
            (now == status).then_some(t)
        },
    )
    .await
}
