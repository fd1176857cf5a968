//! W3C trace context across process boundaries: in gRPC metadata, in NATS
//! headers (through the outbox's `trace_context`), and in assignments, so
//! one trace follows a ticket from CreateTicket to its last status change.
//! Without an OTLP exporter spans have no context and nothing is carried.

use std::collections::HashMap;

use opentelemetry::propagation::{Extractor, Injector, TextMapPropagator};
use opentelemetry::trace::TraceContextExt;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// The header (and carrier key) of W3C trace context.
pub const TRACEPARENT: &str = "traceparent";

/// The current span's context as a carrier (`traceparent`, `tracestate`);
/// empty when there is none to carry.
pub fn current_carrier() -> HashMap<String, String> {
    let cx = tracing::Span::current().context();
    let mut carrier = HashMap::new();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    }
    carrier
}

/// The current span's `traceparent`, if it has a context.
pub fn current() -> Option<String> {
    current_carrier().remove(TRACEPARENT)
}

/// Makes `span` a child of the context in `carrier`, when it holds a valid
/// one; call before the span is first entered.
pub fn adopt(span: &tracing::Span, carrier: &dyn Extractor) {
    let cx = TraceContextPropagator::new().extract(carrier);
    if cx.span().span_context().is_valid() {
        // Fails only when the span is disabled or already started: then it
        // simply keeps its own parent.
        let _ = span.set_parent(cx);
    }
}

/// [`adopt`] from a bare `traceparent` value.
pub fn adopt_traceparent(span: &tracing::Span, traceparent: Option<&str>) {
    if let Some(tp) = traceparent {
        adopt(span, &Single(tp));
    }
}

struct Single<'a>(&'a str);

impl Extractor for Single<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        (key == TRACEPARENT).then_some(self.0)
    }

    fn keys(&self) -> Vec<&str> {
        vec![TRACEPARENT]
    }
}

/// Reads trace context from HTTP/2 (gRPC) request headers.
pub struct Headers<'a>(pub &'a http::HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(http::HeaderName::as_str).collect()
    }
}

/// Writes trace context into outgoing gRPC metadata.
pub struct Metadata<'a>(pub &'a mut tonic::metadata::MetadataMap);

impl Injector for Metadata<'_> {
    fn set(&mut self, key: &str, value: String) {
        if let (Ok(k), Ok(v)) = (tonic::metadata::MetadataKey::from_bytes(key.as_bytes()), value.parse()) {
            self.0.insert(k, v);
        }
    }
}

/// Adds the current span's context to outgoing gRPC metadata.
pub fn inject_current(metadata: &mut tonic::metadata::MetadataMap) {
    let cx = tracing::Span::current().context();
    if cx.span().span_context().is_valid() {
        TraceContextPropagator::new().inject_context(&cx, &mut Metadata(metadata));
    }
}

/// The span of work done on behalf of a consumed event, child of the
/// context its publisher recorded.
pub fn consumed(consumer: &str, event_type: &str, traceparent: Option<&str>) -> tracing::Span {
    let span = tracing::info_span!(
        "consume",
        otel.name = format!("{consumer} {event_type}"),
        otel.kind = "consumer",
        event_type,
    );
    adopt_traceparent(&span, traceparent);
    span
}

/// A consumed event's span and the event read as the domain's (id and
/// envelope); None, with a warning in its span, when this version cannot
/// read it.
fn read_consumed(
    consumer: &str,
    event: &omoi_proto::events::Event,
    traceparent: Option<&str>,
) -> (tracing::Span, Option<(uuid::Uuid, omoi_domain::Envelope)>) {
    let span = consumed(consumer, &event.event_type, traceparent);
    let read = event
        .id
        .parse::<uuid::Uuid>()
        .map_err(|e| e.to_string())
        .and_then(|id| Ok((id, omoi_domain::Envelope::try_from(event).map_err(|e| e.to_string())?)));
    match read {
        Ok(read) => (span, Some(read)),
        Err(error) => {
            span.in_scope(|| tracing::warn!(%error, event_id = %event.id, "skipping an unreadable event"));
            (span, None)
        }
    }
}

/// [`omoi_bus::consumer::consume`] with each event read as the domain's
/// (id and envelope) and handled in a span that continues the trace its
/// publisher recorded. Events this version cannot read are skipped.
pub async fn consume<F, Fut>(
    client: async_nats::Client,
    topology: omoi_bus::Topology,
    durable: String,
    filter: String,
    shutdown: tokio_util::sync::CancellationToken,
    mut handle: F,
) where
    F: FnMut(uuid::Uuid, omoi_domain::Envelope) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    use futures::FutureExt as _;
    use tracing::Instrument as _;
    let name = durable.clone();
    omoi_bus::consumer::consume(
        client,
        topology,
        durable,
        filter,
        shutdown,
        move |event, traceparent| {
            let (span, read) = read_consumed(&name, &event, traceparent.as_deref());
            match read {
                Some((id, envelope)) => handle(id, envelope).instrument(span).boxed(),
                None => futures::future::ready(Ok(())).boxed(),
            }
        },
    )
    .await
}

/// [`omoi_bus::consumer::consume_batches`] with the events read as the
/// domain's (id and envelope) and handed over together; `handle` applies
/// them all or none (one transaction), so its one answer is every event's.
/// Each event gets its span, in the trace its publisher recorded, open
/// while its batch is applied. Events this version cannot read are skipped.
pub async fn consume_batches<F, Fut>(
    client: async_nats::Client,
    topology: omoi_bus::Topology,
    durable: String,
    filter: String,
    shutdown: tokio_util::sync::CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<(uuid::Uuid, omoi_domain::Envelope)>) -> Fut,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let name = durable.clone();
    omoi_bus::consumer::consume_batches(client, topology, durable, filter, shutdown, move |events| {
        let n = events.len();
        let mut spans = Vec::with_capacity(n);
        let mut batch = Vec::with_capacity(n);
        for (event, traceparent) in events {
            let (span, read) = read_consumed(&name, &event, traceparent.as_deref());
            batch.extend(read);
            spans.push(span);
        }
        let applied = (!batch.is_empty()).then(|| handle(batch));
        async move {
            let outcome = match applied {
                Some(applied) => applied.await,
                None => Ok(()),
            };
            drop(spans);
            vec![outcome; n]
        }
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_tracer_nothing_is_carried() {
        assert!(current().is_none());
        let mut md = tonic::metadata::MetadataMap::new();
        inject_current(&mut md);
        assert!(md.is_empty());
    }

    #[test]
    fn headers_and_metadata_carry_traceparent() {
        let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
        let mut md = tonic::metadata::MetadataMap::new();
        Metadata(&mut md).set(TRACEPARENT, tp.to_owned());
        let headers = md.into_headers();
        assert_eq!(Headers(&headers).get(TRACEPARENT), Some(tp));
        let cx = TraceContextPropagator::new().extract(&Headers(&headers));
        assert_eq!(
            cx.span().span_context().trace_id().to_string(),
            "4bf92f3577b34da6a3ce929d0e0e4736"
        );
        assert_eq!(Single(tp).get(TRACEPARENT), Some(tp));
    }
}
