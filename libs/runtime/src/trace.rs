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
