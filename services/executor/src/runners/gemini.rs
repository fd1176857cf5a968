//! The `gemini` runner: Gemini CLI headless (`gemini -p <prompt>
//! --output-format stream-json --yolo`) in the task's workspace.
//!
//! Lines (one JSON object each): `init` (`session_id`, `model`), `message`
//! (`role`, `content`; the assistant's arrive as `delta` pieces), `tool_use`
//! (`tool_name`, `tool_id`, `parameters`), `tool_result` (`tool_id`,
//! `status` success or error, `output`, `error`), `error`, and the closing
//! `result` (`status`, `error`, `stats` with `input_tokens` including
//! `cached`, `input`, `output_tokens`, `duration_ms`, `tool_calls`,
//! `models`). Exit codes: 0 ok, 1 error, 42 bad input, 53 turn limit.
//! Gemini CLI reports no money: the cost comes from the price table.

use std::path::{Path, PathBuf};

use omoi_domain::ErrorClass;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage};
use serde_json::Value;

use super::cli::{AgentCli, AgentStream, Cli, class_of_status, home_of, str_at};
use super::tools::{Dialect, Tools};
use super::{RunContext, RunnerError, SessionLayout, Verdict, plain};
use crate::agent_user::AgentUser;
use crate::events::{self, event};

/// How Gemini CLI names its tools.
static DIALECT: Dialect = Dialect {
    path_keys: &["file_path", "absolute_path", "path", "dir_path"],
    shell: "run_shell_command",
    file_writers: &["write_file", "replace"],
    todos: ("write_todos", "description"),
};

/// The command line of a run: every tool call approved (the workspace is
/// the agent's own).
pub fn argv(cli: &AgentCli, prompt: &str, resume: Option<&Path>) -> Vec<String> {
    let mut argv: Vec<String> = [cli.bin.as_str(), "--output-format", "stream-json", "--yolo"]
        .map(str::to_owned)
        .into();
    if let Some(model) = &cli.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    if let Some(file) = resume {
        argv.extend(["--session-file".to_owned(), file.display().to_string()]);
    }
    argv.extend(cli.args.iter().cloned());
    argv.extend(["--prompt".to_owned(), prompt.to_owned()]);
    argv
}

/// What the CLI needs in its environment besides the agent's own: the
/// workspace is trusted (else `--yolo` is overridden), and with an API key
/// given, a home of its own whose settings select API-key authentication
/// (which a custom `GOOGLE_GEMINI_BASE_URL` alone does not).
pub fn env(cli: &AgentCli, home: Option<&Path>) -> Vec<(String, String)> {
    let mut env = vec![("GEMINI_CLI_TRUST_WORKSPACE".to_owned(), "true".to_owned())];
    if let Some(home) = home
        && keyed(cli)
    {
        env.push(("GEMINI_CLI_HOME".to_owned(), home.display().to_string()));
    }
    env
}

/// Prepares `home` for `env`: `.gemini/settings.json` selecting API-key
/// authentication, readable by its owner only.
pub fn prepare_home(home: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let dir = home.join(".gemini");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&dir)?;
    std::fs::set_permissions(home, std::fs::Permissions::from_mode(0o700))?;
    let settings = serde_json::json!({"security": {"auth": {"selectedType": "gemini-api-key"}}});
    std::fs::write(dir.join("settings.json"), settings.to_string())
}

/// Gemini CLI, as the `gemini` runner starts it: with a home of its own
/// (see [`env`]): the attempt's own when agents run as an agent user, else
/// one under the executor's state directory.
pub struct Gemini {
    home: Option<PathBuf>,
}

impl Gemini {
    /// Prepares the CLI's home under `state` (the executor's own
    /// directory) unless agents run as a `user`, whose attempts each get a
    /// home of their own (prepared by `prepare_home`).
    pub fn new(state: &Path, user: Option<&AgentUser>) -> Result<Self, RunnerError> {
        if user.is_some() {
            return Ok(Self { home: None });
        }
        let home = state.join("gemini");
        prepare_home(&home).map_err(|e| RunnerError::Config {
            setting: "OMOI_WORKSPACE_ROOT",
            message: format!("cannot prepare {}: {e}", home.display()),
        })?;
        Ok(Self { home: Some(home) })
    }
}

/// Whether the CLI is given an API key (and so needs its settings to say so).
fn keyed(cli: &AgentCli) -> bool {
    cli.env.iter().any(|(k, _)| k == "GEMINI_API_KEY")
}

impl Cli for Gemini {
    const REPORTS_COST: bool = false;

    fn argv(&self, cli: &AgentCli, ctx: &RunContext) -> Vec<String> {
        let resume = match (&ctx.resume, home_of(self, cli, ctx)) {
            (Some(id), Some(home)) => Some(home.join(resume_file(id))),
            _ => None,
        };
        argv(cli, &ctx.prompt, resume.as_deref())
    }

    fn env(&self, cli: &AgentCli) -> Vec<(String, String)> {
        env(cli, self.home.as_deref())
    }

    fn reader(&self, _: &AgentCli, ctx: &RunContext) -> Box<dyn AgentStream> {
        Box::new(GeminiStream::new(&ctx.workspace))
    }

    fn sessions(&self) -> Option<&dyn SessionLayout> {
        Some(self)
    }

    fn home(&self, cli: &AgentCli) -> Option<PathBuf> {
        // Its own home only with a key: see `env`.
        self.home.clone().filter(|_| keyed(cli))
    }

    fn prepare_home(&self, cli: &AgentCli, home: &Path) -> std::io::Result<()> {
        if keyed(cli) { prepare_home(home) } else { Ok(()) }
    }
}

/// Where a session to resume is put for `--session-file`, relative to the
/// CLI's home.
fn resume_file(id: &str) -> PathBuf {
    Path::new(".gemini/resume").join(format!("{id}.jsonl"))
}

/// Gemini CLI keeps a session as `.gemini/tmp/<project>/chats/session-<time>-<first
/// 8 characters of its id>.jsonl` (one more, holding the whole
/// conversation, when it imported one); it resumes one from any file
/// (`--session-file`), under a new id.
impl SessionLayout for Gemini {
    fn files(&self, home: &Path, _workspace: &Path, id: &str) -> Vec<PathBuf> {
        let suffix = format!("-{}.jsonl", id.chars().take(8).collect::<String>());
        let tmp = Path::new(".gemini/tmp");
        let Ok(projects) = std::fs::read_dir(home.join(tmp)) else {
            return Vec::new();
        };
        // The largest of the session's files: the whole conversation.
        projects
            .flatten()
            .filter_map(|p| {
                std::fs::read_dir(p.path().join("chats"))
                    .ok()
                    .map(|c| (p.file_name(), c))
            })
            .flat_map(|(project, chats)| {
                let suffix = suffix.clone();
                chats.flatten().filter_map(move |c| {
                    let name = c.file_name();
                    let size = c.metadata().ok().filter(|m| m.is_file())?.len();
                    name.to_string_lossy()
                        .ends_with(&suffix)
                        .then(|| (size, tmp.join(&project).join("chats").join(&name)))
                })
            })
            .max()
            .map(|(_, path)| path)
            .into_iter()
            .collect()
    }

    fn place(&self, kept: &Path, id: &str, _old: &Path, _new: &Path) -> Option<PathBuf> {
        let plain_id = !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        (kept.starts_with(".gemini/tmp") && plain(kept) && plain_id).then(|| resume_file(id))
    }
}

#[derive(Debug, Clone)]
struct Closing {
    ok: bool,
    error: String,
    usage: Usage,
}

/// Reads Gemini CLI's stream-json output, one line at a time.
#[derive(Debug)]
pub struct GeminiStream {
    model: String,
    tools: Tools,
    /// The assistant's message being streamed in pieces.
    message: String,
    /// The last whole assistant message: the run's answer.
    answer: String,
    /// Model round trips: a new one starts with the first assistant output
    /// after the tools' results.
    turns: i32,
    awaiting_model: bool,
    closing: Option<Closing>,
    /// The session's id, from `init`.
    session_id: Option<String>,
}

impl GeminiStream {
    pub fn new(workspace: &Path) -> Self {
        Self {
            model: String::new(),
            tools: Tools::new(&DIALECT, workspace.to_path_buf()),
            message: String::new(),
            answer: String::new(),
            turns: 0,
            awaiting_model: true,
            closing: None,
            session_id: None,
        }
    }

    /// The assistant's streamed message, whole, once something else comes.
    fn flush_message(&mut self) -> Option<AgentEvent> {
        if self.message.is_empty() {
            return None;
        }
        self.answer = std::mem::take(&mut self.message);
        Some(event(AgentEventKind::Message, self.answer.clone()))
    }

    fn model_spoke(&mut self) {
        if self.awaiting_model {
            self.turns += 1;
            self.awaiting_model = false;
        }
    }

    fn tool_use(&mut self, v: &Value) -> Vec<AgentEvent> {
        self.model_spoke();
        self.tools
            .called(str_at(v, "tool_id"), str_at(v, "tool_name"), &v["parameters"])
    }

    fn tool_result(&mut self, v: &Value) -> Vec<AgentEvent> {
        self.awaiting_model = true;
        let failed = str_at(v, "status") != "success";
        let output = match (str_at(v, "output"), str_at(&v["error"], "message")) {
            (out, err) if failed && !err.is_empty() && out.is_empty() => err.to_owned(),
            (out, _) => out.to_owned(),
        };
        self.tools.returned(str_at(v, "tool_id"), output, failed, "written")
    }

    fn result(&mut self, v: &Value) -> Vec<AgentEvent> {
        let stats = &v["stats"];
        let n = |k: &str| stats.get(k).and_then(Value::as_i64).unwrap_or_default();
        let cached = n("cached");
        let models: Vec<String> = stats
            .get("models")
            .and_then(Value::as_object)
            .map(|m| m.keys().cloned().collect())
            .unwrap_or_default();
        let usage = Usage {
            // Gemini counts cached tokens inside input_tokens.
            input_tokens: (n("input_tokens") - cached).max(0),
            output_tokens: n("output_tokens"),
            cache_read_tokens: cached,
            duration_ms: n("duration_ms"),
            turns: self.turns,
            model: if models.is_empty() {
                self.model.clone()
            } else {
                models.join(", ")
            },
            ..Default::default()
        };
        let closing = Closing {
            ok: str_at(v, "status") == "success",
            error: str_at(&v["error"], "message").to_owned(),
            usage,
        };
        let mut out: Vec<AgentEvent> = self.flush_message().into_iter().collect();
        out.push(events::usage(&closing.usage));
        out.push(if closing.ok {
            event(AgentEventKind::Result, self.answer.clone())
        } else {
            event(AgentEventKind::Error, closing.error.clone())
        });
        self.closing = Some(closing);
        out
    }
}

impl AgentStream for GeminiStream {
    fn line(&mut self, line: &str) -> Vec<AgentEvent> {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            let mut out: Vec<AgentEvent> = self.flush_message().into_iter().collect();
            out.push(events::output(OutputStream::Stdout, line.to_owned()));
            return out;
        };
        let kind = str_at(&v, "type");
        if kind == "message" && str_at(&v, "role") == "assistant" {
            self.model_spoke();
            if !v.get("delta").and_then(Value::as_bool).unwrap_or(false) {
                // A whole message: the one before it, if any, has ended.
                let mut out: Vec<AgentEvent> = self.flush_message().into_iter().collect();
                self.message = str_at(&v, "content").to_owned();
                out.extend(self.flush_message());
                return out;
            }
            self.message.push_str(str_at(&v, "content"));
            return Vec::new();
        }
        if kind == "result" {
            return self.result(&v);
        }
        let mut out: Vec<AgentEvent> = self.flush_message().into_iter().collect();
        match kind {
            "init" => {
                self.model = str_at(&v, "model").to_owned();
                let id = str_at(&v, "session_id");
                if !id.is_empty() {
                    self.session_id = Some(id.to_owned());
                }
            }
            // The prompt echoed back.
            "message" => {}
            "tool_use" => out.extend(self.tool_use(&v)),
            "tool_result" => out.extend(self.tool_result(&v)),
            "error" => out.push(event(AgentEventKind::Error, str_at(&v, "message"))),
            _ => out.push(events::output(OutputStream::Stdout, line.to_owned())),
        }
        out
    }

    fn usage(&self) -> Option<Usage> {
        self.closing.as_ref().map(|c| c.usage.clone())
    }

    fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }

    fn verdict(&self, exit_code: Option<i32>) -> Option<Verdict> {
        // Bad input and the turn limit: another attempt ends the same way.
        if let Some(code @ (42 | 53)) = exit_code {
            let what = if code == 42 {
                "refused its input"
            } else {
                "reached its turn limit"
            };
            let detail = self.closing.as_ref().map(|c| c.error.as_str()).unwrap_or_default();
            return Some(Verdict::Failed {
                message: format!("gemini {what} (exit {code}): {detail}"),
                class: Some(ErrorClass::Permanent),
            });
        }
        match &self.closing {
            Some(c) if c.ok && exit_code == Some(0) => Some(Verdict::Succeeded {
                summary: self.answer.clone(),
            }),
            Some(c) if !c.ok => Some(Verdict::Failed {
                message: format!("gemini: {}", c.error),
                class: failure_class(&c.error),
            }),
            Some(_) | None => match exit_code {
                Some(0) => Some(Verdict::Failed {
                    message: "gemini ended without reporting a result".into(),
                    class: Some(ErrorClass::Retryable),
                }),
                _ => None,
            },
        }
    }
}

/// The class of a failed run: from the model API's error object the message
/// carries (`[API Error: {"error": {"code": 401, "status":
/// "UNAUTHENTICATED", …}}]`), its HTTP code first, then its gRPC-style
/// status.
fn failure_class(message: &str) -> Option<ErrorClass> {
    let api_error = message
        .find('{')
        .and_then(|start| {
            let end = message.rfind('}')?;
            serde_json::from_str::<Value>(&message[start..=end]).ok()
        })
        .map(|v| v["error"].clone())
        .unwrap_or(Value::Null);
    if let Some(class) = api_error.get("code").and_then(Value::as_i64).and_then(class_of_status) {
        return Some(class);
    }
    match str_at(&api_error, "status") {
        "UNAUTHENTICATED" | "PERMISSION_DENIED" | "INVALID_ARGUMENT" | "NOT_FOUND" => Some(ErrorClass::Permanent),
        "RESOURCE_EXHAUSTED" | "UNAVAILABLE" | "INTERNAL" | "DEADLINE_EXCEEDED" => Some(ErrorClass::Retryable),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A run recorded from Gemini CLI 0.61 against a stand-in Gemini API: a
    /// streamed message, a write, a shell command, a to-do list, the answer.
    const RECORDED: &str = r#"{"type":"init","timestamp":"2026-11-25T06:24:29.734Z","session_id":"s1","model":"gemini-2.5-flash"}
{"type":"message","timestamp":"2026-11-25T06:24:29.736Z","role":"user","content":"write hello.txt"}
{"type":"message","timestamp":"2026-11-25T06:24:29.771Z","role":"assistant","content":"I will write ","delta":true}
{"type":"message","timestamp":"2026-11-25T06:24:29.772Z","role":"assistant","content":"the file.","delta":true}
{"type":"tool_use","timestamp":"2026-11-25T06:24:29.812Z","tool_name":"write_file","tool_id":"write_file_1","parameters":{"file_path":"/ws/hello.txt","content":"hello from gemini\n"}}
{"type":"tool_result","timestamp":"2026-11-25T06:24:29.850Z","tool_id":"write_file_1","status":"success","output":"Successfully created and wrote to new file: /ws/hello.txt."}
{"type":"tool_use","timestamp":"2026-11-25T06:24:29.867Z","tool_name":"run_shell_command","tool_id":"run_shell_command_2","parameters":{"command":"cat hello.txt","description":"show"}}
{"type":"tool_result","timestamp":"2026-11-25T06:24:29.933Z","tool_id":"run_shell_command_2","status":"success","output":"hello from gemini"}
{"type":"tool_use","timestamp":"2026-11-25T06:24:29.940Z","tool_name":"write_todos","tool_id":"write_todos_3","parameters":{"todos":[{"description":"write","status":"completed"},{"description":"test","status":"in_progress"}]}}
{"type":"tool_result","timestamp":"2026-11-25T06:24:29.941Z","tool_id":"write_todos_3","status":"error","output":"","error":{"type":"invalid_tool_params","message":"bad todo"}}
{"type":"message","timestamp":"2026-11-25T06:24:29.957Z","role":"assistant","content":"Done: wrote hello.txt","delta":true}
{"type":"result","timestamp":"2026-11-25T06:24:29.960Z","status":"success","stats":{"total_tokens":450,"input_tokens":360,"output_tokens":90,"cached":60,"input":300,"duration_ms":226,"tool_calls":3,"models":{"gemini-2.5-flash":{"total_tokens":450,"input_tokens":360,"output_tokens":90,"cached":60,"input":300}}}}"#;

    fn read(lines: &str) -> (GeminiStream, Vec<AgentEvent>) {
        let mut s = GeminiStream::new(Path::new("/ws"));
        let events = lines.lines().flat_map(|l| s.line(l)).collect();
        (s, events)
    }

    #[test]
    fn a_recorded_run_reads_as_events_usage_and_success() {
        use AgentEventKind::*;
        let (s, events) = read(RECORDED);
        let kinds: Vec<AgentEventKind> = events.iter().map(AgentEvent::kind).collect();
        assert_eq!(
            kinds,
            [
                Message, ToolCall, ToolResult, FileChange, ToolCall, ToolResult, Command, ToolCall, Plan, ToolResult,
                Message, Usage, Result
            ]
        );
        assert_eq!(events[0].text, "I will write the file.");
        assert_eq!(
            (events[1].tool.as_str(), events[1].path.as_str()),
            ("write_file", "hello.txt")
        );
        assert_eq!(events[3].path, "hello.txt");
        assert_eq!(events[6].text, "cat hello.txt");
        assert_eq!(events[8].text, "[completed] write\n[in_progress] test");
        assert!(events[9].is_error);
        assert_eq!(events[9].text, "bad todo");
        let usage = s.usage().unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.cache_read_tokens,
                usage.output_tokens,
                usage.duration_ms
            ),
            (300, 60, 90, 226)
        );
        assert_eq!((usage.model.as_str(), usage.turns), ("gemini-2.5-flash", 4));
        assert_eq!(
            s.verdict(Some(0)),
            Some(Verdict::Succeeded {
                summary: "Done: wrote hello.txt".into()
            })
        );
    }

    #[test]
    fn failures_are_classified_from_the_api_error_they_carry() {
        let result = |message: &str| {
            serde_json::json!({"type": "result", "status": "error",
                "error": {"type": "unknown", "message": message}, "stats": {}})
            .to_string()
        };
        let cases = [
            (
                r#"[API Error: {"error":{"code":401,"message":"bad key","status":"UNAUTHENTICATED"}}]"#,
                Some(ErrorClass::Permanent),
            ),
            (
                r#"[API Error: {"error":{"code":429,"message":"quota","status":"RESOURCE_EXHAUSTED"}}]"#,
                Some(ErrorClass::Retryable),
            ),
            (
                r#"[API Error: {"error":{"message":"x","status":"UNAVAILABLE"}}]"#,
                Some(ErrorClass::Retryable),
            ),
            ("something odd", None),
        ];
        for (message, want) in cases {
            let (s, events) = read(&result(message));
            assert_eq!(events.last().unwrap().kind(), AgentEventKind::Error);
            match s.verdict(Some(1)) {
                Some(Verdict::Failed { class, message: m }) => {
                    assert_eq!(class, want, "{message}");
                    assert_eq!(m, format!("gemini: {message}"));
                }
                other => panic!("{message}: {other:?}"),
            }
        }
        for code in [42, 53] {
            let (s, _) = read(&result("no"));
            assert!(matches!(
                s.verdict(Some(code)),
                Some(Verdict::Failed {
                    class: Some(ErrorClass::Permanent),
                    ..
                })
            ));
        }
    }

    #[test]
    fn malformed_lines_pass_through_and_a_cut_run_is_left_to_its_exit_code() {
        let (s, events) = read(
            "{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"half\",\"delta\":true}\nnot json\n{\"type\":\"tool_u",
        );
        let kinds: Vec<AgentEventKind> = events.iter().map(AgentEvent::kind).collect();
        assert_eq!(
            kinds,
            [AgentEventKind::Message, AgentEventKind::Output, AgentEventKind::Output]
        );
        assert_eq!(s.usage(), None);
        assert_eq!(s.verdict(None), None);
        assert!(matches!(s.verdict(Some(0)), Some(Verdict::Failed { .. })));
    }
}
