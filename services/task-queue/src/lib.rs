//! omoi's task-queue service: a durable priority queue on PostgreSQL with
//! dependencies, retries, timeouts and cancellation, pushing ready tasks to
//! agents over gRPC streams, with every change published on JetStream.

mod batcher;
pub mod config;
mod dispatcher;
mod monitor;
mod output;
mod requests;
mod service;
mod stats;

use std::sync::Arc;
use std::time::Duration;

use omoi_base::Base;
use omoi_domain::validate::MAX_TIMEOUT_SECONDS;
use omoi_proto::taskqueue::task_queue_service_server::TaskQueueServiceServer;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;
pub use dispatcher::Dispatcher;
pub use service::TaskQueue;

pub const SERVICE_NAME: &str = "omoi.taskqueue.v1.TaskQueueService";

/// Runs the service on `incoming` until `shutdown`, then drains: agent
/// streams end (their unstarted tasks return to the queue), in-flight RPCs
/// finish, and the outbox is flushed to JetStream.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    anyhow::ensure!(
        (0..=MAX_TIMEOUT_SECONDS).contains(&config.default_task_timeout_seconds),
        "OMOI_DEFAULT_TASK_TIMEOUT_SECONDS must be 0 (none) to {MAX_TIMEOUT_SECONDS}, got {}",
        config.default_task_timeout_seconds
    );
    anyhow::ensure!(
        config.start_timeout_seconds.is_finite() && (0.0..=86_400.0).contains(&config.start_timeout_seconds),
        "OMOI_START_TIMEOUT_SECONDS must be 0 (never) to 86400, got {}",
        config.start_timeout_seconds
    );
    anyhow::ensure!(
        config.lease_seconds.is_finite() && (0.0..=86_400.0).contains(&config.lease_seconds),
        "OMOI_LEASE_SECONDS must be 0 (never) to 86400, got {}",
        config.lease_seconds
    );
    let mut base = Base::connect(&config.common, "omoi-task-queue", config.db_max_connections).await?;
    base.spawn_vacuum(&["tasks", "task_dependencies"]);
    base.spawn_retention(
        "finished tasks",
        "OMOI_TASK_RETENTION_SECONDS",
        config.task_retention_seconds,
        |store, keep, batch| async move { store.prune_tasks(keep, batch).await },
    )?;
    let dispatcher = Dispatcher::new(
        base.store.clone(),
        Some(base.nats.clone()),
        base.topology.clone(),
        Duration::from_millis(config.dispatch_sweep_ms.max(10)),
        Duration::from_secs(2 * u64::from(config.heartbeat_interval_seconds.max(1))),
    );
    let interval = Duration::from_secs_f64(config.timeout_check_interval_seconds.max(0.05));
    {
        let d = Arc::clone(&dispatcher);
        base.spawn_after_migration(move |stop| d.run(stop));
        let d = Arc::clone(&dispatcher);
        base.spawn_after_migration(move |stop| d.follow_peers(stop));
        let (store, d) = (base.store.clone(), Arc::clone(&dispatcher));
        let leases = monitor::Leases {
            start: (config.start_timeout_seconds > 0.0).then_some(config.start_timeout_seconds),
            running: (config.lease_seconds > 0.0).then_some(config.lease_seconds),
        };
        base.spawn_after_migration(move |stop| monitor::run(store, d, interval, leases, stop));
        let store = base.store.clone();
        base.spawn_after_migration(move |stop| monitor::sample(store, Duration::from_secs(5), stop));
        let (store, d) = (base.store.clone(), Arc::clone(&dispatcher));
        let (nats, topology) = (base.nats.clone(), base.topology.clone());
        base.spawn_after_migration(move |stop| monitor::reclaim_from_stale_agents(nats, topology, store, d, stop));
    }

    let watchers = CancellationToken::new();
    let router = base.router(&[SERVICE_NAME], &shutdown).await?;
    let api = TaskQueueServiceServer::new(TaskQueue::new(
        base.store.clone(),
        Arc::clone(&dispatcher),
        base.nats.clone(),
        base.topology.clone(),
        config.default_task_timeout_seconds,
        watchers.clone(),
    ))
    .max_decoding_message_size(config.common.host.max_message_bytes)
    .max_encoding_message_size(config.common.host.max_message_bytes);
    let router = router.add_service(InterceptedService::new(api, base.admission()));
    let before_stop = async move {
        watchers.cancel();
        dispatcher.close_all().await
    };
    base.run(router, incoming, shutdown, before_stop).await
}
