//! The egress proxy: a sandboxed agent's only way to the network. An HTTP
//! proxy (CONNECT tunnels for HTTPS, absolute-form requests for plain
//! HTTP) on a unix socket bound into one attempt's sandbox, letting
//! through the hosts on the allow-list and never the mesh's addresses.
//! The name is resolved here and the address checked is the address
//! connected to, so a name cannot be turned to the mesh between the two.

use std::net::SocketAddr;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, combinators::BoxBody};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use super::Attempt;
use super::hosts::{AllowList, Denied};

pub type Body = BoxBody<Bytes, hyper::Error>;

/// What decides where agents may connect.
#[derive(Debug, Clone)]
pub struct Rules {
    pub allow: AllowList,
    pub denied: Denied,
}

/// Why a connection was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    NotAllowed,
    Mesh,
    Unresolved(String),
}

impl Refusal {
    fn reason(&self) -> &'static str {
        match self {
            Refusal::NotAllowed => "not_allowed",
            Refusal::Mesh => "mesh",
            Refusal::Unresolved(_) => "unresolved",
        }
    }

    fn explain(&self, host: &str, port: u16) -> String {
        match self {
            Refusal::NotAllowed => {
                format!("omoi egress proxy: {host}:{port} is not on the executor's OMOI_AGENT_ALLOWED_HOSTS\n")
            }
            Refusal::Mesh => format!("omoi egress proxy: {host}:{port} is one of omoi's own addresses\n"),
            Refusal::Unresolved(e) => format!("omoi egress proxy: cannot resolve {host}: {e}\n"),
        }
    }
}

impl Rules {
    /// The address to connect to for `host:port`, or why not.
    pub async fn check(&self, host: &str, port: u16) -> Result<SocketAddr, Refusal> {
        if !self.allow.permits(host, port) {
            return Err(Refusal::NotAllowed);
        }
        if self.denied.names(host, port) {
            return Err(Refusal::Mesh);
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let addrs: Vec<SocketAddr> = tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| Refusal::Unresolved(e.to_string()))?
            .collect();
        if addrs.is_empty() {
            return Err(Refusal::Unresolved("no address".into()));
        }
        addrs.into_iter().find(|a| !self.denied.covers(*a)).ok_or(Refusal::Mesh)
    }
}

pub fn text(status: StatusCode, body: String) -> Response<Body> {
    let mut r = Response::new(Full::new(Bytes::from(body)).map_err(|never| match never {}).boxed());
    *r.status_mut() = status;
    r.headers_mut()
        .insert(http::header::CONTENT_TYPE, http::HeaderValue::from_static("text/plain"));
    r
}

/// Answers one request of an attempt's agent.
pub async fn handle(req: Request<Incoming>, rules: &Rules, attempt: &Attempt) -> Response<Body> {
    let Some((host, port)) = target(&req) else {
        return text(
            StatusCode::BAD_REQUEST,
            "omoi egress proxy: send CONNECT host:port, or an absolute http:// URL\n".into(),
        );
    };
    let addr = match rules.check(&host, port).await {
        Ok(a) => a,
        Err(refusal) => {
            omoi_runtime::metrics::EGRESS_REFUSED
                .with_label_values(&[refusal.reason()])
                .inc();
            tracing::warn!(
                task_id = %attempt.task_id,
                attempt = attempt.attempt,
                host,
                port,
                reason = refusal.reason(),
                "agent egress refused"
            );
            let why = refusal.explain(&host, port);
            (attempt.say)(why.trim_end().to_owned());
            return text(StatusCode::FORBIDDEN, why);
        }
    };
    let upstream = match TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            return text(
                StatusCode::BAD_GATEWAY,
                format!("omoi egress proxy: {host}:{port}: {e}\n"),
            );
        }
    };
    if req.method() == Method::CONNECT {
        tokio::spawn(async move {
            if let Ok(upgraded) = hyper::upgrade::on(req).await {
                let mut upstream = upstream;
                let _ = tokio::io::copy_bidirectional(&mut TokioIo::new(upgraded), &mut upstream).await;
            }
        });
        return Response::new(Full::new(Bytes::new()).map_err(|never| match never {}).boxed());
    }
    forward(req, upstream).await
}

/// Where a request goes: CONNECT's authority, or an absolute http:// URL's.
fn target(req: &Request<Incoming>) -> Option<(String, u16)> {
    let uri = req.uri();
    let authority = uri.authority()?;
    if req.method() == Method::CONNECT {
        return Some((authority.host().to_owned(), authority.port_u16()?));
    }
    (uri.scheme_str() == Some("http")).then(|| (authority.host().to_owned(), authority.port_u16().unwrap_or(80)))
}

/// A plain HTTP request sent on over `upstream`, its path in origin form.
async fn forward(mut req: Request<Incoming>, upstream: TcpStream) -> Response<Body> {
    let path = req
        .uri()
        .path_and_query()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "/".into());
    let Ok(origin) = path.parse() else {
        return text(StatusCode::BAD_REQUEST, "omoi egress proxy: bad path\n".into());
    };
    *req.uri_mut() = origin;
    for h in ["proxy-connection", "proxy-authorization"] {
        req.headers_mut().remove(h);
    }
    let (mut sender, conn) = match hyper::client::conn::http1::handshake(TokioIo::new(upstream)).await {
        Ok(pair) => pair,
        Err(e) => return text(StatusCode::BAD_GATEWAY, format!("omoi egress proxy: {e}\n")),
    };
    tokio::spawn(conn);
    match sender.send_request(req).await {
        Ok(resp) => resp.map(BodyExt::boxed),
        Err(e) => text(StatusCode::BAD_GATEWAY, format!("omoi egress proxy: {e}\n")),
    }
}
