//! Delivering notifications: a durable consumer of the ticket events
//! writes a delivery for each subscription that asks for the event's type
//! (acknowledged once written, so no event is lost to a crash), and
//! senders on every replica POST the deliveries due — a ticket's in order,
//! each held by one sender for its try — signed, retried with backoff and
//! jitter on 5xx, 429, 408 and no answer for a day, never on another 4xx;
//! each try recorded.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::connect::dns::Name;
use hyper_util::rt::TokioExecutor;
use omoi_domain::Entity;
use omoi_domain::notify::{Answer, Backoff, DeliveryState, Format, GIVE_UP_AFTER, answer};
use omoi_store::Store;
use omoi_store::notify::{Attempt, Claimed, NewEvent};
use serde_json::{Value, json};
use sha2::Sha256;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::target::{Target, Targets};

const CONSUMER: &str = "omoi-notify";

/// Most deliveries one sender tries at once.
const PER_ROUND: i64 = 32;

/// How deliveries are made.
pub struct Sender {
    pub store: Store,
    pub targets: Targets,
    pub backoff: Backoff,
    /// Most a try may take.
    pub timeout: Duration,
    /// The console, for links to tickets (empty: none).
    pub console_url: String,
    /// Rung when deliveries were written, so that they go at once.
    pub wake: Arc<Notify>,
    /// TLS to receivers (the system's roots), read once.
    pub tls: rustls::ClientConfig,
}

/// TLS as receivers are reached with: the system's root certificates.
pub fn receivers_tls() -> anyhow::Result<rustls::ClientConfig> {
    use hyper_rustls::ConfigBuilderExt;
    Ok(
        rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_safe_default_protocol_versions()?
            .with_native_roots()
            .map_err(|e| anyhow::anyhow!("no TLS roots for notifications: {e}"))?
            .with_no_client_auth(),
    )
}

/// Follows the ticket events until `shutdown`, writing their deliveries
/// (a consumer new to a deployment starts five minutes back: no
/// subscription existed before it, so nothing older is owed).
pub async fn follow(
    sender: Arc<Sender>,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    shutdown: CancellationToken,
) {
    let since = time::OffsetDateTime::now_utc() - time::Duration::minutes(5);
    let filter = topology.entity_filter(Entity::Ticket);
    omoi_bus::consumer::consume_batches_since(
        nats,
        topology,
        CONSUMER.to_owned(),
        filter,
        Some(since),
        shutdown,
        move |batch| {
            let sender = Arc::clone(&sender);
            let events: Vec<NewEvent> = batch
                .iter()
                .map(|c| NewEvent {
                    event_id: c.id,
                    stream_seq: i64::try_from(c.sequence).unwrap_or(i64::MAX),
                    event_type: c.event.event_type.clone(),
                    ticket_id: c.envelope.ticket_id,
                    occurred_at: c.occurred_at.unwrap_or_else(chrono::Utc::now),
                    event: event_json(&c.event),
                })
                .collect();
            async move {
                let added = sender.store.add_deliveries(&events).await.map_err(|e| e.to_string())?;
                if added > 0 {
                    sender.wake.notify_waiters();
                }
                Ok(())
            }
        },
    )
    .await
}

/// The event as the API's JSON mapping shows it.
fn event_json(e: &omoi_proto::events::Event) -> Value {
    let occurred_at = e
        .occurred_at
        .as_ref()
        .and_then(omoi_proto::convert::from_timestamp)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true));
    json!({
        "id": e.id,
        "eventType": e.event_type,
        "entityType": e.entity_type,
        "entityId": e.entity_id,
        "ticketId": e.ticket_id,
        "occurredAt": occurred_at,
        "payload": e.payload.as_ref().map(omoi_proto::convert::struct_to_json).unwrap_or(Value::Null),
    })
}

/// Sends what is due until `shutdown`: at once when woken, else every
/// second (retries falling due, other replicas' deliveries).
pub async fn send(sender: Arc<Sender>, shutdown: CancellationToken) {
    // Held past a try's longest run, so that no other sender takes a
    // delivery in flight; a sender that dies lets go after this.
    let hold = sender.timeout + Duration::from_secs(5);
    loop {
        let woken = sender.wake.notified();
        let claimed = match sender.store.claim_deliveries(PER_ROUND, hold).await {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the deliveries due");
                Vec::new()
            }
        };
        if claimed.is_empty() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = woken => {}
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
            continue;
        }
        futures::future::join_all(claimed.into_iter().map(|c| sender.try_once(c))).await;
        if shutdown.is_cancelled() {
            return;
        }
    }
}

impl Sender {
    /// One try at a delivery, recorded.
    async fn try_once(&self, c: Claimed) {
        let started = Instant::now();
        let target = self.targets.parse(&c.url);
        // The subscription's host only in the log: its address may hold a
        // credential (a Slack webhook's path does).
        let host = target.as_ref().map_or_else(|_| "?".to_owned(), |t| t.host.clone());
        let posted = match target {
            Ok(target) => self.post(&c, &target).await,
            Err(e) => Err(e),
        };
        let (status, retry_after, error) = match posted {
            Ok((status, retry_after)) => (Some(status), retry_after, String::new()),
            Err(e) => (None, None, e),
        };
        let latency_ms = i64::try_from(started.elapsed().as_millis()).unwrap_or(i64::MAX);
        let tries = c.tries + 1;
        let (state, wait) = match answer(status) {
            Answer::Taken => (DeliveryState::Delivered, Duration::ZERO),
            Answer::Refused => (DeliveryState::Refused, Duration::ZERO),
            Answer::Later => {
                let age = (chrono::Utc::now() - c.created_at).to_std().unwrap_or_default();
                if age >= GIVE_UP_AFTER {
                    (DeliveryState::Expired, Duration::ZERO)
                } else {
                    let jitter: f64 = rand::random();
                    (DeliveryState::Pending, self.backoff.wait(tries, retry_after, jitter))
                }
            }
        };
        tracing::info!(
            subscription_id = %c.subscription_id,
            event_id = %c.event_id,
            %host,
            status = status.unwrap_or(0),
            latency_ms,
            tries,
            state = state.as_str(),
            error = %error,
            "notification tried"
        );
        let attempt = Attempt {
            at: chrono::Utc::now(),
            status_code: status.unwrap_or(0),
            latency_ms,
            error,
        };
        if let Err(e) = self
            .store
            .record_try(c.subscription_id, c.event_id, &attempt, state, wait)
            .await
        {
            // Its hold runs out and it is tried again.
            tracing::warn!(event_id = %c.event_id, error = %e, "a notification's try not recorded");
        }
    }

    /// POSTs the delivery: the receiver's status and Retry-After, or why
    /// there was no answer.
    async fn post(&self, c: &Claimed, target: &Target) -> Result<(u16, Option<Duration>), String> {
        let addresses = self.targets.resolve(target).await.map_err(|e| e.to_string())?;
        let body = render(c.format, &c.event, &self.console_url).to_string();
        let timestamp = chrono::Utc::now().timestamp().to_string();
        let signature = sign(&c.secret, &timestamp, &body);
        let request = http::Request::post(target.uri.clone())
            .header("content-type", "application/json")
            .header("user-agent", "omoi-notify")
            .header("x-omoi-event-id", c.event_id.to_string())
            .header("x-omoi-event-type", c.event["eventType"].as_str().unwrap_or_default())
            .header("x-omoi-timestamp", &timestamp)
            .header("x-omoi-signature-256", format!("sha256={signature}"))
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| e.to_string())?;
        // Connected to the addresses just checked, not to what the name
        // may resolve to by the time a connector would look again.
        let mut http = HttpConnector::new_with_resolver(Vetted(addresses));
        http.enforce_http(false);
        http.set_connect_timeout(Some(self.timeout));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(self.tls.clone())
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let client: Client<_, Full<Bytes>> = Client::builder(TokioExecutor::new()).build(connector);
        tokio::time::timeout(self.timeout, async {
            let response = client.request(request).await.map_err(|e| error_chain(&e))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            // Read to the end (bounded by the timeout), then dropped.
            let _ = response.into_body().collect().await;
            Ok::<_, String>((status, retry_after))
        })
        .await
        .map_err(|_| format!("no answer within {} s", self.timeout.as_secs_f64()))?
    }
}

/// An error with its causes, as one line.
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// A resolver that answers with addresses already checked.
#[derive(Clone)]
struct Vetted(Vec<SocketAddr>);

impl tower::Service<Name> for Vetted {
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = std::io::Error;
    type Future = std::future::Ready<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, _: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, _: Name) -> Self::Future {
        std::future::ready(Ok(self.0.clone().into_iter()))
    }
}

/// `hex(HMAC-SHA256(secret, "<timestamp>.<body>"))`: what
/// X-Omoi-Signature-256 carries after `sha256=`.
pub fn sign(secret: &str, timestamp: &str, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes a key of any length");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
}

/// A delivery's body: the event (JSON), or a Slack message about it.
pub fn render(format: Format, event: &Value, console_url: &str) -> Value {
    let ticket_id = event["ticketId"].as_str().unwrap_or_default();
    let link = (!console_url.is_empty() && !ticket_id.is_empty())
        .then(|| format!("{}/tickets/{ticket_id}", console_url.trim_end_matches('/')));
    match format {
        Format::Json => {
            let mut body = event.clone();
            if let (Some(link), Some(o)) = (&link, body.as_object_mut()) {
                o.insert("ticketUrl".into(), Value::String(link.clone()));
            }
            body
        }
        Format::Slack => slack(event, ticket_id, link.as_deref()),
    }
}

/// A Slack incoming-webhook message: a line of text (what notifications
/// show) and blocks (the ticket, linked to the console; what happened;
/// the event).
fn slack(event: &Value, ticket_id: &str, link: Option<&str>) -> Value {
    let p = &event["payload"];
    let event_type = event["eventType"].as_str().unwrap_or_default();
    let title = p["title"]
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| format!("ticket {}", ticket_id.get(..8).unwrap_or(ticket_id)));
    let what = happened(event_type, p);
    let text = format!("{title}: {what}");
    let name = match link {
        Some(link) => format!("<{}|{}>", escape(link), escape(&title)),
        None => format!("*{}*", escape(&title)),
    };
    let mut detail = escape(&what);
    if let Some(tasks) = p["tasks"].as_array() {
        for t in tasks {
            let summary: String = t["summary"].as_str().unwrap_or_default().chars().take(300).collect();
            detail.push_str(&format!(
                "\n• *{}*{}",
                escape(t["title"].as_str().unwrap_or_default()),
                if summary.is_empty() {
                    String::new()
                } else {
                    format!(": {}", escape(&summary))
                }
            ));
        }
    }
    json!({
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("{name}\n{detail}")}},
            {"type": "context", "elements": [
                {"type": "mrkdwn", "text": format!("omoi · {event_type} · {ticket_id}")}
            ]}
        ]
    })
}

/// What an event says happened, in a few words.
fn happened(event_type: &str, p: &Value) -> String {
    let reason = p["reason"].as_str().filter(|r| !r.is_empty());
    let with_reason = |what: &str| match reason {
        Some(r) => format!("{what}: {r}"),
        None => what.to_owned(),
    };
    let phase = p["phase"]
        .as_str()
        .map(|s| s.trim_start_matches("PHASE_").to_ascii_lowercase())
        .unwrap_or_default();
    match event_type {
        "TICKET_CREATED" => "filed".into(),
        "TICKET_COMPLETED" => "completed".into(),
        "TICKET_FAILED" => with_reason("failed"),
        "TICKET_CANCELLED" => with_reason("cancelled"),
        "TICKET_PAUSED" => with_reason("paused"),
        "TICKET_STARTED" => with_reason("in progress"),
        "TICKET_REOPENED" => with_reason("reopened"),
        "TICKET_APPROVAL_REQUESTED" => format!(
            "its {phase} phase awaits approval (round {})",
            p["round"].as_i64().unwrap_or(1)
        ),
        "TICKET_APPROVED" => format!(
            "{} approved its {phase} phase{}",
            p["by"].as_str().unwrap_or("someone"),
            p["comment"]
                .as_str()
                .filter(|c| !c.is_empty())
                .map(|c| format!(": {c}"))
                .unwrap_or_default()
        ),
        "TICKET_CHANGES_REQUESTED" => format!(
            "{} asked for changes before its {phase} phase: {}",
            p["by"].as_str().unwrap_or("someone"),
            p["comment"].as_str().unwrap_or_default()
        ),
        "TICKET_PULL_REQUEST_OPENED" => format!("pull request opened: {}", p["url"].as_str().unwrap_or_default()),
        "TICKET_REACTION" => format!(
            "reacting to {} ({})",
            p["kind"].as_str().unwrap_or_default().replace('_', " "),
            p["url"].as_str().unwrap_or_default()
        ),
        other => other.to_ascii_lowercase().replace('_', " "),
    }
}

/// Text as Slack's mrkdwn takes it: `&`, `<` and `>` escaped.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_is_the_hmac_of_the_timestamp_and_the_body() {
        // echo -n '1700000000.{"a":1}' | openssl dgst -sha256 -hmac 'a-long-enough-secret'
        assert_eq!(
            sign("a-long-enough-secret", "1700000000", r#"{"a":1}"#),
            "0d4a1d9b316bc892d55406462a88e913cbb4b4c151974aa374503f58d0bbdfbe"
        );
    }

    fn approval_requested() -> Value {
        json!({
            "id": "e1",
            "eventType": "TICKET_APPROVAL_REQUESTED",
            "ticketId": "01a2b3c4-0000-7000-8000-000000000001",
            "payload": {
                "title": "Add <login> & more",
                "phase": "PHASE_IMPLEMENTATION",
                "round": 2,
                "tasks": [{"title": "Set up", "summary": "Wrote PLAN.md"}]
            }
        })
    }

    #[test]
    fn a_json_delivery_is_the_event_with_a_link_to_its_ticket() {
        let body = render(Format::Json, &approval_requested(), "https://omoi.example.com/");
        assert_eq!(body["eventType"], "TICKET_APPROVAL_REQUESTED");
        assert_eq!(
            body["ticketUrl"],
            "https://omoi.example.com/tickets/01a2b3c4-0000-7000-8000-000000000001"
        );
        assert!(
            render(Format::Json, &approval_requested(), "")
                .get("ticketUrl")
                .is_none()
        );
    }

    #[test]
    fn a_slack_delivery_is_an_incoming_webhook_message_linking_to_the_console() {
        let body = render(Format::Slack, &approval_requested(), "https://omoi.example.com");
        assert_eq!(
            body["text"],
            "Add <login> & more: its implementation phase awaits approval (round 2)"
        );
        let section = body["blocks"][0]["text"]["text"].as_str().unwrap();
        assert!(
            section.starts_with(
                "<https://omoi.example.com/tickets/01a2b3c4-0000-7000-8000-000000000001|Add &lt;login&gt; &amp; more>\n"
            ),
            "{section}"
        );
        assert!(section.contains("• *Set up*: Wrote PLAN.md"), "{section}");
        assert_eq!(body["blocks"][0]["type"], "section");
        assert_eq!(body["blocks"][1]["type"], "context");
    }
}
