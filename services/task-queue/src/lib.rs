//! omoi's task-queue service: a durable priority queue on PostgreSQL with
//! dependencies, retries, timeouts and cancellation, pushing ready tasks to
//! agents over gRPC streams, with every change published on JetStream.

mod batcher;
pub mod config;
mod convert;
mod dispatcher;
mod error;
mod monitor;
mod service;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use omoi_bus::{Relay, Topology};
use omoi_proto::taskqueue::task_queue_service_server::TaskQueueServiceServer;
use omoi_runtime::auth::RequireBearer;
use omoi_runtime::grpc;
use omoi_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;
pub use dispatcher::Dispatcher;
pub use service::TaskQueue;

const SERVICE_NAME: &str = "omoi.taskqueue.v1.TaskQueueService";

/// Applies migrations and exits (`omoi-task-queue migrate`).
pub async fn migrate(config: &Config) -> anyhow::Result<()> {
    Store::ensure_database(&config.common.database_url).await?;
    let store = Store::connect_lazy(&config.common.database_url, 2)?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {}", redact(&config.common.database_url)))?;
    store.close().await;
    Ok(())
}

/// Runs the service on `incoming` until `shutdown`, then drains: agent
/// streams end (their unstarted tasks return to the queue), in-flight RPCs
/// finish, and the outbox is flushed to JetStream.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    let common = &config.common;
    let store = Store::connect_lazy(&common.database_url, config.db_max_connections).with_context(|| {
        format!(
            "DATABASE_URL {} is not a valid PostgreSQL URL",
            redact(&common.database_url)
        )
    })?;
    let nats = omoi_bus::connect(&common.nats_url, "omoi-task-queue").await?;
    let topology = Topology {
        prefix: common.subject_prefix.clone(),
        stream: common.events_stream.clone(),
    };
    let grace = Duration::from_secs(common.shutdown_grace_seconds);

    // Background work stops after the server, so that in-flight RPCs can
    // still commit and their events still get published.
    let background = CancellationToken::new();
    let relay_wake = Arc::new(Notify::new());
    let dispatcher = Dispatcher::new(
        store.clone(),
        Arc::clone(&relay_wake),
        Some(nats.clone()),
        topology.clone(),
        Duration::from_millis(config.dispatch_sweep_ms.max(10)),
    );

    let (reporter, health) = grpc::health_reporter();
    let (reflection_v1, reflection_v1alpha) = grpc::reflection(&[SERVICE_NAME])?;
    let migrated = Arc::new(tokio::sync::OnceCell::new());
    {
        let (store, nats, migrated) = (store.clone(), nats.clone(), Arc::clone(&migrated));
        tokio::spawn(grpc::follow_readiness(
            reporter,
            vec![SERVICE_NAME],
            Duration::from_secs(2),
            shutdown.clone(),
            move || {
                let (store, nats, migrated) = (store.clone(), nats.clone(), Arc::clone(&migrated));
                async move {
                    migrated.initialized()
                        && nats.connection_state() == async_nats::connection::State::Connected
                        && store.ping().await
                }
            },
        ));
    }

    // Migrate (retrying while the database is down), then start the loops.
    let mut tasks = tokio::task::JoinSet::new();
    {
        let database_url = common.database_url.clone();
        let (store, background, dispatcher, relay_wake) = (
            store.clone(),
            background.clone(),
            Arc::clone(&dispatcher),
            Arc::clone(&relay_wake),
        );
        let interval = Duration::from_secs_f64(config.timeout_check_interval_seconds.max(0.05));
        let relay = Relay::new(store.clone(), nats.clone(), topology.clone(), Arc::clone(&relay_wake));
        tasks.spawn(async move {
            let mut delay = Duration::from_millis(200);
            loop {
                let attempt = async {
                    Store::ensure_database(&database_url).await?;
                    store.migrate().await
                };
                match attempt.await {
                    Ok(()) => break,
                    Err(e) => tracing::warn!(error = %e, "migration failed; retrying"),
                }
                tokio::select! {
                    _ = background.cancelled() => return,
                    _ = tokio::time::sleep(delay) => delay = (delay * 2).min(Duration::from_secs(5)),
                }
            }
            let _ = migrated.set(());
            tracing::info!("database migrated");
            let mut loops = tokio::task::JoinSet::new();
            loops.spawn(Arc::clone(&dispatcher).run(background.clone()));
            loops.spawn(Arc::clone(&dispatcher).follow_peers(background.clone()));
            loops.spawn(monitor::run(
                store,
                dispatcher,
                relay_wake,
                interval,
                background.clone(),
            ));
            loops.spawn(relay.run(background.clone(), grace));
            while loops.join_next().await.is_some() {}
        });
    }

    let auth = RequireBearer::new(common.auth_token.as_deref());
    let api = TaskQueueServiceServer::new(TaskQueue::new(store.clone(), Arc::clone(&dispatcher), relay_wake))
        .max_decoding_message_size(common.max_message_bytes)
        .max_encoding_message_size(common.max_message_bytes);
    let stop = {
        let (shutdown, dispatcher) = (shutdown.clone(), Arc::clone(&dispatcher));
        async move {
            shutdown.cancelled().await;
            dispatcher.close_all().await;
        }
    };
    tracing::info!(addr = ?incoming.local_addr().ok(), "omoi-task-queue serving");
    let served = tonic::transport::Server::builder()
        .trace_fn(|req| tracing::info_span!("grpc", method = %req.uri().path()))
        .add_service(health)
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(api, auth))
        .serve_with_incoming_shutdown(incoming, stop)
        .await;
    background.cancel();
    // The relay drains within `grace`; give it that long plus a margin.
    let _ = tokio::time::timeout(grace + Duration::from_secs(1), async {
        while tasks.join_next().await.is_some() {}
    })
    .await;
    store.close().await;
    served.context("gRPC server failed")?;
    tracing::info!("omoi-task-queue stopped");
    Ok(())
}

/// A URL with its password hidden, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let creds = &url[scheme + 3..at];
            match creds.find(':') {
                Some(colon) => format!("{}{}:***{}", &url[..scheme + 3], &creds[..colon], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn redact_hides_passwords_only() {
        assert_eq!(super::redact("postgres://u:pw@h/db"), "postgres://u:***@h/db");
        assert_eq!(super::redact("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(super::redact("nats://h:4222"), "nats://h:4222");
    }
}
