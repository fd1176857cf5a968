//! omoi's executor: registers as an agent, takes assignments from the task
//! queue, runs each through the configured runner in its own workspace,
//! streams the output, reports the outcome, and drains on SIGTERM.

mod agent_user;
mod check;
pub mod config;
mod events;
mod executions;
pub mod git;
pub mod git_cache;
mod publish;
mod requests;
mod reuse;
mod runners;
pub mod sandbox;
mod service;
mod sessions;
mod worker;
pub mod workspace;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use omoi_bus::Topology;
use omoi_proto::executor::executor_service_server::ExecutorServiceServer;
use omoi_runtime::background::{policy, retry};
use omoi_runtime::host::Host;
use tokio_util::sync::CancellationToken;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::server::TcpIncoming;

pub use config::Config;

pub const SERVICE_NAME: &str = "omoi.executor.v1.ExecutorService";

/// Runs the executor until `shutdown`, then drains: no new work, runs get
/// the grace period to finish, the rest is stopped and handed back.
pub async fn serve(config: Config, incoming: TcpIncoming, shutdown: CancellationToken) -> anyhow::Result<()> {
    agent_user::protect_executor();
    let mut host = Host::new(&config.host, "omoi-executor")?;
    let nats = config.bus.connect("omoi-executor").await?;
    let topology = config.bus.topology();
    let max_message_bytes = config.host.max_message_bytes;
    let agent_id = config.agent_id();
    let executions = Arc::new(executions::Executions::new(
        agent_id,
        Some(nats.clone()),
        topology.clone(),
    ));
    let runner = config.runner.as_str();
    let worker = Arc::new(worker::Worker::new(
        config,
        Arc::clone(&executions),
        agent_id,
        nats.clone(),
    )?);
    if let Some(sandbox) = &worker.sandbox {
        sandbox.sweep().await?;
    }
    tracing::info!(%agent_id, runner, "executor starting");
    host.spawn(ensure_output_stream(nats.clone(), topology, host.background()));

    let ready = {
        let (w, nats) = (Arc::clone(&worker), nats.clone());
        move || {
            let ready = *w.registered.borrow()
                && w.accepting.load(Ordering::Relaxed)
                && nats.connection_state() == async_nats::connection::State::Connected;
            async move { ready }
        }
    };
    let router = host.router(&[SERVICE_NAME], &shutdown, ready).await?;
    let stop_taking = CancellationToken::new();
    let stop_heartbeats = CancellationToken::new();
    host.spawn(Arc::clone(&worker).heartbeat_loop(stop_heartbeats.clone()));
    host.spawn(Arc::clone(&worker).assignment_loop(stop_taking.clone()));
    let api = ExecutorServiceServer::new(service::Executor::new(Arc::clone(&worker), runner))
        .max_decoding_message_size(max_message_bytes)
        .max_encoding_message_size(max_message_bytes);
    let router = router.add_service(InterceptedService::new(api, host.auth()));
    let grace = host.grace();
    let drain = async move {
        shutdown.cancelled().await;
        stop_taking.cancel();
        worker.drain(grace).await;
        stop_heartbeats.cancel();
    };
    let served = host.serve(router, incoming, drain).await;
    // Output lines still in flight to NATS.
    let _ = tokio::time::timeout(Duration::from_secs(2), nats.flush()).await;
    served
}

/// Creates the output stream, retrying by [`policy::NATS`] until NATS has
/// it (or the stop).
async fn ensure_output_stream(nats: async_nats::Client, topology: Topology, stop: CancellationToken) {
    let js = async_nats::jetstream::new(nats);
    let (js, topology) = (&js, &topology);
    retry(
        "creating the output stream",
        policy::NATS,
        &stop,
        |_| true,
        move || async move {
            omoi_bus::ensure_output_stream(js, topology)
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "output stream not ready; retrying"))
        },
    )
    .await;
}
