//! The `command` runner: a configured program given the task prompt as an
//! argument (`{prompt}` and the other placeholders of
//! `OMOI_RUNNER_COMMAND`), on stdin and in `OMOI_TASK_PROMPT`, whose output
//! lines are the run's events.
//!
//! A program may keep a session the executor checkpoints and resumes: it
//! keeps it in `$OMOI_SESSIONS_DIR/<id>/` and says so with a line
//! `omoi:session=<id>` on stdout (the id: letters, digits, `-`, `_`, `.`).
//! A later attempt gets that directory back and `OMOI_RESUME_SESSION=<id>`,
//! with a continuation prompt.

use std::path::{Path, PathBuf};
use std::time::Duration;

use omoi_proto::common::OutputStream;
use tokio_util::sync::CancellationToken;

use super::process::{self, Spawn};
use super::{RunContext, RunOutcome, Runner, RunnerError, SessionLayout, agent_home, plain, session_id_ok, split_args};
use crate::events::EventSink;

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
}

#[async_trait::async_trait]
impl Runner for CommandRunner {
    async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn EventSink,
        stop: &CancellationToken,
    ) -> Result<RunOutcome, RunnerError> {
        let mut env = self.env.clone();
        env.extend(ctx.task_env());
        if let Some(home) = agent_home(ctx, &self.env) {
            env.push(("OMOI_SESSIONS_DIR".into(), home.join(SESSIONS).display().to_string()));
        }
        if let Some(id) = &ctx.resume {
            env.push(("OMOI_RESUME_SESSION".into(), id.clone()));
        }
        let spawn = Spawn {
            argv: self.render(ctx),
            setting: "OMOI_RUNNER_COMMAND",
            env,
            cwd: ctx.workspace.clone(),
            stdin: Some(ctx.prompt.clone()),
            timeout: ctx.timeout,
            kill_grace: self.kill_grace,
            identity: ctx.identity(),
            fence: ctx.fence.clone(),
            writable: agent_home(ctx, &self.env).into_iter().collect(),
        };
        let on_line = &mut |l: String| {
            if let Some(id) = declared_session(&l) {
                ctx.session.send_replace(Some(id.to_owned()));
            }
            out.line(OutputStream::Stdout, l)
        };
        let ended = process::run(spawn, out, on_line, stop).await?;
        Ok(ended.into())
    }

    fn sessions(&self) -> Option<&dyn SessionLayout> {
        Some(self)
    }

    fn home(&self, ctx: &RunContext) -> Option<PathBuf> {
        agent_home(ctx, &self.env)
    }
}

/// Where programs keep their sessions, relative to their home.
const SESSIONS: &str = ".omoi/sessions";

/// The session a program's output line declares (`omoi:session=<id>`).
fn declared_session(line: &str) -> Option<&str> {
    let id = line.trim().strip_prefix("omoi:session=")?;
    session_id_ok(id).then_some(id)
}

/// A program's session is its directory, wherever it ran.
impl SessionLayout for CommandRunner {
    fn files(&self, home: &Path, _workspace: &Path, id: &str) -> Vec<PathBuf> {
        let dir = Path::new(SESSIONS).join(id);
        if session_id_ok(id) && home.join(&dir).is_dir() {
            vec![dir]
        } else {
            Vec::new()
        }
    }

    fn place(&self, kept: &Path, id: &str, _old: &Path, _new: &Path) -> Option<PathBuf> {
        let dir = Path::new(SESSIONS).join(id);
        (session_id_ok(id) && kept == dir && plain(kept)).then_some(dir)
    }
}

#[cfg(test)]
mod session_tests {
    use super::declared_session;

    #[test]
    fn a_session_is_declared_by_a_plain_id_only() {
        assert_eq!(declared_session("omoi:session=demo-1_a.b"), Some("demo-1_a.b"));
        for refused in [
            "omoi:session=",
            "omoi:session=..",
            "omoi:session=a/b",
            "omoi:session=a b",
            "session=a",
        ] {
            assert_eq!(declared_session(refused), None, "{refused}");
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use std::path::PathBuf;

    use omoi_domain::Phase;
    use uuid::Uuid;

    use super::*;
    use crate::runners::Stopped;

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
            resume: None,
            session: Default::default(),
            fence: None,
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
