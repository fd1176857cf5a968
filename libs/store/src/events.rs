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

static TRACE_SOURCE: std::sync::OnceLock<fn() -> Option<String>> = std::sync::OnceLock::new();

/// Where events get their trace context (a W3C `traceparent`): the binary's
/// tracing set-up installs the reader of its current span. Unset, events
/// carry none.
pub fn set_trace_source(source: fn() -> Option<String>) {
    let _ = TRACE_SOURCE.set(source);
}

/// The trace context of the work being done now, if any.
pub fn current_trace() -> Option<String> {
    TRACE_SOURCE.get().and_then(|source| source())
}

/// Appends events to the outbox in one statement, with the current trace
/// context.
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
        "INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
         SELECT e.event_type, e.entity_type, e.entity_id, e.ticket_id, e.payload::jsonb, $6
         FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[])
              WITH ORDINALITY AS e(event_type, entity_type, entity_id, ticket_id, payload, ord)
         ORDER BY e.ord",
    )
    .bind(types)
    .bind(entities)
    .bind(ids)
    .bind(tickets)
    .bind(payloads)
    .bind(current_trace())
    .execute(conn)
    .await?;
    Ok(())
}
