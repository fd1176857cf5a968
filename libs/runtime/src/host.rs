//! The host every omoi binary runs on, database or not: the gRPC server
//! (TLS, per-connection limit, a span and metrics per RPC), grpc.health.v1
//! with liveness and a readiness check, reflection, bearer auth, the
//! metrics endpoint, the plaintext probe port, and a graceful stop that
//! waits for the work the host tracks.

use std::future::Future;
use std::time::Duration;

use anyhow::Context as _;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::TcpIncoming;

use crate::auth::RequireBearer;
use crate::config::CommonArgs;
use crate::grpc;
use crate::service::{MeshRouter, server};

/// How often readiness is re-checked once ready.
const READINESS_EVERY: Duration = Duration::from_secs(2);

pub struct Host {
    pub name: &'static str,
    common: CommonArgs,
    auth: RequireBearer,
    grace: Duration,
    /// Cancelled once the server stopped serving: tracked work ends then.
    background: CancellationToken,
    tasks: JoinSet<()>,
}

impl Host {
    /// Checks the configuration that can be checked before serving (bad
    /// TLS files stop the start here, before anything connects).
    pub fn new(common: &CommonArgs, name: &'static str) -> anyhow::Result<Self> {
        common.tls.server(common.tls_client_ca.as_deref())?;
        Ok(Self {
            name,
            common: common.clone(),
            auth: RequireBearer::new(common.auth_token().as_deref()),
            grace: Duration::from_secs(common.shutdown_grace_seconds),
            background: CancellationToken::new(),
            tasks: JoinSet::new(),
        })
    }

    /// The interceptor that enforces `OMOI_AUTH_TOKEN` on the API.
    pub fn auth(&self) -> RequireBearer {
        self.auth.clone()
    }

    /// How long a stop may take to finish what is in flight.
    pub fn grace(&self) -> Duration {
        self.grace
    }

    /// Fires once the server has stopped serving; tracked work ends on it.
    pub fn background(&self) -> CancellationToken {
        self.background.clone()
    }

    /// Runs `job` alongside the server; the stop waits for it (within the
    /// grace period), so a job should end when `background()` fires.
    pub fn spawn(&mut self, job: impl Future<Output = ()> + Send + 'static) {
        self.tasks.spawn(job);
    }

    /// A server with per-RPC spans and metrics, reflection listing
    /// `services`, liveness, and grpc.health.v1 that reports `services`
    /// SERVING while `ready()` holds, until `shutdown`.
    pub async fn router<F, Fut>(
        &self,
        services: &[&'static str],
        shutdown: &CancellationToken,
        ready: F,
    ) -> anyhow::Result<MeshRouter>
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = bool> + Send + 'static,
    {
        let (reporter, health) = grpc::health_reporter();
        // The reporter starts out SERVING; nothing is ready yet.
        grpc::set_all(&reporter, services, tonic_health::ServingStatus::NotServing).await;
        reporter
            .set_service_status(grpc::LIVENESS, tonic_health::ServingStatus::Serving)
            .await;
        let (reflection_v1, reflection_v1alpha) = grpc::reflection(services)?;
        tokio::spawn(grpc::follow_readiness(
            reporter,
            services.to_vec(),
            READINESS_EVERY,
            shutdown.clone(),
            ready,
        ));
        // Probes keep answering while the server drains.
        Ok(server(&self.common, health, &self.background)?
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha))
    }

    /// Serves until `stop` completes (the signal, then whatever the service
    /// does before it stops taking calls); lets in-flight RPCs finish, then
    /// ends the tracked work and waits for it within the grace period.
    pub async fn serve(
        mut self,
        router: MeshRouter,
        incoming: TcpIncoming,
        stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        if let Some(addr) = self.common.metrics_addr {
            let stop = self.background.clone();
            self.tasks.spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, stop).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed");
                }
            });
        }
        tracing::info!(addr = ?incoming.local_addr().ok(), service = self.name, "serving");
        let served = router.serve_with_incoming_shutdown(incoming, stop).await;
        self.background.cancel();
        // Tracked work drains within `grace`; give it that long plus a margin.
        let _ = tokio::time::timeout(self.grace + Duration::from_secs(1), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        served.context("gRPC server failed")?;
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}
