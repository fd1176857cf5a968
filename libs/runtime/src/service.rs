//! The life of an omoi service process, shared by every service: connect to
//! PostgreSQL and NATS, report health, migrate (retrying while the database
//! is down), run the outbox relay and the service's own loops, serve gRPC
//! with health, reflection and auth, and stop cleanly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use omoi_bus::{Relay, Topology};
use omoi_store::Store;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};

use crate::metrics::GrpcMetricsLayer;

use crate::auth::RequireBearer;
use crate::config::CommonArgs;
use crate::grpc;

/// A service's server: metrics around every RPC, then health, reflection
/// and the API.
pub type MeshRouter = Router<Stack<GrpcMetricsLayer, Identity>>;

type Job = Box<dyn FnOnce(CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// A service's shared machinery, from start to stop.
pub struct Base {
    pub name: &'static str,
    pub store: Store,
    pub nats: async_nats::Client,
    pub topology: Topology,
    auth: RequireBearer,
    grace: Duration,
    metrics_addr: Option<std::net::SocketAddr>,
    common: CommonArgs,
    database_url: String,
    jobs: Vec<Job>,
}

impl Base {
    /// Connects lazily to PostgreSQL and NATS: nothing here waits for them,
    /// so the server comes up and reports NOT_SERVING until they are there.
    pub async fn connect(common: &CommonArgs, name: &'static str, db_max_connections: u32) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(&common.database_url, db_max_connections).with_context(|| {
            format!(
                "DATABASE_URL {} is not a valid PostgreSQL URL",
                redact(&common.database_url)
            )
        })?;
        // Bad TLS files stop the start here, before anything connects.
        common.tls.server(common.tls_client_ca.as_deref())?;
        let nats = omoi_bus::connect(&common.nats_url, name).await?;
        Ok(Self {
            name,
            store,
            nats,
            topology: Topology {
                prefix: common.subject_prefix.clone(),
                stream: common.events_stream.clone(),
            },
            auth: RequireBearer::new(common.auth_token.as_deref()),
            grace: Duration::from_secs(common.shutdown_grace_seconds),
            metrics_addr: common.metrics_addr,
            common: common.clone(),
            database_url: common.database_url.clone(),
            jobs: Vec::new(),
        })
    }

    /// The interceptor that enforces `OMOI_AUTH_TOKEN` on the service's API.
    pub fn auth(&self) -> RequireBearer {
        self.auth.clone()
    }

    /// Runs `job` once the schema is migrated, until the stop token fires
    /// (after the server has stopped serving).
    pub fn spawn_after_migration<F, Fut>(&mut self, job: F)
    where
        F: FnOnce(CancellationToken) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        self.jobs.push(Box::new(move |stop| Box::pin(job(stop))));
    }

    /// A server with per-RPC spans, grpc.health.v1 following readiness, and
    /// reflection listing `services`; add the API and pass it to `run`.
    pub async fn router(
        &self,
        services: &[&'static str],
        shutdown: &CancellationToken,
    ) -> anyhow::Result<(MeshRouter, Readiness)> {
        let (reporter, health) = grpc::health_reporter();
        // The reporter starts out SERVING; nothing is ready yet.
        grpc::set_all(&reporter, services, tonic_health::ServingStatus::NotServing).await;
        reporter
            .set_service_status(grpc::LIVENESS, tonic_health::ServingStatus::Serving)
            .await;
        let (reflection_v1, reflection_v1alpha) = grpc::reflection(services)?;
        let readiness = Readiness {
            migrated: Arc::new(OnceCell::new()),
        };
        {
            let (store, nats, migrated) = (self.store.clone(), self.nats.clone(), Arc::clone(&readiness.migrated));
            tokio::spawn(grpc::follow_readiness(
                reporter,
                services.to_vec(),
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
        let router = server(&self.common, health, shutdown)?
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha);
        Ok((router, readiness))
    }

    /// Serves until `shutdown`; then runs `before_stop` (e.g. ending
    /// streams), lets in-flight RPCs finish, stops the background jobs and
    /// flushes the outbox within the grace period.
    pub async fn run(
        self,
        router: MeshRouter,
        readiness: Readiness,
        incoming: TcpIncoming,
        shutdown: CancellationToken,
        before_stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let background = CancellationToken::new();
        let mut tasks = JoinSet::new();
        {
            let (store, background, database_url) = (self.store.clone(), background.clone(), self.database_url.clone());
            let relay = Relay::new(self.store.clone(), self.nats.clone(), self.topology.clone());
            let (jobs, grace, migrated) = (self.jobs, self.grace, readiness.migrated);
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
                let mut loops = JoinSet::new();
                loops.spawn(relay.run(background.clone(), grace));
                loops.spawn(prune_loop(store.clone(), background.clone()));
                loops.spawn(sample_outbox(store.clone(), background.clone()));
                for job in jobs {
                    loops.spawn(job(background.clone()));
                }
                while loops.join_next().await.is_some() {}
            });
        }
        if let Some(addr) = self.metrics_addr {
            let stop = background.clone();
            tasks.spawn(async move {
                if let Err(e) = crate::metrics::serve(addr, stop).await {
                    tracing::error!(%addr, error = %e, "metrics endpoint failed");
                }
            });
        }
        let stop = async move {
            shutdown.cancelled().await;
            before_stop.await;
        };
        tracing::info!(addr = ?incoming.local_addr().ok(), service = self.name, "serving");
        let served = router.serve_with_incoming_shutdown(incoming, stop).await;
        background.cancel();
        // The relay drains within `grace`; give it that long plus a margin.
        let _ = tokio::time::timeout(self.grace + Duration::from_secs(1), async {
            while tasks.join_next().await.is_some() {}
        })
        .await;
        self.store.close().await;
        served.context("gRPC server failed")?;
        tracing::info!(service = self.name, "stopped");
        Ok(())
    }
}

/// The gRPC server of every omoi process: TLS when configured, the
/// per-connection concurrency limit, a span and metrics per RPC, and
/// grpc.health.v1 (also on the plaintext probe address, when set).
pub fn server<H: Health>(
    common: &CommonArgs,
    health: HealthServer<H>,
    shutdown: &CancellationToken,
) -> anyhow::Result<MeshRouter> {
    if let Some(addr) = common.probe_addr {
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
    if let Some(tls) = common.tls.server(common.tls_client_ca.as_deref())? {
        server = server
            .tls_config(tls)
            .context("OMOI_TLS_CERT, OMOI_TLS_KEY or OMOI_TLS_CLIENT_CA is not usable")?;
    }
    Ok(server
        .concurrency_limit_per_connection(common.max_concurrent_requests_per_connection.max(1))
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

/// Forgets consumed-event records once the stream can no longer redeliver
/// them (it keeps events 7 days).
async fn prune_loop(store: Store, stop: CancellationToken) {
    loop {
        match store.prune_processed_events(8).await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "pruned consumed-event records"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning consumed-event records failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(3600)) => {}
        }
    }
}

/// Keeps the outbox backlog gauge current.
async fn sample_outbox(store: Store, stop: CancellationToken) {
    loop {
        if let Ok(n) = store.outbox_backlog().await {
            crate::metrics::OUTBOX_BACKLOG.set(n);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
    }
}

/// Whether the schema is in place (one of the readiness conditions).
pub struct Readiness {
    migrated: Arc<OnceCell<()>>,
}

/// Applies migrations and exits (each service's `migrate` command).
pub async fn migrate(database_url: &str) -> anyhow::Result<()> {
    Store::ensure_database(database_url).await?;
    let store = Store::connect_lazy(database_url, 2)?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {}", redact(database_url)))?;
    store.close().await;
    Ok(())
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

/// Runs a service binary's main: `result` is its outcome; errors are logged
/// and printed, and become the exit code.
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
