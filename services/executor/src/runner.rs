//! The `command` runner: a configured program in its own process group,
//! given the task prompt on stdin and in `OMOI_TASK_PROMPT`, with only an
//! allow-listed environment; its output is streamed line by line, and a stop
//! (cancellation, timeout, shutdown) terminates the whole group.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::{Duration, Instant};

use omoi_domain::Phase;
use omoi_proto::common::OutputStream;
use omoi_runtime::shutdown::{SIGKILL, SIGTERM};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

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
}

/// Why a run was stopped before it ended by itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stopped {
    Cancelled,
    TimedOut,
}

#[derive(Debug, Clone)]
pub struct RunOutcome {
    /// None when killed by a signal.
    pub exit_code: Option<i32>,
    pub stopped: Option<Stopped>,
    pub duration: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("invalid argument OMOI_RUNNER_COMMAND: {0}")]
    Config(String),
    #[error("cannot start {program}: {source}")]
    Spawn {
        program: String,
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

/// Receives a run's output lines.
pub trait OutputSink: Send + Sync {
    fn line(&self, stream: OutputStream, text: String);
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
        let argv = shlex::split(command).ok_or_else(|| RunnerError::Config(format!("cannot split {command:?}")))?;
        if argv.is_empty() {
            return Err(RunnerError::Config("no program given".into()));
        }
        let allowed: Vec<&str> = allow.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
        let env = std::env::vars()
            .filter(|(k, _)| allowed.contains(&k.as_str()))
            .collect();
        Ok(Self { argv, env, kill_grace })
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
        out: &dyn OutputSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let argv = self.render(ctx);
        let started = Instant::now();
        let mut child = tokio::process::Command::new(&argv[0])
            .args(&argv[1..])
            .current_dir(&ctx.workspace)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .env("OMOI_TASK_PROMPT", &ctx.prompt)
            .env("OMOI_TASK_ID", ctx.task_id.to_string())
            .env("OMOI_TASK_ATTEMPT", ctx.attempt.to_string())
            .env("OMOI_TASK_PHASE", ctx.phase.as_str())
            .env("OMOI_WORKSPACE", &ctx.workspace)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group, so that a stop reaches everything it started.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| RunnerError::Spawn {
                program: argv[0].clone(),
                source,
            })?;
        let pgid = child.id().map(|p| p as i32);
        out.line(
            OutputStream::System,
            format!("started {} (pid {})", argv[0], pgid.unwrap_or_default()),
        );
        if let Some(mut stdin) = child.stdin.take() {
            let prompt = ctx.prompt.clone();
            tokio::spawn(async move {
                // An agent that does not read its stdin is fine.
                let _ = stdin.write_all(prompt.as_bytes()).await;
                let _ = stdin.shutdown().await;
            });
        }
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        let pump = async {
            let read_out = async {
                if let Some(s) = stdout {
                    let mut lines = BufReader::new(s).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        out.line(OutputStream::Stdout, l);
                    }
                }
            };
            let read_err = async {
                if let Some(s) = stderr {
                    let mut lines = BufReader::new(s).lines();
                    while let Ok(Some(l)) = lines.next_line().await {
                        out.line(OutputStream::Stderr, l);
                    }
                }
            };
            tokio::join!(read_out, read_err);
        };
        let deadline = async {
            match ctx.timeout {
                Some(t) => tokio::time::sleep(t).await,
                None => std::future::pending().await,
            }
        };
        let mut stopped = None;
        let status = tokio::select! {
            (status, ()) = async { tokio::join!(child.wait(), pump) } => Some(status),
            _ = stop.cancelled() => { stopped = Some(Stopped::Cancelled); None }
            _ = deadline => { stopped = Some(Stopped::TimedOut); None }
        };
        let status = match status {
            Some(s) => s.map_err(RunnerError::Wait)?,
            None => {
                out.line(OutputStream::System, "stopping the agent process group".into());
                if let Some(pgid) = pgid {
                    terminate_group(pgid, self.kill_grace, &mut child).await;
                }
                child.wait().await.map_err(RunnerError::Wait)?
            }
        };
        Ok(RunOutcome {
            exit_code: status.code(),
            stopped,
            duration: started.elapsed(),
        })
    }
}

fn signal_group(pgid: i32, sig: i32) {
    omoi_runtime::shutdown::send_signal(-pgid, sig);
}

/// SIGTERM to the group, SIGKILL after `grace` if the leader still runs,
/// and SIGKILL to the group anyway so that no straggler survives.
async fn terminate_group(pgid: i32, grace: Duration, child: &mut tokio::process::Child) {
    signal_group(pgid, SIGTERM);
    if tokio::time::timeout(grace, child.wait()).await.is_err() {
        signal_group(pgid, SIGKILL);
    }
    signal_group(pgid, SIGKILL);
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(OutputStream, String)>>);

    impl OutputSink for Lines {
        fn line(&self, stream: OutputStream, text: String) {
            self.0.lock().unwrap().push((stream, text));
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
