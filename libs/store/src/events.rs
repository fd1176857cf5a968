//! Writing events to the outbox inside the transaction of their change.
//! The events and their payloads are the domain's (`omoi_domain::event`).

use chrono::Utc;
use omoi_domain::Envelope;
use sqlx::PgConnection;
use uuid::Uuid;

use crate::Result;
use crate::outbox::OutboxEvent;
use crate::statements::sql;

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

/// Appends events to the outbox as one batch (one row), each with its own
/// trace context (`traces[i]` for `events[i]`).
pub async fn insert_traced(conn: &mut PgConnection, events: &[Envelope], traces: &[Option<String>]) -> Result<()> {
    if events.is_empty() {
        return Ok(());
    }
    debug_assert_eq!(events.len(), traces.len());
    let now = Utc::now();
    let batch: Vec<OutboxEvent> = events
        .iter()
        .zip(traces)
        .map(|(e, trace)| OutboxEvent {
            id: Uuid::now_v7(),
            event_type: e.event.event_type().as_str().to_owned(),
            entity_type: e.entity().as_str().to_owned(),
            entity_id: e.entity_id,
            ticket_id: e.ticket_id,
            payload: e.event.payload(),
            occurred_at: now,
            trace_context: trace.clone(),
        })
        .collect();
    sqlx::query(sql!("INSERT INTO event_batches (n, events) VALUES ($1, $2::json)"))
        .bind(i32::try_from(batch.len()).unwrap_or(i32::MAX))
        .bind(serde_json::to_string(&batch).expect("events always serialize"))
        .execute(conn)
        .await?;
    Ok(())
}

/// The statement part that writes a batch statement's events in the
/// statement itself, so that the change and its events take one round trip
/// and need no transaction of their own: an `INSERT` of one outbox batch
/// (the same shape `insert_traced` writes) from a CTE `ev` with columns
/// `id` (the event id), `ord` (its place in the batch), `entity_id`,
/// `ticket_id`, `payload` (json) and `trace`, nothing when `ev` is empty.
/// The event type and entity type are the parameters named.
macro_rules! insert_events {
    ($event_type:literal, $entity_type:literal) => {
        concat!(
            "INSERT INTO event_batches (n, events)
             SELECT count(*), json_agg(json_build_object(
                        'id', ev.id, 'event_type', ",
            $event_type,
            "::text, 'entity_type', ",
            $entity_type,
            "::text,
                        'entity_id', ev.entity_id, 'ticket_id', ev.ticket_id, 'payload', ev.payload,
                        'occurred_at', now(), 'trace_context', ev.trace) ORDER BY ev.ord)
             FROM ev HAVING count(*) > 0"
        )
    };
}
pub(crate) use insert_events;

/// Fresh event ids for a batch statement's events, one per row it may
/// change: made here (time-ordered, like every event id) and handed to the
/// statement, which uses those of the rows it did change.
pub(crate) fn event_ids(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::now_v7()).collect()
}
