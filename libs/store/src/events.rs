//! Writing events to the outbox inside a transaction.

use serde_json::Value;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

/// An event to record with a state change.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub event_type: &'static str,
    pub entity_type: &'static str,
    pub entity_id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub payload: Value,
}

impl NewEvent {
    pub fn task(event_type: &'static str, task_id: Uuid, ticket_id: Option<Uuid>, payload: Value) -> Self {
        Self {
            event_type,
            entity_type: "task",
            entity_id: task_id,
            ticket_id,
            payload,
        }
    }
}

/// Appends events to the outbox in one statement.
pub async fn insert(conn: &mut PgConnection, events: &[NewEvent]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    let types: Vec<&str> = events.iter().map(|e| e.event_type).collect();
    let entities: Vec<&str> = events.iter().map(|e| e.entity_type).collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.entity_id).collect();
    let tickets: Vec<Option<Uuid>> = events.iter().map(|e| e.ticket_id).collect();
    let payloads: Vec<String> = events.iter().map(|e| e.payload.to_string()).collect();
    sqlx::query(
        "INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload)
         SELECT e.event_type, e.entity_type, e.entity_id, e.ticket_id, e.payload::jsonb
         FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[])
              WITH ORDINALITY AS e(event_type, entity_type, entity_id, ticket_id, payload, ord)
         ORDER BY e.ord",
    )
    .bind(types)
    .bind(entities)
    .bind(ids)
    .bind(tickets)
    .bind(payloads)
    .execute(conn)
    .await?;
    Ok(())
}
