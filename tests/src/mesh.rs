//! The whole mesh as real processes, the way pods run it: task-queue,
//! health, ticket and executors whose command runner is the demo agent.

use std::path::PathBuf;
use std::time::Duration;

use crate::process::{Service, binary, free_port};
use omoi_runtime::grpc::Connector;

use crate::{Infra, TicketClient};

pub struct Options {
    pub executors: usize,
    /// Extra environment of every executor (e.g. demo agent knobs).
    pub executor_env: Vec<(String, String)>,
    pub stale_after_seconds: f64,
    pub heartbeat_interval_seconds: u32,
    /// Extra environment of every service process (TLS, tracing).
    pub env: Vec<(String, String)>,
    /// Set: the services serve TLS (configured through `env`), are reached
    /// at https:// URLs, and the mesh's own calls go through this.
    pub tls: Option<Connector>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            executors: 2,
            executor_env: vec![("OMOI_DEMO_SLEEP_MS".into(), "50".into())],
            stale_after_seconds: 90.0,
            heartbeat_interval_seconds: 30,
            env: Vec::new(),
            tls: None,
        }
    }
}

/// Where the services of a [`ProcessMesh`] serve /metrics.
#[derive(Debug, Clone, Copy)]
pub struct MetricsPorts {
    pub task_queue: u16,
    pub health: u16,
    pub ticket: u16,
}

pub struct ProcessMesh {
    pub metrics: MetricsPorts,
    pub task_queue: Service,
    pub health: Service,
    pub ticket: Service,
    pub executors: Vec<Service>,
    pub workspace_root: PathBuf,
    executor_env: Vec<(String, String)>,
    env: Vec<(String, String)>,
    /// The ticket service's and the task queue's, to restart them as they
    /// were.
    ticket_env: Vec<(String, String)>,
    task_queue_env: Vec<(String, String)>,
    connector: Option<Connector>,
}

const WAIT: Duration = Duration::from_secs(60);

impl ProcessMesh {
    pub async fn start(infra: &Infra, options: Options) -> anyhow::Result<Self> {
        let tq_port = free_port();
        let metrics = MetricsPorts {
            task_queue: free_port(),
            health: free_port(),
            ticket: free_port(),
        };
        let mut env = infra.task_queue_env(&format!("127.0.0.1:{tq_port}"));
        env.push(("OMOI_METRICS_ADDR".into(), format!("127.0.0.1:{}", metrics.task_queue)));
        env.extend(options.env.iter().cloned());
        let spawn = |bin: &str, port: u16, env: &[(String, String)]| spawn(bin, port, env, options.tls.is_some());
        let connector = options.tls.clone().unwrap_or_default();
        let task_queue = spawn("omoi-task-queue", tq_port, &env)?;
        let task_queue_env = env;
        wait(&connector, &task_queue.url).await?;
        let h_port = free_port();
        let mut env = infra.service_env(&format!("127.0.0.1:{h_port}"));
        env.push((
            "OMOI_STALE_AFTER_SECONDS".into(),
            options.stale_after_seconds.to_string(),
        ));
        env.push(("OMOI_STALE_CHECK_INTERVAL_SECONDS".into(), "0.2".into()));
        env.push((
            "OMOI_HEARTBEAT_INTERVAL_SECONDS".into(),
            options.heartbeat_interval_seconds.to_string(),
        ));
        env.push(("OMOI_HEARTBEAT_FLUSH_MS".into(), "100".into()));
        env.push(("OMOI_METRICS_ADDR".into(), format!("127.0.0.1:{}", metrics.health)));
        env.extend(options.env.iter().cloned());
        let health = spawn("omoi-health", h_port, &env)?;
        let t_port = free_port();
        let mut env = infra.service_env(&format!("127.0.0.1:{t_port}"));
        env.push(("OMOI_TASK_QUEUE_URL".into(), task_queue.url.clone()));
        env.push(("OMOI_ENQUEUE_RETRY_SECONDS".into(), "0.2".into()));
        env.push(("OMOI_METRICS_ADDR".into(), format!("127.0.0.1:{}", metrics.ticket)));
        env.extend(options.env.iter().cloned());
        let ticket = spawn("omoi-ticket", t_port, &env)?;
        let ticket_env = env;
        wait(&connector, &health.url).await?;
        wait(&connector, &ticket.url).await?;
        let workspace_root = std::env::temp_dir().join(format!("omoi-ws-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&workspace_root)?;
        let mut mesh = Self {
            metrics,
            task_queue,
            health,
            ticket,
            executors: Vec::new(),
            workspace_root,
            executor_env: options.executor_env,
            env: options.env,
            ticket_env,
            task_queue_env,
            connector: options.tls,
        };
        for _ in 0..options.executors {
            mesh.add_executor(infra, &[]).await?;
        }
        Ok(mesh)
    }

    /// Starts one more executor (with `extra` environment) and waits until
    /// it is registered.
    pub async fn add_executor(&mut self, infra: &Infra, extra: &[(String, String)]) -> anyhow::Result<()> {
        let port = free_port();
        let mut env = infra.service_env(&format!("127.0.0.1:{port}"));
        env.extend([
            ("OMOI_TASK_QUEUE_URL".to_string(), self.task_queue.url.clone()),
            ("OMOI_HEALTH_URL".to_string(), self.health.url.clone()),
            ("OMOI_TICKET_URL".to_string(), self.ticket.url.clone()),
        ]);
        env.extend(demo_executor_env(&self.workspace_root));
        env.extend(self.env.iter().cloned());
        env.extend(self.executor_env.iter().cloned());
        env.extend(extra.iter().cloned());
        let executor = spawn("omoi-executor", port, &env, self.connector.is_some())?;
        wait(&self.connector.clone().unwrap_or_default(), &executor.url).await?;
        self.executors.push(executor);
        Ok(())
    }

    pub fn tickets(&self) -> TicketClient {
        match &self.connector {
            Some(c) => TicketClient::new(c.channel(&self.ticket.url).expect("valid url")),
            None => crate::ticket_client(&self.ticket.url),
        }
    }

    /// Kills the ticket service (SIGKILL, mid-whatever) and starts it again
    /// as it was, on its port; returns once it serves.
    pub async fn restart_ticket(&mut self) -> anyhow::Result<()> {
        self.ticket.child.kill().await?;
        let port = self.ticket.port;
        self.ticket = spawn("omoi-ticket", port, &self.ticket_env, self.connector.is_some())?;
        wait(&self.connector.clone().unwrap_or_default(), &self.ticket.url).await
    }

    /// Kills the task queue (SIGKILL) and starts it again as it was, on its
    /// port; returns once it serves.
    pub async fn restart_task_queue(&mut self) -> anyhow::Result<()> {
        self.task_queue.child.kill().await?;
        let port = self.task_queue.port;
        self.task_queue = spawn("omoi-task-queue", port, &self.task_queue_env, self.connector.is_some())?;
        wait(&self.connector.clone().unwrap_or_default(), &self.task_queue.url).await
    }

    /// SIGTERM to everything, executors first; returns their exit codes.
    pub async fn stop(self) -> anyhow::Result<Vec<Option<i32>>> {
        let mut codes = Vec::new();
        for e in self.executors {
            codes.push(e.terminate(WAIT).await?.code());
        }
        codes.push(self.ticket.terminate(WAIT).await?.code());
        codes.push(self.health.terminate(WAIT).await?.code());
        codes.push(self.task_queue.terminate(WAIT).await?.code());
        let _ = std::fs::remove_dir_all(&self.workspace_root);
        Ok(codes)
    }
}

/// What an executor running the demo agent through the command runner
/// needs, with workspaces under `workspace_root`: the agent sees its knobs
/// (OMOI_DEMO_*) and is stopped a second after it is asked to.
pub fn demo_executor_env(workspace_root: &std::path::Path) -> Vec<(String, String)> {
    [
        ("OMOI_RUNNER", "command".to_owned()),
        ("OMOI_RUNNER_COMMAND", binary("omoi-demo-agent").display().to_string()),
        ("OMOI_WORKSPACE_ROOT", workspace_root.display().to_string()),
        (
            "OMOI_RUNNER_ENV_ALLOW",
            "PATH,HOME,OMOI_DEMO_SLEEP_MS,OMOI_DEMO_FAIL,OMOI_DEMO_FAIL_FIRST,OMOI_DEMO_TURNS,OMOI_DEMO_TURN_MS"
                .to_owned(),
        ),
        ("OMOI_KILL_GRACE_SECONDS", "1".to_owned()),
        // A command that starts the demo agent through a shell names it
        // inside its script, where the sandbox cannot see it: show it the
        // binaries' directory.
        (
            "OMOI_AGENT_SANDBOX_READ_ONLY",
            binary("omoi-demo-agent")
                .parent()
                .map(|d| d.display().to_string())
                .unwrap_or_default(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect()
}

/// Starts a service process, reached at https:// when the mesh runs TLS.
fn spawn(bin: &str, port: u16, env: &[(String, String)], tls: bool) -> anyhow::Result<Service> {
    let mut service = Service::spawn(bin, port, env)?;
    if tls {
        service.url = format!("https://127.0.0.1:{port}");
    }
    Ok(service)
}

async fn wait(connector: &Connector, url: &str) -> anyhow::Result<()> {
    connector.wait_serving(url, WAIT).await.map_err(anyhow::Error::msg)
}

/// The text of `GET /metrics` on a local port.
pub async fn scrape(port: u16) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n").await?;
    let mut body = String::new();
    s.read_to_string(&mut body).await?;
    Ok(body)
}

/// The gRPC calls a scrape counts, by method (`Service/Method`, package
/// left out) and summed over their codes.
pub fn calls(text: &str) -> std::collections::BTreeMap<String, u64> {
    let mut out = std::collections::BTreeMap::new();
    for line in text.lines().filter(|l| l.starts_with("omoi_grpc_requests_total{")) {
        let method = line
            .split("method=\"/")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .map(|m| m.rsplit_once('.').map_or(m, |(_, short)| short));
        let count = line.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok());
        if let (Some(method), Some(count)) = (method, count) {
            *out.entry(method.to_owned()).or_default() += count as u64;
        }
    }
    out
}

/// The value of one sample line (`name{labels} value`) in a scrape.
pub fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}
