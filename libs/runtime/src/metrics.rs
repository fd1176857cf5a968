//! Prometheus metrics: one registry per process, the families every omoi
//! service records, a tower layer counting gRPC requests by method and code,
//! and the `/metrics` endpoint on `OMOI_METRICS_ADDR`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::LazyLock;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use prometheus::{
    CounterVec, Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec,
    Opts, Registry, TextEncoder,
};
use tokio_util::sync::CancellationToken;

pub static REGISTRY: LazyLock<Registry> = LazyLock::new(Registry::new);

fn register<T: prometheus::core::Collector + Clone + 'static>(c: T) -> T {
    // Registering twice (several services in one test process) is harmless.
    let _ = REGISTRY.register(Box::new(c.clone()));
    c
}

fn counter_vec(name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    register(IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

fn gauge_vec(name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    register(IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric"))
}

const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

pub static GRPC_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_grpc_requests_total",
        "gRPC requests answered, by method and status code.",
        &["method", "code"],
    )
});
pub static GRPC_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register(
        HistogramVec::new(
            HistogramOpts::new(
                "omoi_grpc_request_duration_seconds",
                "Time to the response headers, by method.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["method"],
        )
        .expect("valid metric"),
    )
});
pub static AGENT_TOKENS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_agent_tokens_total",
        "Tokens coding agents reported, by model and kind (input, output, cache_read, cache_write).",
        &["model", "kind"],
    )
});
pub static AGENT_COST_USD: LazyLock<CounterVec> = LazyLock::new(|| {
    register(
        CounterVec::new(
            Opts::new(
                "omoi_agent_cost_usd_total",
                "US dollars coding agents spent (reported or estimated), by model.",
            ),
            &["model"],
        )
        .expect("valid metric"),
    )
});
pub static TASKS: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    gauge_vec(
        "omoi_tasks",
        "Tasks in the queue by status and phase.",
        &["status", "phase"],
    )
});
pub static TASKS_READY: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "omoi_tasks_ready",
            "Pending tasks whose dependencies and retry time allow dispatch.",
        )
        .expect("valid metric"),
    )
});
pub static CHECKPOINT_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "omoi_checkpoint_seconds",
                "Taking one checkpoint of an agent's session and work: archiving, storing, recording.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric"),
    )
});
pub static CHECKPOINTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_checkpoints_total",
        "Checkpoints of agent sessions, by outcome (stored, skipped).",
        &["outcome"],
    )
});
pub static CHECKPOINT_BYTES: LazyLock<IntCounter> = LazyLock::new(|| {
    register(
        IntCounter::new(
            "omoi_checkpoint_bytes_total",
            "Bytes of checkpoints stored, compressed.",
        )
        .expect("valid metric"),
    )
});
pub static SESSIONS_RESUMED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_sessions_resumed_total",
        "Attempts that took up an earlier agent session, by outcome (resumed, fresh: its checkpoint could not be used).",
        &["outcome"],
    )
});
pub static AGENT_SANDBOX: LazyLock<IntGauge> = LazyLock::new(|| {
    register(
        IntGauge::new(
            "omoi_agent_sandbox",
            "1 when this executor runs its agents sandboxed, 0 when it cannot or is told not to.",
        )
        .expect("valid metric"),
    )
});
pub static EGRESS_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_agent_egress_refused_total",
        "Connections sandboxed agents asked the egress proxy for and were refused, by reason (not_allowed, mesh, unresolved).",
        &["reason"],
    )
});
pub static DISPATCH_SECONDS: LazyLock<Histogram> = LazyLock::new(|| {
    register(
        Histogram::with_opts(
            HistogramOpts::new(
                "omoi_dispatch_latency_seconds",
                "From a task being ready to its assignment.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric"),
    )
});
pub static TASK_OUTCOMES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    counter_vec(
        "omoi_task_outcomes_total",
        "Task attempts that ended, by outcome (completed, failed, cancelled, requeued).",
        &["outcome"],
    )
});
pub static TASK_RETRIES: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new("omoi_task_retries_total", "Attempts rescheduled with backoff.").expect("valid metric"))
});
pub static TASK_TIMEOUTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new("omoi_task_timeouts_total", "Running attempts timed out.").expect("valid metric"))
});
pub static OUTBOX_BACKLOG: LazyLock<IntGauge> = LazyLock::new(|| {
    register(IntGauge::new("omoi_outbox_backlog", "Events committed but not yet published.").expect("valid metric"))
});
pub static HEARTBEATS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new("omoi_heartbeats_total", "Agent heartbeats accepted.").expect("valid metric"))
});
pub static AGENTS: LazyLock<IntGaugeVec> =
    LazyLock::new(|| gauge_vec("omoi_agents", "Registered agents by status.", &["status"]));
pub static STALE_AGENTS: LazyLock<IntCounter> = LazyLock::new(|| {
    register(IntCounter::new("omoi_stale_agents_total", "Agents declared stale.").expect("valid metric"))
});

/// The registry in Prometheus text format.
pub fn render() -> String {
    // Touch the families so that they appear before their first sample.
    LazyLock::force(&GRPC_REQUESTS);
    LazyLock::force(&GRPC_SECONDS);
    let mut out = Vec::new();
    let _ = TextEncoder::new().encode(&REGISTRY.gather(), &mut out);
    String::from_utf8(out).unwrap_or_default()
}

/// Serves `GET /metrics` on `addr` until `shutdown`.
pub async fn serve(addr: SocketAddr, shutdown: CancellationToken) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!(%addr, "metrics on /metrics");
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            accepted = listener.accept() => accepted?,
        };
        tokio::spawn(async move {
            let service = service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                let resp = if req.uri().path() == "/metrics" {
                    http::Response::builder()
                        .header("content-type", "text/plain; version=0.0.4")
                        .body(Full::new(Bytes::from(render())))
                } else {
                    http::Response::builder()
                        .status(http::StatusCode::NOT_FOUND)
                        .body(Full::new(Bytes::from_static(b"see /metrics\n")))
                };
                Ok::<_, Infallible>(resp.unwrap_or_default())
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// Counts and times every gRPC request by method and status code.
#[derive(Clone, Copy, Default)]
pub struct GrpcMetricsLayer;

impl<S> tower::Layer<S> for GrpcMetricsLayer {
    type Service = GrpcMetrics<S>;

    fn layer(&self, inner: S) -> Self::Service {
        GrpcMetrics { inner }
    }
}

#[derive(Clone)]
pub struct GrpcMetrics<S> {
    inner: S,
}

impl<S, B, R> tower::Service<http::Request<B>> for GrpcMetrics<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let method = req.uri().path().to_owned();
        let started = Instant::now();
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            // Errors travel as trailers-only responses, their status in the
            // headers; a response without one is answering normally.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map_or("OK", |c| code_name(c));
            if !method.starts_with("/grpc.") {
                GRPC_REQUESTS.with_label_values(&[&method, code]).inc();
                GRPC_SECONDS
                    .with_label_values(&[&method])
                    .observe(started.elapsed().as_secs_f64());
            }
            Ok(resp)
        })
    }
}

fn code_name(code: i32) -> &'static str {
    match tonic::Code::from_i32(code) {
        tonic::Code::Ok => "OK",
        tonic::Code::Cancelled => "CANCELLED",
        tonic::Code::Unknown => "UNKNOWN",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        tonic::Code::NotFound => "NOT_FOUND",
        tonic::Code::AlreadyExists => "ALREADY_EXISTS",
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Aborted => "ABORTED",
        tonic::Code::OutOfRange => "OUT_OF_RANGE",
        tonic::Code::Unimplemented => "UNIMPLEMENTED",
        tonic::Code::Internal => "INTERNAL",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::DataLoss => "DATA_LOSS",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
    }
}
