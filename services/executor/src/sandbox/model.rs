//! The model proxy: a sandboxed agent calls its model API here, with a
//! placeholder key; the proxy puts the real key (which only the executor
//! holds) on the request, sends it to the real API and streams the answer
//! back unchanged. The key never enters the sandbox.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::net::UnixListener;
use tokio_util::sync::CancellationToken;

use super::Attempt;
use super::egress::{Body, text};

/// What an agent sees in place of its key.
pub const PLACEHOLDER_KEY: &str = "omoi-brokered-placeholder-key";

/// How an API takes its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyHeader {
    /// Anthropic: `x-api-key`.
    XApiKey,
    /// OpenAI: `authorization: Bearer`.
    Bearer,
    /// Gemini: `x-goog-api-key`.
    GoogApiKey,
}

/// Where an agent's model calls go, with which key.
pub struct ModelRoute {
    /// The API's base URL (scheme, authority, and the path its clients
    /// put before theirs).
    pub upstream: Uri,
    pub key: Option<String>,
    pub header: KeyHeader,
    client: Client<HttpsConnector<HttpConnector>, Incoming>,
}

impl std::fmt::Debug for ModelRoute {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRoute")
            .field("upstream", &self.upstream)
            .field("header", &self.header)
            .finish_non_exhaustive()
    }
}

/// Headers a request carries its key in, whatever the API.
const KEY_HEADERS: [&str; 4] = ["x-api-key", "authorization", "x-goog-api-key", "api-key"];

/// Headers of one hop, not passed on.
const HOP_BY_HOP: [&str; 8] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

impl ModelRoute {
    pub fn new(upstream: &str, setting: &str, key: Option<String>, header: KeyHeader) -> anyhow::Result<Self> {
        let upstream: Uri = upstream
            .trim_end_matches('/')
            .parse()
            .map_err(|e| anyhow::anyhow!("{setting} {upstream:?}: {e}"))?;
        anyhow::ensure!(
            upstream.authority().is_some() && matches!(upstream.scheme_str(), Some("http" | "https")),
            "{setting} {upstream:?} is not an http(s) URL"
        );
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_native_roots()
            .map_err(|e| anyhow::anyhow!("no TLS roots for the model API: {e}"))?
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Self {
            upstream,
            key: key.filter(|k| !k.is_empty()),
            header,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// The path agents put before the API's (`/v1` of an OpenAI base URL).
    pub fn base_path(&self) -> &str {
        self.upstream.path().trim_end_matches('/')
    }

    /// `req` as the real API is to get it: its URL, the real key.
    fn outgoing(&self, mut req: Request<Incoming>) -> Result<Request<Incoming>, String> {
        let pq = req.uri().path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let (path, query) = pq.split_once('?').unwrap_or((pq, ""));
        // Gemini clients may put the key in the query.
        let query: Vec<&str> = query
            .split('&')
            .filter(|kv| !kv.is_empty() && !kv.starts_with("key="))
            .collect();
        let pq = if query.is_empty() {
            path.to_owned()
        } else {
            format!("{path}?{}", query.join("&"))
        };
        let uri = Uri::builder()
            .scheme(self.upstream.scheme_str().unwrap_or("https"))
            .authority(self.upstream.authority().map(|a| a.as_str()).unwrap_or_default())
            .path_and_query(pq)
            .build()
            .map_err(|e| e.to_string())?;
        *req.uri_mut() = uri;
        let headers = req.headers_mut();
        for h in KEY_HEADERS.iter().chain(HOP_BY_HOP.iter()) {
            headers.remove(*h);
        }
        headers.remove(header::HOST);
        if let Some(key) = &self.key {
            let (name, value) = match self.header {
                KeyHeader::XApiKey => (HeaderName::from_static("x-api-key"), key.clone()),
                KeyHeader::Bearer => (header::AUTHORIZATION, format!("Bearer {key}")),
                KeyHeader::GoogApiKey => (HeaderName::from_static("x-goog-api-key"), key.clone()),
            };
            let mut value = HeaderValue::from_str(&value).map_err(|_| "the model API key is not a valid header")?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Ok(req)
    }
}

/// Serves the proxy on `listener` for `attempt` until `stop`.
pub async fn serve(listener: UnixListener, route: Arc<ModelRoute>, attempt: Attempt, stop: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = stop.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok((s, _)) => s,
                Err(_) => continue,
            },
        };
        let (route, attempt, stop) = (Arc::clone(&route), attempt.clone(), stop.clone());
        tokio::spawn(async move {
            let service = hyper::service::service_fn(move |req| {
                let (route, attempt) = (Arc::clone(&route), attempt.clone());
                async move { Ok::<_, std::convert::Infallible>(handle(req, &route, &attempt).await) }
            });
            let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), service);
            tokio::select! {
                _ = conn => {}
                _ = stop.cancelled() => {}
            }
        });
    }
}

async fn handle(req: Request<Incoming>, route: &ModelRoute, attempt: &Attempt) -> Response<Body> {
    let req = match route.outgoing(req) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("omoi model proxy: {e}\n")),
    };
    match route.client.request(req).await {
        Ok(mut resp) => {
            for h in HOP_BY_HOP {
                resp.headers_mut().remove(h);
            }
            resp.map(BodyExt::boxed)
        }
        Err(e) => {
            tracing::warn!(
                task_id = %attempt.task_id,
                attempt = attempt.attempt,
                upstream = %route.upstream,
                error = %e,
                "the model API did not answer the model proxy"
            );
            text(
                StatusCode::BAD_GATEWAY,
                format!(
                    "omoi model proxy: the model API at {} did not answer: {e}\n",
                    route.upstream
                ),
            )
        }
    }
}
