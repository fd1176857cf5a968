//! The health service's whole configuration: flags with environment fallbacks.

use std::net::SocketAddr;

use clap::Parser;
use omoi_base::{Command, ServiceArgs};
use omoi_runtime::config::parse_listen;

#[derive(Debug, Clone, Parser)]
#[command(
    name = "omoi-health",
    version,
    about = "omoi's agent registry, heartbeats and stale detection"
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    #[command(flatten)]
    pub common: ServiceArgs,

    /// Address the gRPC server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:50053", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,

    /// Heartbeat period told to agents, in seconds.
    #[arg(long, env = "OMOI_HEARTBEAT_INTERVAL_SECONDS", default_value_t = 30)]
    pub heartbeat_interval_seconds: u32,

    /// Silence after which an agent is stale and its work taken back.
    #[arg(long, env = "OMOI_STALE_AFTER_SECONDS", default_value_t = 90.0)]
    pub stale_after_seconds: f64,

    /// How often agents are checked for staleness.
    #[arg(long, env = "OMOI_STALE_CHECK_INTERVAL_SECONDS", default_value_t = 5.0)]
    pub stale_check_interval_seconds: f64,

    /// Deregistered and stale agents are forgotten after this many seconds
    /// (their rows deleted), so that ListAgents stays readable; 0 = never.
    #[arg(long, env = "OMOI_AGENT_RETENTION_SECONDS", default_value_t = 604_800.0)]
    pub agent_retention_seconds: f64,

    /// How often buffered heartbeats are written to the database.
    #[arg(long, env = "OMOI_HEARTBEAT_FLUSH_MS", default_value_t = 500)]
    pub heartbeat_flush_ms: u64,

    /// Most PostgreSQL connections of this process.
    #[arg(long, env = "OMOI_DB_MAX_CONNECTIONS", default_value_t = 8)]
    pub db_max_connections: u32,
}

impl Config {
    /// A configuration from defaults and the environment only (tests, tools).
    pub fn from_env() -> Self {
        Config::parse_from(["omoi-health"])
    }
}
