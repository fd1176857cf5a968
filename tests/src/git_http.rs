//! A git forge stand-in for the tests: git's own smart-HTTP server
//! (`git http-backend`, as CGI) serving the bare repositories under a root,
//! behind basic auth with one token, the way a forge answers a clone or a
//! push. It counts what it answered, so a test can tell the credentials
//! were used.

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::io::AsyncWriteExt;

use crate::http::{Reply, Server};

pub struct GitServer {
    pub url: String,
    state: Arc<State>,
    _server: Server,
}

struct State {
    root: PathBuf,
    /// `Basic <base64(user:token)>`.
    expected: String,
    authorized: AtomicUsize,
    refused: AtomicUsize,
    /// Fetches of objects (upload-pack) that named no commit the client
    /// had: clones.
    clones: AtomicUsize,
}

impl GitServer {
    /// Serves `root/<path>.git` at `<url>/<path>.git` to `user`/`token`.
    pub async fn start(root: PathBuf, user: &str, token: &str) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            root,
            expected: format!("Basic {}", STANDARD.encode(format!("{user}:{token}"))),
            authorized: AtomicUsize::new(0),
            refused: AtomicUsize::new(0),
            clones: AtomicUsize::new(0),
        });
        let server = Server::start(Arc::clone(&state), handle).await?;
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    /// Requests answered with the right credentials.
    pub fn authorized(&self) -> usize {
        self.state.authorized.load(Ordering::Relaxed)
    }

    /// Requests refused for want of them.
    pub fn refused(&self) -> usize {
        self.state.refused.load(Ordering::Relaxed)
    }

    /// Object fetches that named no commit the client had (what a clone
    /// asks; an incremental fetch says what it has).
    pub fn clones(&self) -> usize {
        self.state.clones.load(Ordering::Relaxed)
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let auth = req
        .headers()
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if auth != state.expected {
        state.refused.fetch_add(1, Ordering::Relaxed);
        return Ok(Response::builder()
            .status(StatusCode::UNAUTHORIZED)
            .header(http::header::WWW_AUTHENTICATE, "Basic realm=\"git\"")
            .body(Full::new(Bytes::new()))
            .expect("a response"));
    }
    state.authorized.fetch_add(1, Ordering::Relaxed);
    match cgi(&state, req).await {
        Ok(r) => Ok(r),
        Err(e) => Ok(Response::builder()
            .status(StatusCode::INTERNAL_SERVER_ERROR)
            .body(Full::new(Bytes::from(e.to_string())))
            .expect("a response")),
    }
}

/// One request through `git http-backend`.
async fn cgi(state: &State, req: Request<Incoming>) -> anyhow::Result<Response<Full<Bytes>>> {
    let (parts, body) = req.into_parts();
    let body = body.collect().await?.to_bytes();
    // git sends long requests (many `have`s) compressed: never a clone's.
    let compressed = parts.headers.contains_key(http::header::CONTENT_ENCODING);
    let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    if parts.uri.path().ends_with("/git-upload-pack") && !compressed && has(b"want ") && !has(b"have ") {
        state.clones.fetch_add(1, Ordering::Relaxed);
    }
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let mut child = tokio::process::Command::new("git")
        .arg("http-backend")
        .env("GIT_PROJECT_ROOT", &state.root)
        .env("GIT_HTTP_EXPORT_ALL", "1")
        .env("REMOTE_USER", "forge-user")
        .env("REMOTE_ADDR", "127.0.0.1")
        .env("REQUEST_METHOD", parts.method.as_str())
        .env("PATH_INFO", parts.uri.path())
        .env("QUERY_STRING", parts.uri.query().unwrap_or_default())
        .env("CONTENT_TYPE", header("content-type"))
        .env("CONTENT_LENGTH", body.len().to_string())
        .env("HTTP_CONTENT_ENCODING", header("content-encoding"))
        .env("GIT_PROTOCOL", header("git-protocol"))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let mut stdin = child.stdin.take().expect("piped stdin");
    stdin.write_all(&body).await?;
    drop(stdin);
    let out = child.wait_with_output().await?;
    let split = out
        .stdout
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| (i, i + 4))
        .or_else(|| out.stdout.windows(2).position(|w| w == b"\n\n").map(|i| (i, i + 2)))
        .ok_or_else(|| anyhow::anyhow!("http-backend answered without headers"))?;
    let head = String::from_utf8_lossy(&out.stdout[..split.0]).into_owned();
    let mut response = Response::builder();
    for line in head.lines() {
        let Some((name, value)) = line.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("status") {
            let code: u16 = value.split(' ').next().unwrap_or("200").parse()?;
            response = response.status(code);
        } else {
            response = response.header(name.trim(), value);
        }
    }
    Ok(response.body(Full::new(Bytes::copy_from_slice(&out.stdout[split.1..])))?)
}
