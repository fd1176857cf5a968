//! The ticket service's whole configuration: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Parser;
use omoi_runtime::config::{Command, CommonArgs, parse_listen};

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
    pub common: CommonArgs,

    /// Address the gRPC server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:50051", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,

    /// The task-queue service.
    #[arg(long, env = "OMOI_TASK_QUEUE_URL", default_value = "http://127.0.0.1:50052")]
    pub task_queue_url: String,

    /// How often tickets whose tasks could not be created yet are retried.
    #[arg(long, env = "OMOI_ENQUEUE_RETRY_SECONDS", default_value_t = 2.0)]
    pub enqueue_retry_seconds: f64,

    /// Most PostgreSQL connections of this process.
    #[arg(long, env = "OMOI_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
}

impl Config {
    /// A configuration from defaults and the environment only (tests, tools).
    pub fn from_env() -> Self {
        Config::parse_from(["omoi-ticket"])
    }
}
