//! Writing events to the outbox inside the transaction of their change.
//! The events and their payloads are the domain's (`omoi_domain::event`).

use omoi_domain::Envelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;

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

/// Appends events to the outbox in one statement, in the current trace.
pub async fn insert(conn: &mut PgConnection, events: &[Envelope]) -> Result<()> {
    let trace = current_trace();
    let traces = vec![trace; events.len()];
    insert_traced(conn, events, &traces).await
}

/// Appends events to the outbox in one statement, each with its own trace
/// context (`traces[i]` for `events[i]`).
pub async fn insert_traced(conn: &mut PgConnection, events: &[Envelope], traces: &[Option<String>]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    debug_assert_eq!(events.len(), traces.len());
    let types: Vec<&str> = events.iter().map(|e| e.event.event_type().as_str()).collect();
    let entities: Vec<&str> = events.iter().map(|e| e.entity().as_str()).collect();
    let ids: Vec<Uuid> = events.iter().map(|e| e.entity_id).collect();
    let tickets: Vec<Option<Uuid>> = events.iter().map(|e| e.ticket_id).collect();
    let payloads: Vec<String> = events.iter().map(|e| e.event.payload().to_string()).collect();
    sqlx::query(
        "INSERT INTO event_outbox (event_type, entity_type, entity_id, ticket_id, payload, trace_context)
         SELECT e.event_type, e.entity_type, e.entity_id, e.ticket_id, e.payload::jsonb, e.trace
         FROM unnest($1::text[], $2::text[], $3::uuid[], $4::uuid[], $5::text[], $6::text[])
              WITH ORDINALITY AS e(event_type, entity_type, entity_id, ticket_id, payload, trace, ord)
         ORDER BY e.ord",
    )
    .bind(types)
    .bind(entities)
    .bind(ids)
    .bind(tickets)
    .bind(payloads)
    .bind(traces)
    .execute(conn)
    .await?;
    Ok(())
}
