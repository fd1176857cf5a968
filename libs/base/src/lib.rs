//! What a database service of omoi (ticket, task-queue, health) runs on,
//! on top of its host (`omoi-runtime`): PostgreSQL and NATS, migrations
//! (retried while the database is down), the outbox relay, vacuum and
//! retention, change announcements, the handlers' error type, and the
//! service's own background loops, started once the schema is there.

pub mod changes;
mod maintenance;
mod relay;
pub mod status;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use omoi_bus::{BusArgs, Topology};
use omoi_runtime::auth::RequireBearer;
use omoi_runtime::background::{Retried, policy, retry};
use omoi_runtime::config::{HostArgs, redact, secret_file};
use omoi_runtime::host::{Host, MeshRouter};
use omoi_store::Store;
use tokio::sync::OnceCell;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tonic::service::Interceptor;
use tonic::transport::server::TcpIncoming;
use tonic::{Request, Status};

pub use status::{ApiError, ApiResult, status};

use relay::Relay;

/// Where a database service finds PostgreSQL, and how it looks after it.
#[derive(Debug, Clone, clap::Args)]
pub struct DatabaseArgs {
    /// PostgreSQL URL.
    #[arg(
        long,
        env = "DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/omoi"
    )]
    pub database_url: String,

    /// A file holding the PostgreSQL URL, read instead of DATABASE_URL (so
    /// that the secret is not in the process's environment). Parsed, the
    /// field holds the file's content.
    #[arg(long, env = "DATABASE_URL_FILE", value_parser = secret_file, hide_env_values = true)]
    pub database_url_file: Option<String>,

    /// Seconds between vacuums of the service's tables that nothing else
    /// vacuums (the server's or the table's autovacuum is off).
    #[arg(long, env = "OMOI_VACUUM_INTERVAL_SECONDS", default_value_t = 30.0)]
    pub vacuum_interval_seconds: f64,
}

impl DatabaseArgs {
    pub fn url(&self) -> &str {
        self.database_url_file.as_deref().unwrap_or(&self.database_url)
    }
}

/// Every setting a database service shares: its host's, NATS's and
/// PostgreSQL's; each service flattens it into its configuration.
#[derive(Debug, Clone, clap::Args)]
pub struct ServiceArgs {
    #[command(flatten)]
    pub host: HostArgs,

    #[command(flatten)]
    pub bus: BusArgs,

    #[command(flatten)]
    pub database: DatabaseArgs,
}

/// What a database service binary does; serving is the default.
#[derive(Debug, Clone, clap::Subcommand)]
pub enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

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
    pub async fn connect(args: &ServiceArgs, name: &'static str, db_max_connections: u32) -> anyhow::Result<Self> {
        let ServiceArgs { host, bus, database } = args;
        let store = Store::connect_lazy(database.url(), db_max_connections)
            .with_context(|| format!("DATABASE_URL {} is not a valid PostgreSQL URL", redact(database.url())))?;
        let host = Host::new(host, name)?;
        let nats = bus.connect(name).await?;
        if omoi_runtime::telemetry::exporting() {
            // Events written to the outbox carry the trace they were written in.
            omoi_store::events::set_trace_source(omoi_runtime::trace::current);
        }
        Ok(Self {
            host,
            store,
            nats,
            topology: bus.topology(),
            database_url: database.url().to_owned(),
            jobs: Vec::new(),
            migrated: Arc::new(OnceCell::new()),
            vacuum_every: Duration::from_secs_f64(database.vacuum_interval_seconds.clamp(0.1, 86_400.0)),
        })
    }

    /// What the service's API is served behind: the bearer token
    /// (`OMOI_AUTH_TOKEN`), then UNAVAILABLE until the schema is migrated —
    /// a call before then would meet tables that are not there yet, and
    /// must be told to come back, not that the server failed.
    pub fn admission(&self) -> Admission {
        Admission {
            auth: self.host.auth(),
            migrated: Arc::clone(&self.migrated),
            service: self.host.name,
        }
    }

    /// Keeps `tables` vacuumed and analyzed when nothing else does (the
    /// server's autovacuum is off, or the table's): a hot table left alone
    /// fills with dead rows and every statement on it slows, until the
    /// queue crawls. Every `OMOI_VACUUM_INTERVAL_SECONDS`; any replica
    /// may, one at a time.
    pub fn spawn_vacuum(&mut self, tables: &'static [&'static str]) {
        let (store, every) = (self.store.clone(), self.vacuum_every);
        self.spawn_after_migration(move |stop| maintenance::vacuum(store, tables, every, stop));
    }

    /// Deletes what is past a retention of `keep_seconds` (0: keep
    /// forever), the value of the setting `setting`, once the schema is
    /// migrated and then every tenth of the retention (a second to a
    /// minute), `prune(store, keep, batch)` taking at most a batch a time
    /// until a pass finds less. Refuses a negative or non-finite retention.
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
        anyhow::ensure!(
            keep_seconds.is_finite() && keep_seconds >= 0.0,
            "{setting} must be 0 (forever) or more, got {keep_seconds}"
        );
        if keep_seconds == 0.0 {
            return Ok(());
        }
        let keep = Duration::from_secs_f64(keep_seconds.min(1e9));
        let store = self.store.clone();
        self.spawn_after_migration(move |stop| maintenance::retention(what, store, keep, prune, stop));
        Ok(())
    }

    /// Runs `job` once the schema is migrated, until the stop token fires
    /// (after the server has stopped serving); the stop waits for it within
    /// the grace period.
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
            // The relay stops after every other loop has: a dispatch round
            // or a lease check still committing when the stop came writes
            // events the relay's drain must still find.
            let relay_stop = CancellationToken::new();
            let relay = tokio::spawn(relay.run(relay_stop.clone(), grace));
            let mut loops = JoinSet::new();
            loops.spawn(maintenance::forget_consumed(
                store.clone(),
                events_max_age,
                background.clone(),
            ));
            // The outbox and the consumers' records, which every service writes.
            loops.spawn(maintenance::vacuum(
                store.clone(),
                &["event_batches", "processed_events"],
                vacuum_every,
                background.clone(),
            ));
            loops.spawn(maintenance::sample_outbox(store, background.clone()));
            for job in jobs {
                loops.spawn(job(background.clone()));
            }
            // The others get half the grace period after the stop to end.
            let others_end = async { while loops.join_next().await.is_some() {} };
            let others_late = async {
                background.cancelled().await;
                tokio::time::sleep(grace / 2).await;
            };
            tokio::select! {
                _ = others_end => {}
                _ = others_late => {}
            }
            relay_stop.cancel();
            let _ = relay.await;
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

/// The interceptor a database service's API is served behind (see
/// [`Base::admission`]).
#[derive(Clone)]
pub struct Admission {
    auth: RequireBearer,
    migrated: Arc<OnceCell<()>>,
    service: &'static str,
}

impl Interceptor for Admission {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let request = self.auth.call(request)?;
        if !self.migrated.initialized() {
            return Err(Status::unavailable(format!(
                "{} is starting: its database schema is not migrated yet; retry",
                self.service
            )));
        }
        Ok(request)
    }
}

/// Migrates, retrying by [`policy::DATABASE`] while the database is not
/// there (or not ready for it); false when `stop` came first.
async fn migrate_until_done(store: &Store, database_url: &str, stop: &CancellationToken) -> bool {
    let migrated = retry(
        "migration",
        policy::DATABASE,
        stop,
        |_| true,
        || async {
            let migrated = async {
                Store::ensure_database(database_url).await?;
                store.migrate().await
            };
            migrated
                .await
                .inspect_err(|e| tracing::warn!(error = %e, "migration failed; retrying"))
        },
    )
    .await;
    matches!(migrated, Retried::Done(()))
}

/// Applies migrations and exits (each service's `migrate` command).
pub async fn migrate(database: &DatabaseArgs) -> anyhow::Result<()> {
    let url = database.url();
    Store::ensure_database(url).await?;
    let store = Store::connect_lazy(url, 2)?;
    store
        .migrate()
        .await
        .with_context(|| format!("migrating {}", redact(url)))?;
    store.close().await;
    Ok(())
}
