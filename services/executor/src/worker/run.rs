//! One assignment from start to report: the workspace, the runner, the
//! outcome.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use omoi_domain::{ErrorClass, Phase};
use omoi_proto::common::{OutputStream, Usage};
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as tk;
use serde_json::json;
use tonic::Status;
use uuid::Uuid;

use super::{Worker, report};
use crate::config::WorkspacePolicy;
use crate::events::EventSink;
use crate::runner::{RunContext, RunOutcome, RunnerError, Stopped, Verdict};
use crate::runs::{NewRun, Run, StopRequest};
use crate::workspace;

/// The span of one attempt, continuing the trace the dispatch sent along.
pub(super) fn run_span(a: &tq::Assignment) -> tracing::Span {
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

impl Worker {
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
    pub(super) async fn execute(self: Arc<Self>, a: tq::Assignment) {
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
        if !self.start(task_id, attempt).await {
            return;
        }
        let dir = match workspace::path(&self.config.workspace_root, task_id, attempt) {
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
        if let Err((message, class)) = self.prepare(&task.ticket_id, &dir).await {
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
            user: self.agent_user.clone(),
        };
        let outcome = self.runner.run(&ctx, &*run, &run.stop).await;
        let changed = workspace::changed(&before, &workspace::snapshot(&dir));
        let succeeded = self.settle(&run, outcome, changed, task.timeout_seconds).await;
        self.runs.end(&run);
        self.clean_up(&dir, succeeded).await;
    }

    /// Tells the queue the attempt started; false when it is no longer ours.
    async fn start(&self, task_id: Uuid, attempt: i32) -> bool {
        report("StartTask", || {
            let mut q = self.queue.clone();
            async move {
                q.start_task(tq::StartTaskRequest {
                    task_id: task_id.to_string(),
                    attempt,
                })
                .await
            }
        })
        .await
    }

    /// The workspace, with the ticket's repository checked out when it names
    /// one; a failure says how it should be classified.
    async fn prepare(&self, ticket_id: &str, dir: &Path) -> Result<(), (String, Option<ErrorClass>)> {
        let repo = self
            .repository_of(ticket_id)
            .await
            .map_err(|s| (format!("cannot read the ticket: {}", s.message()), None))?;
        let parsed = workspace::parse_repository(&repo).map_err(|e| (e.to_string(), Some(ErrorClass::Permanent)))?;
        workspace::prepare(dir, parsed.as_ref())
            .await
            .map_err(|e| (e.to_string(), None))?;
        if let Some(user) = &self.agent_user {
            user.give(dir).map_err(|e| {
                let message = format!("cannot hand the workspace to {}: {e}", user.name);
                (message, Some(ErrorClass::Permanent))
            })?;
        }
        Ok(())
    }

    async fn clean_up(&self, dir: &Path, succeeded: bool) {
        let remove = match self.config.workspace_policy {
            WorkspacePolicy::Keep => false,
            WorkspacePolicy::Remove => true,
            WorkspacePolicy::RemoveOnSuccess => succeeded,
        };
        if remove && let Err(e) = tokio::fs::remove_dir_all(dir).await {
            tracing::warn!(workspace = %dir.display(), error = %e, "workspace not removed");
        }
    }

    /// Records the run's end and reports it; true when it succeeded.
    async fn settle(
        &self,
        run: &Run,
        outcome: Result<RunOutcome, RunnerError>,
        changed: Vec<String>,
        timeout_seconds: i32,
    ) -> bool {
        let outcome = match outcome {
            Ok(o) => o,
            Err(e) => {
                let class = match &e {
                    // The agent cannot even start: retrying elsewhere will not help.
                    RunnerError::Spawn { .. } | RunnerError::Config { .. } => ErrorClass::Permanent,
                    RunnerError::Agent { permanent: true, .. } => ErrorClass::Permanent,
                    RunnerError::Agent { permanent: false, .. } | RunnerError::Wait(_) => ErrorClass::Retryable,
                };
                let end = End::failed(ExecutionState::Failed, e.to_string(), Some(class));
                self.end_failed(run, end, -1, changed, None).await;
                return false;
            }
        };
        let exit = outcome.exit_code.unwrap_or(-1);
        if let Some(usage) = &outcome.usage {
            crate::events::count_usage(usage);
        }
        run.set_usage(outcome.usage.clone());
        let last_out = run.tail(OutputStream::Stdout, 1).pop().unwrap_or_default();
        let end = match (outcome.stopped, outcome.verdict.clone()) {
            (Some(Stopped::Cancelled), _) => {
                let request = run.stop_request().unwrap_or(StopRequest {
                    reason: "stopped".into(),
                    report: false,
                });
                End {
                    state: ExecutionState::Cancelled,
                    message: format!("stopped: {}", request.reason),
                    class: Some(ErrorClass::Retryable),
                    // The queue itself took the attempt back: nothing to tell.
                    report: request.report.then_some(request.reason),
                    timed_out: false,
                    retry_after: None,
                }
            }
            (Some(Stopped::TimedOut), _) => End {
                // Our timer ran out before the queue noticed: still a timeout.
                timed_out: true,
                ..End::failed(
                    ExecutionState::TimedOut,
                    format!("timed out after {timeout_seconds} s"),
                    None,
                )
            },
            (None, Some(Verdict::Succeeded { summary })) => {
                return self.succeeded(run, &outcome, summary, changed).await;
            }
            (None, None) if exit == 0 => return self.succeeded(run, &outcome, last_out, changed).await,
            (None, Some(Verdict::Failed { message, class })) => End {
                retry_after: outcome.retry_after,
                ..End::failed(ExecutionState::Failed, message, class)
            },
            (None, None) => {
                let detail = run.tail(OutputStream::Stderr, 1).pop().unwrap_or(last_out);
                // The queue classifies the message (docs/rules.md word lists).
                End::failed(
                    ExecutionState::Failed,
                    format!("agent exited with code {exit}: {detail}"),
                    None,
                )
            }
        };
        self.end_failed(run, end, exit, changed, outcome.usage).await;
        false
    }

    /// Records a run that did not succeed and reports it when it should.
    async fn end_failed(&self, run: &Run, end: End, exit: i32, changed: Vec<String>, usage: Option<Usage>) {
        let last_out = run.tail(OutputStream::Stdout, 1).pop().unwrap_or_default();
        run.line(OutputStream::System, end.message.clone());
        let error = end.report.clone().unwrap_or_else(|| end.message.clone());
        run.finish(end.state, exit, last_out, error, changed);
        let Some(message) = end.report else { return };
        run.flush(FLUSH_WITHIN).await;
        let more = tq::FailTaskRequest {
            timed_out: end.timed_out,
            usage,
            retry_after: end.retry_after.and_then(|d| prost_types::Duration::try_from(d).ok()),
            ..Default::default()
        };
        self.report_failure(run.task_id, run.attempt, &message, end.class, more)
            .await;
    }

    /// A successful run: the result (summary, changed files, output tail)
    /// reported as the task's completion.
    async fn succeeded(&self, run: &Run, outcome: &RunOutcome, summary: String, changed: Vec<String>) -> bool {
        let mut tail = run.tail(OutputStream::Stdout, 20);
        tail.extend(
            run.tail(OutputStream::Stderr, 10)
                .into_iter()
                .map(|l| format!("stderr: {l}")),
        );
        let result = json!({
            "exit_code": 0,
            "summary": summary,
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
        run.finish(ExecutionState::Succeeded, 0, summary, String::new(), changed);
        let Some(result) = result.as_object().map(omoi_proto::convert::map_to_struct) else {
            return false;
        };
        run.flush(FLUSH_WITHIN).await;
        let (task_id, attempt, usage) = (run.task_id, run.attempt, outcome.usage.clone());
        report("CompleteTask", || {
            let mut q = self.queue.clone();
            let (result, usage) = (result.clone(), usage.clone());
            async move {
                q.complete_task(tq::CompleteTaskRequest {
                    task_id: task_id.to_string(),
                    attempt,
                    result: Some(result),
                    usage,
                })
                .await
            }
        })
        .await
    }
}

/// How long a run's end waits for its events to reach JetStream before it
/// reports anyway (they follow when NATS is back).
const FLUSH_WITHIN: Duration = Duration::from_secs(10);

/// How a run that did not succeed ended.
struct End {
    state: ExecutionState,
    /// Said in the run's output.
    message: String,
    class: Option<ErrorClass>,
    /// The failure to report (None: nothing to report).
    report: Option<String>,
    timed_out: bool,
    /// The agent said a retry cannot help sooner.
    retry_after: Option<Duration>,
}

impl End {
    fn failed(state: ExecutionState, message: String, class: Option<ErrorClass>) -> Self {
        End {
            state,
            report: Some(message.clone()),
            message,
            class,
            timed_out: false,
            retry_after: None,
        }
    }
}
