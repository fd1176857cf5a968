//! The `claude-code` runner: Claude Code headless (`claude -p <prompt>
//! --output-format stream-json --verbose`) in the task's workspace, its
//! stream read line by line into agent events, its final `result` line
//! deciding the outcome and the usage.
//!
//! Lines (one JSON object each): `system` (`init` with the model and tools,
//! `api_retry` while the API fails), `rate_limit_event` (a subscription's
//! usage limit: `rate_limit_info.status` allowed / allowed_warning /
//! rejected, `resetsAt` in Unix seconds, `rateLimitType`), `assistant` and
//! `user` messages whose
//! content blocks are `text`, `thinking`, `tool_use` and `tool_result`, and
//! the closing `result` (`subtype`, `is_error`, `api_error_status`,
//! `result`, `num_turns`, `duration_ms`, `total_cost_usd`, `usage`,
//! `modelUsage`). Anything else is passed on as OUTPUT.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use omoi_domain::ErrorClass;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream, Usage};
use serde_json::Value;

use super::cli::{AgentCli, AgentStream, Cli, add_tokens, class_of_status, str_at, text_of};
use super::tools::{Dialect, Tools};
use super::{RunContext, SessionLayout, Verdict, plain};
use crate::events::{self, event};

/// Tools an unattended run may use without asking (Claude Code refuses
/// `--dangerously-skip-permissions` as root). Edits are accepted by the
/// permission mode; `OMOI_AGENT_ARGS` can add to both.
const ALLOWED_TOOLS: &str = "Bash,Edit,MultiEdit,Write,Read,Glob,Grep,LS,NotebookEdit,TodoWrite";

/// How Claude Code names its tools.
static DIALECT: Dialect = Dialect {
    path_keys: &["file_path", "notebook_path", "path"],
    shell: "Bash",
    file_writers: &["Write", "Edit", "MultiEdit", "NotebookEdit"],
    todos: ("TodoWrite", "content"),
};

/// The command line of a run (`budget`: what the ticket may still spend,
/// which Claude Code holds itself to; `resume`: the session to take up,
/// its transcript already where [`Claude`]'s layout places it).
pub fn argv(cli: &AgentCli, prompt: &str, budget: Option<f64>, resume: Option<&str>) -> Vec<String> {
    let mut argv: Vec<String> = [
        cli.bin.as_str(),
        "-p",
        prompt,
        "--output-format",
        "stream-json",
        "--verbose",
        "--permission-mode",
        "acceptEdits",
        "--allowedTools",
        ALLOWED_TOOLS,
    ]
    .map(str::to_owned)
    .into();
    if let Some(model) = &cli.model {
        argv.extend(["--model".to_owned(), model.clone()]);
    }
    if let Some(id) = resume {
        argv.extend(["--resume".to_owned(), id.to_owned()]);
    }
    if let Some(left) = budget {
        // A cent at least: a spent budget pauses the ticket before dispatch.
        argv.extend(["--max-budget-usd".to_owned(), format!("{:.2}", left.max(0.01))]);
    }
    argv.extend(cli.args.iter().cloned());
    argv
}

/// What the CLI needs in its environment besides the agent's own.
pub fn env() -> Vec<(String, String)> {
    // No update checks, telemetry or error reporting from a worker.
    vec![
        ("CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC".into(), "1".into()),
        ("DISABLE_AUTOUPDATER".into(), "1".into()),
    ]
}

/// Where Claude Code keeps the sessions of runs in `workspace`, relative to
/// its home: `.claude/projects/<dir>`, `<dir>` being the workspace's path
/// with every character but ASCII letters and digits made `-` (Claude
/// Code's own naming; its `--resume` looks there for the directory it runs
/// in). A session is its transcript `<id>.jsonl` and its own directory
/// `<id>/` (subagents' transcripts, large tool results).
pub fn project_dir(workspace: &Path) -> PathBuf {
    let dir: String = workspace
        .display()
        .to_string()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .collect();
    Path::new(".claude/projects").join(dir)
}

impl SessionLayout for Claude {
    fn files(&self, home: &Path, workspace: &Path, id: &str) -> Vec<PathBuf> {
        let project = project_dir(workspace);
        [project.join(format!("{id}.jsonl")), project.join(id)]
            .into_iter()
            .filter(|p| home.join(p).exists())
            .collect()
    }

    fn place(&self, kept: &Path, _id: &str, old: &Path, new: &Path) -> Option<PathBuf> {
        let rest = kept.strip_prefix(project_dir(old)).ok()?;
        (plain(rest) && !rest.as_os_str().is_empty()).then(|| project_dir(new).join(rest))
    }
}

/// Claude Code, as the `claude-code` runner starts it.
pub struct Claude;

impl Cli for Claude {
    const REPORTS_COST: bool = true;

    fn argv(&self, cli: &AgentCli, ctx: &RunContext) -> Vec<String> {
        argv(cli, &ctx.prompt, ctx.budget_left_usd, ctx.resume.as_deref())
    }

    fn sessions(&self) -> Option<&dyn SessionLayout> {
        Some(self)
    }

    fn env(&self, _: &AgentCli) -> Vec<(String, String)> {
        env()
    }

    fn reader(&self, _: &AgentCli, ctx: &RunContext) -> Box<dyn AgentStream> {
        Box::new(ClaudeStream::new(&ctx.workspace))
    }
}

/// The closing `result` line.
#[derive(Debug, Clone)]
struct Closing {
    subtype: String,
    is_error: bool,
    text: String,
    api_error_status: Option<i64>,
    usage: Usage,
}

/// Reads Claude Code's stream-json output, one line at a time.
#[derive(Debug)]
pub struct ClaudeStream {
    model: String,
    /// The session's id, from `system/init` (or any later line).
    session_id: Option<String>,
    tools: Tools,
    /// Usage per assistant message id (the parts of one message repeat it),
    /// for a run that ends without its result line.
    messages: BTreeMap<String, Usage>,
    /// The last API failure the CLI retried.
    api_error: Option<String>,
    /// That failure's HTTP status and how long the CLI waited before trying
    /// again.
    last_retry: Option<(i64, Duration)>,
    /// When the usage limit that turned the run away resets.
    limit_resets_at: Option<SystemTime>,
    closing: Option<Closing>,
}

impl AgentStream for ClaudeStream {
    /// The events one line of output says.
    fn line(&mut self, line: &str) -> Vec<AgentEvent> {
        let raw = || vec![events::output(OutputStream::Stdout, line.to_owned())];
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            return raw();
        };
        match str_at(&v, "type") {
            "system" => self.system(&v),
            "rate_limit_event" => self.rate_limit(&v["rate_limit_info"]),
            "assistant" => self.assistant(&v),
            "user" => self.user(&v),
            "result" => self.result(&v),
            _ => raw(),
        }
    }

    /// What the run spent: the result line's account, else the sum of the
    /// messages seen (no cost known then).
    fn usage(&self) -> Option<Usage> {
        if let Some(c) = &self.closing {
            return Some(c.usage.clone());
        }
        self.so_far()
    }

    /// How the run ended, as the agent tells it; None leaves it to the exit
    /// code.
    fn verdict(&self, exit_code: Option<i32>) -> Option<Verdict> {
        let Some(c) = &self.closing else {
            return match (&self.api_error, exit_code) {
                (_, Some(0)) => Some(Verdict::Failed {
                    message: "claude ended without reporting a result".into(),
                    class: Some(ErrorClass::Retryable),
                }),
                (Some(error), _) => Some(Verdict::Failed {
                    message: format!("claude stopped after model API errors: {error}"),
                    class: Some(ErrorClass::Retryable),
                }),
                (None, _) => None,
            };
        };
        if !c.is_error && c.subtype == "success" {
            return Some(Verdict::Succeeded {
                summary: c.text.clone(),
            });
        }
        let class = match (c.subtype.as_str(), c.api_error_status.and_then(class_of_status)) {
            // Limits the deployment set: another attempt hits them again.
            ("error_max_budget_usd" | "error_max_turns", _) => Some(ErrorClass::Permanent),
            (_, Some(class)) => Some(class),
            // Turned away by the usage limit: it resets.
            _ if self.limit_resets_at.is_some() => Some(ErrorClass::Retryable),
            ("error_during_execution", _) => Some(ErrorClass::Retryable),
            _ => None,
        };
        let detail = if c.text.is_empty() { c.subtype.as_str() } else { &c.text };
        Some(Verdict::Failed {
            message: format!("claude: {detail}"),
            class,
        })
    }

    /// A run that gave up on a rate-limited API: as long as the CLI itself
    /// was told to wait before its last try (the API's retry-after), or
    /// until the usage limit that turned it away resets, whichever is later.
    fn retry_after(&self) -> Option<Duration> {
        let failed = self
            .closing
            .as_ref()
            .is_none_or(|c| c.is_error || c.subtype != "success");
        let rate_limited = self.closing.as_ref().is_none_or(|c| c.api_error_status == Some(429));
        let api_wait = match self.last_retry {
            Some((429, wait)) if rate_limited => Some(wait),
            _ => None,
        };
        let until_reset = self
            .limit_resets_at
            .filter(|_| failed)
            .map(|at| at.duration_since(SystemTime::now()).unwrap_or_default());
        api_wait.max(until_reset)
    }

    fn session_id(&self) -> Option<&str> {
        self.session_id.as_deref()
    }
}

impl ClaudeStream {
    pub fn new(workspace: &Path) -> Self {
        Self {
            model: String::new(),
            session_id: None,
            tools: Tools::new(&DIALECT, workspace.to_path_buf()),
            messages: BTreeMap::new(),
            api_error: None,
            last_retry: None,
            limit_resets_at: None,
            closing: None,
        }
    }

    /// A subscription's usage limit: said as an error when it turns the run
    /// away (and remembered, for when to try again), kept quiet otherwise.
    fn rate_limit(&mut self, info: &Value) -> Vec<AgentEvent> {
        if str_at(info, "status") != "rejected" {
            self.limit_resets_at = None;
            return Vec::new();
        }
        let resets = info
            .get("resetsAt")
            .and_then(Value::as_u64)
            .map(|s| SystemTime::UNIX_EPOCH + Duration::from_secs(s));
        self.limit_resets_at = Some(resets.unwrap_or_else(SystemTime::now));
        let kind = match str_at(info, "rateLimitType") {
            "" => "usage".to_owned(),
            k => k.replace('_', " "),
        };
        let when = resets
            .map(|at| format!("; resets at {}", chrono::DateTime::<chrono::Utc>::from(at).to_rfc3339()))
            .unwrap_or_default();
        vec![event(AgentEventKind::Error, format!("{kind} limit reached{when}"))]
    }

    fn system(&mut self, v: &Value) -> Vec<AgentEvent> {
        match str_at(v, "subtype") {
            "init" => {
                self.model = str_at(v, "model").to_owned();
                let id = str_at(v, "session_id");
                if !id.is_empty() {
                    self.session_id = Some(id.to_owned());
                }
                Vec::new()
            }
            "api_retry" => {
                let n = |k: &str| v.get(k).and_then(Value::as_i64).unwrap_or_default();
                let (status, wait_ms) = (n("error_status"), n("retry_delay_ms"));
                let error = format!("{} ({status})", str_at(v, "error"));
                let text = format!(
                    "model API failed: {error}; retry {} of {} in {wait_ms} ms",
                    n("attempt"),
                    n("max_retries")
                );
                self.api_error = Some(error);
                self.last_retry = Some((
                    status,
                    Duration::from_millis(u64::try_from(wait_ms).unwrap_or_default()),
                ));
                vec![event(AgentEventKind::Error, text)]
            }
            _ => Vec::new(),
        }
    }

    /// The sum of the messages seen so far (their tokens as each message
    /// began: no cost, and output counted low until the result line).
    fn so_far(&self) -> Option<Usage> {
        if self.messages.is_empty() {
            return None;
        }
        let mut sum = Usage {
            model: self.model.clone(),
            turns: i32::try_from(self.messages.len()).unwrap_or(i32::MAX),
            ..Default::default()
        };
        for u in self.messages.values() {
            add_tokens(&mut sum, u);
        }
        Some(sum)
    }

    fn assistant(&mut self, v: &Value) -> Vec<AgentEvent> {
        let message = &v["message"];
        let mut out = Vec::new();
        if let (Some(id), Some(u)) = (message.get("id").and_then(Value::as_str), message.get("usage")) {
            let mut usage = token_usage(u);
            usage.model = str_at(message, "model").to_owned();
            // A new message: what the run spent so far, told as it runs
            // (the guardian's spending signals read it) where the CLI
            // tells its own account only at the end.
            if self.messages.insert(id.to_owned(), usage).is_none() {
                out.extend(self.so_far().map(|u| events::usage(&u)));
            }
        }
        for block in blocks(message) {
            match str_at(block, "type") {
                "text" => out.push(event(AgentEventKind::Message, str_at(block, "text"))),
                "thinking" => out.push(event(AgentEventKind::Thinking, str_at(block, "thinking"))),
                "tool_use" => out.extend(self.tools.called(
                    str_at(block, "id"),
                    str_at(block, "name"),
                    &block["input"],
                )),
                _ => {}
            }
        }
        out
    }

    fn user(&mut self, v: &Value) -> Vec<AgentEvent> {
        let mut out = Vec::new();
        for block in blocks(&v["message"]) {
            if str_at(block, "type") != "tool_result" {
                continue;
            }
            let is_error = block.get("is_error").and_then(Value::as_bool).unwrap_or(false);
            let written = match str_at(&v["tool_use_result"], "type") {
                "create" => "created",
                _ => "edited",
            };
            let output = text_of(&block["content"]);
            out.extend(
                self.tools
                    .returned(str_at(block, "tool_use_id"), output, is_error, written),
            );
        }
        out
    }

    fn result(&mut self, v: &Value) -> Vec<AgentEvent> {
        let mut usage = token_usage(&v["usage"]);
        usage.cost_usd = v.get("total_cost_usd").and_then(Value::as_f64).unwrap_or_default();
        usage.turns = v
            .get("num_turns")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok())
            .unwrap_or_default();
        usage.duration_ms = v.get("duration_ms").and_then(Value::as_i64).unwrap_or_default();
        usage.model = match v.get("modelUsage").and_then(Value::as_object) {
            Some(models) if !models.is_empty() => models.keys().cloned().collect::<Vec<_>>().join(", "),
            _ => self.model.clone(),
        };
        let closing = Closing {
            subtype: str_at(v, "subtype").to_owned(),
            is_error: v.get("is_error").and_then(Value::as_bool).unwrap_or(false),
            text: match v.get("result").and_then(Value::as_str) {
                Some(text) => text.to_owned(),
                // Error subtypes carry a list of errors instead.
                None => text_of(&v["errors"]),
            },
            api_error_status: v.get("api_error_status").and_then(Value::as_i64),
            usage,
        };
        let kind = if closing.is_error {
            AgentEventKind::Error
        } else {
            AgentEventKind::Result
        };
        let out = vec![events::usage(&closing.usage), event(kind, closing.text.clone())];
        self.closing = Some(closing);
        out
    }
}

fn blocks(message: &Value) -> &[Value] {
    message
        .get("content")
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice)
}

/// The token counts of a Messages API `usage` object.
fn token_usage(u: &Value) -> Usage {
    let n = |k: &str| u.get(k).and_then(Value::as_i64).unwrap_or_default();
    Usage {
        input_tokens: n("input_tokens"),
        output_tokens: n("output_tokens"),
        cache_read_tokens: n("cache_read_input_tokens"),
        cache_write_tokens: n("cache_creation_input_tokens"),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ticket_budget_becomes_claude_codes_own_limit() {
        let cli = AgentCli {
            bin: "claude".into(),
            model: None,
            args: vec!["--x".into()],
            env: vec![],
            kill_grace: Duration::ZERO,
        };
        let with = argv(&cli, "do it", Some(0.4567), None);
        let at = with.iter().position(|a| a == "--max-budget-usd").expect("the flag");
        assert_eq!(with[at + 1], "0.46");
        assert_eq!(with.last().map(String::as_str), Some("--x"));
        let spent = argv(&cli, "do it", Some(-1.0), Some("s-1"));
        assert!(spent.windows(2).any(|w| w == ["--resume", "s-1"]));
        assert!(spent.windows(2).any(|w| w == ["--max-budget-usd", "0.01"]));
        assert!(!argv(&cli, "do it", None, None).contains(&"--max-budget-usd".to_owned()));
    }

    #[test]
    fn sessions_are_where_claude_code_keeps_them_for_the_directory() {
        assert_eq!(
            project_dir(Path::new("/tmp/omoi/ws.one/3")),
            PathBuf::from(".claude/projects/-tmp-omoi-ws-one-3")
        );
        let (old, new) = (Path::new("/w/t/1"), Path::new("/w/t/2"));
        let kept = Path::new(".claude/projects/-w-t-1/abc.jsonl");
        assert_eq!(
            Claude.place(kept, "abc", old, new),
            Some(PathBuf::from(".claude/projects/-w-t-2/abc.jsonl"))
        );
        for elsewhere in [
            ".claude/projects/-w-t-9/abc.jsonl",
            ".claude/projects/-w-t-1/../../x",
            ".ssh/id",
        ] {
            assert_eq!(Claude.place(Path::new(elsewhere), "abc", old, new), None, "{elsewhere}");
        }
    }

    /// A run recorded from Claude Code 2.1 against a stand-in model API
    /// (trimmed of fields the parser does not read): a text, a Write, a
    /// Bash command, a to-do list, the final answer.
    const RECORDED: &str = r#"{"type":"system","subtype":"init","cwd":"/ws","session_id":"s1","tools":["Bash","Edit","Write"],"model":"claude-sonnet-4-5","permissionMode":"acceptEdits"}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"I will write the file."}],"usage":{"input_tokens":100,"output_tokens":1,"cache_creation_input_tokens":10,"cache_read_input_tokens":20}},"session_id":"s1"}
{"type":"assistant","message":{"id":"msg_1","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_1","name":"Write","input":{"file_path":"/ws/src/hello.txt","content":"hello\n"}}],"usage":{"input_tokens":100,"output_tokens":1,"cache_creation_input_tokens":10,"cache_read_input_tokens":20}},"session_id":"s1"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_1","type":"tool_result","content":"File created successfully at: /ws/src/hello.txt"}]},"session_id":"s1","tool_use_result":{"type":"create","filePath":"/ws/src/hello.txt"}}
{"type":"assistant","message":{"id":"msg_2","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"thinking","thinking":"now test it"},{"type":"tool_use","id":"toolu_2","name":"Bash","input":{"command":"cat src/hello.txt","description":"show"}}],"usage":{"input_tokens":100,"output_tokens":1}},"session_id":"s1"}
{"type":"user","message":{"role":"user","content":[{"tool_use_id":"toolu_2","type":"tool_result","content":[{"type":"text","text":"hello"}],"is_error":false}]},"session_id":"s1"}
{"type":"assistant","message":{"id":"msg_3","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"tool_use","id":"toolu_3","name":"TodoWrite","input":{"todos":[{"content":"write","status":"completed"},{"content":"test","status":"in_progress"}]}}],"usage":{"input_tokens":100,"output_tokens":1}},"session_id":"s1"}
{"type":"assistant","message":{"id":"msg_4","type":"message","role":"assistant","model":"claude-sonnet-4-5","content":[{"type":"text","text":"Done: wrote hello.txt"}],"usage":{"input_tokens":100,"output_tokens":1}},"session_id":"s1"}
{"type":"result","subtype":"success","is_error":false,"api_error_status":null,"duration_ms":194,"num_turns":4,"result":"Done: wrote hello.txt","session_id":"s1","total_cost_usd":0.002187,"usage":{"input_tokens":200,"cache_creation_input_tokens":20,"cache_read_input_tokens":40,"output_tokens":100},"modelUsage":{"claude-sonnet-4-5":{"inputTokens":200,"outputTokens":100,"costUSD":0.002187}},"terminal_reason":"completed"}"#;

    fn read(lines: &str) -> (ClaudeStream, Vec<AgentEvent>) {
        let mut s = ClaudeStream::new(Path::new("/ws"));
        let events = lines.lines().flat_map(|l| s.line(l)).collect();
        (s, events)
    }

    fn kinds(events: &[AgentEvent]) -> Vec<AgentEventKind> {
        events.iter().map(AgentEvent::kind).collect()
    }

    #[test]
    fn a_recorded_run_reads_as_events_usage_and_success() {
        use AgentEventKind::*;
        let (s, all) = read(RECORDED);
        assert_eq!(s.session_id(), Some("s1"));
        // What it spent so far as each message began (msg_1's two parts
        // told once), then the result line's account.
        let told: Vec<(i64, i32)> = all
            .iter()
            .filter_map(|e| e.usage.as_ref())
            .map(|u| (u.input_tokens, u.turns))
            .collect();
        assert_eq!(told, [(100, 1), (200, 2), (300, 3), (400, 4), (200, 4)]);
        assert_eq!(kinds(&all[all.len() - 2..]), [Usage, Result]);
        let account = all[all.len() - 2].usage.clone();
        let events: Vec<AgentEvent> = all.into_iter().filter(|e| e.kind() != Usage).collect();
        assert_eq!(
            kinds(&events),
            [
                Message, ToolCall, ToolResult, FileChange, Thinking, ToolCall, ToolResult, Command, ToolCall, Plan,
                Message, Result
            ]
        );
        let write = &events[1];
        assert_eq!((write.tool.as_str(), write.path.as_str()), ("Write", "src/hello.txt"));
        assert_eq!(events[3].path, "src/hello.txt");
        assert_eq!(events[3].text, "created");
        assert_eq!(events[6].text, "hello");
        assert_eq!(events[7].text, "cat src/hello.txt");
        assert_eq!(events[9].text, "[completed] write\n[in_progress] test");
        let usage = s.usage().unwrap();
        assert_eq!(
            (
                usage.input_tokens,
                usage.output_tokens,
                usage.cache_read_tokens,
                usage.cache_write_tokens
            ),
            (200, 100, 40, 20)
        );
        assert_eq!((usage.cost_usd, usage.turns, usage.duration_ms), (0.002187, 4, 194));
        assert_eq!(usage.model, "claude-sonnet-4-5");
        assert!(!usage.cost_estimated);
        assert_eq!(account, Some(usage));
        assert_eq!(
            s.verdict(Some(0)),
            Some(Verdict::Succeeded {
                summary: "Done: wrote hello.txt".into()
            })
        );
    }

    #[test]
    fn malformed_and_unknown_lines_pass_through_as_output() {
        let (s, events) = read(
            "not json\n{\"type\":\"stream_event\"}\n{\"type\":\"assistant\",\"message\":{\"content\":[{\"type\":\"te",
        );
        assert_eq!(kinds(&events), [AgentEventKind::Output; 3]);
        assert_eq!(events[0].stream(), OutputStream::Stdout);
        assert_eq!(events[0].text, "not json");
        assert_eq!(s.usage(), None);
        // Killed mid-run: the exit code decides.
        assert_eq!(s.verdict(None), None);
        assert!(matches!(
            s.verdict(Some(0)),
            Some(Verdict::Failed {
                class: Some(ErrorClass::Retryable),
                ..
            })
        ));
    }

    #[test]
    fn a_run_cut_short_counts_each_message_once() {
        // The first seven lines: no result line.
        let cut: String = RECORDED.lines().take(7).collect::<Vec<_>>().join("\n");
        let (s, _) = read(&cut);
        let usage = s.usage().unwrap();
        // msg_1 twice (counted once), msg_2, msg_3.
        assert_eq!((usage.input_tokens, usage.cache_read_tokens, usage.turns), (300, 20, 3));
        assert_eq!(usage.cost_usd, 0.0);
    }

    fn closing(subtype: &str, status: Option<i64>, text: &str) -> String {
        serde_json::json!({
            "type": "result", "subtype": subtype, "is_error": true, "api_error_status": status,
            "result": text, "num_turns": 1, "total_cost_usd": 0, "usage": {}
        })
        .to_string()
    }

    #[test]
    fn failures_are_classified_from_the_result_not_the_words() {
        let cases = [
            (
                closing("success", Some(401), "Failed to authenticate. API Error: 401"),
                Some(ErrorClass::Permanent),
            ),
            (
                closing("success", Some(429), "API Error: Request rejected (429)"),
                Some(ErrorClass::Retryable),
            ),
            (closing("success", Some(529), "Overloaded"), Some(ErrorClass::Retryable)),
            (closing("error_max_budget_usd", None, ""), Some(ErrorClass::Permanent)),
            (closing("error_max_turns", None, ""), Some(ErrorClass::Permanent)),
            (closing("error_during_execution", None, ""), Some(ErrorClass::Retryable)),
            // A permanent-sounding text with no structured cause: the queue decides.
            (closing("success", None, "permission denied"), None),
        ];
        for (line, want) in cases {
            let (s, events) = read(&line);
            assert_eq!(kinds(&events), [AgentEventKind::Usage, AgentEventKind::Error], "{line}");
            match s.verdict(Some(1)) {
                Some(Verdict::Failed { class, message }) => {
                    assert_eq!(class, want, "{line}");
                    assert!(message.starts_with("claude: "), "{message}");
                }
                other => panic!("{line}: {other:?}"),
            }
        }
        let budget = read(&closing("error_max_budget_usd", None, "")).0.verdict(Some(1));
        assert!(matches!(budget, Some(Verdict::Failed { message, .. }) if message == "claude: error_max_budget_usd"));
    }

    #[test]
    fn api_retries_are_errors_and_explain_a_run_that_gave_up() {
        let line = r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":507,"error_status":429,"error":"rate_limit"}"#;
        let (s, events) = read(line);
        assert_eq!(kinds(&events), [AgentEventKind::Error]);
        assert!(events[0].text.contains("rate_limit (429)"), "{}", events[0].text);
        assert_eq!(
            s.verdict(Some(1)),
            Some(Verdict::Failed {
                message: "claude stopped after model API errors: rate_limit (429)".into(),
                class: Some(ErrorClass::Retryable)
            })
        );
        // The API's retry-after, as the CLI waited it, holds the task's retry back.
        assert_eq!(s.retry_after(), Some(Duration::from_millis(507)));
        let (s, _) = read(&format!("{line}\n{}", closing("success", Some(429), "API Error: 429")));
        assert_eq!(s.retry_after(), Some(Duration::from_millis(507)));
        let (s, _) = read(&format!("{line}\n{}", closing("success", Some(401), "API Error: 401")));
        assert_eq!(s.retry_after(), None);
    }

    #[test]
    fn a_usage_limit_that_turns_the_run_away_holds_the_retry_until_it_resets() {
        let resets = SystemTime::now() + Duration::from_secs(3600);
        let at = resets.duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        let event = |status: &str| {
            serde_json::json!({
                "type": "rate_limit_event",
                "rate_limit_info": {"status": status, "resetsAt": at, "rateLimitType": "five_hour", "isUsingOverage": false},
                "uuid": "76258cfb-0dc8-4d4b-8682-77082b59c03f", "session_id": "s"
            })
            .to_string()
        };
        // Allowed: nothing to say, nothing to wait for.
        let (s, events) = read(&event("allowed"));
        assert!(events.is_empty(), "{events:?}");
        assert_eq!(s.retry_after(), None);

        let (s, events) = read(&format!(
            "{}\n{}",
            event("rejected"),
            closing("success", None, "Limit reached")
        ));
        assert_eq!(kinds(&events)[0], AgentEventKind::Error);
        assert!(
            events[0].text.starts_with("five hour limit reached; resets at 20"),
            "{}",
            events[0].text
        );
        assert!(
            matches!(
                s.verdict(Some(1)),
                Some(Verdict::Failed {
                    class: Some(ErrorClass::Retryable),
                    ..
                })
            ),
            "a limit that resets is worth waiting for"
        );
        let wait = s.retry_after().unwrap();
        assert!(
            wait > Duration::from_secs(3590) && wait <= Duration::from_secs(3600),
            "{wait:?}"
        );

        // A later, longer API retry-after wins; a limit lifted again is no
        // reason to wait.
        let retry = r#"{"type":"system","subtype":"api_retry","attempt":1,"max_retries":10,"retry_delay_ms":7200000,"error_status":429,"error":"rate_limit"}"#;
        let (s, _) = read(&format!("{}\n{retry}", event("rejected")));
        assert_eq!(s.retry_after(), Some(Duration::from_secs(7200)));
        let (s, _) = read(&format!(
            "{}\n{}\n{}",
            event("rejected"),
            event("allowed"),
            closing("success", Some(500), "")
        ));
        assert_eq!(s.retry_after(), None);
    }
}
