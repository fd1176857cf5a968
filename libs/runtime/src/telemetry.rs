//! Logging and tracing set-up: `tracing` to stdout (text or JSON), and spans
//! exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` is set.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::LogFormat;

/// What is exported as spans: omoi's own at info, not its libraries' inner workings.
const TRACE_FILTER: &str = "info,h2=warn,hyper=warn,hyper_util=warn,tower=warn,tonic=warn,sqlx=warn,async_nats=warn";

/// Whether this process exports spans: only then is there a trace context
/// worth carrying (e.g. into the events it writes).
static EXPORTING: AtomicBool = AtomicBool::new(false);

pub fn exporting() -> bool {
    EXPORTING.load(Ordering::Relaxed)
}

/// Flushes exported spans when dropped; keep it alive for the process.
#[must_use = "spans are flushed when the guard drops"]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take()
            && let Err(e) = provider.shutdown()
        {
            eprintln!("flushing traces failed: {e}");
        }
    }
}

/// Installs the global subscriber: `RUST_LOG` filters (`default_filter`
/// when unset), text or JSON lines on stdout, plus an OTLP span exporter for
/// `service` when `OTEL_EXPORTER_OTLP_ENDPOINT` is set. Safe to call twice
/// (later calls are ignored), which tests that start several services in
/// one process rely on.
pub fn init(service: &'static str, format: LogFormat, default_filter: &str) -> Telemetry {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let endpoint = std::env::var("OTEL_EXPORTER_OTLP_ENDPOINT")
        .ok()
        .filter(|e| !e.is_empty());
    let provider = endpoint.and_then(|endpoint| match otlp_provider(service, &endpoint) {
        Ok(p) => Some(p),
        Err(e) => {
            eprintln!("{service}: OTLP exporter for {endpoint} not started: {e}");
            None
        }
    });
    // RUST_LOG quiets the logs, not the traces: exported spans have their
    // own filter, so a deployment logging warnings still traces requests.
    let otel = provider.as_ref().map(|p| {
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer(service))
            .with_filter(EnvFilter::new(TRACE_FILTER))
    });
    let registry = tracing_subscriber::registry().with(otel);
    let installed = match format {
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_filter(filter),
            )
            .try_init(),
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_filter(filter))
            .try_init(),
    };
    if installed.is_err() {
        return Telemetry { provider: None };
    }
    if let Some(p) = &provider {
        opentelemetry::global::set_text_map_propagator(TraceContextPropagator::new());
        opentelemetry::global::set_tracer_provider(p.clone());
        EXPORTING.store(true, Ordering::Relaxed);
    }
    Telemetry { provider }
}

fn otlp_provider(service: &'static str, endpoint: &str) -> Result<SdkTracerProvider, String> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()
        .map_err(|e| e.to_string())?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(Resource::builder().with_service_name(service).build())
        .build())
}
