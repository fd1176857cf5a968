//! A stand-in OpenHands agent server for tests: the routes of OPENHANDS.md
//! with scripted outcomes. The prompt chooses one with `outcome=<name>`:
//! finished (the default), error, stuck, slow (runs until interrupted); a
//! model named `.../unavailable` gets 503 on every create. A wrong
//! `X-Session-API-Key` gets 401.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::http::{Reply, Server};

#[derive(Debug, Clone, Default)]
pub struct Conversation {
    pub model: String,
    pub working_dir: String,
    pub prompt: String,
    pub status: String,
    pub polls: u32,
    pub interrupted: bool,
    pub deleted: bool,
    pub events: Vec<Value>,
}

#[derive(Default)]
struct State {
    key: Option<String>,
    conversations: Mutex<HashMap<String, Conversation>>,
}

pub struct StandIn {
    pub url: String,
    state: Arc<State>,
    _server: Server,
}

impl StandIn {
    pub async fn start(key: Option<&str>) -> anyhow::Result<Self> {
        let state = Arc::new(State {
            key: key.map(str::to_owned),
            conversations: Mutex::new(HashMap::new()),
        });
        let server = Server::start(Arc::clone(&state), handle).await?;
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    pub fn conversation(&self, id: &str) -> Option<Conversation> {
        self.state.conversations.lock().unwrap().get(id).cloned()
    }
}

fn outcome(c: &Conversation) -> &str {
    c.prompt
        .split("outcome=")
        .nth(1)
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_alphanumeric()).next())
        .unwrap_or("finished")
}

fn reply(status: StatusCode, body: Value) -> Result<Response<Full<Bytes>>, std::convert::Infallible> {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap())
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    if let Some(key) = &state.key {
        let given = req.headers().get("X-Session-API-Key").and_then(|v| v.to_str().ok());
        if given != Some(key.as_str()) {
            return reply(StatusCode::UNAUTHORIZED, json!({"detail": "bad session key"}));
        }
    }
    let method = req.method().clone();
    let path = req.uri().path().to_owned();
    let body: Value = req
        .into_body()
        .collect()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b.to_bytes()).ok())
        .unwrap_or(Value::Null);
    let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let mut convs = state.conversations.lock().unwrap();
    match (method, parts.as_slice()) {
        (Method::GET, ["health"]) => reply(StatusCode::OK, json!({"status": "ok"})),
        (Method::POST, ["api", "conversations"]) => {
            let id = body["conversation_id"].as_str().unwrap_or_default().to_owned();
            let model = body["agent"]["llm"]["model"].as_str().unwrap_or_default().to_owned();
            if model.ends_with("unavailable") {
                return reply(StatusCode::SERVICE_UNAVAILABLE, json!({"detail": "overloaded"}));
            }
            let existed = convs.contains_key(&id);
            convs.entry(id.clone()).or_insert(Conversation {
                model,
                working_dir: body["workspace"]["working_dir"].as_str().unwrap_or_default().to_owned(),
                status: "idle".into(),
                ..Default::default()
            });
            let status = if existed { StatusCode::OK } else { StatusCode::CREATED };
            reply(status, json!({"id": id, "execution_status": "idle"}))
        }
        (method, ["api", "conversations", id, rest @ ..]) => {
            let Some(c) = convs.get_mut(*id) else {
                return reply(StatusCode::NOT_FOUND, json!({"detail": "no such conversation"}));
            };
            match (method, rest) {
                (Method::POST, ["events"]) => {
                    c.prompt = body["content"][0]["text"].as_str().unwrap_or_default().to_owned();
                    c.events
                        .push(json!({"id": "e1", "kind": "MessageEvent", "message": c.prompt.lines().next()}));
                    reply(StatusCode::OK, json!({"success": true}))
                }
                (Method::POST, ["run"]) => {
                    if c.status == "running" {
                        return reply(StatusCode::CONFLICT, json!({"detail": "already running"}));
                    }
                    c.status = "running".into();
                    c.events
                        .push(json!({"id": "e2", "kind": "ActionEvent", "thought": "writing the change"}));
                    if outcome(c) == "finished" {
                        let _ = std::fs::write(
                            std::path::Path::new(&c.working_dir).join("OPENHANDS.md"),
                            format!("{}\n", c.prompt.lines().next().unwrap_or_default()),
                        );
                    }
                    reply(StatusCode::OK, json!({"success": true}))
                }
                (Method::GET, []) => {
                    c.polls += 1;
                    if c.status == "running" && c.polls >= 2 {
                        match outcome(c) {
                            "finished" => c.status = "finished".into(),
                            "error" => {
                                c.events
                                    .push(json!({"id": "e3", "kind": "AgentErrorEvent", "error": "tool crashed"}));
                                c.status = "error".into();
                            }
                            "stuck" => c.status = "stuck".into(),
                            _ => {}
                        }
                    }
                    // What the agent-server's ConversationStats reports: the
                    // agent's LLM and a condenser's, each with its metrics.
                    let metrics = |model: &str, cost: f64, prompt: i64, completion: i64, cache_read: i64| {
                        json!({"model_name": model, "accumulated_cost": cost,
                               "accumulated_token_usage": {"model": model, "prompt_tokens": prompt,
                                   "completion_tokens": completion, "cache_read_tokens": cache_read,
                                   "cache_write_tokens": 5, "reasoning_tokens": 0, "context_window": 200000}})
                    };
                    let stats = json!({"usage_to_metrics": {
                        "agent": metrics(&c.model, 0.0125, 1200, 300, 200),
                        "condenser": metrics(&c.model, 0.0025, 400, 50, 0)}});
                    reply(
                        StatusCode::OK,
                        json!({"id": id, "execution_status": c.status, "stats": stats}),
                    )
                }
                (Method::GET, ["events", "search"]) => {
                    reply(StatusCode::OK, json!({"items": c.events, "next_page_id": null}))
                }
                (Method::GET, ["agent_final_response"]) => reply(StatusCode::OK, json!({"response": "All done"})),
                (Method::POST, ["interrupt"]) | (Method::POST, ["pause"]) => {
                    c.interrupted = true;
                    c.status = "paused".into();
                    reply(StatusCode::OK, json!({"success": true}))
                }
                (Method::DELETE, []) => {
                    c.deleted = true;
                    reply(StatusCode::OK, json!({"success": true}))
                }
                _ => reply(StatusCode::NOT_FOUND, json!({"detail": "no such route"})),
            }
        }
        _ => reply(StatusCode::NOT_FOUND, json!({"detail": "no such route"})),
    }
}
