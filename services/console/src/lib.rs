//! omoi-console: the mesh's HTTP face. Every RPC annotated with
//! `google.api.http` in the protos is served as JSON over HTTP (the proto3
//! JSON mapping, gRPC's transcoding convention), server-streaming ones as
//! Server-Sent Events; the console calls the services over gRPC like any
//! other client, with the same bearer token it requires of its own callers.

mod call;
mod openapi;
mod routes;
mod ui;
mod webhooks;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use futures::StreamExt;
use http::{HeaderMap, StatusCode};
use prost_reflect::{DynamicMessage, SerializeOptions};
use tokio_util::sync::CancellationToken;
use tonic::Status;

use omoi_runtime::auth::RequireBearer;
use omoi_runtime::config::{LogFormat, parse_listen, secret, secret_file};
use omoi_runtime::grpc::{Client, Connector};
use omoi_runtime::tls::TlsArgs;

use call::DynamicCodec;
use routes::{Found, Route, Upstream};

#[derive(Debug, Clone, clap::Parser)]
#[command(name = "omoi-console", version, about = "omoi's HTTP/JSON API")]
pub struct Config {
    /// Address the HTTP server listens on.
    #[arg(long, env = "OMOI_LISTEN_ADDR", default_value = "0.0.0.0:8080", value_parser = parse_listen)]
    pub listen_addr: SocketAddr,
    #[arg(long, env = "OMOI_TICKET_URL", default_value = "http://127.0.0.1:50051")]
    pub ticket_url: String,
    #[arg(long, env = "OMOI_TASK_QUEUE_URL", default_value = "http://127.0.0.1:50052")]
    pub task_queue_url: String,
    #[arg(long, env = "OMOI_HEALTH_URL", default_value = "http://127.0.0.1:50053")]
    pub health_url: String,
    /// The mesh's bearer token: required of HTTP callers (as
    /// `Authorization: Bearer …`) and sent to the services; unset = none.
    #[arg(long, env = "OMOI_AUTH_TOKEN", hide_env_values = true)]
    pub auth_token: Option<String>,
    /// A file holding the bearer token, read instead of OMOI_AUTH_TOKEN.
    #[arg(long, env = "OMOI_AUTH_TOKEN_FILE", value_parser = secret_file, hide_env_values = true)]
    pub auth_token_file: Option<String>,
    /// Largest request body accepted, in bytes.
    #[arg(long, env = "OMOI_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// The secret GitHub signs its webhook deliveries with (a repository's
    /// or a GitHub App's); unset = `POST /webhooks/github` is off.
    #[arg(long, env = "OMOI_GITHUB_WEBHOOK_SECRET", hide_env_values = true)]
    pub github_webhook_secret: Option<String>,
    /// A file holding OMOI_GITHUB_WEBHOOK_SECRET, read instead of it.
    #[arg(long, env = "OMOI_GITHUB_WEBHOOK_SECRET_FILE", value_parser = secret_file, hide_env_values = true)]
    pub github_webhook_secret_file: Option<String>,
    #[command(flatten)]
    pub tls: TlsArgs,
    #[arg(long, env = "OMOI_LOG_FORMAT", value_enum, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
}

struct Console {
    routes: Vec<Route>,
    ticket: Client,
    task_queue: Client,
    health: Client,
    bearer: RequireBearer,
    max_body_bytes: usize,
    /// GitHub's webhook secret; None: webhooks are off.
    webhook_secret: Option<String>,
}

/// Serves on `listener` until `shutdown`.
pub async fn serve(
    config: Config,
    listener: tokio::net::TcpListener,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let token = secret(&config.auth_token, &config.auth_token_file);
    let connector = Connector::new(token.as_deref(), &config.tls)?;
    let console = Arc::new(Console {
        routes: routes::all(),
        ticket: connector.client(&config.ticket_url, "OMOI_TICKET_URL")?,
        task_queue: connector.client(&config.task_queue_url, "OMOI_TASK_QUEUE_URL")?,
        health: connector.client(&config.health_url, "OMOI_HEALTH_URL")?,
        bearer: RequireBearer::new(token.as_deref()),
        max_body_bytes: config.max_body_bytes,
        webhook_secret: secret(&config.github_webhook_secret, &config.github_webhook_secret_file)
            .filter(|s| !s.is_empty()),
    });
    tracing::info!(routes = console.routes.len(), addr = ?listener.local_addr().ok(), "serving");
    let document = openapi::document(&console.routes);
    let page = openapi::page(&document);
    let document = document.to_string();
    let app = axum::Router::new()
        .route("/healthz", axum::routing::get(|| async { "ok" }))
        .route(
            "/openapi.json",
            axum::routing::get(move || async move { ([(http::header::CONTENT_TYPE, "application/json")], document) }),
        )
        .route(
            "/docs",
            axum::routing::get(move || async move { axum::response::Html(page) }),
        )
        // Signed by GitHub, not by the mesh's bearer token.
        .route(
            "/webhooks/github",
            axum::routing::post(webhooks::github)
                .layer(axum::extract::DefaultBodyLimit::max(webhooks::MAX_DELIVERY_BYTES)),
        )
        .merge(ui::routes())
        .fallback(api)
        .with_state(console);
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await?;
    Ok(())
}

/// Any request: routed by the annotations.
async fn api(State(console): State<Arc<Console>>, request: Request) -> Response {
    match console.answer(request).await {
        Ok(response) => response,
        Err(status) => refusal(&status),
    }
}

fn refusal(status: &Status) -> Response {
    let code = call::http_status(status.code());
    let mut response = (code, call::status_json(status).to_string()).into_response();
    json_type(response.headers_mut());
    response
}

fn json_type(headers: &mut HeaderMap) {
    headers.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
}

impl Console {
    async fn answer(&self, request: Request) -> Result<Response, Status> {
        let (parts, body) = request.into_parts();
        // The token first: without it, nothing about the API is told, not
        // even which paths exist.
        let authorization = parts
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        self.bearer.check(authorization)?;
        refuse_cross_site(&parts.method, &parts.headers)?;
        let (route, vars) = match routes::find(&self.routes, &parts.method, parts.uri.path()) {
            Found::Route(route, vars) => (route, vars),
            Found::WrongMethod => {
                // As grpc-gateway answers: UNIMPLEMENTED, with the HTTP 405.
                let status = Status::unimplemented(format!("{} does not take {}", parts.uri.path(), parts.method));
                let mut response = refusal(&status);
                *response.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
                return Ok(response);
            }
            Found::None => return Err(Status::not_found(format!("no API at {}", parts.uri.path()))),
        };
        tracing::debug!(route = %route.template, rpc = route.rpc.name(), "transcoding");
        let body = axum::body::to_bytes(body, self.max_body_bytes)
            .await
            .map_err(|e| Status::invalid_argument(format!("body: {e}")))?;
        let message = call::request(route, &vars, parts.uri.query(), &body)?;
        let path = route.grpc_path.clone();
        let codec = DynamicCodec {
            output: route.rpc.output(),
        };
        let mut grpc = tonic::client::Grpc::new(self.client(route.upstream));
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("{:?} unreachable: {e}", route.upstream)))?;
        if route.rpc.is_server_streaming() {
            let stream = grpc
                .server_streaming(tonic::Request::new(message), path, codec)
                .await?
                .into_inner();
            let resume = parts
                .headers
                .get("last-event-id")
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
            return Ok(sse(stream, resume).into_response());
        }
        let reply = grpc
            .unary(tonic::Request::new(message), path, codec)
            .await?
            .into_inner();
        let mut response = (StatusCode::OK, json(&reply)).into_response();
        json_type(response.headers_mut());
        Ok(response)
    }

    fn client(&self, upstream: Upstream) -> Client {
        match upstream {
            Upstream::Ticket => self.ticket.clone(),
            Upstream::TaskQueue => self.task_queue.clone(),
            Upstream::Health => self.health.clone(),
        }
    }
}

/// A browser sends a state-changing request from another site with the
/// user's ambient credentials (a token the browser holds for a proxy in
/// front, or none when the mesh has no token): such requests are refused.
/// The console's own page calls from its own origin; clients outside a
/// browser send neither header.
fn refuse_cross_site(method: &http::Method, headers: &HeaderMap) -> Result<(), Status> {
    if matches!(*method, http::Method::GET | http::Method::HEAD) {
        return Ok(());
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = header("sec-fetch-site")
        && !matches!(site, "same-origin" | "none")
    {
        return Err(Status::permission_denied(format!(
            "a {site} request may not change anything"
        )));
    }
    if let Some(origin) = header("origin") {
        let from = origin.split_once("://").map_or(origin, |(_, host)| host);
        if Some(from) != header("host") {
            return Err(Status::permission_denied(format!(
                "a request from {origin} may not change anything"
            )));
        }
    }
    Ok(())
}

/// A message in the proto3 JSON mapping, every field present.
fn json(message: &DynamicMessage) -> String {
    let mut out = serde_json::Serializer::new(Vec::new());
    let options = SerializeOptions::new().skip_default_fields(false);
    match message.serialize_with_options(&mut out, &options) {
        Ok(()) => String::from_utf8(out.into_inner()).unwrap_or_default(),
        Err(e) => call::status_json(&Status::internal(format!("encoding the answer: {e}"))).to_string(),
    }
}

/// An event's id for `Last-Event-ID`: its `id` (ticket events), or the
/// attempt and sequence number of an agent event.
fn event_id(message: &DynamicMessage) -> Option<String> {
    if let Some(id) = message
        .get_field_by_name("id")
        .and_then(|v| v.as_str().map(str::to_owned))
    {
        return Some(id);
    }
    let event = message.get_field_by_name("event")?;
    let event = event.as_message()?;
    let attempt = event.get_field_by_name("attempt")?.as_i32()?;
    let seq = event.get_field_by_name("seq")?.as_i64()?;
    Some(format!("{attempt}-{seq}"))
}

/// A server stream as Server-Sent Events; with `resume` (the client's
/// Last-Event-ID), what it had already seen is skipped (the streams start
/// with their history).
fn sse(
    stream: tonic::Streaming<DynamicMessage>,
    resume: Option<String>,
) -> Sse<impl futures::Stream<Item = Result<SseEvent, Infallible>>> {
    let mut skipping = resume;
    let events = stream.filter_map(move |item| {
        let out = match item {
            Ok(message) => {
                let id = event_id(&message);
                if let Some(last) = &skipping {
                    if id.as_ref() == Some(last) {
                        skipping = None;
                    }
                    None
                } else {
                    let mut event = SseEvent::default().data(json(&message));
                    if let Some(id) = id {
                        event = event.id(id);
                    }
                    Some(Ok(event))
                }
            }
            Err(status) => Some(Ok(SseEvent::default()
                .event("error")
                .data(call::status_json(&status).to_string()))),
        };
        futures::future::ready(out)
    });
    Sse::new(events).keep_alive(KeepAlive::default())
}
