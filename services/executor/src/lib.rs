//! omoi's executor: registers as an agent, takes assignments from the task
//! queue, runs each through the configured runner in its own workspace,
//! streams the output, reports the outcome, and drains on SIGTERM.

pub mod config;
mod openhands;
mod runner;
mod runs;
mod service;
mod worker;
pub mod workspace;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use omoi_bus::Topology;
use omoi_proto::executor::executor_service_server::ExecutorServiceServer;
use omoi_runtime::auth::RequireBearer;
use omoi_runtime::grpc;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;
use uuid::Uuid;

pub use config::Config;

pub const SERVICE_NAME: &str = "omoi.executor.v1.ExecutorService";

/// Runs the executor until `shutdown`, then drains: no new work, runs get
/// the grace period to finish, the rest is stopped and handed back.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    let common = config.common.clone();
    let nats = omoi_bus::connect(&common.nats_url, "omoi-executor").await?;
    let topology = Topology {
        prefix: common.subject_prefix.clone(),
        stream: common.events_stream.clone(),
    };
    let agent_id = Uuid::now_v7();
    let runs = Arc::new(runs::Runs::new(agent_id, Some(nats.clone()), topology.clone()));
    let runner = config.runner.as_str();
    let worker = Arc::new(worker::Worker::new(config, Arc::clone(&runs), agent_id)?);
    tracing::info!(%agent_id, runner, "executor starting");

    {
        let (nats, topology) = (nats.clone(), topology.clone());
        tokio::spawn(async move {
            let js = async_nats::jetstream::new(nats);
            let mut delay = Duration::from_millis(200);
            while let Err(e) = omoi_bus::ensure_output_stream(&js, &topology).await {
                tracing::warn!(error = %e, "output stream not ready; retrying");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        });
    }

    let (reporter, health) = grpc::health_reporter();
    grpc::set_all(&reporter, &[SERVICE_NAME], tonic_health::ServingStatus::NotServing).await;
    reporter
        .set_service_status(grpc::LIVENESS, tonic_health::ServingStatus::Serving)
        .await;
    let (reflection_v1, reflection_v1alpha) = grpc::reflection(&[SERVICE_NAME])?;
    {
        let (w, nats) = (Arc::clone(&worker), nats.clone());
        tokio::spawn(grpc::follow_readiness(
            reporter,
            vec![SERVICE_NAME],
            Duration::from_secs(2),
            shutdown.clone(),
            move || {
                let ready = w.registered.load(Ordering::Relaxed)
                    && w.accepting.load(Ordering::Relaxed)
                    && nats.connection_state() == async_nats::connection::State::Connected;
                async move { ready }
            },
        ));
    }
    let stop_taking = CancellationToken::new();
    let stop_heartbeats = CancellationToken::new();
    let metrics_stop = stop_heartbeats.clone();
    let loops = [
        tokio::spawn(Arc::clone(&worker).heartbeat_loop(stop_heartbeats.clone())),
        tokio::spawn(Arc::clone(&worker).assignment_loop(stop_taking.clone())),
    ];
    let api = ExecutorServiceServer::new(service::Executor::new(Arc::clone(&worker), runner))
        .max_decoding_message_size(common.max_message_bytes)
        .max_encoding_message_size(common.max_message_bytes);
    let grace = Duration::from_secs(common.shutdown_grace_seconds);
    let drain = {
        let worker = Arc::clone(&worker);
        async move {
            shutdown.cancelled().await;
            stop_taking.cancel();
            worker.drain(grace).await;
            stop_heartbeats.cancel();
        }
    };
    if let Some(addr) = common.metrics_addr {
        let stop = metrics_stop.clone();
        tokio::spawn(async move {
            if let Err(e) = omoi_runtime::metrics::serve(addr, stop).await {
                tracing::error!(%addr, error = %e, "metrics endpoint failed");
            }
        });
    }
    tracing::info!(addr = ?incoming.local_addr().ok(), "omoi-executor serving");
    let served = omoi_runtime::service::server(&common, health, &metrics_stop)?
        .add_service(reflection_v1)
        .add_service(reflection_v1alpha)
        .add_service(InterceptedService::new(
            api,
            RequireBearer::new(common.auth_token.as_deref()),
        ))
        .serve_with_incoming_shutdown(incoming, drain)
        .await;
    for l in loops {
        let _ = l.await;
    }
    // Output lines still in flight to NATS.
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    served?;
    tracing::info!("omoi-executor stopped");
    Ok(())
}
