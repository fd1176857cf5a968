//! The `openhands` runner: drives an OpenHands agent server over its HTTP
//! API (one conversation per task attempt, the task id as conversation id),
//! following it by polling until it finishes, and stopping it on
//! cancellation or timeout. The agent server's API as used here:
//! `POST /api/conversations` (create one with the model), `POST
//! /api/conversations/{id}/events` (the prompt) and `.../run`, `GET
//! /api/conversations/{id}` (its status and stats), `GET
//! .../events/search` (its events, paged), `GET .../agent_final_response`,
//! `POST .../interrupt` to stop it and `DELETE /api/conversations/{id}` at
//! the end; every call with `X-Session-API-Key` when the server has one.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use omoi_proto::common::{OutputStream, Usage};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use super::{RunContext, RunOutcome, Runner, RunnerError, Stopped};
use crate::events::{self, EventSink};

pub struct OpenHandsRunner {
    base: String,
    session_key: Option<String>,
    model: String,
    llm_api_key: Option<String>,
    poll: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

/// An answer of the agent server.
struct Answer {
    status: StatusCode,
    body: Value,
}

impl OpenHandsRunner {
    pub fn new(
        url: &str,
        session_key: Option<String>,
        model: String,
        llm_api_key: Option<String>,
        poll: Duration,
    ) -> Result<Self, RunnerError> {
        let base = url.trim_end_matches('/').to_owned();
        if !base.starts_with("http://") {
            return Err(RunnerError::Config {
                setting: "OPENHANDS_URL",
                message: format!("{url:?} must be an http:// URL (the agent server runs beside the executor)"),
            });
        }
        base.parse::<http::Uri>().map_err(|e| RunnerError::Config {
            setting: "OPENHANDS_URL",
            message: format!("{url:?}: {e}"),
        })?;
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(5)));
        Ok(Self {
            base,
            session_key: session_key.filter(|k| !k.is_empty()),
            model,
            llm_api_key: llm_api_key.filter(|k| !k.is_empty()),
            poll,
            client: Client::builder(TokioExecutor::new()).build(connector),
        })
    }

    async fn call(&self, method: Method, path: &str, body: Option<Value>) -> Result<Answer, RunnerError> {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(format!("{}{path}", self.base))
            .header("accept", "application/json");
        if let Some(k) = &self.session_key {
            req = req.header("X-Session-API-Key", k);
        }
        let body = match body {
            Some(v) => {
                req = req.header("content-type", "application/json");
                Full::new(Bytes::from(v.to_string()))
            }
            None => Full::new(Bytes::new()),
        };
        let req = req.body(body).map_err(|e| RunnerError::Agent {
            message: format!("building {method} {path}: {e}"),
            permanent: true,
        })?;
        let resp = tokio::time::timeout(Duration::from_secs(30), self.client.request(req))
            .await
            .map_err(|_| RunnerError::Agent {
                message: format!("openhands {method} {path}: timeout"),
                permanent: false,
            })?
            .map_err(|e| RunnerError::Agent {
                message: format!("openhands {method} {path}: connection failed: {e}"),
                permanent: false,
            })?;
        let status = resp.status();
        let bytes = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| RunnerError::Agent {
                message: format!("openhands {method} {path}: reading the answer: {e}"),
                permanent: false,
            })?
            .to_bytes();
        let body = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
        if status == StatusCode::UNAUTHORIZED || status == StatusCode::FORBIDDEN {
            return Err(RunnerError::Agent {
                message: format!("openhands {method} {path}: authentication failed ({status})"),
                permanent: true,
            });
        }
        if status.is_server_error() {
            return Err(RunnerError::Agent {
                message: format!("openhands {method} {path}: server unavailable ({status})"),
                permanent: false,
            });
        }
        Ok(Answer { status, body })
    }

    fn expect_ok(answer: &Answer, what: &str, also: &[StatusCode]) -> Result<(), RunnerError> {
        if answer.status.is_success() || also.contains(&answer.status) {
            Ok(())
        } else {
            Err(RunnerError::Agent {
                message: format!("openhands {what}: unexpected answer {}: {}", answer.status, answer.body),
                permanent: answer.status.is_client_error(),
            })
        }
    }
}

#[async_trait::async_trait]
impl Runner for OpenHandsRunner {
    async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let started = Instant::now();
        let id = ctx.task_id.to_string();
        let mut llm = json!({"usage_id": "agent", "model": self.model});
        if let Some(key) = &self.llm_api_key {
            llm["api_key"] = json!(key);
        }
        let created = self
            .call(
                Method::POST,
                "/api/conversations",
                Some(json!({
                    "agent": {
                        "kind": "Agent",
                        "llm": llm,
                        "tools": [{"name": "terminal"}, {"name": "file_editor"}, {"name": "task_tracker"}],
                    },
                    "workspace": {"working_dir": ctx.workspace.display().to_string()},
                    "conversation_id": id,
                    "max_iterations": 500,
                    "stuck_detection": true,
                    "confirmation_policy": {"kind": "NeverConfirm"},
                })),
            )
            .await?;
        Self::expect_ok(&created, "create conversation", &[])?;
        // Recorded as the attempt's session. The agent server's
        // conversation is deleted when the run ends, so a later attempt
        // starts a new one (told what this one changed), not resumes it.
        ctx.session.send_replace(Some(id.clone()));
        out.line(
            OutputStream::System,
            format!("openhands conversation {id} ({})", self.model),
        );
        let result = self.follow(ctx, &id, out, stop, started).await;
        // Always clean up, whatever happened.
        if let Err(e) = self
            .call(Method::DELETE, &format!("/api/conversations/{id}"), None)
            .await
        {
            out.line(OutputStream::System, format!("deleting the conversation failed: {e}"));
        }
        result
    }
}

impl OpenHandsRunner {
    async fn follow(
        &self,
        ctx: &RunContext,
        id: &str,
        out: &dyn EventSink,
        stop: &CancellationToken,
        started: Instant,
    ) -> Result<RunOutcome, RunnerError> {
        self.start_conversation(id, &ctx.prompt).await?;
        let deadline = ctx.timeout.map(|t| started + t);
        let mut page = Cursor::default();
        let mut last_status = String::new();
        loop {
            self.relay_events(id, &mut page, out).await;
            let info = self
                .call(Method::GET, &format!("/api/conversations/{id}"), None)
                .await?;
            Self::expect_ok(&info, "conversation status", &[])?;
            let status = info.body["execution_status"].as_str().unwrap_or("unknown").to_owned();
            if status != last_status {
                out.line(OutputStream::System, format!("openhands status: {status}"));
                last_status = status.clone();
            }
            let exit_code = match status.as_str() {
                "finished" => Some(0),
                "error" | "stuck" => Some(1),
                _ => None,
            };
            if let Some(exit_code) = exit_code {
                self.relay_events(id, &mut page, out).await;
                if exit_code == 0 {
                    self.relay_final_response(id, out).await;
                } else {
                    out.line(OutputStream::Stderr, format!("openhands conversation ended: {status}"));
                }
                let usage = usage_of(&info.body["stats"]);
                if let Some(u) = &usage {
                    out.emit(events::usage(u));
                }
                return Ok(RunOutcome {
                    exit_code: Some(exit_code),
                    stopped: None,
                    duration: started.elapsed(),
                    usage,
                    verdict: None,
                    retry_after: None,
                });
            }
            if let Some(stopped) = self.pause(deadline, stop).await {
                out.line(OutputStream::System, "interrupting the openhands conversation".into());
                let _ = self
                    .call(Method::POST, &format!("/api/conversations/{id}/interrupt"), None)
                    .await;
                return Ok(RunOutcome {
                    exit_code: None,
                    stopped: Some(stopped),
                    duration: started.elapsed(),
                    usage: None,
                    verdict: None,
                    retry_after: None,
                });
            }
        }
    }

    /// Sends the prompt and sets the agent running (already running is fine).
    async fn start_conversation(&self, id: &str, prompt: &str) -> Result<(), RunnerError> {
        let sent = self
            .call(
                Method::POST,
                &format!("/api/conversations/{id}/events"),
                Some(json!({"role": "user", "content": [{"type": "text", "text": prompt}], "run": false})),
            )
            .await?;
        Self::expect_ok(&sent, "send the prompt", &[])?;
        let run = self
            .call(Method::POST, &format!("/api/conversations/{id}/run"), None)
            .await?;
        Self::expect_ok(&run, "run", &[StatusCode::CONFLICT])
    }

    /// The agent's last word, as the run's last output line.
    async fn relay_final_response(&self, id: &str, out: &dyn EventSink) {
        let final_response = self
            .call(
                Method::GET,
                &format!("/api/conversations/{id}/agent_final_response"),
                None,
            )
            .await
            .ok()
            .and_then(|a| a.body["response"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if !final_response.is_empty() {
            out.line(OutputStream::Stdout, final_response);
        }
    }

    /// Waits one poll period; why the run must stop instead, if it must.
    async fn pause(&self, deadline: Option<Instant>, stop: &CancellationToken) -> Option<Stopped> {
        let timed_out = async {
            match deadline {
                Some(d) => tokio::time::sleep_until(d.into()).await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = tokio::time::sleep(self.poll) => None,
            _ = stop.cancelled() => Some(Stopped::Cancelled),
            _ = timed_out => Some(Stopped::TimedOut),
        }
    }

    /// Streams the conversation's new events as output lines.
    async fn relay_events(&self, id: &str, cursor: &mut Cursor, out: &dyn EventSink) {
        let page = &mut cursor.page;
        for _ in 0..20 {
            let mut path = format!("/api/conversations/{id}/events/search?limit=100");
            if let Some(p) = page.as_ref() {
                path.push_str(&format!("&page_id={p}"));
            }
            let Ok(answer) = self.call(Method::GET, &path, None).await else {
                return;
            };
            let items = answer.body["items"].as_array().cloned().unwrap_or_default();
            for e in &items {
                if let Some(eid) = e["id"].as_str()
                    && !cursor.seen.insert(eid.to_owned())
                {
                    continue;
                }
                let kind = e["kind"].as_str().unwrap_or("Event");
                let text = describe(e);
                let stream = if kind == "AgentErrorEvent" {
                    OutputStream::Stderr
                } else {
                    OutputStream::Stdout
                };
                out.line(stream, format!("{kind}: {text}"));
            }
            match answer.body["next_page_id"].as_str() {
                Some(next) if !next.is_empty() => *page = Some(next.to_owned()),
                _ => {
                    // Resume after the last event seen next time.
                    if let Some(last) = items.last().and_then(|e| e["id"].as_str()) {
                        *page = Some(last.to_owned());
                    }
                    return;
                }
            }
        }
    }
}

/// Where the event listing resumes, and the events already relayed (the
/// page cursor may repeat the last one).
#[derive(Default)]
struct Cursor {
    page: Option<String>,
    seen: std::collections::HashSet<String>,
}

/// A one-line summary of an agent event.
fn describe(e: &Value) -> String {
    for key in [
        "message",
        "thought",
        "content",
        "observation",
        "error",
        "value",
        "action",
    ] {
        match &e[key] {
            Value::String(s) if !s.is_empty() => return s.lines().next().unwrap_or("").chars().take(500).collect(),
            Value::Null => {}
            other => {
                let s = other.to_string();
                if s != "\"\"" {
                    return s.chars().take(500).collect();
                }
            }
        }
    }
    String::new()
}

/// What a conversation spent, from its info's `stats` (the agent-server's
/// ConversationStats: `usage_to_metrics`, one entry per LLM the
/// conversation used, each with `accumulated_cost` and
/// `accumulated_token_usage`). Prompt tokens count the cached ones, which
/// are taken out of the input here.
fn usage_of(stats: &Value) -> Option<Usage> {
    let metrics = stats.get("usage_to_metrics")?.as_object()?;
    let mut sum = Usage::default();
    let mut models: Vec<String> = Vec::new();
    for m in metrics.values() {
        let t = &m["accumulated_token_usage"];
        let n = |k: &str| t.get(k).and_then(Value::as_i64).unwrap_or_default();
        let (cache_read, cache_write) = (n("cache_read_tokens"), n("cache_write_tokens"));
        sum.input_tokens += (n("prompt_tokens") - cache_read - cache_write).max(0);
        sum.output_tokens += n("completion_tokens");
        sum.cache_read_tokens += cache_read;
        sum.cache_write_tokens += cache_write;
        sum.cost_usd += m.get("accumulated_cost").and_then(Value::as_f64).unwrap_or_default();
        let model = m.get("model_name").and_then(Value::as_str).unwrap_or_default();
        if !model.is_empty() && !models.iter().any(|x| x == model) {
            models.push(model.to_owned());
        }
    }
    sum.model = models.join(", ");
    (sum != Usage::default()).then_some(sum)
}
