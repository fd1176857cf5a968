//! The coding-agent CLI runners (`claude-code`, `codex`, `gemini`): the CLI started
//! headless in the task's workspace with the prompt, its structured output
//! read line by line into agent events by the CLI's own reader, which also
//! says what the run spent and how it ended.

mod claude;
mod codex;
mod gemini;
mod tools;

use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_domain::ErrorClass;
use omoi_proto::common::{AgentEvent, OutputStream, Usage};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use crate::agent_user::AgentUser;
use crate::events::EventSink;
use crate::prices::PriceTable;
use crate::process::{self, Spawn};
use crate::runner::{RunContext, RunOutcome, RunnerError, Verdict};

/// How an agent CLI is started.
#[derive(Debug, Clone)]
pub struct AgentCli {
    pub bin: String,
    pub model: Option<String>,
    /// Appended to the runner's own arguments.
    pub args: Vec<String>,
    /// The agent's whole environment, but for the task's variables.
    pub env: Vec<(String, String)>,
    pub kill_grace: Duration,
}

/// Which CLI.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CliKind {
    Claude,
    Codex,
    Gemini,
}

/// Reads one CLI's output.
pub trait AgentStream: Send {
    /// The events one line of its stdout says.
    fn line(&mut self, line: &str) -> Vec<AgentEvent>;
    /// What the run spent, as far as it told.
    fn usage(&self) -> Option<Usage>;
    /// How the run ended as the agent tells it; None leaves it to the exit code.
    fn verdict(&self, exit_code: Option<i32>) -> Option<Verdict>;
    /// How long the agent said a retry should wait, when it said so.
    fn retry_after(&self) -> Option<Duration> {
        None
    }
}

pub struct CliRunner {
    kind: CliKind,
    cli: AgentCli,
    prices: PriceTable,
    /// Gemini CLI's home of its own (see `gemini::env`).
    home: Option<PathBuf>,
}

impl CliKind {
    /// Whether the CLI reports what its run cost in money.
    fn reports_cost(self) -> bool {
        matches!(self, CliKind::Claude)
    }
}

impl CliRunner {
    /// `state` is a directory of the executor's own, for what a CLI needs
    /// set up once.
    pub fn new(
        kind: CliKind,
        cli: AgentCli,
        prices: PriceTable,
        state: &Path,
        user: Option<&AgentUser>,
    ) -> Result<Self, RunnerError> {
        let home = match kind {
            CliKind::Gemini => {
                let home = state.join("gemini");
                let prepared = gemini::prepare_home(&home).and_then(|()| match user {
                    Some(u) => u.give(&home),
                    None => Ok(()),
                });
                prepared.map_err(|e| RunnerError::Config {
                    setting: "OMOI_WORKSPACE_ROOT",
                    message: format!("cannot prepare {}: {e}", home.display()),
                })?;
                Some(home)
            }
            CliKind::Claude | CliKind::Codex => None,
        };
        Ok(Self {
            kind,
            cli,
            prices,
            home,
        })
    }

    pub async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let mut env = self.cli.env.clone();
        env.extend(ctx.task_env());
        let (argv, mut stream): (Vec<String>, Box<dyn AgentStream>) = match self.kind {
            CliKind::Claude => {
                env.extend(claude::env());
                (
                    claude::argv(&self.cli, &ctx.prompt, ctx.budget_left_usd),
                    Box::new(claude::ClaudeStream::new(&ctx.workspace)),
                )
            }
            CliKind::Codex => (
                codex::argv(&self.cli, &ctx.prompt),
                Box::new(codex::CodexStream::new(&ctx.workspace, self.cli.model.clone())),
            ),
            CliKind::Gemini => {
                env.extend(gemini::env(&self.cli, self.home.as_deref()));
                (
                    gemini::argv(&self.cli, &ctx.prompt),
                    Box::new(gemini::GeminiStream::new(&ctx.workspace)),
                )
            }
        };
        let spawn = Spawn {
            argv,
            setting: "OMOI_AGENT_BIN",
            env,
            cwd: ctx.workspace.clone(),
            stdin: None,
            timeout: ctx.timeout,
            kill_grace: self.cli.kill_grace,
            identity: ctx.identity(),
        };
        let ended = process::run(
            spawn,
            out,
            &mut |line| {
                for e in stream.line(&line) {
                    out.emit(e);
                }
            },
            stop,
        )
        .await?;
        let mut outcome = RunOutcome::from(ended);
        outcome.usage = stream.usage();
        if let Some(usage) = outcome.usage.as_mut()
            && !self.kind.reports_cost()
            && !self.prices.estimate(usage)
        {
            out.line(
                OutputStream::System,
                format!(
                    "no price for model {:?} in the price table (OMOI_PRICE_TABLE_FILE): its cost is unknown",
                    usage.model
                ),
            );
        }
        outcome.verdict = stream.verdict(outcome.exit_code);
        outcome.retry_after = stream.retry_after();
        Ok(outcome)
    }
}

/// The class of a model API's HTTP status: refused credentials and requests
/// the API will never take are permanent; rate limits, overload, timeouts and
/// server errors retryable; anything else the queue decides.
pub fn class_of_status(status: i64) -> Option<ErrorClass> {
    match status {
        400 | 401 | 403 | 404 | 413 | 422 => Some(ErrorClass::Permanent),
        408 | 409 | 429 | 500..=599 => Some(ErrorClass::Retryable),
        _ => None,
    }
}

/// Adds `part`'s token counts to `sum`.
fn add_tokens(sum: &mut Usage, part: &Usage) {
    sum.input_tokens += part.input_tokens;
    sum.output_tokens += part.output_tokens;
    sum.cache_read_tokens += part.cache_read_tokens;
    sum.cache_write_tokens += part.cache_write_tokens;
}

fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A tool result's or error list's text: a string, or the text of its parts.
fn text_of(content: &Value) -> String {
    match content {
        Value::String(s) => s.clone(),
        Value::Array(parts) => parts
            .iter()
            .map(|p| match p {
                Value::String(s) => s.clone(),
                other => str_at(other, "text").to_owned(),
            })
            .filter(|s| !s.is_empty())
            .collect::<Vec<_>>()
            .join("\n"),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// `path` relative to the workspace when it is inside it.
fn relative(workspace: &Path, path: &str) -> String {
    Path::new(path)
        .strip_prefix(workspace)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_owned())
}
