//! omoi's agent health service: the agent registry, heartbeats (buffered in
//! memory and written in batches), stale detection with AGENT_STALE events
//! that the task-queue acts on, and health statistics.

pub mod config;
mod registry;
mod requests;
mod service;
mod watch;

use std::sync::Arc;
use std::time::Duration;

use omoi_base::Base;
use omoi_proto::health::agent_health_service_server::AgentHealthServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;
pub use registry::Registry;
pub use service::Health;

pub const SERVICE_NAME: &str = "omoi.health.v1.AgentHealthService";

/// Runs the service on `incoming` until `shutdown`; buffered heartbeats are
/// written before it exits.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    let mut base = Base::connect(&config.common, "omoi-health", config.db_max_connections).await?;
    base.spawn_vacuum(&["agents"]);
    base.spawn_retention(
        "agents gone",
        "OMOI_AGENT_RETENTION_SECONDS",
        config.agent_retention_seconds,
        |store, keep, batch| async move { store.prune_agents(keep, batch).await },
    )?;
    let registry = Arc::new(Registry::new(base.store.clone()));
    let flush_every = Duration::from_millis(config.heartbeat_flush_ms.max(10));
    let stale_after = Duration::from_secs_f64(config.stale_after_seconds.max(0.1));
    let check_every = Duration::from_secs_f64(config.stale_check_interval_seconds.max(0.05));
    {
        let r = Arc::clone(&registry);
        base.spawn_after_migration(move |stop| r.flush_loop(flush_every, stop));
        let r = Arc::clone(&registry);
        base.spawn_after_migration(move |stop| r.stale_loop(stale_after, check_every, stop));
        let (r, nats, topology) = (Arc::clone(&registry), base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| r.count_outcomes(nats, topology, stop));
    }
    let hub = Arc::new(watch::Hub::new());
    {
        let (h, store) = (Arc::clone(&hub), base.store.clone());
        base.spawn_after_migration(move |stop| async move { h.follow_database(store, stop).await });
    }
    let watchers = CancellationToken::new();
    let router = base.router(&[SERVICE_NAME], &shutdown).await?;
    let api = AgentHealthServiceServer::new(Health::new(
        base.store.clone(),
        Arc::clone(&registry),
        config.heartbeat_interval_seconds,
        hub,
        watchers.clone(),
    ))
    .max_decoding_message_size(config.common.host.max_message_bytes)
    .max_encoding_message_size(config.common.host.max_message_bytes);
    let router = router.add_service(InterceptedService::new(api, base.admission()));
    base.run(router, incoming, shutdown, async move { watchers.cancel() })
        .await
}
