//! What every runner shares (the run's context, its outcome, its errors)
//! and the `command` runner: a configured program given the task prompt as
//! an argument, on stdin and in `OMOI_TASK_PROMPT`, whose output lines are
//! the run's events.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use omoi_domain::{ErrorClass, Phase};
use omoi_proto::common::{OutputStream, Usage};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::agent_user::AgentUser;
use crate::events::EventSink;
use crate::process::{self, Spawn};

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
            env.push(("HOME".into(), user.home.display().to_string()));
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

pub struct CommandRunner {
    argv: Vec<String>,
    env: Vec<(String, String)>,
    kill_grace: Duration,
}

impl CommandRunner {
    /// `command` is split like a shell; `allow` names the environment
    /// variables of the executor that the agent may see.
    pub fn new(command: &str, allow: &str, kill_grace: Duration) -> Result<Self, RunnerError> {
        let argv = split_args("OMOI_RUNNER_COMMAND", command)?;
        if argv.is_empty() {
            return Err(RunnerError::Config {
                setting: "OMOI_RUNNER_COMMAND",
                message: "no program given".into(),
            });
        }
        Ok(Self {
            argv,
            env: process::allowed_env(allow),
            kill_grace,
        })
    }

    fn render(&self, ctx: &RunContext) -> Vec<String> {
        let workspace = ctx.workspace.display().to_string();
        let task_id = ctx.task_id.to_string();
        self.argv
            .iter()
            .map(|a| {
                a.replace("{prompt}", &ctx.prompt)
                    .replace("{workspace}", &workspace)
                    .replace("{task_id}", &task_id)
                    .replace("{phase}", ctx.phase.as_str())
            })
            .collect()
    }

    pub async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let mut env = self.env.clone();
        env.extend(ctx.task_env());
        let spawn = Spawn {
            argv: self.render(ctx),
            setting: "OMOI_RUNNER_COMMAND",
            env,
            cwd: ctx.workspace.clone(),
            stdin: Some(ctx.prompt.clone()),
            timeout: ctx.timeout,
            kill_grace: self.kill_grace,
            identity: ctx.identity(),
        };
        let ended = process::run(spawn, out, &mut |l| out.line(OutputStream::Stdout, l), stop).await?;
        Ok(ended.into())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(OutputStream, String)>>);

    impl EventSink for Lines {
        fn emit(&self, event: omoi_proto::common::AgentEvent) {
            self.0.lock().unwrap().push((event.stream(), event.text));
        }
    }

    fn ctx(dir: &std::path::Path) -> RunContext {
        RunContext {
            task_id: Uuid::from_u128(7),
            attempt: 1,
            phase: Phase::Implementation,
            prompt: "do the thing".into(),
            workspace: dir.to_path_buf(),
            timeout: None,
            user: None,
            budget_left_usd: None,
        }
    }

    fn tmp() -> PathBuf {
        let d = std::env::temp_dir().join(format!("omoi-runner-{}", Uuid::new_v4()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[tokio::test]
    async fn templates_stdin_env_and_output() {
        let dir = tmp();
        let r = CommandRunner::new(
            "sh -c 'echo {phase} {task_id}; cat; echo; echo err >&2; echo secret=$SECRET_TOKEN; pwd'",
            "PATH",
            Duration::from_secs(1),
        )
        .unwrap();
        let lines = Lines::default();
        let out = r.run(&ctx(&dir), &lines, &CancellationToken::new()).await.unwrap();
        assert_eq!(out.exit_code, Some(0));
        let got = lines.0.lock().unwrap().clone();
        let stdout: Vec<&str> = got
            .iter()
            .filter(|(s, _)| *s == OutputStream::Stdout)
            .map(|(_, l)| l.as_str())
            .collect();
        assert_eq!(stdout[0], format!("PHASE_IMPLEMENTATION {}", Uuid::from_u128(7)));
        assert_eq!(stdout[1], "do the thing");
        assert!(
            stdout.contains(&"secret="),
            "the executor's environment must not leak: {stdout:?}"
        );
        assert!(stdout.contains(&dir.display().to_string().as_str()));
        assert!(got.contains(&(OutputStream::Stderr, "err".to_string())));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_stop_kills_the_whole_group() {
        let dir = tmp();
        // The child starts a grandchild that ignores SIGTERM; both must die.
        let r = CommandRunner::new(
            "sh -c 'sh -c \"trap \\\"\\\" TERM; sleep 300\" & echo $! > grandchild.pid; sleep 300'",
            "PATH",
            Duration::from_millis(300),
        )
        .unwrap();
        let stop = CancellationToken::new();
        let lines = Lines::default();
        let c = ctx(&dir);
        let run = r.run(&c, &lines, &stop);
        let stopper = async {
            for _ in 0..100 {
                if dir.join("grandchild.pid").exists() {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            stop.cancel();
        };
        let (out, ()) = tokio::join!(run, stopper);
        let out = out.unwrap();
        assert_eq!(out.stopped, Some(Stopped::Cancelled));
        let pid: i32 = std::fs::read_to_string(dir.join("grandchild.pid"))
            .unwrap()
            .trim()
            .parse()
            .unwrap();
        let mut alive = true;
        for _ in 0..50 {
            // Signal 0 probes existence; a zombie is reaped by init soon after.
            alive = omoi_runtime::shutdown::send_signal(pid, 0)
                && !std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "));
            if !alive {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(!alive, "grandchild {pid} survived");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[tokio::test]
    async fn a_timeout_stops_the_run_and_a_missing_program_is_an_error() {
        let dir = tmp();
        let r = CommandRunner::new("sleep 30", "PATH", Duration::from_millis(200)).unwrap();
        let mut c = ctx(&dir);
        c.timeout = Some(Duration::from_millis(200));
        let out = r.run(&c, &Lines::default(), &CancellationToken::new()).await.unwrap();
        assert_eq!(out.stopped, Some(Stopped::TimedOut));
        let missing = CommandRunner::new("/nonexistent/agent", "PATH", Duration::from_millis(200)).unwrap();
        let err = missing
            .run(&c, &Lines::default(), &CancellationToken::new())
            .await
            .unwrap_err();
        assert!(err.to_string().contains("cannot start"), "{err}");
        assert!(CommandRunner::new("", "PATH", Duration::ZERO).is_err());
        assert!(CommandRunner::new("'unclosed", "PATH", Duration::ZERO).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
