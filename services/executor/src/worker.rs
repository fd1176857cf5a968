//! The executor's life as an agent: register with the health service and
//! heartbeat, take assignments from the task queue, work each in its own
//! workspace through the runner, report the outcome, and drain on shutdown.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use omoi_domain::backoff::Backoff;
use omoi_domain::{ErrorClass, Phase, classify};
use omoi_proto::common::OutputStream;
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::health::{self as hp, agent_health_service_client::AgentHealthServiceClient};
use omoi_proto::taskqueue::watch_assignments_response::Event as StreamEvent;
use omoi_proto::taskqueue::{self as tq, task_queue_service_client::TaskQueueServiceClient};
use omoi_proto::ticket::{self as tk, ticket_service_client::TicketServiceClient};
use omoi_runtime::status::transient;
use serde_json::json;
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};
use tracing::Instrument as _;
use uuid::Uuid;

use crate::config::{Config, RunnerKind, WorkspacePolicy};
use crate::openhands::OpenHandsRunner;
use crate::runner::{CommandRunner, OutputSink, RunContext, RunnerError, Stopped};
use crate::runs::{NewRun, Run, Runs, StopRequest};
use crate::workspace;

type Ch = omoi_runtime::grpc::Client;

/// The configured runner.
enum Runner {
    Command(CommandRunner),
    OpenHands(Box<OpenHandsRunner>),
}

impl Runner {
    async fn run(
        &self,
        ctx: &RunContext,
        out: &dyn OutputSink,
        stop: &CancellationToken,
    ) -> Result<crate::runner::RunOutcome, RunnerError> {
        match self {
            Runner::Command(r) => r.run(ctx, out, stop).await,
            Runner::OpenHands(r) => r.run(ctx, out, stop).await,
        }
    }
}

pub struct Worker {
    pub agent_id: Uuid,
    pub config: Config,
    pub runs: Arc<Runs>,
    runner: Runner,
    phases: Vec<Phase>,
    labels: HashMap<String, String>,
    queue: TaskQueueServiceClient<Ch>,
    health: AgentHealthServiceClient<Ch>,
    tickets: TicketServiceClient<Ch>,
    pub registered: AtomicBool,
    pub accepting: AtomicBool,
    interval_secs: AtomicU64,
    repositories: Mutex<HashMap<String, String>>,
}

/// The span of one attempt, continuing the trace the dispatch sent along.
fn run_span(a: &tq::Assignment) -> tracing::Span {
    let task_id = a.task.as_ref().map(|t| t.id.as_str()).unwrap_or_default();
    let span = tracing::info_span!(
        "run",
        otel.name = "run",
        otel.kind = "consumer",
        task_id,
        attempt = a.attempt
    );
    omoi_runtime::trace::adopt(&span, &a.trace_context);
    span
}

/// Phases from `INITIAL,IMPLEMENTATION` (with or without the PHASE_ prefix).
pub fn parse_phases(list: &str) -> anyhow::Result<Vec<Phase>> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = item.to_ascii_uppercase();
        let name = name.strip_prefix("PHASE_").unwrap_or(&name).to_owned();
        let phase = Phase::ALL
            .into_iter()
            .find(|p| p.as_str().trim_start_matches("PHASE_") == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "OMOI_AGENT_PHASES: {item:?} is not INITIAL, IMPLEMENTATION, INTEGRATION or REFACTORING"
                )
            })?;
        if !out.contains(&phase) {
            out.push(phase);
        }
    }
    Ok(out)
}

/// Labels from `key=value,key=value`.
pub fn parse_labels(list: &str) -> anyhow::Result<HashMap<String, String>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("OMOI_AGENT_LABELS: {kv:?} is not key=value"))
        })
        .collect()
}

/// Sends a report until a service answers it (restarts are ridden out);
/// `Ok(false)` when it was refused, i.e. the attempt is no longer ours.
async fn report<F, Fut, T>(what: &str, mut send: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    for _ in 0..60 {
        match send().await {
            Ok(_) => return true,
            Err(s) if transient(s.code()) => {
                tracing::debug!(what, error = %s.message(), "report not delivered; retrying");
                tokio::time::sleep(backoff.next_delay()).await;
            }
            Err(s) => {
                tracing::info!(what, code = ?s.code(), error = %s.message(), "report refused");
                return false;
            }
        }
    }
    tracing::warn!(
        what,
        "report undelivered; the task queue's timeouts and stale detection take over"
    );
    false
}

impl Worker {
    pub fn new(config: Config, runs: Arc<Runs>, agent_id: Uuid) -> anyhow::Result<Self> {
        let runner = match config.runner {
            RunnerKind::Command => {
                let command = config.runner_command.clone().ok_or_else(|| {
                    anyhow::anyhow!("OMOI_RUNNER_COMMAND is required for the command runner (e.g. \"omoi-demo-agent\")")
                })?;
                Runner::Command(CommandRunner::new(
                    &command,
                    &config.env_allow,
                    Duration::from_secs_f64(config.kill_grace_seconds.max(0.0)),
                )?)
            }
            RunnerKind::Openhands => Runner::OpenHands(Box::new(OpenHandsRunner::new(
                &config.openhands_url,
                config.openhands_api_key.clone(),
                config.llm_model.clone(),
                config.llm_api_key.clone(),
                Duration::from_millis(config.openhands_poll_ms.max(10)),
            )?)),
        };
        anyhow::ensure!(
            (1..=1000).contains(&config.capacity),
            "OMOI_EXECUTOR_CAPACITY must be 1 to 1000, got {}",
            config.capacity
        );
        let connector = config.common.connector()?;
        Ok(Self {
            agent_id,
            phases: parse_phases(&config.phases)?,
            labels: parse_labels(&config.labels)?,
            queue: TaskQueueServiceClient::new(connector.client(&config.task_queue_url, "OMOI_TASK_QUEUE_URL")?),
            health: AgentHealthServiceClient::new(connector.client(&config.health_url, "OMOI_HEALTH_URL")?),
            tickets: TicketServiceClient::new(connector.client(&config.ticket_url, "OMOI_TICKET_URL")?),
            runner,
            runs,
            config,
            registered: AtomicBool::new(false),
            accepting: AtomicBool::new(true),
            interval_secs: AtomicU64::new(30),
            repositories: Mutex::new(HashMap::new()),
        })
    }

    async fn register(&self) -> Result<(), Status> {
        let r = self
            .health
            .clone()
            .register_agent(hp::RegisterAgentRequest {
                agent_id: self.agent_id.to_string(),
                agent_type: self.config.agent_type.clone(),
                phase: omoi_proto::common::Phase::Unspecified.into(),
                phases: self.phases.iter().map(|p| p.wire()).collect(),
                capacity: self.config.capacity,
                labels: self.labels.clone(),
            })
            .await?
            .into_inner();
        self.interval_secs
            .store(r.heartbeat_interval_seconds.max(1) as u64, Ordering::Relaxed);
        self.registered.store(true, Ordering::Relaxed);
        tracing::info!(agent_id = %self.agent_id, interval = r.heartbeat_interval_seconds, "registered");
        Ok(())
    }

    /// Registers (again whenever the registry lost us) and heartbeats at the
    /// interval the health service tells, until `stop`.
    pub async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !stop.is_cancelled() {
            if !self.registered.load(Ordering::Relaxed) {
                if let Err(e) = self.register().await {
                    tracing::warn!(error = %e.message(), "registration failed; retrying");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(backoff.next_delay()) => {}
                    }
                    continue;
                }
                backoff.reset();
            }
            let wait = Duration::from_secs(self.interval_secs.load(Ordering::Relaxed));
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
            let beat = self
                .health
                .clone()
                .heartbeat(hp::HeartbeatRequest {
                    agent_id: self.agent_id.to_string(),
                    running_task_ids: self.runs.running_ids(),
                })
                .await;
            match beat {
                Ok(r) => {
                    let i = r.into_inner().interval_seconds.max(1) as u64;
                    self.interval_secs.store(i, Ordering::Relaxed);
                }
                Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                    tracing::warn!(error = %s.message(), "registration lost; registering again");
                    self.registered.store(false, Ordering::Relaxed);
                }
                Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed"),
            }
        }
    }

    /// Takes assignments until `stop` (reconnecting with backoff whenever the
    /// task queue goes away).
    pub async fn assignment_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        while !stop.is_cancelled() {
            let opened = self
                .queue
                .clone()
                .watch_assignments(tq::WatchAssignmentsRequest {
                    agent_id: self.agent_id.to_string(),
                    phases: self.phases.iter().map(|p| p.wire()).collect(),
                    capacity: self.config.capacity,
                })
                .await;
            match opened {
                Ok(stream) => {
                    tracing::info!("assignment stream open");
                    backoff.reset();
                    let mut stream = stream.into_inner();
                    loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match msg {
                            Ok(Some(m)) => match m.event {
                                Some(StreamEvent::Assignment(a)) => {
                                    let span = run_span(&a);
                                    tokio::spawn(Arc::clone(&self).execute(a).instrument(span));
                                }
                                Some(StreamEvent::Cancellation(c)) => {
                                    if let Ok(id) = c.task_id.parse() {
                                        let request = StopRequest {
                                            reason: c.reason,
                                            report: false,
                                        };
                                        if self.runs.stop(id, Some(c.attempt), request) {
                                            tracing::info!(task_id = %id, "run stopped by the task queue");
                                        }
                                    }
                                }
                                None => {}
                            },
                            Ok(None) => break,
                            Err(s) => {
                                tracing::warn!(error = %s.message(), "assignment stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(s) => tracing::warn!(error = %s.message(), "cannot open the assignment stream"),
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(backoff.next_delay()) => {}
            }
        }
    }

    async fn repository_of(&self, ticket_id: &str) -> Result<String, Status> {
        if ticket_id.is_empty() {
            return Ok(String::new());
        }
        if let Some(r) = self
            .repositories
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(ticket_id)
        {
            return Ok(r.clone());
        }
        let t = self
            .tickets
            .clone()
            .get_ticket(tk::GetTicketRequest {
                ticket_id: ticket_id.to_owned(),
            })
            .await?
            .into_inner()
            .ticket
            .unwrap_or_default();
        self.repositories
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(ticket_id.to_owned(), t.repository.clone());
        Ok(t.repository)
    }

    fn prompt(task: &tq::Task, phase: Phase) -> String {
        format!(
            "# {}\n\nPhase: {}\nTask: {}\nTicket: {}\n\n{}\n",
            task.title,
            phase.as_str(),
            task.id,
            task.ticket_id,
            task.description
        )
    }

    /// Works one assignment from start to report.
    async fn execute(self: Arc<Self>, a: tq::Assignment) {
        let Some(task) = a.task else { return };
        let (Ok(task_id), Some(phase)) = (task.id.parse::<Uuid>(), Phase::given(task.phase).known()) else {
            tracing::warn!(task_id = %task.id, "malformed assignment ignored");
            return;
        };
        let attempt = a.attempt;
        if !self.accepting.load(Ordering::Relaxed) {
            // Draining: leave it to the queue (the stream's end requeues it).
            return;
        }
        let started = report("StartTask", || {
            let mut q = self.queue.clone();
            async move {
                q.start_task(tq::StartTaskRequest {
                    task_id: task_id.to_string(),
                    attempt,
                })
                .await
            }
        })
        .await;
        if !started {
            return;
        }
        let root = self.config.workspace_root.clone();
        let dir = match workspace::path(&root, task_id, attempt) {
            Ok(d) => d,
            Err(e) => {
                self.fail(task_id, attempt, &e.to_string(), Some(ErrorClass::Permanent))
                    .await;
                return;
            }
        };
        let run = self.runs.begin(NewRun {
            task_id,
            attempt,
            ticket_id: task.ticket_id.clone(),
            phase,
            workspace: dir.clone(),
        });
        run.line(OutputStream::System, format!("attempt {attempt} in {}", dir.display()));
        let prepared = async {
            let repo = self
                .repository_of(&task.ticket_id)
                .await
                .map_err(|s| (format!("cannot read the ticket: {}", s.message()), None))?;
            let parsed =
                workspace::parse_repository(&repo).map_err(|e| (e.to_string(), Some(ErrorClass::Permanent)))?;
            workspace::prepare(&dir, parsed.as_ref())
                .await
                .map_err(|e| (e.to_string(), None))
        };
        if let Err((message, class)) = prepared.await {
            run.line(OutputStream::System, message.clone());
            run.finish(ExecutionState::Failed, -1, String::new(), message.clone(), vec![]);
            self.runs.end(&run);
            self.fail(task_id, attempt, &message, class).await;
            return;
        }
        let before = workspace::snapshot(&dir);
        run.set_state(ExecutionState::Running);
        let ctx = RunContext {
            task_id,
            attempt,
            phase,
            prompt: Self::prompt(&task, phase),
            workspace: dir.clone(),
            timeout: (task.timeout_seconds > 0).then(|| Duration::from_secs(task.timeout_seconds as u64)),
        };
        let outcome = self.runner.run(&ctx, &*run, &run.stop).await;
        let changed = workspace::changed(&before, &workspace::snapshot(&dir));
        let succeeded = self.settle(&run, outcome, changed, task.timeout_seconds).await;
        self.runs.end(&run);
        let remove = match self.config.workspace_policy {
            WorkspacePolicy::Keep => false,
            WorkspacePolicy::Remove => true,
            WorkspacePolicy::RemoveOnSuccess => succeeded,
        };
        if remove && let Err(e) = tokio::fs::remove_dir_all(&dir).await {
            tracing::warn!(workspace = %dir.display(), error = %e, "workspace not removed");
        }
    }

    /// Records the run's end and reports it; true when it succeeded.
    async fn settle(
        &self,
        run: &Run,
        outcome: Result<crate::runner::RunOutcome, RunnerError>,
        changed: Vec<String>,
        timeout_seconds: i32,
    ) -> bool {
        let (task_id, attempt) = (run.task_id, run.attempt);
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let class = match &e {
                    // The agent cannot even start: retrying elsewhere will not help.
                    RunnerError::Spawn { .. } | RunnerError::Config(_) => ErrorClass::Permanent,
                    RunnerError::Agent { permanent: true, .. } => ErrorClass::Permanent,
                    RunnerError::Agent { permanent: false, .. } | RunnerError::Wait(_) => ErrorClass::Retryable,
                };
                let message = e.to_string();
                run.line(OutputStream::System, message.clone());
                run.finish(ExecutionState::Failed, -1, String::new(), message.clone(), changed);
                self.fail(task_id, attempt, &message, Some(class)).await;
                return false;
            }
        };
        let exit = outcome.exit_code.unwrap_or(-1);
        let last_out = run.tail(OutputStream::Stdout, 1).pop().unwrap_or_default();
        match outcome.stopped {
            Some(Stopped::Cancelled) => {
                let request = run.stop_request().unwrap_or(StopRequest {
                    reason: "stopped".into(),
                    report: false,
                });
                run.line(OutputStream::System, format!("stopped: {}", request.reason));
                run.finish(
                    ExecutionState::Cancelled,
                    exit,
                    last_out,
                    request.reason.clone(),
                    changed,
                );
                if request.report {
                    self.fail(task_id, attempt, &request.reason, Some(ErrorClass::Retryable))
                        .await;
                }
                false
            }
            Some(Stopped::TimedOut) => {
                let message = format!("timed out after {timeout_seconds} s");
                run.line(OutputStream::System, message.clone());
                run.finish(ExecutionState::TimedOut, exit, last_out, message.clone(), changed);
                self.fail(task_id, attempt, &message, None).await;
                false
            }
            None if exit == 0 => {
                let mut tail = run.tail(OutputStream::Stdout, 20);
                tail.extend(
                    run.tail(OutputStream::Stderr, 10)
                        .into_iter()
                        .map(|l| format!("stderr: {l}")),
                );
                let result = json!({
                    "exit_code": 0,
                    "summary": last_out,
                    "changed_files": changed,
                    "duration_ms": outcome.duration.as_millis() as u64,
                    "output_tail": tail,
                    "workspace": run.workspace.display().to_string(),
                    "agent_id": self.agent_id.to_string(),
                });
                run.line(
                    OutputStream::System,
                    format!("succeeded; {} files changed", changed.len()),
                );
                run.finish(ExecutionState::Succeeded, 0, last_out, String::new(), changed);
                let Some(result) = result.as_object().map(omoi_proto::convert::map_to_struct) else {
                    return false;
                };
                report("CompleteTask", || {
                    let mut q = self.queue.clone();
                    let result = result.clone();
                    async move {
                        q.complete_task(tq::CompleteTaskRequest {
                            task_id: task_id.to_string(),
                            attempt,
                            result: Some(result),
                        })
                        .await
                    }
                })
                .await
            }
            None => {
                let last_err = run.tail(OutputStream::Stderr, 1).pop();
                let detail = last_err.unwrap_or(last_out.clone());
                let message = format!("agent exited with code {exit}: {detail}");
                run.line(OutputStream::System, message.clone());
                run.finish(ExecutionState::Failed, exit, last_out, message.clone(), changed);
                // The queue classifies the message (docs/rules.md word lists).
                self.fail(task_id, attempt, &message, None).await;
                false
            }
        }
    }

    async fn fail(&self, task_id: Uuid, attempt: i32, message: &str, class: Option<ErrorClass>) {
        let message: String = message.chars().take(8000).collect();
        let class = class.unwrap_or_else(|| classify::classify(&message, None));
        report("FailTask", || {
            let mut q = self.queue.clone();
            let message = message.clone();
            async move {
                q.fail_task(tq::FailTaskRequest {
                    task_id: task_id.to_string(),
                    attempt,
                    error_message: message,
                    error_class: class.wire(),
                })
                .await
            }
        })
        .await;
    }

    /// Stops taking work, lets runs finish within `grace`, stops and reports
    /// what is left as retryable (so another agent takes it), deregisters.
    pub async fn drain(&self, grace: Duration) {
        self.accepting.store(false, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + grace;
        while !self.runs.active().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.runs.active();
        for run in &left {
            run.stop_with(StopRequest {
                reason: "executor shutting down".into(),
                report: true,
            });
        }
        let settle = Duration::from_secs_f64(self.config.kill_grace_seconds.max(0.0)) + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + settle;
        while left.iter().any(|r| !r.is_finished()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the last reports go out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self
            .health
            .clone()
            .deregister_agent(hp::DeregisterAgentRequest {
                agent_id: self.agent_id.to_string(),
            })
            .await;
        tracing::info!(stopped = left.len(), "drained and deregistered");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_labels_parse() {
        assert_eq!(
            parse_phases("initial, PHASE_REFACTORING,initial").unwrap(),
            vec![Phase::Initial, Phase::Refactoring]
        );
        assert!(parse_phases("").unwrap().is_empty());
        assert!(parse_phases("testing").is_err());
        let labels = parse_labels("zone=a, tier = gpu").unwrap();
        assert_eq!(labels.get("tier").map(String::as_str), Some("gpu"));
        assert!(parse_labels("novalue").is_err());
    }
}
