//! The runners: what works a task's attempt in its workspace. Every one
//! is a [`Runner`] given the same [`RunContext`] and answering the same
//! [`RunOutcome`]: `command` (a configured program), `openhands` (an
//! OpenHands agent server), and the coding-agent CLIs `claude-code`,
//! `codex` and `gemini` (one [`cli::CliRunner`] each, over what sets the
//! CLI apart). They share the agent process ([`process`]), the reading of
//! tool calls ([`tools`]) and the price table ([`prices`]).
//!
//! The runners and the process speak this module's terms (`RunContext`,
//! `RunOutcome`, `RunnerError`, `Stopped`) and this module builds the
//! runner the configuration names from them: the shape of a parent and its
//! parts, which import each other by design.

mod claude;
mod cli;
mod codex;
mod command;
mod gemini;
mod openhands;
mod prices;
pub mod process;
mod tools;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use omoi_domain::{ErrorClass, Phase};
use omoi_proto::common::Usage;
use omoi_runtime::config::secret;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent_user::AgentUser;
use crate::config::{Config, RunnerKind};
use crate::events::EventSink;
use crate::sandbox::{self, Sandbox};

/// Works one attempt: runs its agent in the attempt's workspace until the
/// agent ends, `stop` fires or the context's timeout passes, every event on
/// `out`; says how it ended. A runner is shared by all the executor's
/// attempts at once.
#[async_trait::async_trait]
pub trait Runner: Send + Sync {
    async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError>;

    /// Where its agent keeps sessions, when it can take one up again by
    /// its id (`RunContext::resume`); None: every run starts afresh.
    fn sessions(&self) -> Option<&dyn SessionLayout> {
        None
    }

    /// Fills a new attempt's home (see `AgentUser::for_attempt`) with what
    /// the agent needs there before it starts.
    fn prepare_home(&self, _home: &Path) -> std::io::Result<()> {
        Ok(())
    }

    /// The agent process's home.
    fn home(&self, ctx: &RunContext) -> Option<PathBuf> {
        ctx.user.as_ref().and_then(|u| u.home.clone())
    }
}

/// Where an agent CLI keeps its sessions on disk, under its home.
pub trait SessionLayout: Send + Sync {
    /// The files and directories of session `id` of a run in `workspace`,
    /// relative to `home`, as they are now: what a checkpoint keeps.
    fn files(&self, home: &Path, workspace: &Path, id: &str) -> Vec<PathBuf>;
    /// Where `kept` (one of the `files` of session `id` of a run in `old`)
    /// goes for a run in `new` to resume it, relative to the home; None:
    /// nowhere it may go.
    fn place(&self, kept: &Path, id: &str, old: &Path, new: &Path) -> Option<PathBuf>;
}

/// Whether an agent's session id may name files: letters, digits, `-`,
/// `_` and `.`, at most 128, not `.` or `..` (it comes from the agent's own
/// output, and ends up in paths the executor reads and writes).
pub fn session_id_ok(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id != "."
        && id != ".."
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// The home of an agent process of `ctx` given the environment `env`: the
/// agent user's, else the HOME `env` sets, else the executor's.
pub fn agent_home(ctx: &RunContext, env: &[(String, String)]) -> Option<PathBuf> {
    if let Some(user) = &ctx.user {
        return user.home.clone();
    }
    env.iter()
        .find(|(k, _)| k == "HOME")
        .map(|(_, v)| PathBuf::from(v))
        .or_else(|| std::env::var_os("HOME").map(PathBuf::from))
}

/// `p` made only of plain names (nothing that climbs or starts at the root).
pub fn plain(p: &Path) -> bool {
    p.components().all(|c| matches!(c, std::path::Component::Normal(_)))
}

/// The runner `OMOI_RUNNER` names, set up from the configuration; `user`
/// is who its agents run as, `sandbox` what they run in.
pub fn from_config(
    config: &Config,
    user: Option<&AgentUser>,
    sandbox: Option<&Sandbox>,
) -> anyhow::Result<Box<dyn Runner>> {
    let kill_grace = Duration::from_secs_f64(config.kill_grace_seconds.max(0.0));
    let prices = || prices::PriceTable::load(config.price_table_file.as_deref());
    Ok(match config.runner {
        RunnerKind::Command => {
            let command = config.runner_command.clone().ok_or_else(|| {
                anyhow::anyhow!("OMOI_RUNNER_COMMAND is required for the command runner (e.g. \"omoi-demo-agent\")")
            })?;
            Box::new(command::CommandRunner::new(&command, &config.env_allow, kill_grace)?)
        }
        RunnerKind::Openhands => Box::new(openhands::OpenHandsRunner::new(
            &config.openhands_url,
            secret(&config.openhands_api_key, &config.openhands_api_key_file),
            config.llm_model.clone(),
            secret(&config.llm_api_key, &config.llm_api_key_file),
            Duration::from_millis(config.openhands_poll_ms.max(10)),
        )?),
        RunnerKind::ClaudeCode => Box::new(cli::CliRunner::new(
            claude::Claude,
            agent_cli(config, kill_grace, sandbox)?,
            prices()?,
        )),
        RunnerKind::Codex => Box::new(cli::CliRunner::new(
            codex::Codex,
            agent_cli(config, kill_grace, sandbox)?,
            prices()?,
        )),
        RunnerKind::Gemini => {
            let gemini = gemini::Gemini::new(&config.state_dir(), user)?;
            Box::new(cli::CliRunner::new(
                gemini,
                agent_cli(config, kill_grace, sandbox)?,
                prices()?,
            ))
        }
    })
}

/// The model API a coding-agent CLI calls, as the configuration gives it.
pub struct ModelApi {
    /// The variables the CLI reads its key and base URL from.
    pub key_var: &'static str,
    pub url_var: &'static str,
    pub key: Option<String>,
    /// As configured; None: the vendor's.
    pub base_url: Option<String>,
    /// The vendor's, for the model proxy when none is configured.
    pub vendor_url: &'static str,
    pub header: sandbox::KeyHeader,
}

impl ModelApi {
    /// The API of the configured runner; None when it starts no CLI.
    pub fn of(config: &Config) -> Option<Self> {
        let set = |v: &Option<String>| v.clone().filter(|v| !v.is_empty());
        Some(match config.runner {
            RunnerKind::ClaudeCode => ModelApi {
                key_var: "ANTHROPIC_API_KEY",
                url_var: "ANTHROPIC_BASE_URL",
                key: secret(&config.anthropic_api_key, &config.anthropic_api_key_file),
                base_url: set(&config.anthropic_base_url),
                vendor_url: "https://api.anthropic.com",
                header: sandbox::KeyHeader::XApiKey,
            },
            RunnerKind::Codex => ModelApi {
                key_var: "OPENAI_API_KEY",
                url_var: "OPENAI_BASE_URL",
                key: secret(&config.openai_api_key, &config.openai_api_key_file),
                base_url: set(&config.openai_base_url),
                vendor_url: "https://api.openai.com/v1",
                header: sandbox::KeyHeader::Bearer,
            },
            RunnerKind::Gemini => ModelApi {
                key_var: "GEMINI_API_KEY",
                url_var: "GOOGLE_GEMINI_BASE_URL",
                key: secret(&config.gemini_api_key, &config.gemini_api_key_file),
                base_url: set(&config.google_gemini_base_url),
                vendor_url: "https://generativelanguage.googleapis.com",
                header: sandbox::KeyHeader::GoogApiKey,
            },
            RunnerKind::Command | RunnerKind::Openhands => return None,
        })
    }

    /// The model proxy's route to this API.
    pub fn route(self) -> anyhow::Result<sandbox::ModelRoute> {
        let upstream = self.base_url.as_deref().unwrap_or(self.vendor_url);
        sandbox::ModelRoute::new(upstream, self.url_var, self.key, self.header)
    }
}

/// How a coding-agent CLI is started, from the common agent settings.
fn agent_cli(config: &Config, kill_grace: Duration, sandbox: Option<&Sandbox>) -> Result<cli::AgentCli, RunnerError> {
    let bin = match (&config.agent_bin, config.runner.default_bin()) {
        (Some(bin), _) if !bin.trim().is_empty() => bin.trim().to_owned(),
        (_, Some(default)) => default.to_owned(),
        (_, None) => {
            return Err(RunnerError::Config {
                setting: "OMOI_AGENT_BIN",
                message: format!("the {} runner starts no agent CLI", config.runner.as_str()),
            });
        }
    };
    let mut env = process::allowed_env(&config.env_allow);
    // The agent's key and API reach only the agent that uses them; a
    // sandboxed agent gets neither, but the model proxy and a placeholder.
    if let Some(api) = ModelApi::of(config) {
        let brokered = sandbox.and_then(|s| s.model_base_url());
        let (key, url) = match brokered {
            Some(proxy) => (api.key.map(|_| sandbox::PLACEHOLDER_KEY.to_owned()), Some(proxy)),
            None => (api.key, api.base_url),
        };
        for (name, value) in [(api.key_var, key), (api.url_var, url)] {
            if let Some(v) = value {
                env.push((name.to_owned(), v));
            }
        }
    }
    Ok(cli::AgentCli {
        bin,
        model: config.agent_model.clone().filter(|m| !m.trim().is_empty()),
        args: split_args("OMOI_AGENT_ARGS", &config.agent_args)?,
        env,
        kill_grace,
    })
}

/// What a run is given.
#[derive(Debug, Clone)]
pub struct RunContext {
    pub task_id: Uuid,
    pub attempt: i32,
    pub phase: Phase,
    pub prompt: String,
    pub workspace: PathBuf,
    /// Kill the run after this long (the task's own timeout).
    pub timeout: Option<Duration>,
    /// Who the agent process runs as; None: the executor's own user.
    pub user: Option<Arc<AgentUser>>,
    /// What the ticket may still spend (USD), for an agent that can hold
    /// itself to it.
    pub budget_left_usd: Option<f64>,
    /// The session to take up (its files restored where the agent looks).
    pub resume: Option<String>,
    /// The agent's session id, as soon as the runner learns it.
    pub session: Arc<tokio::sync::watch::Sender<Option<String>>>,
    /// The attempt's sandbox, when agents run in one.
    pub fence: Option<Arc<crate::sandbox::Fence>>,
}

impl RunContext {
    /// The variables every agent process gets about its task (and, run as
    /// an agent user, its HOME, over the allow-listed one).
    pub fn task_env(&self) -> Vec<(String, String)> {
        let mut env = vec![
            ("OMOI_TASK_PROMPT".into(), self.prompt.clone()),
            ("OMOI_TASK_ID".into(), self.task_id.to_string()),
            ("OMOI_TASK_ATTEMPT".into(), self.attempt.to_string()),
            ("OMOI_TASK_PHASE".into(), self.phase.as_str().into()),
            ("OMOI_WORKSPACE".into(), self.workspace.display().to_string()),
        ];
        if let Some(user) = &self.user {
            if let Some(home) = &user.home {
                env.push(("HOME".into(), home.display().to_string()));
            }
            env.push(("USER".into(), user.name.clone()));
        }
        env
    }

    /// The (uid, gid) the agent process runs as, if not the executor's.
    pub fn identity(&self) -> Option<(u32, u32)> {
        self.user.as_ref().map(|u| (u.uid, u.gid))
    }
}

/// Why a run was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Cancelled,
    TimedOut,
}

/// The agent's own account of how its run ended, for runners that read one.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Succeeded {
        summary: String,
    },
    /// `class` None lets the queue classify the message.
    Failed {
        message: String,
        class: Option<ErrorClass>,
    },
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// None when killed by a signal.
    pub exit_code: Option<i32>,
    pub stopped: Option<Stopped>,
    pub duration: Duration,
    /// What the agent reported spending.
    pub usage: Option<Usage>,
    /// None: the exit code decides.
    pub verdict: Option<Verdict>,
    /// A failed run's agent said a retry cannot help sooner than this (a
    /// rate limit's reset).
    pub retry_after: Option<Duration>,
}

impl From<process::Ended> for RunOutcome {
    fn from(e: process::Ended) -> Self {
        RunOutcome {
            exit_code: e.exit_code,
            stopped: e.stopped,
            duration: e.duration,
            usage: None,
            verdict: None,
            retry_after: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("invalid argument {setting}: {message}")]
    Config { setting: &'static str, message: String },
    #[error("cannot start {program} (set by {setting}): {source}")]
    Spawn {
        program: String,
        setting: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("waiting for the agent process failed: {0}")]
    Wait(std::io::Error),
    /// The agent server failed the run; `permanent` when retrying cannot help
    /// (refused credentials, a malformed request).
    #[error("{message}")]
    Agent { message: String, permanent: bool },
}

/// `value` split like a shell, for the setting it came from.
pub fn split_args(setting: &'static str, value: &str) -> Result<Vec<String>, RunnerError> {
    shlex::split(value).ok_or_else(|| RunnerError::Config {
        setting,
        message: format!("cannot split {value:?}"),
    })
}
