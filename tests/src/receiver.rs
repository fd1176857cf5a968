//! A stand-in receiver of omoi's notifications, as a careful one is
//! written: every delivery's signature (`X-Omoi-Signature-256`, the
//! HMAC-SHA256 of `<X-Omoi-Timestamp>.<body>` under the subscription's
//! secret) and timestamp (within five minutes: no replays) checked. It
//! answers the first try of each event 503 and every later one 200, so
//! that half its answers ask for a retry; `hold(n)` keeps the first try of
//! the n-th event it sees waiting until `release()`, so that a test can
//! kill the sender in the middle of a delivery.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::Value;
use sha2::Sha256;
use tokio::sync::Notify;

use crate::http::{Reply, Server};

/// One request, as the receiver saw and answered it.
#[derive(Debug, Clone)]
pub struct Received {
    pub at: chrono::DateTime<chrono::Utc>,
    pub path: String,
    pub event_id: String,
    pub body: Value,
    /// What it answered.
    pub status: u16,
    /// The signature matched the body and timestamp.
    pub signed: bool,
    /// The timestamp was within five minutes of now.
    pub fresh: bool,
}

#[derive(Default)]
struct State {
    secret: String,
    received: Mutex<Vec<Received>>,
    /// Event ids seen (a first try is answered 503).
    seen: Mutex<Vec<String>>,
    hold: Mutex<Option<usize>>,
    held: Notify,
    release: Notify,
}

pub struct Receiver {
    pub url: String,
    state: Arc<State>,
    _server: Server,
}

impl Receiver {
    pub async fn start(secret: &str) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            secret: secret.to_owned(),
            ..Default::default()
        });
        let server = Server::start(Arc::clone(&state), handle).await?;
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    /// Every request so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.state.received.lock().unwrap().clone()
    }

    /// Keeps the first try of the `n`-th event (1-based) waiting.
    pub fn hold(&self, n: usize) {
        *self.state.hold.lock().unwrap() = Some(n);
    }

    /// Returns once a request is being held.
    pub async fn held(&self) {
        self.state.held.notified().await;
    }

    pub fn release(&self) {
        self.state.release.notify_waiters();
    }
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (signature, timestamp, event_id) = (
        header("x-omoi-signature-256"),
        header("x-omoi-timestamp"),
        header("x-omoi-event-id"),
    );
    let path = req.uri().path().to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut mac = Hmac::<Sha256>::new_from_slice(state.secret.as_bytes()).expect("any key length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(&body);
    let expected: String = mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect();
    let signed = signature == format!("sha256={expected}");
    let fresh = timestamp
        .parse::<i64>()
        .is_ok_and(|t| (chrono::Utc::now().timestamp() - t).abs() <= 300);
    let (first, nth) = {
        let mut seen = state.seen.lock().unwrap();
        let key = format!("{path} {event_id}");
        let first = !seen.contains(&key);
        if first {
            seen.push(key);
        }
        (first, seen.len())
    };
    let status = if !signed || !fresh {
        StatusCode::UNAUTHORIZED
    } else if first {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    // Recorded as answered before any hold: a held request's answer may
    // never reach its sender.
    state.received.lock().unwrap().push(Received {
        at: chrono::Utc::now(),
        path,
        event_id,
        body: serde_json::from_slice(&body).unwrap_or(Value::Null),
        status: status.as_u16(),
        signed,
        fresh,
    });
    if first && *state.hold.lock().unwrap() == Some(nth) {
        *state.hold.lock().unwrap() = None;
        let released = state.release.notified();
        state.held.notify_one();
        released.await;
    }
    Ok(Response::builder()
        .status(status)
        .body(Full::new(Bytes::new()))
        .expect("a valid response"))
}
