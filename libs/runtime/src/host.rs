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
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};

use crate::auth::RequireBearer;
use crate::config::HostArgs;
use crate::grpc;
use crate::metrics::GrpcMetricsLayer;

/// A service's server: metrics around every RPC, then health, reflection
/// and the API.
pub type MeshRouter = Router<Stack<GrpcMetricsLayer, Identity>>;

/// How often readiness is re-checked once ready.
const READINESS_EVERY: Duration = Duration::from_secs(2);

pub struct Host {
    pub name: &'static str,
    args: HostArgs,
    auth: RequireBearer,
    grace: Duration,
    /// Cancelled once the server stopped serving: tracked work ends then.
    background: CancellationToken,
    tasks: JoinSet<()>,
}

impl Host {
    /// Checks the configuration that can be checked before serving (bad
    /// TLS files stop the start here, before anything connects).
    pub fn new(args: &HostArgs, name: &'static str) -> anyhow::Result<Self> {
        args.tls.server(args.tls_client_ca.as_deref())?;
        Ok(Self {
            name,
            args: args.clone(),
            auth: RequireBearer::new(args.auth_token().as_deref()),
            grace: Duration::from_secs(args.shutdown_grace_seconds),
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
        Ok(server(&self.args, health, &self.background)?
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
        if let Some(addr) = self.args.metrics_addr {
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

/// The gRPC server of every omoi process: TLS when configured, the
/// per-connection concurrency limit, a span and metrics per RPC, and
/// grpc.health.v1 (also on the plaintext probe address, when set).
fn server<H: Health>(
    args: &HostArgs,
    health: HealthServer<H>,
    shutdown: &CancellationToken,
) -> anyhow::Result<MeshRouter> {
    if let Some(addr) = args.probe_addr {
        let (health, incoming, stop) = (health.clone(), probe_listener(addr)?, shutdown.clone());
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming_shutdown(incoming, stop.cancelled())
                .await;
            if let Err(e) = served {
                tracing::error!(%addr, error = %e, "probe endpoint failed");
            }
        });
    }
    let mut server = tonic::transport::Server::builder();
    if let Some(tls) = args.tls.server(args.tls_client_ca.as_deref())? {
        server = server
            .tls_config(tls)
            .context("OMOI_TLS_CERT, OMOI_TLS_KEY or OMOI_TLS_CLIENT_CA is not usable")?;
    }
    Ok(server
        .concurrency_limit_per_connection(args.max_concurrent_requests_per_connection.max(1))
        .trace_fn(|req| {
            let path = req.uri().path();
            // Probes and reflection are not worth a trace each.
            let span = if path.starts_with("/grpc.") {
                tracing::debug_span!("grpc", method = path)
            } else {
                tracing::info_span!("grpc", otel.name = path, otel.kind = "server", method = path)
            };
            crate::trace::adopt(&span, &crate::trace::Headers(req.headers()));
            span
        })
        .layer(GrpcMetricsLayer)
        .add_service(health))
}

/// Binds the listen address, or explains what to change.
pub fn listen(addr: std::net::SocketAddr) -> anyhow::Result<TcpIncoming> {
    grpc::bind(addr).map_err(|e| {
        anyhow::anyhow!("cannot listen on {addr} ({e}); set OMOI_LISTEN_ADDR or --listen-addr to a free address")
    })
}

fn probe_listener(addr: std::net::SocketAddr) -> anyhow::Result<TcpIncoming> {
    grpc::bind(addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on {addr} for probes ({e}); set OMOI_PROBE_ADDR to a free address"))
}

/// Runs a binary's main: `result` is its outcome; errors are logged and
/// printed, and become the exit code.
pub fn exit(name: &str, result: anyhow::Result<()>) -> std::process::ExitCode {
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "{name} failed");
            eprintln!("{name}: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
