//! The `codex` runner: Codex headless (`codex exec --json`) in the task's
//! workspace, writes confined to it by Codex's own sandbox
//! (`--sandbox workspace-write`).
//!
//! Lines (one JSON object each): `thread.started`, `turn.started`,
//! `item.started` / `item.updated` / `item.completed` of an item whose
//! `type` is `agent_message`, `reasoning`, `command_execution` (`command`,
//! `aggregated_output`, `exit_code`), `file_change` (`changes` of `path` and
//! `kind`), `mcp_tool_call`, `web_search`, `todo_list` or `error`; then
//! `turn.completed` with `usage` (`input_tokens` including
//! `cached_input_tokens`, `output_tokens`) or `turn.failed` with its
//! `error`, and top-level `error`s while it retries. Codex reports no money:
//! the cost comes from the price table.

use std::path::{Path, PathBuf};

use omoi_domain::ErrorClass;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage};
use serde_json::Value;

use super::cli::{AgentCli, AgentStream, Cli, add_tokens, class_of_status, relative, str_at};
use super::{RunContext, SessionLayout, Verdict, plain};
use crate::events::{self, event};

/// The provider name under which a custom `OPENAI_BASE_URL` is configured.
const PROVIDER: &str = "omoi";

/// The command line of a run (`resume`: the thread to take up, its
/// rollout already where Codex finds it, through `codex exec resume`,
/// which takes the sandbox as configuration). With `OPENAI_BASE_URL` in the
/// agent's environment, Codex is pointed at it as a Responses API provider
/// whose key is `OPENAI_API_KEY`. `fenced`: the executor's sandbox is
/// around it, so Codex's own (a bubblewrap of its own, which cannot nest
/// in another) stands aside.
pub fn argv(cli: &AgentCli, prompt: &str, resume: Option<&str>, fenced: bool) -> Vec<String> {
    let mode = if fenced {
        "danger-full-access"
    } else {
        "workspace-write"
    };
    let sandbox = format!("sandbox_mode=\"{mode}\"");
    let head: Vec<&str> = match resume {
        None => vec!["exec", "--json", "--skip-git-repo-check", "--sandbox", mode],
        Some(_) => vec!["exec", "resume", "--json", "--skip-git-repo-check", "-c", &sandbox],
    };
    let mut argv: Vec<String> = std::iter::once(cli.bin.as_str())
        .chain(head.iter().copied())
        .map(str::to_owned)
        .collect();
    if let Some(model) = &cli.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    let base_url = cli.env.iter().find(|(k, _)| k == "OPENAI_BASE_URL").map(|(_, v)| v);
    if let Some(url) = base_url {
        argv.extend([
            "-c".to_owned(),
            format!("model_provider={PROVIDER}"),
            "-c".to_owned(),
            format!(
                "model_providers.{PROVIDER}={{name={PROVIDER:?},base_url={},env_key=\"OPENAI_API_KEY\",wire_api=\"responses\"}}",
                toml_string(url)
            ),
        ]);
    }
    argv.extend(cli.args.iter().cloned());
    // The prompt last, after `--` so that none of it reads as an option.
    argv.push("--".to_owned());
    argv.extend(resume.map(str::to_owned));
    argv.push(prompt.to_owned());
    argv
}

/// Where Codex keeps its threads, relative to its home: one rollout
/// `.codex/sessions/YYYY/MM/DD/rollout-<time>-<thread id>.jsonl` per thread,
/// whatever the directory it ran in (its `exec resume <id>` finds it by
/// name there).
impl SessionLayout for Codex {
    fn files(&self, home: &Path, _workspace: &Path, id: &str) -> Vec<PathBuf> {
        let root = Path::new(".codex/sessions");
        let suffix = format!("-{id}.jsonl");
        let mut found = Vec::new();
        let mut stack = vec![(root.to_path_buf(), 0)];
        while let Some((dir, depth)) = stack.pop() {
            let Ok(entries) = std::fs::read_dir(home.join(&dir)) else {
                continue;
            };
            for e in entries.flatten() {
                let (name, rel) = (e.file_name(), dir.join(e.file_name()));
                match e.file_type() {
                    Ok(t) if t.is_dir() && depth < 3 => stack.push((rel, depth + 1)),
                    Ok(t) if t.is_file() && name.to_string_lossy().ends_with(&suffix) => found.push(rel),
                    _ => {}
                }
            }
        }
        found
    }

    fn place(&self, kept: &Path, _id: &str, _old: &Path, _new: &Path) -> Option<PathBuf> {
        (kept.starts_with(".codex/sessions") && plain(kept)).then(|| kept.to_path_buf())
    }
}

/// `s` as a TOML basic string.
fn toml_string(s: &str) -> String {
    let mut out = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04X}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// Codex, as the `codex` runner starts it.
pub struct Codex;

impl Cli for Codex {
    const REPORTS_COST: bool = false;

    fn argv(&self, cli: &AgentCli, ctx: &RunContext) -> Vec<String> {
        argv(cli, &ctx.prompt, ctx.resume.as_deref(), ctx.fence.is_some())
    }

    fn sessions(&self) -> Option<&dyn SessionLayout> {
        Some(self)
    }

    fn env(&self, _: &AgentCli) -> Vec<(String, String)> {
        Vec::new()
    }

    fn reader(&self, cli: &AgentCli, ctx: &RunContext) -> Box<dyn AgentStream> {
        Box::new(CodexStream::new(&ctx.workspace, cli.model.clone()))
    }
}

/// Reads `codex exec --json` output, one line at a time.
#[derive(Debug)]
pub struct CodexStream {
    workspace: PathBuf,
    model: String,
    usage: Option<Usage>,
    /// The last agent message: the run's answer.
    answer: String,
    completed: bool,
    failure: Option<String>,
    /// The thread's id, from `thread.started`.
    thread_id: Option<String>,
}

impl CodexStream {
    pub fn new(workspace: &Path, model: Option<String>) -> Self {
        Self {
            workspace: workspace.to_path_buf(),
            model: model.unwrap_or_default(),
            usage: None,
            answer: String::new(),
            completed: false,
            failure: None,
            thread_id: None,
        }
    }

    fn item_started(&self, item: &Value) -> Vec<AgentEvent> {
        match str_at(item, "type") {
            "command_execution" => vec![events::tool_call("shell", str_at(item, "command").to_owned(), None)],
            "mcp_tool_call" => vec![events::tool_call(
                &format!("{}.{}", str_at(item, "server"), str_at(item, "tool")),
                item.get("arguments").map(Value::to_string).unwrap_or_default(),
                None,
            )],
            _ => Vec::new(),
        }
    }

    fn item_completed(&mut self, item: &Value) -> Vec<AgentEvent> {
        match str_at(item, "type") {
            "agent_message" => {
                self.answer = str_at(item, "text").to_owned();
                vec![event(AgentEventKind::Message, self.answer.clone())]
            }
            "reasoning" => vec![event(AgentEventKind::Thinking, str_at(item, "text"))],
            "command_execution" => {
                let exit_code = item
                    .get("exit_code")
                    .and_then(Value::as_i64)
                    .and_then(|c| i32::try_from(c).ok());
                let failed = str_at(item, "status") == "failed" || exit_code.is_some_and(|c| c != 0);
                vec![
                    events::tool_result("shell", str_at(item, "aggregated_output").to_owned(), failed),
                    events::command(str_at(item, "command"), exit_code, failed),
                ]
            }
            "file_change" => item
                .get("changes")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
                .map(|c| {
                    let how = match str_at(c, "kind") {
                        "add" => "created",
                        "delete" => "deleted",
                        _ => "edited",
                    };
                    events::file_change(&relative(&self.workspace, str_at(c, "path")), how)
                })
                .collect(),
            "mcp_tool_call" => {
                let tool = format!("{}.{}", str_at(item, "server"), str_at(item, "tool"));
                let failed = str_at(item, "status") == "failed";
                let output = match item.get("error") {
                    Some(e) if !e.is_null() => e.to_string(),
                    _ => item.get("result").map(Value::to_string).unwrap_or_default(),
                };
                vec![events::tool_result(&tool, output, failed)]
            }
            "web_search" => vec![events::tool_call("web_search", str_at(item, "query").to_owned(), None)],
            "todo_list" => vec![plan(item)],
            "error" => vec![event(AgentEventKind::Error, str_at(item, "message"))],
            _ => Vec::new(),
        }
    }

    fn turn_completed(&mut self, v: &Value) -> Vec<AgentEvent> {
        let u = &v["usage"];
        let n = |k: &str| u.get(k).and_then(Value::as_i64).unwrap_or_default();
        let cached = n("cached_input_tokens");
        let turn = Usage {
            // Codex counts cached tokens inside input_tokens.
            input_tokens: (n("input_tokens") - cached).max(0),
            output_tokens: n("output_tokens"),
            cache_read_tokens: cached,
            cache_write_tokens: n("cache_write_input_tokens"),
            ..Default::default()
        };
        let sum = self.usage.get_or_insert_with(|| Usage {
            model: self.model.clone(),
            ..Default::default()
        });
        add_tokens(sum, &turn);
        sum.turns += 1;
        self.completed = true;
        vec![events::usage(sum)]
    }
}

/// A to-do list as a plan: one `[done]` or `[todo]` line per item.
fn plan(item: &Value) -> AgentEvent {
    let lines: Vec<String> = item
        .get("items")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
        .map(|t| {
            let done = t.get("completed").and_then(Value::as_bool).unwrap_or(false);
            format!("[{}] {}", if done { "done" } else { "todo" }, str_at(t, "text"))
        })
        .collect();
    event(AgentEventKind::Plan, lines.join("\n"))
}

impl AgentStream for CodexStream {
    fn line(&mut self, line: &str) -> Vec<AgentEvent> {
        let raw = || vec![events::output(OutputStream::Stdout, line.to_owned())];
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return raw();
        };
        match str_at(&v, "type") {
            "thread.started" => {
                let id = str_at(&v, "thread_id");
                if !id.is_empty() {
                    self.thread_id = Some(id.to_owned());
                }
                Vec::new()
            }
            "turn.started" => Vec::new(),
            "item.started" => self.item_started(&v["item"]),
            // Only to-do lists are worth showing before they finish.
            "item.updated" if str_at(&v["item"], "type") == "todo_list" => vec![plan(&v["item"])],
            "item.updated" => Vec::new(),
            "item.completed" => self.item_completed(&v["item"]),
            "turn.completed" => self.turn_completed(&v),
            "turn.failed" => {
                let message = str_at(&v["error"], "message").to_owned();
                self.failure = Some(message.clone());
                vec![event(AgentEventKind::Error, message)]
            }
            "error" => vec![event(AgentEventKind::Error, str_at(&v, "message"))],
            _ => raw(),
        }
    }

    fn usage(&self) -> Option<Usage> {
        self.usage.clone()
    }

    fn session_id(&self) -> Option<&str> {
        self.thread_id.as_deref()
    }

    fn verdict(&self, exit_code: Option<i32>) -> Option<Verdict> {
        if let Some(message) = &self.failure {
            return Some(Verdict::Failed {
                message: format!("codex: {message}"),
                class: failure_class(message),
            });
        }
        match exit_code {
            Some(0) if self.completed => Some(Verdict::Succeeded {
                summary: self.answer.clone(),
            }),
            Some(0) => Some(Verdict::Failed {
                message: "codex ended without completing its turn".into(),
                class: Some(ErrorClass::Retryable),
            }),
            _ => None,
        }
    }
}

/// The class of a failed turn. Codex reports the model API's failure only as
/// a message; its forms name the HTTP status ("unexpected status 401
/// Unauthorized: …", "exceeded retry limit, last status: 429 …") or carry
/// the API's JSON error object, whose `type` says what it is.
fn failure_class(message: &str) -> Option<ErrorClass> {
    let status = ["unexpected status ", "last status: "].iter().find_map(|prefix| {
        let rest = &message[message.find(prefix)? + prefix.len()..];
        rest.get(..3)?.parse::<i64>().ok()
    });
    if let Some(class) = status.and_then(class_of_status) {
        return Some(class);
    }
    let api_error = serde_json::from_str::<Value>(message).ok()?;
    match str_at(&api_error["error"], "type") {
        "invalid_request_error" | "authentication_error" | "permission_error" | "insufficient_quota" => {
            Some(ErrorClass::Permanent)
        }
        "rate_limit_exceeded" | "server_error" | "overloaded_error" => Some(ErrorClass::Retryable),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run recorded from Codex 0.169 against a stand-in Responses API: a
    /// shell command that writes a file, a file change, a to-do list, the
    /// answer.
    const RECORDED: &str = r#"{"type":"thread.started","thread_id":"01a21158-d858-7432-8e57-8ee13b17509a"}
{"type":"item.completed","item":{"id":"item_0","type":"error","message":"Model metadata for `gpt-5-codex` not found. Defaulting to fallback metadata; this can degrade performance and cause issues."}}
{"type":"turn.started"}
{"type":"item.started","item":{"id":"item_1","type":"command_execution","command":"/bin/bash -lc \"printf 'hello from codex\\\\n' > hello.txt && cat hello.txt\"","aggregated_output":"","exit_code":null,"status":"in_progress"}}
{"type":"item.completed","item":{"id":"item_1","type":"command_execution","command":"/bin/bash -lc \"printf 'hello from codex\\\\n' > hello.txt && cat hello.txt\"","aggregated_output":"hello from codex\n","exit_code":0,"status":"completed"}}
{"type":"item.completed","item":{"id":"item_2","type":"file_change","changes":[{"path":"/ws/src/lib.rs","kind":"update"},{"path":"/ws/NEW.md","kind":"add"}],"status":"completed"}}
{"type":"item.updated","item":{"id":"item_3","type":"todo_list","items":[{"text":"write","completed":true},{"text":"test","completed":false}]}}
{"type":"item.completed","item":{"id":"item_4","type":"agent_message","text":"Done: wrote hello.txt"}}
{"type":"turn.completed","usage":{"input_tokens":200,"cached_input_tokens":40,"cache_write_input_tokens":0,"output_tokens":60,"reasoning_output_tokens":10}}"#;

    fn read(lines: &str) -> (CodexStream, Vec<AgentEvent>) {
        let mut s = CodexStream::new(Path::new("/ws"), Some("gpt-5-codex".into()));
        let events = lines.lines().flat_map(|l| s.line(l)).collect();
        (s, events)
    }

    #[test]
    fn a_recorded_run_reads_as_events_usage_and_success() {
        use AgentEventKind::*;
        let (s, events) = read(RECORDED);
        assert_eq!(s.session_id(), Some("01a21158-d858-7432-8e57-8ee13b17509a"));
        let kinds: Vec<AgentEventKind> = events.iter().map(AgentEvent::kind).collect();
        assert_eq!(
            kinds,
            [
                Error, ToolCall, ToolResult, Command, FileChange, FileChange, Plan, Message, Usage
            ]
        );
        assert!(events[1].text.contains("hello.txt"));
        assert_eq!(events[2].text, "hello from codex\n");
        assert_eq!((events[3].exit_code, events[3].is_error), (Some(0), false));
        assert_eq!(
            (events[4].path.as_str(), events[4].text.as_str()),
            ("src/lib.rs", "edited")
        );
        assert_eq!(
            (events[5].path.as_str(), events[5].text.as_str()),
            ("NEW.md", "created")
        );
        assert_eq!(events[6].text, "[done] write\n[todo] test");
        let usage = s.usage().unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.cache_read_tokens,
                usage.output_tokens,
                usage.turns
            ),
            (160, 40, 60, 1)
        );
        assert_eq!(usage.model, "gpt-5-codex");
        assert_eq!(usage.cost_usd, 0.0, "codex reports no money");
        assert_eq!(
            s.verdict(Some(0)),
            Some(Verdict::Succeeded {
                summary: "Done: wrote hello.txt".into()
            })
        );
    }

    #[test]
    fn failed_turns_are_classified_from_the_status_they_name() {
        let cases = [
            (
                "unexpected status 401 Unauthorized: bad key, url: http://x/v1/responses",
                Some(ErrorClass::Permanent),
            ),
            (
                "exceeded retry limit, last status: 429 Too Many Requests",
                Some(ErrorClass::Retryable),
            ),
            (
                r#"{"error": {"type": "invalid_request_error", "message": "bad"}}"#,
                Some(ErrorClass::Permanent),
            ),
            ("stream disconnected before completion", None),
        ];
        for (message, want) in cases {
            let line = serde_json::json!({"type": "turn.failed", "error": {"message": message}}).to_string();
            let (s, events) = read(&line);
            assert_eq!(events[0].kind(), AgentEventKind::Error);
            match s.verdict(Some(1)) {
                Some(Verdict::Failed { message: m, class }) => {
                    assert_eq!(class, want, "{message}");
                    assert_eq!(m, format!("codex: {message}"));
                }
                other => panic!("{message}: {other:?}"),
            }
        }
    }

    #[test]
    fn malformed_lines_pass_through_and_a_cut_run_is_left_to_its_exit_code() {
        let (s, events) = read("oops\n{\"type\":\"item.completed\",\"item\":{\"type\":\"agent_mes");
        assert!(events.iter().all(|e| e.kind() == AgentEventKind::Output));
        assert_eq!(s.verdict(None), None);
        assert!(matches!(s.verdict(Some(0)), Some(Verdict::Failed { .. })));
    }

    #[test]
    fn a_custom_base_url_becomes_a_provider() {
        let cli = AgentCli {
            bin: "codex".into(),
            model: Some("gpt-5-codex".into()),
            args: vec!["-c".into(), "x=1".into()],
            env: vec![("OPENAI_BASE_URL".into(), "http://127.0.0.1:9/v1".into())],
            kill_grace: std::time::Duration::ZERO,
        };
        let resumed = argv(&cli, "go on", Some("t-1"), false);
        assert_eq!(resumed[1..3], ["exec", "resume"]);
        assert!(resumed.contains(&r#"sandbox_mode="workspace-write""#.to_owned()));
        assert_eq!(resumed[resumed.len() - 3..], ["--", "t-1", "go on"]);
        let fenced = argv(&cli, "--do it", None, true);
        assert_eq!(fenced[4..6], ["--sandbox", "danger-full-access"]);
        let argv = argv(&cli, "--do it", None, false);
        assert_eq!(
            argv[..6],
            [
                "codex",
                "exec",
                "--json",
                "--skip-git-repo-check",
                "--sandbox",
                "workspace-write"
            ]
        );
        assert!(argv.contains(&"model_provider=omoi".to_owned()));
        assert!(argv.contains(
            &r#"model_providers.omoi={name="omoi",base_url="http://127.0.0.1:9/v1",env_key="OPENAI_API_KEY",wire_api="responses"}"#
                .to_owned()
        ));
        assert_eq!(argv[argv.len() - 4..], ["-c", "x=1", "--", "--do it"]);
        assert_eq!(toml_string("a\"b\\c\n"), r#""a\"b\\c\u000A""#);
    }
}
