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
use hyper_util::rt::TokioExecutor;

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

/// Answers one request of an attempt's agent, counting what the answer
/// says was used into `tally`.
pub async fn handle(
    req: Request<Incoming>,
    route: &ModelRoute,
    attempt: &Attempt,
    tally: Arc<std::sync::Mutex<Metered>>,
) -> Response<Body> {
    let req = match route.outgoing(req) {
        Ok(r) => r,
        Err(e) => return text(StatusCode::BAD_REQUEST, format!("omoi model proxy: {e}\n")),
    };
    match route.client.request(req).await {
        Ok(mut resp) => {
            for h in HOP_BY_HOP {
                resp.headers_mut().remove(h);
            }
            let header = route.header;
            resp.map(|inner| {
                MeteredBody {
                    inner,
                    scan: Some(Scan::new(header)),
                    tally,
                }
                .boxed()
            })
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

/// What the model proxy counted in the answers of one attempt's model
/// API: a second source for its usage, beside what the agent reports.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Metered {
    pub responses: u32,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    /// The model the last answer named.
    pub model: String,
}

/// The usage one answer carries, read from its lines as they stream by
/// (server-sent events, or a JSON body).
struct Scan {
    api: KeyHeader,
    line: Vec<u8>,
    /// The whole body while it is small, for a JSON answer over many lines.
    body: Vec<u8>,
    seen: Metered,
    found: bool,
}

/// The most of a body kept to read as one JSON document.
const BODY_KEPT: usize = 1 << 20;

impl Scan {
    fn new(api: KeyHeader) -> Self {
        Scan {
            api,
            line: Vec::new(),
            body: Vec::new(),
            seen: Metered::default(),
            found: false,
        }
    }

    fn feed(&mut self, data: &[u8]) {
        if self.body.len() + data.len() <= BODY_KEPT {
            self.body.extend_from_slice(data);
        } else {
            self.body = Vec::new();
        }
        for &b in data {
            if b == b'\n' {
                let line = std::mem::take(&mut self.line);
                self.line_of(&line);
            } else if self.line.len() < BODY_KEPT {
                self.line.push(b);
            }
        }
    }

    fn line_of(&mut self, line: &[u8]) {
        let text = String::from_utf8_lossy(line);
        let text = text.trim();
        let json = text.strip_prefix("data:").map(str::trim).unwrap_or(text);
        if json.starts_with('{')
            && let Ok(v) = serde_json::from_str::<serde_json::Value>(json)
        {
            self.value(&v);
        }
    }

    /// Reads the usage `v` (an event or a whole answer) carries.
    fn value(&mut self, v: &serde_json::Value) {
        let n = |v: &serde_json::Value| v.as_i64().unwrap_or(0);
        let s = &mut self.seen;
        match self.api {
            KeyHeader::XApiKey => {
                let (usage, model) = match v["type"].as_str() {
                    Some("message_start") => (&v["message"]["usage"], &v["message"]["model"]),
                    Some("message_delta") | Some("message") => (&v["usage"], &v["model"]),
                    _ => return,
                };
                for (field, slot) in [
                    ("input_tokens", &mut s.input_tokens),
                    ("output_tokens", &mut s.output_tokens),
                    ("cache_read_input_tokens", &mut s.cache_read_tokens),
                    ("cache_creation_input_tokens", &mut s.cache_write_tokens),
                ] {
                    // Later events restate a count: the last one holds.
                    if usage[field].is_i64() {
                        *slot = n(&usage[field]);
                        self.found = true;
                    }
                }
                if let Some(m) = model.as_str() {
                    s.model = m.to_owned();
                }
            }
            KeyHeader::Bearer => {
                let response = match v["type"].as_str() {
                    Some("response.completed") => &v["response"],
                    _ if v["object"] == "response" => v,
                    _ => return,
                };
                let usage = &response["usage"];
                if usage.is_object() {
                    let cached = n(&usage["input_tokens_details"]["cached_tokens"]);
                    s.input_tokens = n(&usage["input_tokens"]) - cached;
                    s.cache_read_tokens = cached;
                    s.output_tokens = n(&usage["output_tokens"]);
                    self.found = true;
                }
                if let Some(m) = response["model"].as_str() {
                    s.model = m.to_owned();
                }
            }
            KeyHeader::GoogApiKey => {
                let usage = &v["usageMetadata"];
                if usage.is_object() {
                    // Each chunk restates the answer's counts so far.
                    let cached = n(&usage["cachedContentTokenCount"]);
                    s.input_tokens = n(&usage["promptTokenCount"]) - cached;
                    s.cache_read_tokens = cached;
                    s.output_tokens = n(&usage["candidatesTokenCount"]) + n(&usage["thoughtsTokenCount"]);
                    self.found = true;
                }
                if let Some(m) = v["modelVersion"].as_str() {
                    s.model = m.to_owned();
                }
            }
        }
    }

    /// The answer ended: what it carried.
    fn finish(&mut self) -> Option<Metered> {
        let rest = std::mem::take(&mut self.line);
        self.line_of(&rest);
        if !self.found
            && let Ok(v) = serde_json::from_slice::<serde_json::Value>(&self.body)
        {
            // A JSON answer spread over lines.
            match &v {
                serde_json::Value::Array(chunks) => chunks.iter().for_each(|c| self.value(c)),
                one => self.value(one),
            }
        }
        self.found.then(|| std::mem::take(&mut self.seen))
    }
}

/// An answer's body on its way to the agent, its usage counted into the
/// attempt's tally as it passes (and when it ends or is dropped).
pub struct MeteredBody {
    inner: Incoming,
    scan: Option<Scan>,
    tally: Arc<std::sync::Mutex<Metered>>,
}

impl MeteredBody {
    fn count(&mut self) {
        if let Some(seen) = self.scan.take().and_then(|mut s| s.finish()) {
            let mut t = self.tally.lock().unwrap_or_else(|p| p.into_inner());
            t.responses += 1;
            t.input_tokens += seen.input_tokens;
            t.output_tokens += seen.output_tokens;
            t.cache_read_tokens += seen.cache_read_tokens;
            t.cache_write_tokens += seen.cache_write_tokens;
            if !seen.model.is_empty() {
                t.model = seen.model;
            }
        }
    }
}

impl Drop for MeteredBody {
    fn drop(&mut self) {
        self.count();
    }
}

impl hyper::body::Body for MeteredBody {
    type Data = bytes::Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        let this = self.get_mut();
        let polled = std::pin::Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            std::task::Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(scan)) = (frame.data_ref(), this.scan.as_mut()) {
                    scan.feed(data);
                }
            }
            std::task::Poll::Ready(None) => this.count(),
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scan(api: KeyHeader, body: &str) -> Option<Metered> {
        let mut s = Scan::new(api);
        // In pieces that split lines, as a stream does.
        for piece in body.as_bytes().chunks(7) {
            s.feed(piece);
        }
        s.finish()
    }

    #[test]
    fn each_apis_answers_are_counted_streamed_or_whole() {
        let messages = "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"model\":\"claude-sonnet-4-5\",\"usage\":{\"input_tokens\":110,\"output_tokens\":1,\"cache_read_input_tokens\":20,\"cache_creation_input_tokens\":10}}}\n\nevent: message_delta\ndata: {\"type\":\"message_delta\",\"usage\":{\"output_tokens\":31}}\n\n";
        let m = scan(KeyHeader::XApiKey, messages).unwrap();
        assert_eq!(
            (
                m.input_tokens,
                m.output_tokens,
                m.cache_read_tokens,
                m.cache_write_tokens,
                m.model.as_str()
            ),
            (110, 31, 20, 10, "claude-sonnet-4-5")
        );
        let responses = "event: response.completed\ndata: {\"type\":\"response.completed\",\"response\":{\"model\":\"gpt-5-codex\",\"usage\":{\"input_tokens\":130,\"input_tokens_details\":{\"cached_tokens\":20},\"output_tokens\":31}}}\n\n";
        let m = scan(KeyHeader::Bearer, responses).unwrap();
        assert_eq!((m.input_tokens, m.cache_read_tokens, m.output_tokens), (110, 20, 31));
        let gemini = "data: {\"candidates\":[],\"usageMetadata\":{\"promptTokenCount\":10,\"candidatesTokenCount\":1}}\r\n\r\ndata: {\"usageMetadata\":{\"promptTokenCount\":130,\"cachedContentTokenCount\":20,\"candidatesTokenCount\":31},\"modelVersion\":\"gemini-2.5-flash\"}\r\n\r\n";
        let m = scan(KeyHeader::GoogApiKey, gemini).unwrap();
        assert_eq!((m.input_tokens, m.cache_read_tokens, m.output_tokens), (110, 20, 31));
        let whole = "{\n  \"type\": \"message\",\n  \"model\": \"claude-haiku-4-5\",\n  \"usage\": {\"input_tokens\": 5, \"output_tokens\": 7}\n}";
        let m = scan(KeyHeader::XApiKey, whole).unwrap();
        assert_eq!(
            (m.input_tokens, m.output_tokens, m.model.as_str()),
            (5, 7, "claude-haiku-4-5")
        );
        assert_eq!(scan(KeyHeader::XApiKey, "{\"type\":\"error\"}"), None);
    }
}
