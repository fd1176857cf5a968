//! Isolation on the shared PostgreSQL and NATS: every test gets its own
//! database, subject prefix and stream.

use std::time::Duration;

use omoi_base::DatabaseArgs;
use omoi_bus::{BusArgs, Topology};
use omoi_runtime::config::HostArgs;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

/// The server tests create their databases on; `OMOI_TEST_DATABASE_URL`
/// overrides it.
pub fn admin_url() -> String {
    std::env::var("OMOI_TEST_DATABASE_URL").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_owned())
}

pub fn nats_url() -> String {
    std::env::var("OMOI_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".to_owned())
}

/// A database of its own, dropped by `drop_now` (tests that fail leave it
/// behind for inspection).
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create() -> anyhow::Result<Self> {
        let name = format!("omoi_t_{}", Uuid::new_v4().simple());
        let admin = admin_url();
        let mut conn = PgConnection::connect(&admin).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut conn)
            .await?;
        conn.close().await?;
        let base = admin.rsplit_once('/').map_or(admin.as_str(), |(b, _)| b);
        Ok(Self {
            url: format!("{base}/{name}"),
            name,
        })
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let mut conn = PgConnection::connect(&admin_url()).await?;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "DROP DATABASE IF EXISTS {} WITH (FORCE)",
            self.name
        )))
        .execute(&mut conn)
        .await?;
        Ok(())
    }

    pub async fn connect(&self) -> anyhow::Result<sqlx::PgPool> {
        Ok(sqlx::postgres::PgPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(Duration::from_secs(10))
            .connect(&self.url)
            .await?)
    }
}

/// Everything one test needs: a database, a NATS topology, and a config
/// for the task-queue pointing at both.
pub struct Infra {
    pub db: TestDb,
    pub nats_url: String,
    /// A NATS credentials file the services connect with, when the test's
    /// NATS runs in operator (JWT) mode.
    pub nats_creds: Option<std::path::PathBuf>,
    pub topology: Topology,
}

impl Infra {
    pub async fn new() -> anyhow::Result<Self> {
        let id = Uuid::new_v4().simple().to_string();
        Ok(Self {
            db: TestDb::create().await?,
            nats_url: nats_url(),
            nats_creds: None,
            topology: Topology {
                prefix: format!("t{}", &id[..12]),
                stream: format!("T_{}", &id[..12].to_uppercase()),
                ..Default::default()
            },
        })
    }

    /// A task-queue configuration for this test; tests adjust fields.
    pub fn task_queue_config(&self) -> omoi_task_queue::Config {
        let mut config = omoi_task_queue::Config::from_env();
        self.common(
            &mut config.common.host,
            &mut config.common.bus,
            Some(&mut config.common.database),
        );
        config.timeout_check_interval_seconds = 0.2;
        config.db_max_connections = 8;
        config
    }

    pub fn health_config(&self) -> omoi_health::Config {
        let mut config = omoi_health::Config::from_env();
        self.common(
            &mut config.common.host,
            &mut config.common.bus,
            Some(&mut config.common.database),
        );
        config.stale_check_interval_seconds = 0.2;
        config.heartbeat_flush_ms = 100;
        config.db_max_connections = 4;
        config
    }

    pub fn ticket_config(&self, task_queue_url: &str) -> omoi_ticket::Config {
        let mut config = omoi_ticket::Config::from_env();
        self.common(
            &mut config.common.host,
            &mut config.common.bus,
            Some(&mut config.common.database),
        );
        config.task_queue_url = task_queue_url.to_owned();
        config.enqueue_retry_seconds = 0.2;
        config.db_max_connections = 4;
        config
    }

    /// An in-process executor's configuration: runner `true` (succeeds at
    /// once), pointed at the given services.
    pub fn executor_config(&self, task_queue: &str, health: &str, ticket: &str) -> omoi_executor::Config {
        let mut config = omoi_executor::Config::from_env();
        self.common(&mut config.host, &mut config.bus, None);
        config.task_queue_url = task_queue.to_owned();
        config.health_url = health.to_owned();
        config.ticket_url = ticket.to_owned();
        config.runner_command = Some("true".into());
        // Agents start in their sandbox through the executor's binary, not
        // this test's.
        config.sandbox_init = Some(crate::process::binary("omoi-executor"));
        config.workspace_root = std::env::temp_dir().join(format!("omoi-ws-{}", Uuid::new_v4().simple()));
        config
    }

    /// Points a service's settings at this test's database and NATS topology.
    fn common(&self, host: &mut HostArgs, bus: &mut BusArgs, database: Option<&mut DatabaseArgs>) {
        host.auth_token = None;
        host.shutdown_grace_seconds = 10;
        bus.nats_url = self.nats_url.clone();
        bus.nats_creds_file = self.nats_creds.clone();
        bus.subject_prefix = self.topology.prefix.clone();
        bus.events_stream = self.topology.stream.clone();
        if let Some(database) = database {
            database.database_url = self.db.url.clone();
        }
    }

    /// This test's Object Store bucket of agent session checkpoints.
    pub fn sessions_bucket(&self) -> String {
        format!("{}_SESSIONS", self.topology.stream)
    }

    /// The environment every service process of this test shares.
    pub fn service_env(&self, listen: &str) -> Vec<(String, String)> {
        let creds = self
            .nats_creds
            .iter()
            .map(|c| ("NATS_CREDS_FILE".into(), c.display().to_string()));
        let env = vec![
            ("DATABASE_URL".into(), self.db.url.clone()),
            ("NATS_URL".into(), self.nats_url.clone()),
            ("OMOI_SUBJECT_PREFIX".into(), self.topology.prefix.clone()),
            ("OMOI_EVENTS_STREAM".into(), self.topology.stream.clone()),
            ("OMOI_SESSIONS_BUCKET".into(), self.sessions_bucket()),
            ("OMOI_LISTEN_ADDR".into(), listen.to_owned()),
            ("OMOI_SHUTDOWN_GRACE_SECONDS".into(), "10".into()),
            ("OMOI_DB_MAX_CONNECTIONS".into(), "6".into()),
        ];
        env.into_iter().chain(creds).collect()
    }

    /// The environment a task-queue process needs for this test.
    pub fn task_queue_env(&self, listen: &str) -> Vec<(String, String)> {
        let mut env = self.service_env(listen);
        env.push(("OMOI_TIMEOUT_CHECK_INTERVAL_SECONDS".into(), "0.2".into()));
        env
    }

    /// Drops the database and the streams (events and agent output).
    pub async fn cleanup(self) -> anyhow::Result<()> {
        if let Ok(client) = async_nats::connect(&self.nats_url).await {
            let js = async_nats::jetstream::new(client);
            let _ = js.delete_stream(&self.topology.stream).await;
            let _ = js.delete_stream(self.topology.output_stream()).await;
            let _ = js.delete_object_store(self.sessions_bucket()).await;
        }
        self.db.drop_now().await
    }
}
