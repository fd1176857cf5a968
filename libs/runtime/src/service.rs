//! The life of an omoi service process, shared by every service: connect to
//! PostgreSQL and NATS, report health, migrate (retrying while the database
//! is down), run the outbox relay and the service's own loops, serve gRPC
//! with health, reflection and auth, and stop cleanly.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use omoi_bus::{Relay, Topology};
use omoi_domain::backoff::Backoff;
use omoi_store::Store;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::transport::server::{Router, TcpIncoming};
use tonic_health::pb::health_server::{Health, HealthServer};
use tower::layer::util::{Identity, Stack};

use crate::auth::RequireBearer;
use crate::config::CommonArgs;
use crate::grpc;
use crate::host::Host;
use crate::metrics::GrpcMetricsLayer;

/// A service's server: metrics around every RPC, then health, reflection
/// and the API.
pub type MeshRouter = Router<Stack<GrpcMetricsLayer, Identity>>;

type Job = Box<dyn FnOnce(CancellationToken) -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> + Send + Sync>;

/// The PostgreSQL and NATS part of a service, on top of its [`Host`]:
/// connections, migration (retried while the database is down), the
/// outbox relay, readiness on both, and the service's own loops.
pub struct Base {
    pub host: Host,
    pub store: Store,
    pub nats: async_nats::Client,
    pub topology: Topology,
    database_url: String,
    jobs: Vec<Job>,
    migrated: Arc<OnceCell<()>>,
    vacuum_every: Duration,
}

impl Base {
    /// Connects lazily to PostgreSQL and NATS: nothing here waits for them,
    /// so the server comes up and reports NOT_SERVING until they are there.
    pub async fn connect(common: &CommonArgs, name: &'static str, db_max_connections: u32) -> anyhow::Result<Self> {
        let store = Store::connect_lazy(common.database_url(), db_max_connections).with_context(|| {
            format!(
                "DATABASE_URL {} is not a valid PostgreSQL URL",
                redact(common.database_url())
            )
        })?;
        let host = Host::new(common, name)?;
        let nats = omoi_bus::connect(common.nats_url(), name).await?;
        Ok(Self {
            host,
            store,
            nats,
            topology: common.topology(),
            database_url: common.database_url().to_owned(),
            jobs: Vec::new(),
            migrated: Arc::new(OnceCell::new()),
            vacuum_every: Duration::from_secs_f64(common.vacuum_interval_seconds.clamp(0.1, 86_400.0)),
        })
    }

    /// The interceptor that enforces `OMOI_AUTH_TOKEN` on the service's API.
    pub fn auth(&self) -> RequireBearer {
        self.host.auth()
    }

    /// Keeps `tables` vacuumed and analyzed when nothing else does (the
    /// server's autovacuum is off, or the table's): a hot table left alone
    /// fills with dead rows and every statement on it slows, until the
    /// queue crawls. Every `OMOI_VACUUM_INTERVAL_SECONDS`; any replica
    /// may, one at a time.
    pub fn spawn_vacuum(&mut self, tables: &'static [&'static str]) {
        let (store, every) = (self.store.clone(), self.vacuum_every);
        self.spawn_after_migration(move |stop| vacuum_loop(store, tables, every, stop));
    }

    /// Deletes what is past a retention of `keep_seconds` (0: keep
    /// forever), the value of the setting `setting`, once the schema is
    /// migrated and then every [`prune_interval`], `prune(store, keep,
    /// batch)` taking at most a batch a time until a pass finds less.
    /// Refuses a negative or non-finite retention.
    pub fn spawn_retention<F, Fut>(
        &mut self,
        what: &'static str,
        setting: &str,
        keep_seconds: f64,
        prune: F,
    ) -> anyhow::Result<()>
    where
        F: Fn(Store, Duration, i64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = omoi_store::Result<u64>> + Send + 'static,
    {
        const BATCH: i64 = 1000;
        anyhow::ensure!(
            keep_seconds.is_finite() && keep_seconds >= 0.0,
            "{setting} must be 0 (forever) or more, got {keep_seconds}"
        );
        if keep_seconds == 0.0 {
            return Ok(());
        }
        let keep = Duration::from_secs_f64(keep_seconds.min(1e9));
        let store = self.store.clone();
        let prune = Arc::new(prune);
        self.spawn_after_migration(move |stop| {
            prune_every(what, prune_interval(keep), stop, move || {
                let (store, prune) = (store.clone(), Arc::clone(&prune));
                async move {
                    let mut gone = 0;
                    loop {
                        let n = prune(store.clone(), keep, BATCH).await?;
                        gone += n;
                        if n < BATCH as u64 {
                            return Ok(gone);
                        }
                    }
                }
            })
        });
        Ok(())
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

    /// The host's server, ready once the schema is migrated, NATS is
    /// connected and the database answers; add the API and pass it to `run`.
    pub async fn router(&self, services: &[&'static str], shutdown: &CancellationToken) -> anyhow::Result<MeshRouter> {
        let (store, nats, migrated) = (self.store.clone(), self.nats.clone(), Arc::clone(&self.migrated));
        let ready = move || {
            let (store, nats, migrated) = (store.clone(), nats.clone(), Arc::clone(&migrated));
            async move {
                migrated.initialized()
                    && nats.connection_state() == async_nats::connection::State::Connected
                    && store.ping().await
            }
        };
        self.host.router(services, shutdown, ready).await
    }

    /// Serves until `shutdown`; then runs `before_stop` (e.g. ending
    /// streams), lets in-flight RPCs finish, stops the background jobs and
    /// flushes the outbox within the grace period.
    pub async fn run(
        mut self,
        router: MeshRouter,
        incoming: TcpIncoming,
        shutdown: CancellationToken,
        before_stop: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let background = self.host.background();
        let relay = Relay::new(self.store.clone(), self.nats.clone(), self.topology.clone());
        let (store, database_url, jobs) = (self.store.clone(), self.database_url.clone(), self.jobs);
        let (grace, migrated) = (self.host.grace(), self.migrated);
        let (events_max_age, vacuum_every) = (self.topology.events_max_age, self.vacuum_every);
        self.host.spawn(async move {
            if !migrate_until_done(&store, &database_url, &background).await {
                return;
            }
            let _ = migrated.set(());
            tracing::info!("database migrated");
            let mut loops = JoinSet::new();
            loops.spawn(relay.run(background.clone(), grace));
            loops.spawn(prune_loop(store.clone(), events_max_age, background.clone()));
            // The outbox and the consumers' records, which every service writes.
            loops.spawn(vacuum_loop(
                store.clone(),
                &["event_batches", "processed_events"],
                vacuum_every,
                background.clone(),
            ));
            loops.spawn(sample_outbox(store, background.clone()));
            for job in jobs {
                loops.spawn(job(background.clone()));
            }
            while loops.join_next().await.is_some() {}
        });
        let stop = async move {
            shutdown.cancelled().await;
            before_stop.await;
        };
        let served = self.host.serve(router, incoming, stop).await;
        self.store.close().await;
        served
    }
}

/// Pauses between attempts to reach PostgreSQL: 200 ms doubling to 5 s.
pub fn database_backoff() -> Backoff {
    Backoff::new(Duration::from_millis(200), Duration::from_secs(5))
}

/// Migrates, retrying with backoff while the database is not there; false
/// when `stop` came first.
async fn migrate_until_done(store: &Store, database_url: &str, stop: &CancellationToken) -> bool {
    let mut backoff = database_backoff();
    loop {
        let attempt = async {
            Store::ensure_database(database_url).await?;
            store.migrate().await
        };
        match attempt.await {
            Ok(()) => return true,
            Err(e) => tracing::warn!(error = %e, "migration failed; retrying"),
        }
        tokio::select! {
            _ = stop.cancelled() => return false,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
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

async fn vacuum_loop(store: Store, tables: &'static [&'static str], every: Duration, stop: CancellationToken) {
    let mut told = false;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        match store.vacuum_unattended(tables).await {
            Ok(done) if !done.is_empty() && !told => {
                told = true;
                tracing::info!(tables = ?done, every = ?every, "autovacuum is off for these tables; vacuuming them");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "vacuuming failed"),
        }
    }
}

/// Forgets consumed-event records a day after the stream stops keeping
/// their events (it can no longer redeliver them).
async fn prune_loop(store: Store, keep: Duration, stop: CancellationToken) {
    let keep = keep + Duration::from_secs(86_400);
    prune_every("consumed-event records", Duration::from_secs(3600), stop, move || {
        let store = store.clone();
        async move { store.prune_processed_events(keep).await }
    })
    .await
}

/// Runs a retention pass now and then every `every` until `stop`: `pass`
/// deletes what is past its retention and says how much went.
async fn prune_every<F, Fut>(what: &'static str, every: Duration, stop: CancellationToken, pass: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = omoi_store::Result<u64>>,
{
    loop {
        match pass().await {
            Ok(n) if n > 0 => tracing::info!(removed = n, "removed {what} past their retention"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "removing {what} past their retention failed"),
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// How often a retention of `keep` is applied: a tenth of it, between a
/// second and a minute.
fn prune_interval(keep: Duration) -> Duration {
    (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60))
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
