//! The relay's side of the outbox: take batches of events in order, delete
//! them once published.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::postgres::PgConnectOptions;
use sqlx::types::Json;
use sqlx::{Connection, PgConnection};
use uuid::Uuid;

use crate::statements::sql;
use crate::{Result, Store};

/// Any value works as long as every relay of one database uses the same.
const RELAY_LOCK_KEY: i64 = 0x6f6d_6f69_0001;

/// One event as the outbox keeps it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutboxEvent {
    pub id: Uuid,
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
    pub trace_context: Option<String>,
}

/// Events taken from the outbox: the batches' positions (to delete them
/// once published) and their events, in order.
#[derive(Debug, Default)]
pub struct Taken {
    pub seqs: Vec<i64>,
    pub events: Vec<OutboxEvent>,
}

/// The relay's own database session, outside the pool. It holds the relay
/// lock from taking batches until they are published and deleted, one
/// relay at a time keeping the stream in commit order for every entity; the
/// lock is the session's, so a relay that dies (or whose session is
/// dropped) frees it at once. Each step is one autocommit statement: two
/// round trips a batch where a transaction took four.
///
/// Its deletes commit without waiting for the WAL flush
/// (`synchronous_commit = off`): a delete lost in a crash only republishes
/// events JetStream already has, and the stream's duplicate window (keyed
/// by event id) drops the copies, as after a crash between publish and
/// delete. Nothing acknowledged to anyone is written on this session.
pub struct RelaySession {
    conn: PgConnection,
}

impl Store {
    /// Opens a relay session (a connection of its own, with the pool's
    /// settings).
    pub async fn relay_session(&self) -> Result<RelaySession> {
        Ok(RelaySession {
            conn: PgConnection::connect_with(&relay_options(self.pool().connect_options().as_ref())).await?,
        })
    }
}

/// Whether the lock was taken, and one batch (none when the outbox is
/// empty or the lock held elsewhere).
type TakenRow = (bool, Option<i64>, Option<Json<Vec<OutboxEvent>>>);

/// The pool's connection settings, with deletes that do not wait for the
/// WAL flush.
fn relay_options(pool: &PgConnectOptions) -> PgConnectOptions {
    pool.clone().options([("synchronous_commit", "off")])
}

impl RelaySession {
    /// Takes the relay lock and the oldest batches, at least one and, past
    /// the first, no more than `limit` events in all, in one statement.
    /// Some: this session holds the lock until `finish` or `release`.
    /// None: nothing to publish, the outbox is empty (the lock is given back
    /// at once) or another relay holds the lock.
    pub async fn take(&mut self, limit: i64) -> Result<Option<Taken>> {
        // The lock is tried once (a materialized CTE), so the session holds
        // it at most once and one unlock frees it. The running count of
        // events up to each batch: batches are taken whole, the first even
        // when it alone holds more than the limit.
        let rows: Vec<TakenRow> = sqlx::query_as(sql!(
            "WITH lock AS MATERIALIZED (SELECT pg_try_advisory_lock($2) AS held)
             SELECT lock.held, b.seq, b.events FROM lock LEFT JOIN LATERAL (
                 SELECT seq, events FROM (
                     SELECT seq, n, events, sum(n) OVER (ORDER BY seq) AS upto
                     FROM (SELECT seq, n, events FROM event_batches
                           WHERE lock.held ORDER BY seq LIMIT $1) oldest
                 ) counted
                 WHERE upto <= $1 OR upto = n
             ) b ON true
             ORDER BY b.seq"
        ))
        .bind(limit)
        .bind(RELAY_LOCK_KEY)
        .fetch_all(&mut self.conn)
        .await?;
        let held = rows.first().is_some_and(|(held, _, _)| *held);
        let mut taken = Taken::default();
        for (_, seq, events) in rows {
            if let (Some(seq), Some(Json(events))) = (seq, events) {
                taken.seqs.push(seq);
                taken.events.extend(events);
            }
        }
        if !held {
            return Ok(None);
        }
        if taken.seqs.is_empty() {
            self.release().await?;
            return Ok(None);
        }
        Ok(Some(taken))
    }

    /// Deletes the published batches and gives the lock back, in one
    /// statement.
    pub async fn finish(&mut self, seqs: &[i64]) -> Result<()> {
        sqlx::query(sql!(
            "WITH gone AS (DELETE FROM event_batches WHERE seq = ANY($1))
             SELECT pg_advisory_unlock($2)"
        ))
        .bind(seqs)
        .bind(RELAY_LOCK_KEY)
        .execute(&mut self.conn)
        .await?;
        Ok(())
    }

    /// Gives the lock back, leaving the batches for the next relay.
    pub async fn release(&mut self) -> Result<()> {
        sqlx::query(sql!("SELECT pg_advisory_unlock($1)"))
            .bind(RELAY_LOCK_KEY)
            .execute(&mut self.conn)
            .await?;
        Ok(())
    }

    /// Ends the session cleanly (a dropped one ends when the server sees
    /// its socket close).
    pub async fn close(self) {
        let _ = self.conn.close().await;
    }
}

impl Store {
    /// Events waiting to be published.
    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar(sql!("SELECT coalesce(sum(n), 0)::bigint FROM event_batches"))
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Every event in the outbox, oldest first.
    pub async fn outbox_events(&self) -> Result<Vec<OutboxEvent>> {
        let rows: Vec<Json<Vec<OutboxEvent>>> =
            sqlx::query_scalar(sql!("SELECT events FROM event_batches ORDER BY seq"))
                .fetch_all(self.pool())
                .await?;
        Ok(rows.into_iter().flat_map(|Json(events)| events).collect())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_relay_session_keeps_the_pools_settings_and_only_its_deletes_skip_the_flush() {
        let pool = crate::connect_options("postgres://omoi@db/omoi").unwrap();
        let relay = relay_options(&pool);
        let settings = relay.get_options().unwrap_or_default();
        assert!(settings.contains("jit=off"), "{settings}");
        assert!(settings.contains("synchronous_commit=off"), "{settings}");
        assert!(!pool.get_options().unwrap_or_default().contains("synchronous_commit"));
        assert_eq!((relay.get_host(), relay.get_database()), ("db", Some("omoi")));
    }
}
