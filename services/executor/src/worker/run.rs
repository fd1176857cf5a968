//! One assignment from start to report: the workspace, the runner, the
//! outcome.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use omoi_domain::{ErrorClass, Phase};
use omoi_proto::common::OutputStream;
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as tk;
use serde_json::json;
use tonic::Status;
use uuid::Uuid;

use super::{Worker, report};
use crate::config::WorkspacePolicy;
use crate::runner::{OutputSink, RunContext, RunOutcome, RunnerError, Stopped};
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
            .map_err(|e| (e.to_string(), None))
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
        let (state, message, class) = match outcome.stopped {
            None if exit == 0 => return self.succeeded(run, &outcome, last_out, changed).await,
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
                return false;
            }
            Some(Stopped::TimedOut) => {
                let message = format!("timed out after {timeout_seconds} s");
                run.line(OutputStream::System, message.clone());
                run.finish(ExecutionState::TimedOut, exit, last_out, message.clone(), changed);
                // Our timer ran out before the queue noticed: still a timeout.
                self.report_failure(task_id, attempt, &message, None, true).await;
                return false;
            }
            None => {
                let detail = run.tail(OutputStream::Stderr, 1).pop().unwrap_or(last_out.clone());
                // The queue classifies the message (docs/rules.md word lists).
                (
                    ExecutionState::Failed,
                    format!("agent exited with code {exit}: {detail}"),
                    None,
                )
            }
        };
        run.line(OutputStream::System, message.clone());
        run.finish(state, exit, last_out, message.clone(), changed);
        self.fail(task_id, attempt, &message, class).await;
        false
    }

    /// A clean exit: the result (summary, changed files, output tail)
    /// reported as the task's completion.
    async fn succeeded(&self, run: &Run, outcome: &RunOutcome, last_out: String, changed: Vec<String>) -> bool {
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
        let (task_id, attempt) = (run.task_id, run.attempt);
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
}
