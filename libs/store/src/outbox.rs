//! The relay's side of the outbox: take a batch in order, delete it once
//! published.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::{Result, Store};

/// Any value works as long as every relay of one database uses the same.
const RELAY_LOCK_KEY: i64 = 0x6f6d_6f69_0001;

#[derive(Debug, Clone)]
pub struct OutboxEvent {
    pub seq: i64,
    pub id: Uuid,
    pub event_type: String,
    pub entity_type: String,
    pub entity_id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub payload: Value,
    pub occurred_at: DateTime<Utc>,
    pub trace_context: Option<String>,
}

/// Takes the relay lock for this transaction and the oldest `limit` events.
/// Returns `None` when another relay holds the lock: one relay at a time keeps
/// the stream in commit order for every entity.
pub async fn lock_batch(conn: &mut PgConnection, limit: i64) -> Result<Option<Vec<OutboxEvent>>> {
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_xact_lock($1)")
        .bind(RELAY_LOCK_KEY)
        .fetch_one(&mut *conn)
        .await?;
    if !locked {
        return Ok(None);
    }
    let rows = sqlx::query(
        "SELECT seq, id, event_type, entity_type, entity_id, ticket_id, payload, occurred_at, trace_context
         FROM event_outbox ORDER BY seq LIMIT $1",
    )
    .bind(limit)
    .fetch_all(&mut *conn)
    .await?;
    let mut out = Vec::with_capacity(rows.len());
    for row in rows {
        out.push(OutboxEvent {
            seq: row.try_get("seq")?,
            id: row.try_get("id")?,
            event_type: row.try_get("event_type")?,
            entity_type: row.try_get("entity_type")?,
            entity_id: row.try_get("entity_id")?,
            ticket_id: row.try_get("ticket_id")?,
            payload: row.try_get("payload")?,
            occurred_at: row.try_get("occurred_at")?,
            trace_context: row.try_get("trace_context")?,
        });
    }
    Ok(Some(out))
}

pub async fn delete(conn: &mut PgConnection, seqs: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM event_outbox WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(())
}

impl Store {
    /// Events waiting to be published.
    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(sqlx::query_scalar("SELECT count(*) FROM event_outbox")
            .fetch_one(self.pool())
            .await?)
    }
}
