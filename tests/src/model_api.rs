//! A stand-in for the model APIs of the coding agents, enough for the real
//! CLIs to run against it offline: Anthropic's Messages API
//! (`POST /v1/messages`, for Claude Code), OpenAI's Responses API
//! (`POST /v1/responses`, for Codex) and the Gemini API
//! (`POST /v1beta/models/<model>:streamGenerateContent`, for Gemini CLI). Every answer is streamed as
//! server-sent events the way the API streams them. The prompt picks the
//! script with `outcome=<name>`:
//!
//! - `write` (the default): turn 1 writes `hello.txt` in the agent's working
//!   directory (Claude's Write tool; Codex's `exec_command`; Gemini's
//!   `write_file`), turn 2 runs
//!   `cat hello.txt`, turn 3 answers "Done: wrote hello.txt".
//! - `unauthorized`: 401.
//! - `rate_limited`: 429.
//! - `reveal` (Messages API): as `write`, but turn 2 runs `env`, so that the
//!   agent's environment comes back in the conversation.
//! - `loop` (Messages API): every turn runs the same failing command, `cat
//!   missing.txt`, whatever it is told — an agent going in circles.
//!
//! A later prompt of the conversation (a follow-up's) with `file=<name>`
//! in it starts the script again from there, writing `<name>` (Messages
//! API); one asking for ``(`git merge <base>`)`` starts the merge script:
//! turn 1 runs that merge, turn 2 resolves each conflicted file by keeping
//! both sides (its conflict markers deleted), turn 3 answers. Any other
//! later prompt (a resumed session's) carries on where the conversation is.
//! A judge's prompt (omoi's, asking for `{"pick": …}` among `## Candidate
//! <n>` sections; Messages API) is answered at once, picking the last
//! candidate shown: `{"pick": <n>, "reasons": "candidate <n> is the most
//! thorough"}`. The guardian's reviewer (a prompt asking to review an
//! agent's work in progress) is answered at once: not progressing, and
//! what to tell the agent, when the agent keeps reading `missing.txt`;
//! progressing otherwise.
//!
//! It adds up the usage it reported, so that a test can compare what the
//! agent and omoi made of it; `hold(turn)` keeps that turn's answer back
//! until `release()`, so that a test can look at a run in the middle.

use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::http::{Reply, Server};
use tokio::sync::Notify;

/// One model request: when it arrived, the agent's working directory, the
/// conversation it carried.
pub type Asked = (chrono::DateTime<chrono::Utc>, String, Value);

/// The usage the stand-in reported, summed over its answers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    pub answers: u32,
    /// Uncached input tokens (the Responses API counts cached ones inside
    /// its `input_tokens`; they are taken out here).
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
}

impl Tally {
    /// What these tokens cost at Claude Sonnet 4.5's list prices (USD per
    /// million: input 3, output 15, cache write 3.75, cache read 0.30).
    pub fn sonnet_4_5_cost(&self) -> f64 {
        (self.input_tokens as f64 * 3.0
            + self.output_tokens as f64 * 15.0
            + self.cache_write_tokens as f64 * 3.75
            + self.cache_read_tokens as f64 * 0.30)
            / 1e6
    }

    /// What these tokens cost at Gemini 2.5 Flash's list prices (USD per
    /// million: input 0.30, cached input 0.075, output 2.50).
    pub fn gemini_2_5_flash_cost(&self) -> f64 {
        (self.input_tokens as f64 * 0.30 + self.cache_read_tokens as f64 * 0.075 + self.output_tokens as f64 * 2.50)
            / 1e6
    }

    /// What these tokens cost at GPT-5-Codex's list prices (USD per
    /// million: input 1.25, cached input 0.125, output 10).
    pub fn gpt_5_codex_cost(&self) -> f64 {
        (self.input_tokens as f64 * 1.25 + self.cache_read_tokens as f64 * 0.125 + self.output_tokens as f64 * 10.0)
            / 1e6
    }
}

#[derive(Default)]
struct State {
    tally: Mutex<Tally>,
    hold: Mutex<Option<usize>>,
    held: Notify,
    release: Notify,
    /// The working directories of the runs seen.
    directories: Mutex<Vec<String>>,
    /// Each request: when it arrived, the agent's working directory, the
    /// conversation it carried (`messages`, `input`, `contents`).
    conversations: Mutex<Vec<Asked>>,
    /// The API key each request carried.
    keys: Mutex<Vec<String>>,
}

pub struct ModelApi {
    pub url: String,
    state: Arc<State>,
    _server: Server,
}

impl ModelApi {
    pub async fn start() -> anyhow::Result<Self> {
        let state = Arc::new(State::default());
        let server = Server::start(Arc::clone(&state), handle).await?;
        Ok(Self {
            url: server.url.clone(),
            state,
            _server: server,
        })
    }

    pub fn tally(&self) -> Tally {
        *self.state.tally.lock().unwrap()
    }

    pub fn directories(&self) -> Vec<String> {
        self.state.directories.lock().unwrap().clone()
    }

    /// The conversation of every request so far, in order.
    pub fn conversations(&self) -> Vec<Value> {
        self.asked().into_iter().map(|(_, _, c)| c).collect()
    }

    /// Every request so far, in order.
    pub fn asked(&self) -> Vec<Asked> {
        self.state.conversations.lock().unwrap().clone()
    }

    /// The API key every request so far carried, in order (`x-api-key`,
    /// a bearer token, `x-goog-api-key` or the `key` parameter; empty when
    /// none).
    pub fn keys(&self) -> Vec<String> {
        self.state.keys.lock().unwrap().clone()
    }

    /// Keeps the answer to turn `turn` (from 1) back until `release`.
    pub fn hold(&self, turn: usize) {
        *self.state.hold.lock().unwrap() = Some(turn);
    }

    /// Waits until a held turn was asked for.
    pub async fn held(&self) {
        self.state.held.notified().await;
    }

    pub fn release(&self) {
        *self.state.hold.lock().unwrap() = None;
        self.state.release.notify_one();
    }
}

/// An agent CLI, set up to talk to a [`ModelApi`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cli {
    Claude,
    Codex,
    Gemini,
}

impl ModelApi {
    /// The environment of an executor running `cli` (the pinned one)
    /// against this stand-in, with `home` as its HOME and `key` as its API
    /// key, the CLI's own retries of a failing API off (a test does not
    /// wait them out).
    pub fn executor_env(&self, cli: Cli, home: &std::path::Path, key: &str) -> Vec<(String, String)> {
        let home = home.display().to_string();
        let (runner, model, bin) = match cli {
            Cli::Claude => ("claude-code", "claude-sonnet-4-5", "claude"),
            Cli::Codex => ("codex", "gpt-5-codex", "codex"),
            Cli::Gemini => ("gemini", "gemini-2.5-flash", "gemini"),
        };
        let bin = crate::process::agent_cli(bin).display().to_string();
        let mut env = vec![
            ("OMOI_RUNNER", runner.to_owned()),
            ("OMOI_AGENT_BIN", bin),
            ("OMOI_AGENT_MODEL", model.to_owned()),
            ("HOME", home),
        ];
        env.extend(match cli {
            Cli::Claude => vec![
                ("ANTHROPIC_BASE_URL", self.url.clone()),
                ("ANTHROPIC_API_KEY", key.to_owned()),
                ("CLAUDE_CODE_MAX_RETRIES", "0".to_owned()),
                ("OMOI_RUNNER_ENV_ALLOW", "PATH,HOME,CLAUDE_CODE_MAX_RETRIES".to_owned()),
            ],
            Cli::Codex => vec![
                (
                    "OMOI_AGENT_ARGS",
                    "-c model_providers.omoi.request_max_retries=0 -c model_providers.omoi.stream_max_retries=0"
                        .to_owned(),
                ),
                ("OPENAI_BASE_URL", format!("{}/v1", self.url)),
                ("OPENAI_API_KEY", key.to_owned()),
                ("OMOI_RUNNER_ENV_ALLOW", "PATH,HOME".to_owned()),
            ],
            Cli::Gemini => vec![
                ("GOOGLE_GEMINI_BASE_URL", self.url.clone()),
                ("GEMINI_API_KEY", key.to_owned()),
                ("OMOI_RUNNER_ENV_ALLOW", "PATH,HOME".to_owned()),
            ],
        });
        env.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
    }
}

fn outcome(script: &str) -> String {
    script
        .split("outcome=")
        .nth(1)
        .and_then(|rest| rest.split(|ch: char| !ch.is_ascii_alphanumeric() && ch != '_').next())
        .unwrap_or("write")
        .to_owned()
}

/// The agent's working directory, as its prompt states it (Claude Code:
/// "Primary working directory: <dir>"; Codex: "<cwd><dir></cwd>"; Gemini
/// CLI: "**Workspace Directories:**\n  - <dir>").
fn working_directory(body: &Value) -> String {
    let text = body.to_string();
    [
        "Primary working directory: ",
        "<cwd>",
        "Workspace Directories:**\\n  - ",
    ]
    .iter()
    .find_map(|marker| text.split(marker).nth(1))
    .and_then(|rest| rest.split(['\\', '"', '<']).next())
    .unwrap_or_default()
    .to_owned()
}

/// An error answer in the shape of `api`'s own errors.
fn error(api: Api, status: StatusCode) -> Response<Full<Bytes>> {
    let message = format!("stand-in: {status}");
    let body = match api {
        Api::Messages => {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "authentication_error",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
                StatusCode::NOT_FOUND => "not_found_error",
                _ => "invalid_request_error",
            };
            json!({"type": "error", "error": {"type": kind, "message": message}})
        }
        Api::Responses => {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "invalid_api_key",
                StatusCode::TOO_MANY_REQUESTS => "rate_limit_exceeded",
                _ => "invalid_request_error",
            };
            json!({"error": {"type": kind, "code": kind, "message": message}})
        }
        Api::Gemini => {
            let kind = match status {
                StatusCode::UNAUTHORIZED => "UNAUTHENTICATED",
                StatusCode::TOO_MANY_REQUESTS => "RESOURCE_EXHAUSTED",
                _ => "INVALID_ARGUMENT",
            };
            json!({"error": {"code": status.as_u16(), "message": message, "status": kind}})
        }
    };
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .unwrap()
}

fn sse(out: &mut String, event: &str, data: Value) {
    out.push_str(&format!("event: {event}\ndata: {data}\n\n"));
}

/// Which API a request is for.
#[derive(Clone, Copy, PartialEq)]
enum Api {
    Messages,
    Responses,
    Gemini,
}

/// The API key `req` carries, however its API takes it.
fn key_of(req: &Request<Incoming>) -> String {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    header("x-api-key")
        .or_else(|| header("authorization").map(|v| v.trim_start_matches("Bearer ")))
        .or_else(|| header("x-goog-api-key"))
        .or_else(|| {
            req.uri()
                .query()
                .and_then(|q| q.split('&').find_map(|kv| kv.strip_prefix("key=")))
        })
        .unwrap_or_default()
        .to_owned()
}

async fn handle(state: Arc<State>, req: Request<Incoming>) -> Reply {
    state.keys.lock().unwrap().push(key_of(&req));
    let api = match req.uri().path() {
        p if p.ends_with("/v1/messages") => Api::Messages,
        p if p.ends_with("/v1/responses") => Api::Responses,
        p if p.ends_with(":streamGenerateContent") => Api::Gemini,
        _ => return Ok(error(Api::Messages, StatusCode::NOT_FOUND)),
    };
    let body: Value = req
        .into_body()
        .collect()
        .await
        .ok()
        .and_then(|b| serde_json::from_slice(&b.to_bytes()).ok())
        .unwrap_or(Value::Null);
    let script = match api {
        Api::Messages => body["messages"][0].to_string(),
        Api::Responses => body["input"].to_string(),
        Api::Gemini => body["contents"].to_string(),
    };
    match outcome(&script).as_str() {
        "unauthorized" => return Ok(error(api, StatusCode::UNAUTHORIZED)),
        "rate_limited" => return Ok(error(api, StatusCode::TOO_MANY_REQUESTS)),
        _ => {}
    }
    let dir = working_directory(&body);
    if dir.is_empty() {
        // Never script a write to a path we do not know.
        return Ok(error(api, StatusCode::BAD_REQUEST));
    }
    let conversation = match api {
        Api::Messages => body["messages"].clone(),
        Api::Responses => body["input"].clone(),
        Api::Gemini => body["contents"].clone(),
    };
    state
        .conversations
        .lock()
        .unwrap()
        .push((chrono::Utc::now(), working_directory(&body), conversation));
    let (since, script_of) = follow_up_script(&body);
    let turn = 1 + match api {
        Api::Messages => body["messages"]
            .as_array()
            .map_or(0, |m| m.iter().skip(since).filter(|m| m["role"] == "assistant").count()),
        Api::Responses => body["input"]
            .as_array()
            .map_or(0, |i| i.iter().filter(|i| i["type"] == "function_call_output").count()),
        Api::Gemini => script.matches("\"functionResponse\"").count(),
    };
    let held = *state.hold.lock().unwrap() == Some(turn);
    if held {
        let released = state.release.notified();
        state.held.notify_one();
        released.await;
    }
    if turn == 1 {
        state.directories.lock().unwrap().push(dir.clone());
    }
    let (input, output, cache_read, cache_write) = (100 + 10 * turn as i64, 30 + turn as i64, 20, 10);
    {
        let mut t = state.tally.lock().unwrap();
        t.answers += 1;
        t.input_tokens += input;
        t.output_tokens += output;
        t.cache_read_tokens += cache_read;
        if api == Api::Messages {
            t.cache_write_tokens += cache_write;
        }
    }
    let out = match api {
        Api::Messages => {
            // `outcome=reveal`: its shell command shows the agent's environment.
            let script_of = if outcome(&script) == "loop" && !matches!(script_of, Script::Review { .. }) {
                Script::Loop
            } else {
                script_of
            };
            let command = match (outcome(&script).as_str(), &script_of) {
                ("reveal", _) => "env".to_owned(),
                (_, Script::Write(file)) => format!("cat {file}"),
                (_, Script::Merge(_) | Script::Judge(_) | Script::Loop | Script::Review { .. }) => String::new(),
            };
            messages(
                &body,
                turn,
                &dir,
                &script_of,
                &command,
                (input, output, cache_read, cache_write),
            )
        }
        Api::Responses => responses(turn, (input, output, cache_read)),
        Api::Gemini => gemini(turn, &dir, (input, output, cache_read)),
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "text/event-stream")
        .body(Full::new(Bytes::from(out)))
        .unwrap())
}

/// A turn of the Gemini API: `write_file`, then `run_shell_command`, then
/// the answer, in one streamed chunk.
fn gemini(turn: usize, dir: &str, (input, output, cached): (i64, i64, i64)) -> String {
    let parts = match turn {
        1 => json!([{"text": "I will write the file."},
                     {"functionCall": {"name": "write_file",
                                       "args": {"file_path": format!("{dir}/hello.txt"), "content": "hello from gemini\n"}}}]),
        2 => json!([{"functionCall": {"name": "run_shell_command",
                                      "args": {"command": "cat hello.txt", "description": "Show the file"}}}]),
        _ => json!([{"text": "Done: wrote hello.txt"}]),
    };
    // The Gemini API counts cached tokens inside promptTokenCount.
    let chunk = json!({"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
                       "usageMetadata": {"promptTokenCount": input + cached, "cachedContentTokenCount": cached,
                                         "candidatesTokenCount": output, "totalTokenCount": input + cached + output},
                       "modelVersion": "gemini-2.5-flash"});
    format!("data: {chunk}\r\n\r\n")
}

/// A turn of the Responses API: Codex's `exec_command` function, then the answer.
fn responses(turn: usize, (input, output, cached): (i64, i64, i64)) -> String {
    let call = |cmd: &str| {
        json!({"type": "function_call", "id": format!("fc_{turn}"), "call_id": format!("call_{turn}"),
               "name": "exec_command", "arguments": json!({"cmd": cmd}).to_string(), "status": "completed"})
    };
    let item = match turn {
        1 => call("printf 'hello from codex\\n' > hello.txt"),
        2 => call("cat hello.txt"),
        _ => json!({"type": "message", "role": "assistant", "id": format!("msg_{turn}"), "status": "completed",
                    "content": [{"type": "output_text", "text": "Done: wrote hello.txt", "annotations": []}]}),
    };
    let id = format!("resp_{turn}_{}", uuid::Uuid::new_v4().simple());
    let mut out = String::new();
    sse(
        &mut out,
        "response.created",
        json!({"type": "response.created", "response": {"id": id, "object": "response", "status": "in_progress", "output": []}}),
    );
    sse(
        &mut out,
        "response.output_item.added",
        json!({"type": "response.output_item.added", "output_index": 0, "item": item}),
    );
    sse(
        &mut out,
        "response.output_item.done",
        json!({"type": "response.output_item.done", "output_index": 0, "item": item}),
    );
    // The Responses API counts cached tokens inside input_tokens.
    let usage = json!({"input_tokens": input + cached, "input_tokens_details": {"cached_tokens": cached},
                       "output_tokens": output, "output_tokens_details": {"reasoning_tokens": 0},
                       "total_tokens": input + cached + output});
    sse(
        &mut out,
        "response.completed",
        json!({"type": "response.completed", "response": {"id": id, "object": "response", "status": "completed",
               "output": [item], "usage": usage}}),
    );
    out
}

/// What a Messages API conversation's script does.
enum Script {
    /// Writes the file.
    Write(String),
    /// Merges the branch and resolves its conflicts.
    Merge(String),
    /// Judges candidates: picks this one.
    Judge(u32),
    /// Runs the same failing command, turn after turn.
    Loop,
    /// Reviews an agent's work in progress: going in circles when it keeps
    /// reading the missing file, else progressing.
    Review { circles: bool },
}

/// Where the script starts in a Messages API conversation, and what it
/// does: from the last user prompt naming `file=<name>` or asking for a
/// merge, else from the start writing `hello.txt`.
fn follow_up_script(body: &Value) -> (usize, Script) {
    let Some(messages) = body["messages"].as_array() else {
        return (0, Script::Write("hello.txt".into()));
    };
    let name_after = |text: &str, marker: &str| -> Option<String> {
        let name: String = text
            .split(marker)
            .nth(1)?
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '/'))
            .collect();
        (!name.is_empty()).then_some(name)
    };
    messages
        .iter()
        .enumerate()
        .rev()
        .filter(|(_, m)| m["role"] == "user")
        .find_map(|(i, m)| {
            let text = m["content"].to_string();
            if text.contains("omoi's guardian asks you to review") {
                return Some((
                    i,
                    Script::Review {
                        circles: text.contains("missing.txt"),
                    },
                ));
            }
            if text.contains("Answer with one JSON object and nothing else") {
                let last = text
                    .split("## Candidate ")
                    .skip(1)
                    .filter_map(|rest| {
                        rest.chars()
                            .take_while(char::is_ascii_digit)
                            .collect::<String>()
                            .parse()
                            .ok()
                    })
                    .max()
                    .unwrap_or(0);
                return Some((i, Script::Judge(last)));
            }
            if let Some(base) = name_after(&text, "(`git merge ") {
                return Some((i, Script::Merge(base)));
            }
            name_after(&text, "file=").map(|name| (i, Script::Write(name)))
        })
        .unwrap_or((0, Script::Write("hello.txt".into())))
}

/// A turn of the Messages API: Claude's Write of `file`, then Bash running
/// `command`, then the answer; or the merge script's turn.
fn messages(
    body: &Value,
    turn: usize,
    dir: &str,
    script: &Script,
    command: &str,
    (input, output, cache_read, cache_write): (i64, i64, i64, i64),
) -> String {
    let bash = |id: &str, command: String, description: &str| {
        json!({"type": "tool_use", "id": id, "name": "Bash",
               "input": {"command": command, "description": description}})
    };
    let blocks = match script {
        Script::Write(file) => {
            let id = |what: &str| format!("toolu_{what}_{}", file.replace('.', "_"));
            match turn {
                1 => vec![
                    json!({"type": "text", "text": "I will write the file."}),
                    json!({"type": "tool_use", "id": id("write"), "name": "Write",
                           "input": {"file_path": format!("{dir}/{file}"), "content": "hello from claude\n"}}),
                ],
                2 => vec![bash(&id("cat"), command.to_owned(), "Show the file")],
                _ => vec![json!({"type": "text", "text": format!("Done: wrote {file}")})],
            }
        }
        Script::Loop => vec![bash(
            &format!("toolu_loop_{turn}"),
            "cat missing.txt".to_owned(),
            "Show the file",
        )],
        Script::Review { circles: true } => vec![json!({"type": "text", "text":
            "{\"progressing\": false, \"say\": \"You keep reading missing.txt, which does not exist: write it first.\"}"})],
        Script::Review { circles: false } => vec![json!({"type": "text", "text": "{\"progressing\": true, \"say\": \"\"}"})],
        Script::Judge(pick) => vec![json!({"type": "text", "text": format!(
            "{{\"pick\": {pick}, \"reasons\": \"candidate {pick} is the most thorough\"}}"
        )})],
        Script::Merge(base) => match turn {
            1 => vec![
                json!({"type": "text", "text": format!("I will merge {base}.")}),
                bash("toolu_merge", format!("git merge {base} || true"), "Merge the base"),
            ],
            2 => vec![bash(
                "toolu_resolve",
                "git diff --name-only --diff-filter=U | xargs sed -i -e '/^<<<<<<< /d' -e '/^=======$/d' -e '/^>>>>>>> /d'"
                    .to_owned(),
                "Keep both sides of each conflict",
            )],
            _ => vec![json!({"type": "text", "text": format!("Done: merged {base}")})],
        },
    };
    let mut out = String::new();
    sse(
        &mut out,
        "message_start",
        json!({"type": "message_start", "message": {
            "id": format!("msg_{turn}_{}", uuid::Uuid::new_v4().simple()), "type": "message", "role": "assistant",
            "model": body["model"], "content": [], "stop_reason": null,
            "usage": {"input_tokens": input, "output_tokens": 1,
                      "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": cache_write}}}),
    );
    let mut stop_reason = "end_turn";
    for (index, block) in blocks.iter().enumerate() {
        if block["type"] == "tool_use" {
            stop_reason = "tool_use";
            let start = json!({"type": "tool_use", "id": block["id"], "name": block["name"], "input": {}});
            sse(
                &mut out,
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": start}),
            );
            let delta = json!({"type": "input_json_delta", "partial_json": block["input"].to_string()});
            sse(
                &mut out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            );
        } else {
            let start = json!({"type": "text", "text": ""});
            sse(
                &mut out,
                "content_block_start",
                json!({"type": "content_block_start", "index": index, "content_block": start}),
            );
            let delta = json!({"type": "text_delta", "text": block["text"]});
            sse(
                &mut out,
                "content_block_delta",
                json!({"type": "content_block_delta", "index": index, "delta": delta}),
            );
        }
        sse(
            &mut out,
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        );
    }
    sse(
        &mut out,
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": null},
               "usage": {"output_tokens": output}}),
    );
    sse(&mut out, "message_stop", json!({"type": "message_stop"}));
    out
}
