//! The relay's side of the outbox: take batches of events in order, delete
//! them once published.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sqlx::PgConnection;
use sqlx::types::Json;
use uuid::Uuid;

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

/// Takes the relay lock for this transaction and the oldest batches, at
/// least one and, past the first, no more than `limit` events in all, in
/// one statement. Takes nothing when the outbox is empty or another relay
/// holds the lock: one relay at a time keeps the stream in commit order for
/// every entity.
pub async fn lock_batch(conn: &mut PgConnection, limit: i64) -> Result<Taken> {
    // The running count of events up to each batch: batches are taken
    // whole, the first even when it alone holds more than the limit.
    let rows: Vec<(i64, Json<Vec<OutboxEvent>>)> = sqlx::query_as(
        "SELECT seq, events FROM (
             SELECT seq, n, events, sum(n) OVER (ORDER BY seq) AS upto
             FROM (SELECT seq, n, events FROM event_batches
                   WHERE pg_try_advisory_xact_lock($2)
                   ORDER BY seq LIMIT $1) oldest
         ) b
         WHERE upto <= $1 OR upto = n
         ORDER BY seq",
    )
    .bind(limit)
    .bind(RELAY_LOCK_KEY)
    .fetch_all(&mut *conn)
    .await?;
    let mut taken = Taken::default();
    for (seq, Json(events)) in rows {
        taken.seqs.push(seq);
        taken.events.extend(events);
    }
    Ok(taken)
}

pub async fn delete(conn: &mut PgConnection, seqs: &[i64]) -> Result<()> {
    sqlx::query("DELETE FROM event_batches WHERE seq = ANY($1)")
        .bind(seqs)
        .execute(conn)
        .await?;
    Ok(())
}

impl Store {
    /// Events waiting to be published.
    pub async fn outbox_backlog(&self) -> Result<i64> {
        Ok(
            sqlx::query_scalar("SELECT coalesce(sum(n), 0)::bigint FROM event_batches")
                .fetch_one(self.pool())
                .await?,
        )
    }

    /// Every event in the outbox, oldest first.
    pub async fn outbox_events(&self) -> Result<Vec<OutboxEvent>> {
        let rows: Vec<Json<Vec<OutboxEvent>>> = sqlx::query_scalar("SELECT events FROM event_batches ORDER BY seq")
            .fetch_all(self.pool())
            .await?;
        Ok(rows.into_iter().flat_map(|Json(events)| events).collect())
    }
}
