//! An agent process: started in the task's workspace in its own process
//! group with only the environment it is given, its output read line by
//! line while it runs, and the whole group terminated when the run is
//! stopped (cancellation, timeout, shutdown).

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::{Duration, Instant};

use omoi_proto::common::OutputStream;
use omoi_runtime::shutdown::{SIGKILL, SIGTERM};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio_util::sync::CancellationToken;

use super::{RunnerError, Stopped};
use crate::events::EventSink;
use crate::sandbox::Fence;

/// What to start.
pub struct Spawn {
    pub argv: Vec<String>,
    /// The setting that chose the program, named when it cannot start.
    pub setting: &'static str,
    /// The complete environment of the process.
    pub env: Vec<(String, String)>,
    pub cwd: PathBuf,
    /// Written to its stdin, which is then closed.
    pub stdin: Option<String>,
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL when stopped.
    pub kill_grace: Duration,
    /// (uid, gid) to run as; None: the executor's own.
    pub identity: Option<(u32, u32)>,
    /// The attempt's sandbox, when agents run in one.
    pub fence: Option<Arc<Fence>>,
    /// What the agent may write in the sandbox besides `cwd`: its home.
    pub writable: Vec<PathBuf>,
}

/// How it ended.
pub struct Ended {
    /// None when killed by a signal.
    pub exit_code: Option<i32>,
    pub stopped: Option<Stopped>,
    pub duration: Duration,
}

/// Runs `spawn` to its end or until `stop` or its timeout; each stdout line
/// goes to `on_stdout`, each stderr line to `out` as OUTPUT.
pub async fn run(
    spawn: Spawn,
    out: &dyn EventSink,
    on_stdout: &mut (dyn FnMut(String) + Send),
    stop: &CancellationToken,
) -> Result<Ended, RunnerError> {
    let started = Instant::now();
    let (argv, setting, env) = match &spawn.fence {
        Some(fence) => {
            // Found on the agent's PATH, else on the executor's, as an
            // unsandboxed start would.
            let own_path = std::env::var("PATH").ok();
            let path = spawn
                .env
                .iter()
                .find(|(k, _)| k == "PATH")
                .map(|(_, v)| v.as_str())
                .or(own_path.as_deref());
            let mut writable = vec![spawn.cwd.clone()];
            writable.extend(spawn.writable.iter().cloned());
            // Found out here, as it would be unsandboxed: a program that is
            // not there is a setting to fix, not an agent that failed.
            let Some(argv) = fence.argv(&spawn.argv, path, &spawn.cwd, &writable) else {
                return Err(RunnerError::Spawn {
                    program: spawn.argv[0].clone(),
                    setting: spawn.setting,
                    source: std::io::Error::from(std::io::ErrorKind::NotFound),
                });
            };
            let mut env = spawn.env.clone();
            env.extend(fence.env());
            (argv, fence.program().1, env)
        }
        None => (spawn.argv.clone(), spawn.setting, spawn.env.clone()),
    };
    let program = &argv[0];
    let mut command = tokio::process::Command::new(program);
    if let Some((uid, gid)) = spawn.identity {
        // Dropping from root also drops the supplementary groups.
        command.uid(uid).gid(gid);
    }
    // The agent dies with the executor: one killed outright (SIGKILL, a
    // lost node) must not leave its agent working, and spending, on a
    // run whose next attempt resumes elsewhere. Set after the change of
    // user (which would clear it), in the child, before it runs the agent.
    // Its own session, so that it has no terminal to reach, and so its own
    // process group, so that a stop reaches everything it started.
    // SAFETY: prctl and setsid are async-signal-safe, as a pre-exec hook
    // must be.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL).map_err(std::io::Error::from)?;
            nix::unistd::setsid().map(drop).map_err(std::io::Error::from)
        });
    }
    let mut child = command
        .args(&argv[1..])
        .current_dir(&spawn.cwd)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|source| RunnerError::Spawn {
            program: program.clone(),
            setting,
            source,
        })?;
    let pgid = child.id().map(|p| p as i32);
    let fenced = if spawn.fence.is_some() { " in its sandbox" } else { "" };
    out.line(
        OutputStream::System,
        format!("started {}{fenced} (pid {})", spawn.argv[0], pgid.unwrap_or_default()),
    );
    if let Some(mut stdin) = child.stdin.take() {
        let input = spawn.stdin.clone().unwrap_or_default();
        tokio::spawn(async move {
            // An agent that does not read its stdin is fine.
            let _ = stdin.write_all(input.as_bytes()).await;
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
                    on_stdout(l);
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
        match spawn.timeout {
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
                terminate_group(pgid, spawn.kill_grace, &mut child).await;
            }
            child.wait().await.map_err(RunnerError::Wait)?
        }
    };
    Ok(Ended {
        exit_code: status.code(),
        stopped,
        duration: started.elapsed(),
    })
}

/// The variables of the executor's own environment named in `allow` (a
/// comma list): all of it the agent may see.
pub fn allowed_env(allow: &str) -> Vec<(String, String)> {
    let allowed: Vec<&str> = allow.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    std::env::vars()
        .filter(|(k, _)| allowed.contains(&k.as_str()))
        .collect()
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
