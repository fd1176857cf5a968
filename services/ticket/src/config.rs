//! The ticket service's whole configuration: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Parser;
use omoi_base::{Command, ServiceArgs};
use omoi_domain::ticket::PhaseInstructions;
use omoi_runtime::config::{parse_listen, secret, secret_file};

#[derive(Debug, Clone, Parser)]
#[command(
    name = "omoi-ticket",
    version,
    about = "omoi's tickets: split into phase tasks, status follows them"
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: ServiceArgs,

    /// Address the gRPC server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:50051", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,

    /// The task-queue service.
    #[arg(long, env = "OMOI_TASK_QUEUE_URL", default_value = "http://127.0.0.1:50052")]
    pub task_queue_url: String,

    /// How often tickets whose tasks could not be created yet are retried.
    #[arg(long, env = "OMOI_ENQUEUE_RETRY_SECONDS", default_value_t = 2.0)]
    pub enqueue_retry_seconds: f64,

    /// GitHub API root (GitHub Enterprise: `https://<host>/api/v3`).
    #[arg(long, env = "OMOI_GITHUB_API_URL", default_value = "https://api.github.com")]
    pub github_api_url: String,

    /// Token that opens tickets' pull requests (from a secret; never logged).
    #[arg(long, env = "OMOI_GITHUB_TOKEN", hide_env_values = true)]
    pub github_token: Option<String>,

    /// A file holding OMOI_GITHUB_TOKEN, read instead of it (the secret stays out of
    /// the service's environment). Parsed, the field holds the content.
    #[arg(long, env = "OMOI_GITHUB_TOKEN_FILE", value_parser = secret_file, hide_env_values = true)]
    pub github_token_file: Option<String>,

    /// How often completed tickets are checked for pull requests to open.
    #[arg(long, env = "OMOI_PULL_REQUEST_INTERVAL_SECONDS", default_value_t = 2.0)]
    pub pull_request_interval_seconds: f64,

    /// A JSON object overriding what the default plan tells each phase
    /// (`initial`, `implementation`, `integration`, `refactoring`; any
    /// left out keeps the built-in text). Parsed, the field holds them.
    #[arg(long, env = "OMOI_PHASE_INSTRUCTIONS_FILE", value_parser = phase_instructions, default_value = "")]
    pub phase_instructions: PhaseInstructions,

    /// Seconds a ticket that ended (completed, failed or cancelled) is
    /// kept; then it and its plan are deleted. 0 = keep forever.
    #[arg(long, env = "OMOI_TICKET_RETENTION_SECONDS", default_value_t = 604_800.0)]
    pub ticket_retention_seconds: f64,

    /// Most follow-ups the forge may start on a ticket's pull request (CI
    /// failures, mentions) unless the ticket says otherwise.
    #[arg(long, env = "OMOI_MAX_REACTIONS", default_value_t = 5, value_parser = clap::value_parser!(i32).range(0..=100))]
    pub max_reactions: i32,

    /// What a pull request comment must name to ask the agent for more.
    #[arg(long, env = "OMOI_GITHUB_MENTION", default_value = "@omoi")]
    pub github_mention: String,

    /// Seconds between looks at the open pull requests' checks and reviews
    /// over REST, for deployments GitHub's webhooks cannot reach; 0 = never.
    #[arg(long, env = "OMOI_GITHUB_POLL_SECONDS", default_value_t = 0.0)]
    pub github_poll_seconds: f64,

    /// Repositories (comma list of `owner/name`) whose labelled issues
    /// become tickets; empty = none.
    #[arg(long, env = "OMOI_GITHUB_REPOSITORIES", default_value = "")]
    pub github_repositories: String,

    /// The label that makes an issue a ticket.
    #[arg(long, env = "OMOI_GITHUB_ISSUE_LABEL", default_value = "omoi")]
    pub github_issue_label: String,

    /// The console's address, for links to tickets in what omoi writes on
    /// the forge; empty = no links.
    #[arg(long, env = "OMOI_CONSOLE_URL", default_value = "")]
    pub console_url: String,

    /// Hosts (comma list) notifications may reach over plain http; any
    /// other subscription must be https.
    #[arg(long, env = "OMOI_NOTIFY_ALLOW_HTTP_HOSTS", default_value = "")]
    pub notify_allow_http_hosts: String,

    /// Most one try at a notification may take, connecting included.
    #[arg(long, env = "OMOI_NOTIFY_TIMEOUT_SECONDS", default_value_t = 10.0)]
    pub notify_timeout_seconds: f64,

    /// The wait after a notification's first failed try, doubled after
    /// each one after, up to OMOI_NOTIFY_MAX_BACKOFF_SECONDS (with jitter).
    #[arg(long, env = "OMOI_NOTIFY_BACKOFF_SECONDS", default_value_t = 1.0)]
    pub notify_backoff_seconds: f64,

    #[arg(long, env = "OMOI_NOTIFY_MAX_BACKOFF_SECONDS", default_value_t = 300.0)]
    pub notify_max_backoff_seconds: f64,

    /// Most PostgreSQL connections of this process.
    #[arg(long, env = "OMOI_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
}

/// The phase instructions in `path` (empty: the built-in ones).
fn phase_instructions(path: &str) -> Result<PhaseInstructions, String> {
    if path.is_empty() {
        return Ok(PhaseInstructions::default());
    }
    let text = std::fs::read_to_string(path).map_err(|e| format!("cannot read {path}: {e}"))?;
    serde_json::from_str(&text).map_err(|e| format!("{path}: {e}"))
}

impl Config {
    /// A configuration from defaults and the environment only (tests, tools).
    pub fn from_env() -> Self {
        Config::parse_from(["omoi-ticket"])
    }

    pub fn github_token(&self) -> Option<String> {
        secret(&self.github_token, &self.github_token_file)
    }

    /// Where notifications may go: the allowed http hosts, and the mesh's
    /// own endpoints to keep them from (this service, its task queue,
    /// database, NATS, metrics and the console).
    pub fn notify_targets(&self) -> crate::notify::target::Targets {
        use crate::notify::target::endpoints;
        let mut mesh = vec![(self.listen_addr.ip().to_string(), self.listen_addr.port())];
        if let Some(m) = self.common.host.metrics_addr {
            mesh.push((m.ip().to_string(), m.port()));
        }
        mesh.extend(endpoints(&self.task_queue_url, 80));
        mesh.extend(endpoints(&self.common.database.database_url, 5432));
        mesh.extend(endpoints(&self.common.bus.nats_url, 4222));
        if !self.console_url.is_empty() {
            mesh.extend(endpoints(&self.console_url, 80));
        }
        crate::notify::target::Targets {
            allow_http_hosts: self
                .notify_allow_http_hosts
                .split(',')
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect(),
            mesh,
        }
    }
}
