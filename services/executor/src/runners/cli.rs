//! What the coding-agent CLI runners (`claude-code`, `codex`, `gemini`)
//! share: the CLI started headless in the task's workspace with the
//! prompt, its structured output read line by line into agent events by
//! the CLI's own reader ([`AgentStream`]), which also says what the run
//! spent and how it ended; the cost priced from the table when the CLI
//! reports none. What sets each CLI apart is its [`Cli`].

use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_domain::ErrorClass;
use omoi_proto::common::{AgentEvent, OutputStream, Usage};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::prices::PriceTable;
use super::process::{self, Spawn};
use super::{RunContext, RunOutcome, Runner, RunnerError, SessionLayout, Verdict, agent_home, session_id_ok};
use crate::events::EventSink;

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

/// What sets one coding-agent CLI apart.
pub trait Cli: Send + Sync {
    /// Whether the CLI reports what its run cost in money (else the price
    /// table estimates it).
    const REPORTS_COST: bool;
    /// The command line of a run.
    fn argv(&self, cli: &AgentCli, ctx: &RunContext) -> Vec<String>;
    /// What the CLI needs in its environment besides the agent's own.
    fn env(&self, cli: &AgentCli) -> Vec<(String, String)>;
    /// A reader of one run's output.
    fn reader(&self, cli: &AgentCli, ctx: &RunContext) -> Box<dyn AgentStream>;
    /// Where the CLI keeps its sessions, when it can take one up again.
    fn sessions(&self) -> Option<&dyn SessionLayout> {
        None
    }
    /// The CLI's own home, when it keeps one apart from the agent's.
    fn home(&self, _cli: &AgentCli) -> Option<PathBuf> {
        None
    }
    /// What the CLI needs in a new attempt's home.
    fn prepare_home(&self, _cli: &AgentCli, _home: &Path) -> std::io::Result<()> {
        Ok(())
    }
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
    /// The agent's id of its session, once it said it.
    fn session_id(&self) -> Option<&str> {
        None
    }
}

/// A coding-agent CLI as a runner.
pub struct CliRunner<C> {
    kind: C,
    cli: AgentCli,
    prices: PriceTable,
}

impl<C: Cli> CliRunner<C> {
    pub fn new(kind: C, cli: AgentCli, prices: PriceTable) -> Self {
        Self { kind, cli, prices }
    }
}

#[async_trait::async_trait]
impl<C: Cli> Runner for CliRunner<C> {
    async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let mut env = self.cli.env.clone();
        env.extend(ctx.task_env());
        env.extend(self.kind.env(&self.cli));
        let mut stream = self.kind.reader(&self.cli, ctx);
        let spawn = Spawn {
            argv: self.kind.argv(&self.cli, ctx),
            setting: "OMOI_AGENT_BIN",
            env,
            cwd: ctx.workspace.clone(),
            stdin: None,
            timeout: ctx.timeout,
            kill_grace: self.cli.kill_grace,
            identity: ctx.identity(),
            fence: ctx.fence.clone(),
            // The agent's home, and the CLI's own when it keeps one apart.
            writable: agent_home(ctx, &self.cli.env)
                .into_iter()
                .chain(self.kind.home(&self.cli))
                .collect(),
        };
        let ended = process::run(
            spawn,
            out,
            &mut |line| {
                for mut e in stream.line(&line) {
                    // Usage told as the agent runs, without its cost: the
                    // price table's estimate, as for the run's account.
                    if let Some(mut u) = e.usage.clone()
                        && u.cost_usd == 0.0
                        && !u.cost_estimated
                        && u.input_tokens + u.output_tokens > 0
                        && self.prices.estimate(&mut u)
                    {
                        e = crate::events::usage(&u);
                    }
                    out.emit(e);
                }
                if let Some(id) = stream.session_id().filter(|id| session_id_ok(id)) {
                    ctx.session.send_if_modified(|known| {
                        let new = known.as_deref() != Some(id);
                        if new {
                            *known = Some(id.to_owned());
                        }
                        new
                    });
                }
            },
            stop,
        )
        .await?;
        let mut outcome = RunOutcome::from(ended);
        outcome.usage = stream.usage();
        // The model proxy's count: said beside the agent's, and its usage
        // when the agent said none (killed, or a CLI that never reports).
        let metered = ctx.fence.as_ref().and_then(|f| f.metered());
        let mut from_proxy = false;
        if let Some(m) = &metered {
            out.line(
                OutputStream::System,
                format!(
                    "model proxy counted {} answers: {} input, {} output, {} cache read, {} cache write tokens",
                    m.responses, m.input_tokens, m.output_tokens, m.cache_read_tokens, m.cache_write_tokens
                ),
            );
            if outcome.usage.is_none() {
                outcome.usage = Some(Usage {
                    input_tokens: m.input_tokens,
                    output_tokens: m.output_tokens,
                    cache_read_tokens: m.cache_read_tokens,
                    cache_write_tokens: m.cache_write_tokens,
                    model: self.cli.model.clone().unwrap_or_else(|| m.model.clone()),
                    turns: m.responses as i32,
                    duration_ms: outcome.duration.as_millis() as i64,
                    ..Default::default()
                });
                from_proxy = true;
            }
        }
        // Its cost, where the agent told none: a CLI that never does, the
        // proxy's count, or a run stopped before its account (Claude Code's
        // messages so far).
        if let Some(usage) = outcome.usage.as_mut()
            && (!C::REPORTS_COST || from_proxy || (usage.cost_usd == 0.0 && !usage.cost_estimated))
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

    fn sessions(&self) -> Option<&dyn SessionLayout> {
        self.kind.sessions()
    }

    fn home(&self, ctx: &RunContext) -> Option<PathBuf> {
        home_of(&self.kind, &self.cli, ctx)
    }

    fn prepare_home(&self, home: &Path) -> std::io::Result<()> {
        self.kind.prepare_home(&self.cli, home)
    }
}

/// Where a CLI's run of `ctx` keeps its files: the CLI's own home, else the
/// agent's (see [`agent_home`]). The one answer for a checkpoint, a restore
/// and a command line that names a restored file.
pub(super) fn home_of<C: Cli + ?Sized>(kind: &C, cli: &AgentCli, ctx: &RunContext) -> Option<PathBuf> {
    kind.home(cli).or_else(|| agent_home(ctx, &cli.env))
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
pub(super) fn add_tokens(sum: &mut Usage, part: &Usage) {
    sum.input_tokens += part.input_tokens;
    sum.output_tokens += part.output_tokens;
    sum.cache_read_tokens += part.cache_read_tokens;
    sum.cache_write_tokens += part.cache_write_tokens;
}

pub(super) fn str_at<'a>(v: &'a Value, key: &str) -> &'a str {
    v.get(key).and_then(Value::as_str).unwrap_or_default()
}

/// A tool result's or error list's text: a string, or the text of its parts.
pub(super) fn text_of(content: &Value) -> String {
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
pub(super) fn relative(workspace: &Path, path: &str) -> String {
    Path::new(path)
        .strip_prefix(workspace)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_owned())
}
