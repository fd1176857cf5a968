//! A ticket's check command (`CreateTicket.check_command`, e.g. `cargo
//! test`): run in the workspace once the agent's work is committed, as the
//! agent's user in its sandbox (the check runs the agent's code), with the
//! agent's environment and a time limit. What it says — exit status,
//! duration, the tail of its output — is the evidence of the attempt.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::Mutex;
use std::time::Duration;

use omoi_domain::check::Check;
use omoi_proto::common::{AgentEvent, AgentEventKind, OutputStream};
use tokio_util::sync::CancellationToken;

use crate::events::{self, EventSink};
use crate::git::WorkspaceUser;
use crate::runners::{Stopped, process};

/// Lines of a check's output kept as its tail.
const TAIL_LINES: usize = 40;

/// How checks run on this executor.
#[derive(Debug, Clone)]
pub struct CheckSettings {
    pub timeout: Duration,
    /// Between SIGTERM and SIGKILL when a check is stopped.
    pub kill_grace: Duration,
    /// The environment the agent may see (OMOI_RUNNER_ENV_ALLOW).
    pub env_allow: String,
}

/// The COMMAND event an attempt's timeline shows for its check.
pub fn event(check: &Check) -> AgentEvent {
    AgentEvent {
        exit_code: check.exit_code,
        tool: "check".into(),
        ..events::event(AgentEventKind::Command, format!("check: {}", check.command))
    }
}

/// Forwards the check's lines to the run and keeps the last ones.
struct Tail<'a> {
    run: &'a dyn EventSink,
    lines: Mutex<VecDeque<String>>,
}

impl Tail<'_> {
    fn keep(&self, line: &str) {
        let mut lines = self.lines.lock().unwrap_or_else(|p| p.into_inner());
        if lines.len() == TAIL_LINES {
            lines.pop_front();
        }
        lines.push_back(line.to_owned());
    }
}

impl EventSink for Tail<'_> {
    fn emit(&self, event: AgentEvent) {
        if event.kind() == AgentEventKind::Output && event.stream() != OutputStream::System {
            self.keep(&event.text);
        }
        self.run.emit(event);
    }
}

/// Runs `command` in `dir` as `user` until it ends, its time limit, or
/// `stop`; its output goes to `run` as it comes.
pub async fn run(
    command: &str,
    dir: &Path,
    user: &WorkspaceUser,
    settings: &CheckSettings,
    run: &dyn EventSink,
    stop: &CancellationToken,
) -> Check {
    let mut env = process::allowed_env(&settings.env_allow);
    env.retain(|(k, _)| k != "HOME");
    env.push(("HOME".into(), user.home.as_deref().unwrap_or(dir).display().to_string()));
    let spawn = process::Spawn {
        argv: vec!["sh".into(), "-c".into(), command.to_owned()],
        setting: "check_command",
        env,
        cwd: dir.to_path_buf(),
        stdin: None,
        timeout: Some(settings.timeout),
        kill_grace: settings.kill_grace,
        identity: user.identity,
        fence: user.fence.clone(),
        writable: user.home.iter().cloned().collect(),
    };
    let tail = Tail {
        run,
        lines: Mutex::new(VecDeque::new()),
    };
    let started = std::time::Instant::now();
    let mut on_stdout = |line: String| tail.emit(events::output(OutputStream::Stdout, line));
    let ended = process::run(spawn, &tail, &mut on_stdout, stop).await;
    let mut output_tail: Vec<String> = tail.lines.lock().unwrap_or_else(|p| p.into_inner()).drain(..).collect();
    let (exit_code, timed_out) = match &ended {
        Ok(e) => (
            e.stopped.is_none().then_some(e.exit_code).flatten(),
            e.stopped == Some(Stopped::TimedOut),
        ),
        Err(e) => {
            output_tail.push(format!("cannot run the check: {e}"));
            (None, false)
        }
    };
    Check {
        command: command.to_owned(),
        passed: exit_code == Some(0),
        exit_code,
        timed_out,
        duration_ms: started.elapsed().as_millis() as u64,
        output_tail,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Default)]
    struct Lines(Mutex<Vec<AgentEvent>>);

    impl EventSink for Lines {
        fn emit(&self, event: AgentEvent) {
            self.0.lock().unwrap().push(event);
        }
    }

    fn settings(timeout: Duration) -> CheckSettings {
        CheckSettings {
            timeout,
            kill_grace: Duration::from_millis(200),
            env_allow: "PATH".into(),
        }
    }

    async fn check(command: &str, timeout: Duration) -> (Check, Vec<AgentEvent>) {
        let dir = std::env::temp_dir().join(format!("omoi-check-{}", uuid::Uuid::new_v4().simple()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("hello.txt"), "hello\n").unwrap();
        let lines = Lines::default();
        let result = run(
            command,
            &dir,
            &WorkspaceUser::default(),
            &settings(timeout),
            &lines,
            &CancellationToken::new(),
        )
        .await;
        std::fs::remove_dir_all(&dir).unwrap();
        (result, lines.0.into_inner().unwrap())
    }

    #[tokio::test]
    async fn a_check_passes_or_fails_by_its_exit_status_with_its_output_kept() {
        let (ok, seen) = check("cat hello.txt; echo to-stderr >&2", Duration::from_secs(10)).await;
        assert!(ok.passed, "{ok:?}");
        assert_eq!(ok.exit_code, Some(0));
        assert_eq!(ok.output_tail.len(), 2);
        assert!(ok.output_tail.contains(&"hello".to_owned()) && ok.output_tail.contains(&"to-stderr".to_owned()));
        assert!(
            seen.iter().any(|e| e.text == "hello"),
            "the run sees the check's output"
        );
        let (bad, _) = check("seq 1 100; grep -q bye hello.txt", Duration::from_secs(10)).await;
        assert!(!bad.passed);
        assert_eq!(bad.exit_code, Some(1));
        assert_eq!(bad.output_tail.len(), TAIL_LINES, "only the tail is kept");
        assert_eq!(bad.output_tail.last().map(String::as_str), Some("100"));
        assert!(
            bad.line()
                .starts_with("check failed: seq 1 100; grep -q bye hello.txt (exit 1,")
        );
        assert_eq!(event(&bad).exit_code, Some(1));
    }

    #[tokio::test]
    async fn a_check_that_hangs_is_killed_at_its_limit_and_fails() {
        let (hung, _) = check("echo started; sleep 30", Duration::from_millis(300)).await;
        assert!(!hung.passed && hung.timed_out, "{hung:?}");
        assert_eq!(hung.exit_code, None);
        assert!(hung.duration_ms < 5_000, "{hung:?}");
        assert_eq!(hung.output_tail, ["started"]);
        assert!(hung.line().contains("killed at its time limit"));
    }
}
