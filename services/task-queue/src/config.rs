//! The task-queue's whole configuration: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Parser;
use omoi_base::{Command, ServiceArgs};
use omoi_runtime::config::parse_listen;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "omoi-task-queue",
    version,
    about = "omoi's durable priority task queue and dispatcher"
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: ServiceArgs,

    /// Address the gRPC server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:50052", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,

    /// How often running tasks are checked against their deadline.
    #[arg(long, env = "OMOI_TIMEOUT_CHECK_INTERVAL_SECONDS", default_value_t = 10.0)]
    pub timeout_check_interval_seconds: f64,

    /// Deadline of an attempt whose task gives none (timeout_seconds 0), so
    /// that no run holds its task forever; 0 = no deadline.
    #[arg(long, env = "OMOI_DEFAULT_TASK_TIMEOUT_SECONDS", default_value_t = 7200)]
    pub default_task_timeout_seconds: i32,

    /// Start lease: an assignment its agent has not started within this
    /// many seconds goes back to the queue (TASK_REQUEUED), so that a lost
    /// assignment or a vanished agent or replica strands nothing; 0 = never.
    #[arg(long, env = "OMOI_START_TIMEOUT_SECONDS", default_value_t = 60.0)]
    pub start_timeout_seconds: f64,

    /// Running lease: a running task is held this many seconds after its
    /// start, then while its agent's heartbeats list it (or an ExtendLease
    /// holds it); one nobody holds (agent unknown, deregistered, stale, or
    /// no longer listing it) goes back to the queue as a retry. Keep it
    /// above the agents' heartbeat interval; 0 = never.
    #[arg(long, env = "OMOI_LEASE_SECONDS", default_value_t = 90.0)]
    pub lease_seconds: f64,

    /// The agents' heartbeat interval (as the health service tells them):
    /// an agent not heard from for two of them gets no new work, well
    /// before the health service declares it stale.
    #[arg(long, env = "OMOI_HEARTBEAT_INTERVAL_SECONDS", default_value_t = 30)]
    pub heartbeat_interval_seconds: u32,

    /// Longest the dispatcher waits without a wake-up before it looks for
    /// ready tasks anyway (a safety net; enqueues, completions that release
    /// work and completions that free capacity work waits for wake it).
    #[arg(long, env = "OMOI_DISPATCH_SWEEP_MS", default_value_t = 2000)]
    pub dispatch_sweep_ms: u64,

    /// Seconds a finished task is kept (with its result, once its ticket's
    /// other tasks and the tasks it is tied to by dependencies finished as
    /// long ago); then it is deleted and can no longer be read or retried.
    /// 0 = keep forever.
    #[arg(long, env = "OMOI_TASK_RETENTION_SECONDS", default_value_t = 604_800.0)]
    pub task_retention_seconds: f64,

    /// Most PostgreSQL connections of this process.
    #[arg(long, env = "OMOI_DB_MAX_CONNECTIONS", default_value_t = 16)]
    pub db_max_connections: u32,
}

impl Config {
    /// A configuration from defaults and the environment only (tests, tools).
    pub fn from_env() -> Self {
        Config::parse_from(["omoi-task-queue"])
    }
}
