//! PostgreSQL storage of omoi. All SQL lives here; every state change writes
//! its events to the outbox in the same transaction.

pub mod agents;
mod codes;
pub mod consumed;
mod error;
pub mod events;
pub mod gates;
pub mod limits;
pub mod listen;
pub mod notify;
pub mod outbox;
pub mod pauses;
pub mod pulls;
mod statements;
pub mod tasks;
pub mod tickets;
pub mod turns;

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{ConnectOptions, Connection, PgPool, Postgres, Transaction};
use tokio::sync::Notify;

use crate::statements::sql;

pub use error::{Result, StoreError};
pub use omoi_domain::Task;

/// How long a pooled connection may sit idle and still be used untested.
const IDLE_BEFORE_TEST: Duration = Duration::from_secs(1);

/// The schema history, embedded in every binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations");

/// One page of rows fetched with a limit of `page_size + 1`: the rows, and
/// the position to continue after when there are more.
fn page<T>(mut rows: Vec<T>, page_size: i64, seq: impl Fn(&T) -> i64) -> (Vec<T>, Option<i64>) {
    if rows.len() as i64 > page_size {
        rows.truncate(page_size as usize);
        let next = rows.last().map(seq);
        (rows, next)
    } else {
        (rows, None)
    }
}

/// A handle on the database; cheap to clone.
#[derive(Clone, Debug)]
pub struct Store {
    pool: PgPool,
    /// Signalled after every commit, so the outbox relay publishes what a
    /// write added without anyone having to remember to wake it.
    committed: Arc<Notify>,
}

impl Store {
    /// Connects lazily: the pool opens connections on first use, so a service
    /// can start (and report NOT_SERVING) while the database is still down.
    pub fn connect_lazy(url: &str, max_connections: u32) -> Result<Self> {
        let options = connect_options(url)?;
        let pool = PgPoolOptions::new()
            .max_connections(max_connections)
            .acquire_timeout(Duration::from_secs(5))
            // A connection back in use within a second is alive: testing
            // each acquire would cost a round trip per transaction on the
            // hot path. One that sat idle longer (the database may have
            // restarted meanwhile) is tested first, and replaced if dead.
            .test_before_acquire(false)
            .before_acquire(|conn, meta| {
                Box::pin(async move {
                    if meta.idle_for < IDLE_BEFORE_TEST {
                        return Ok(true);
                    }
                    Ok(conn.ping().await.is_ok())
                })
            })
            .connect_lazy_with(options);
        Ok(Self {
            pool,
            committed: Arc::new(Notify::new()),
        })
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// Fires after a write through this handle (or a clone) committed:
    /// the outbox relay waits on it.
    pub fn committed(&self) -> Arc<Notify> {
        Arc::clone(&self.committed)
    }

    /// Commits a write; the events it put in the outbox are visible now.
    pub(crate) async fn commit(&self, tx: Transaction<'_, Postgres>) -> Result<()> {
        tx.commit().await?;
        self.wrote();
        Ok(())
    }

    /// A statement that wrote events committed on its own (no transaction
    /// of its own around it): they are visible now.
    pub(crate) fn wrote(&self) {
        self.committed.notify_one();
    }

    /// Creates the database named in `url` when it does not exist yet (a
    /// fresh local set-up); a server that refuses is left to the migration
    /// to report.
    pub async fn ensure_database(url: &str) -> Result<()> {
        use sqlx::migrate::MigrateDatabase;
        if !sqlx::Postgres::database_exists(url).await? {
            tracing::info!("creating database");
            if let Err(e) = sqlx::Postgres::create_database(url).await {
                // Lost a race with another replica, or no CREATEDB right.
                tracing::warn!(error = %e, "could not create the database");
            }
        }
        Ok(())
    }

    /// Applies pending migrations. sqlx holds a PostgreSQL advisory lock while
    /// it migrates, so replicas starting together apply each migration once.
    pub async fn migrate(&self) -> Result<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        sqlx::query(sql!("SELECT 1")).execute(&self.pool).await.is_ok()
    }

    pub async fn close(&self) {
        self.pool.close().await;
    }
}

impl Store {
    /// Vacuums and analyzes those of `tables` nothing else looks after (the
    /// server's autovacuum is off, or the table's); a table another vacuum
    /// holds is skipped. Which were vacuumed.
    pub async fn vacuum_unattended(&self, tables: &[&str]) -> Result<Vec<String>> {
        let unattended: Vec<String> = sqlx::query_scalar(sql!(
            "SELECT c.relname::text FROM pg_class c
             WHERE c.relname = ANY($1) AND c.relkind = 'r' AND pg_table_is_visible(c.oid)
               AND (current_setting('autovacuum') = 'off'
                    OR EXISTS (SELECT 1 FROM unnest(c.reloptions) o
                               WHERE o IN ('autovacuum_enabled=false', 'autovacuum_enabled=off',
                                           'autovacuum_enabled=0', 'autovacuum_enabled=no')))
             ORDER BY c.relname"
        ))
        .bind(tables)
        .fetch_all(self.pool())
        .await?;
        for table in &unattended {
            // The names come from the caller's fixed list and pg_class. One
            // process: parallel index vacuuming of a table of millions of
            // rows would take every core of a small server from the queue.
            let sql = format!("VACUUM (SKIP_LOCKED, ANALYZE, PARALLEL 0) {}", quote_ident(table));
            sqlx::raw_sql(sqlx::AssertSqlSafe(sql)).execute(self.pool()).await?;
        }
        Ok(unattended)
    }
}

/// Every connection's settings.
fn connect_options(url: &str) -> Result<PgConnectOptions> {
    let options: PgConnectOptions = url.parse().map_err(StoreError::Database)?;
    Ok(options
        // Every statement here is short and prepared once per connection; a
        // generic plan's estimate for a deep queue can pass the JIT
        // threshold, and compiling it costs hundreds of milliseconds a claim
        // that takes one or two. No parallel workers either: the only
        // statements a plan would give them are background scans (the
        // queue's counts, retention), which on a small server would take
        // every core from the claims for as long as they ran.
        .options([("jit", "off"), ("max_parallel_workers_per_gather", "0")])
        // Room for every statement of the store (about a hundred, the claim
        // alone has eleven), so that none is evicted and prepared again.
        .statement_cache_capacity(256)
        .log_statements(tracing::log::LevelFilter::Trace)
        .log_slow_statements(tracing::log::LevelFilter::Warn, Duration::from_secs(1)))
}

/// A PostgreSQL identifier, quoted.
fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
