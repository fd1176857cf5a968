//! One assignment from start to report: the workspace, the runner, the
//! outcome.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::Duration;

use omoi_domain::guardian::Watch;
use omoi_domain::{ErrorClass, GitChange, Phase};
use omoi_proto::common::{OutputStream, Usage};
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as tk;
use serde_json::json;
use tonic::Status;
use uuid::Uuid;

use super::guardian::{Guarding, Reviewer, Stepped};
use super::prompt::{self, Dependency, TicketContext, phase_name};
use super::session::{Checkpointing, Continues};
use super::{Worker, report};
use crate::agent_user::AgentUser;
use crate::config::WorkspacePolicy;
use crate::events::EventSink;
use crate::executions::{Execution, NewExecution, StopRequest};
use crate::git::{self, Checkout, GitError, WorkspaceUser};
use crate::reuse;
use crate::runners::{RunContext, RunOutcome, RunnerError, Stopped, Verdict};
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

/// What an attempt starts with besides its task.
pub(super) struct Prepared {
    pub(super) ticket: TicketContext,
    dependencies: Vec<Dependency>,
    /// The candidates this task chooses among (its dependencies that are
    /// candidate attempts at it), as the queue has them; empty for others.
    pub(super) candidates: Vec<tq::Task>,
    /// The ticket's branch, checked out (when it names a repository).
    pub(super) checkout: Option<Checkout>,
}

impl Worker {
    /// The attempt's ticket and the task's completed dependencies (in its
    /// order), read together: the ticket alone (its budget moves as its
    /// tasks spend), the dependencies in one call.
    async fn read_context(
        &self,
        task: &tq::Task,
    ) -> Result<(TicketContext, Vec<tq::Task>), (String, Option<ErrorClass>)> {
        let unreachable = |what: &str, s: Status| {
            (
                format!("cannot read {what}: {}", s.message()),
                Some(ErrorClass::Retryable),
            )
        };
        let ticket = async {
            if task.ticket_id.is_empty() {
                return Ok(TicketContext::default());
            }
            let read = self
                .tickets
                .clone()
                .get_ticket(tk::GetTicketRequest {
                    ticket_id: task.ticket_id.clone(),
                    view: tk::TicketView::Basic.into(),
                })
                .await?;
            Ok(TicketContext::from(read.into_inner().ticket.unwrap_or_default()))
        };
        let dependencies = async {
            if task.depends_on.is_empty() {
                return Ok(Vec::new());
            }
            let read = self
                .queue
                .clone()
                .batch_get_tasks(tq::BatchGetTasksRequest {
                    task_ids: task.depends_on.clone(),
                })
                .await?;
            Ok(read.into_inner().tasks)
        };
        let (ticket, dependencies) = tokio::join!(ticket, dependencies);
        Ok((
            ticket.map_err(|s| unreachable("the ticket", s))?,
            dependencies.map_err(|s| unreachable("the task's dependencies", s))?,
        ))
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
        let run = self.executions.begin(NewExecution {
            task_id,
            attempt,
            ticket_id: task.ticket_id.clone(),
            phase,
            workspace: dir.clone(),
        });
        run.line(OutputStream::System, format!("attempt {attempt} in {}", dir.display()));
        let prepared = match self.prepare(&task, &dir).await {
            Ok(p) => p,
            Err((message, class)) => return self.abandon(&run, &dir, message, class).await,
        };
        if let Some(c) = &prepared.checkout {
            let reused = if c.reused {
                " (this executor's earlier checkout of the ticket, brought to it)"
            } else {
                ""
            };
            run.line(
                OutputStream::System,
                format!("on branch {} at {}{reused}", c.branch, c.base_commit),
            );
        }
        let say: Arc<dyn Fn(String) + Send + Sync> = {
            let run = Arc::clone(&run);
            Arc::new(move |line| run.line(OutputStream::System, line))
        };
        let fence = match self
            .sandbox
            .as_ref()
            .map(|s| {
                let borrowed = prepared.checkout.as_ref().and_then(|c| c.borrowed());
                s.fence(task_id, attempt, say, borrowed.into_iter().collect())
            })
            .transpose()
        {
            Ok(f) => f.map(Arc::new),
            Err(e) => {
                let message = format!("cannot set up the agent's sandbox (its proxies' sockets): {e}");
                return self.abandon(&run, &dir, message, Some(ErrorClass::Retryable)).await;
            }
        };
        let user = match self.attempt_user(&dir) {
            Ok(u) => u,
            Err(message) => return self.abandon(&run, &dir, message, Some(ErrorClass::Retryable)).await,
        };
        // The attempt's work is what differs from here: restored work too.
        let before = workspace::snapshot(&dir);
        let mut ctx = RunContext {
            task_id,
            attempt,
            phase,
            prompt: String::new(),
            workspace: dir.clone(),
            timeout: (task.timeout_seconds > 0).then(|| Duration::from_secs(task.timeout_seconds as u64)),
            user,
            budget_left_usd: prepared.ticket.budget_left_usd,
            resume: None,
            session: Default::default(),
            fence,
        };
        if task.lands_candidate {
            // A person's choice among a step's candidates: no agent runs.
            let landed = self.land_choice(&run, &task, &prepared).await;
            self.executions.end(&run);
            self.clean_up(&dir, landed, None).await;
            return;
        }
        if !prepared.candidates.is_empty() {
            // It chooses among its candidates, all ended; its agent, when
            // it requires one (the judge's labels), judges them.
            let judge = (!task.requires.is_empty()).then_some(&mut ctx);
            let landed = self.choose_and_land(&run, &task, &prepared, judge).await;
            self.executions.end(&run);
            self.clean_up(&dir, landed, None).await;
            return;
        }
        let continues = Continues::of(&task, task_id);
        let restored = self.restore(&run, &continues, &ctx).await;
        ctx.resume = restored.resume.clone();
        let checkout = prepared.checkout.as_ref();
        ctx.prompt = match (&continues, &ctx.resume) {
            (Continues::Retry(_), Some(_)) => prompt::continuation(&task, checkout),
            (Continues::FollowUp { .. }, Some(_)) => prompt::follow_up(&task, checkout),
            _ => {
                let mut p = prompt::prompt(&task, phase, &prepared.ticket, &prepared.dependencies, checkout);
                if let Some(earlier) = &restored.earlier {
                    p.push_str(&prompt::earlier_attempt(&task, &earlier.changed, &earlier.diff));
                }
                p
            }
        };
        if let Some(session) = restored.session.as_ref().filter(|_| ctx.resume.is_some()) {
            // TASK_RESUMED, and the record of where it came from.
            let mut first = session.clone();
            first.attempt = attempt;
            first.checkpoint = continues.session().map(|s| s.checkpoint.clone()).unwrap_or_default();
            self.record_session(task_id, attempt, &first).await;
        }
        run.set_state(ExecutionState::Running);
        let checkpointing = Checkpointing {
            run: &run,
            ctx: &ctx,
            ticket_id: task.ticket_id.parse().ok(),
            before: &before,
            resumed: restored.session,
            count: AtomicI32::new(0),
        };
        let thresholds = prepared.ticket.guardian.over(self.guardian);
        let mut watch = Watch::new(thresholds, prepared.ticket.budget_left_usd);
        if matches!(continues, Continues::Retry(_)) && ctx.resume.is_some() {
            self.count_on(&run, &mut watch).await;
            watch.carry_on(prepared.ticket.budget_left_usd);
        }
        let mut guarding = Guarding {
            watch,
            reviewer: Reviewer::new(thresholds.review_seconds),
            seen: -1,
        };
        // What runs cut short by a nudge spent: the attempt's, as the last
        // run's is.
        let mut spent_before: Option<omoi_domain::Usage> = None;
        // A run the guardian nudged goes on in the same session, told why.
        let mut nudged: Option<RunContext> = None;
        let outcome = loop {
            let this = nudged.as_ref().unwrap_or(&ctx);
            let turn = run.stop.child_token();
            let mut stepped = None;
            let outcome = {
                let guard = async {
                    stepped = Some(self.guard(&run, this, &task, &mut guarding, &turn).await);
                    // The run ends as it was told to: wait for it.
                    std::future::pending::<std::convert::Infallible>().await
                };
                tokio::select! {
                    outcome = self.runner.run(this, &*run, &turn) => outcome,
                    never = self.checkpoint_every(&checkpointing) => match never {},
                    never = guard => match never {},
                }
            };
            // A run that ended by itself as the nudge came stands as it ended.
            let cut_short = matches!(&outcome, Ok(o) if o.stopped == Some(Stopped::Cancelled));
            match stepped {
                Some(Stepped::Nudge(prompt)) if cut_short && !run.stop.is_cancelled() => {
                    let Some(session) = ctx.session.borrow().clone() else {
                        run.stop_with(StopRequest {
                            reason: "the guardian stopped it: its agent has no session to resume".into(),
                            report: true,
                        });
                        break outcome;
                    };
                    if let Ok(RunOutcome { usage: Some(u), .. }) = &outcome {
                        spent_before
                            .get_or_insert_with(Default::default)
                            .add(&omoi_domain::Usage::from(u.clone()));
                    }
                    nudged = Some(RunContext {
                        resume: Some(session),
                        prompt,
                        ..ctx.clone()
                    });
                    // What the stopped run did after the trip is not held
                    // against the resumed one.
                    guarding.seen = run.last_seq();
                    guarding.watch.next_run();
                }
                _ => break outcome,
            }
        };
        // The attempt spent what its runs and its reviewer did.
        let outcome = outcome.map(|mut o| {
            for spent in [spent_before, guarding.reviewer.spent.take()].into_iter().flatten() {
                let mut sum = o.usage.take().map(omoi_domain::Usage::from).unwrap_or_default();
                sum.add(&spent);
                o.usage = Some(Usage::from(&sum));
            }
            o
        });
        let after = workspace::snapshot(&dir);
        if worth_a_last_checkpoint(&outcome, &run, &ctx) {
            self.checkpoint(&checkpointing, &after).await;
        }
        let changed = workspace::changed(&before, &after);
        let commit = prepared.checkout.as_ref().map(|c| BranchCommit {
            checkout: c,
            message: git::commit_message(&phase_name(task.phase), &task.title, &task.id, attempt),
            user: workspace_user(&ctx),
            check: Some(prepared.ticket.check_command.clone()).filter(|c| !c.is_empty()),
            candidate: task.candidate_of.parse::<Uuid>().ok().map(|of| (of, task.candidate)),
        });
        let succeeded = self
            .report_end(&run, outcome, changed, task.timeout_seconds, commit)
            .await;
        self.executions.end(&run);
        let ticket = prepared.checkout.as_ref().map(|_| task.ticket_id.as_str());
        self.clean_up(&dir, succeeded, ticket).await;
    }

    /// Whether the queue still has the attempt running for us, asked (by
    /// extending its lease over the push) before its work is pushed. A queue
    /// out of reach cannot say: the work is pushed, and the report that
    /// follows decides.
    pub(super) async fn hold_for_push(&self, task_id: Uuid, attempt: i32) -> bool {
        let asked = self
            .queue
            .clone()
            .extend_lease(tq::ExtendLeaseRequest {
                task_id: task_id.to_string(),
                attempt,
                seconds: PUSH_LEASE_SECONDS,
            })
            .await;
        match asked {
            Ok(_) => true,
            Err(s) if omoi_runtime::status::transient(s.code()) => true,
            Err(s) => {
                tracing::info!(%task_id, attempt, error = %s.message(), "attempt no longer ours");
                false
            }
        }
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

    /// The workspace (a checkout of the ticket's branch where its
    /// dependencies' work goes on, when the ticket names a repository), the
    /// ticket and the dependencies' work; a failure says how it should be
    /// classified.
    async fn prepare(&self, task: &tq::Task, dir: &Path) -> Result<Prepared, (String, Option<ErrorClass>)> {
        let (ticket, dependencies) = self.read_context(task).await?;
        let (candidates, dependencies): (Vec<tq::Task>, Vec<tq::Task>) = dependencies
            .into_iter()
            .partition(|d| d.candidate_of == task.id || task.lands_candidate);
        let dependencies: Vec<Dependency> = dependencies.into_iter().map(Dependency::from).collect();
        let repository = workspace::parse_repository(&ticket.repository)
            .map_err(|e| (e.to_string(), Some(ErrorClass::Permanent)))?;
        workspace::fresh(dir).await.map_err(|e| (e.to_string(), None))?;
        // A choice among candidates runs no agent in its checkout.
        let reuse = candidates
            .is_empty()
            .then(|| self.parked.take(&task.ticket_id))
            .flatten();
        let checkout = match &repository {
            None => None,
            Some(repository) => {
                let start = git::Start {
                    repository,
                    branch: &ticket.branch,
                    base_ref: &ticket.base_ref,
                    parents: dependencies
                        .iter()
                        .filter_map(|d| {
                            d.git.as_ref().map(|g| git::Parent {
                                name: d.title.clone(),
                                commit: g.commit.clone(),
                            })
                        })
                        .collect(),
                    reuse: reuse.as_ref().map(|t| t.path.as_path()),
                };
                let checkout = self.git.prepare(&start, &workspace::mirror_path(dir), dir).await;
                Some(checkout)
            }
        };
        let checkout = checkout.transpose();
        let reused = matches!(&checkout, Ok(Some(c)) if c.reused);
        if let Some(tree) = reuse {
            if reused {
                // Where the policy kept it, its task's directory may be empty now.
                if let Some(task_dir) = tree.path.parent() {
                    let _ = tokio::fs::remove_dir(task_dir).await;
                }
            } else {
                reuse::discard(tree).await;
            }
        }
        let checkout = checkout.map_err(git_failure)?;
        if let Some(user) = &self.agent_user {
            // A reused tree's files are the agent's already: only the new
            // repository is handed over (never walking what the agent
            // could have laid out, as root).
            let given = if reused {
                user.give_top(dir).and_then(|()| user.give(&dir.join(".git")))
            } else {
                user.give(dir)
            };
            given.map_err(|e| {
                let message = format!("cannot hand the workspace to {}: {e}", user.name);
                (message, Some(ErrorClass::Permanent))
            })?;
        }
        if let Some(c) = checkout.as_ref().filter(|c| c.reused) {
            // Its files were the agent's: brought to the base as the agent.
            let user = WorkspaceUser {
                identity: self.agent_user.as_ref().map(|u| (u.uid, u.gid)),
                ..Default::default()
            };
            self.git.refresh(c, &user).await.map_err(git_failure)?;
        }
        Ok(Prepared {
            ticket,
            dependencies,
            candidates,
            checkout,
        })
    }

    /// Ends an attempt that could not start its agent: said on its output,
    /// reported failed (as `class` says), its workspace cleaned up.
    async fn abandon(&self, run: &Execution, dir: &Path, message: String, class: Option<ErrorClass>) {
        run.line(OutputStream::System, message.clone());
        run.finish(ExecutionState::Failed, -1, String::new(), message.clone(), vec![]);
        self.executions.end(run);
        self.fail(run.task_id, run.attempt, &message, class).await;
        self.clean_up(dir, false, None).await;
    }

    /// The agent user of one attempt, with a home of its own beside the
    /// workspace (see `AgentUser::for_attempt`); None when agents run as
    /// the executor's user.
    fn attempt_user(&self, dir: &Path) -> Result<Option<Arc<AgentUser>>, String> {
        let Some(user) = &self.agent_user else {
            return Ok(None);
        };
        user.for_attempt(&workspace::home_path(dir), |h| self.runner.prepare_home(h))
            .map(|u| Some(Arc::new(u)))
            .map_err(|e| format!("cannot make the agent's home: {e}"))
    }

    /// `ticket`: the workspace is a checkout of that ticket's branch, which
    /// its next attempt here may reuse.
    async fn clean_up(&self, dir: &Path, succeeded: bool, ticket: Option<&str>) {
        // The executor's clone and the agent's home have done their job
        // whatever happened (the session is in its checkpoints).
        for (done, what) in [
            (workspace::mirror_path(dir), "repository clone"),
            (workspace::home_path(dir), "agent's home"),
        ] {
            if tokio::fs::try_exists(&done).await.unwrap_or(false)
                && let Err(e) = tokio::fs::remove_dir_all(&done).await
            {
                tracing::warn!(path = %done.display(), error = %e, "{what} not removed");
            }
        }
        let remove = match self.config.workspace_policy {
            WorkspacePolicy::Keep => false,
            WorkspacePolicy::Remove => true,
            WorkspacePolicy::RemoveOnSuccess => succeeded,
        };
        if let Some(ticket) = ticket
            && (succeeded || remove)
        {
            // Its work is on the branch, or nobody wants to look at it.
            self.parked.park(ticket, dir, remove).await;
            if remove && let Some(task_dir) = dir.parent() {
                let _ = tokio::fs::remove_dir(task_dir).await;
            }
            return;
        }
        if !remove {
            return;
        }
        match tokio::fs::remove_dir_all(dir).await {
            // A run that failed before its workspace was made has none.
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(workspace = %dir.display(), error = %e, "workspace not removed");
            }
            _ => {}
        }
        // The task's directory goes with its last attempt's, or the root
        // fills with empty ones; one still holding an attempt stays.
        if let Some(task_dir) = dir.parent() {
            let _ = tokio::fs::remove_dir(task_dir).await;
        }
    }

    /// Records the run's end and reports it; true when it succeeded.
    async fn report_end(
        &self,
        run: &Execution,
        outcome: Result<RunOutcome, RunnerError>,
        changed: Vec<String>,
        timeout_seconds: i32,
        commit: Option<BranchCommit<'_>>,
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
                return self.succeeded(run, &outcome, summary, changed, commit).await;
            }
            (None, None) if exit == 0 => return self.succeeded(run, &outcome, last_out, changed, commit).await,
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
    pub(super) async fn end_failed(
        &self,
        run: &Execution,
        end: End,
        exit: i32,
        changed: Vec<String>,
        usage: Option<Usage>,
    ) {
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
    async fn succeeded(
        &self,
        run: &Execution,
        outcome: &RunOutcome,
        summary: String,
        changed: Vec<String>,
        commit: Option<BranchCommit<'_>>,
    ) -> bool {
        if commit.is_some() && !self.hold_for_push(run.task_id, run.attempt).await {
            // Taken back while the agent worked (its lease lapsed): nothing
            // of it may land on the branch, and nothing is reported.
            let message = "the attempt was taken back before its work could land".to_owned();
            run.line(OutputStream::System, message.clone());
            run.finish(ExecutionState::Cancelled, 0, String::new(), message, changed);
            return false;
        }
        let mut check = None;
        let landed = match commit {
            None => None,
            Some(c) => {
                let done = match c.candidate {
                    // A candidate's work is kept, not pushed: it lands only if chosen.
                    Some(_) => self.keep_candidate(run, &c).await.map(Landed::Kept),
                    None => self
                        .git
                        .commit_and_push(c.checkout, &c.message, &c.user)
                        .await
                        .map(Landed::Pushed),
                };
                let landed = match done {
                    Ok(landed) => landed,
                    Err(e) => {
                        let (message, class) = git_failure(e);
                        let message = format!("the work did not land on {}: {message}", c.checkout.branch);
                        let end = End::failed(ExecutionState::Failed, message, class);
                        self.end_failed(run, end, 0, changed, outcome.usage.clone()).await;
                        return false;
                    }
                };
                // Checked as committed: what the check leaves behind
                // (builds, caches) is not the agent's work.
                if let Some(command) = &c.check {
                    let said = crate::check::run(command, &run.workspace, &c.user, &self.check, run, &run.stop).await;
                    run.line(OutputStream::System, said.line());
                    run.emit(crate::check::event(&said));
                    check = Some(said);
                }
                Some(landed)
            }
        };
        let mut tail = run.tail(OutputStream::Stdout, 20);
        tail.extend(
            run.tail(OutputStream::Stderr, 10)
                .into_iter()
                .map(|l| format!("stderr: {l}")),
        );
        let mut result = json!({
            "exit_code": 0,
            "summary": summary,
            "changed_files": changed,
            "duration_ms": outcome.duration.as_millis() as u64,
            "output_tail": tail,
            "workspace": run.workspace.display().to_string(),
            "agent_id": self.agent_id.to_string(),
        });
        if let Some(check) = &check {
            result["check"] = json!(check);
        }
        let git = match landed {
            Some(Landed::Pushed(g)) => Some(omoi_proto::common::GitChange::from(&g)),
            Some(Landed::Kept(kept)) => {
                result["candidate"] = json!(kept);
                None
            }
            None => None,
        };
        run.line(
            OutputStream::System,
            format!("succeeded; {} files changed", changed.len()),
        );
        run.finish(ExecutionState::Succeeded, 0, summary, String::new(), changed);
        self.complete(run, result, outcome.usage.clone(), git).await
    }

    /// Reports the attempt completed (once its events are out), with its
    /// result, usage and what it left on the branch.
    pub(super) async fn complete(
        &self,
        run: &Execution,
        result: serde_json::Value,
        usage: Option<Usage>,
        git: Option<omoi_proto::common::GitChange>,
    ) -> bool {
        let Some(result) = result.as_object().map(omoi_proto::convert::map_to_struct) else {
            return false;
        };
        run.flush(FLUSH_WITHIN).await;
        let (task_id, attempt) = (run.task_id, run.attempt);
        report("CompleteTask", || {
            let mut q = self.queue.clone();
            let (result, usage, git) = (result.clone(), usage.clone(), git.clone());
            async move {
                q.complete_task(tq::CompleteTaskRequest {
                    task_id: task_id.to_string(),
                    attempt,
                    result: Some(result),
                    usage,
                    git,
                })
                .await
            }
        })
        .await
    }
}

/// Whether a run's end is checkpointed: when it has a session to take up
/// later (a retry's, a follow-up's), or work a retry would redo; not when
/// the queue took the attempt back (it is no longer ours to record).
fn worth_a_last_checkpoint(outcome: &Result<RunOutcome, RunnerError>, run: &Execution, ctx: &RunContext) -> bool {
    let Ok(o) = outcome else { return false };
    let taken_back = o.stopped == Some(Stopped::Cancelled) && run.stop_request().is_none_or(|r| !r.report);
    if taken_back {
        return false;
    }
    let has_session = ctx.session.borrow().is_some() || ctx.resume.is_some();
    let ended_well = o.stopped.is_none()
        && match &o.verdict {
            Some(Verdict::Succeeded { .. }) => true,
            Some(Verdict::Failed { .. }) => false,
            None => o.exit_code == Some(0),
        };
    has_session || !ended_well
}

/// Where a successful run's work went.
enum Landed {
    /// Pushed to the ticket's branch.
    Pushed(GitChange),
    /// A candidate's: committed and kept for the choice.
    Kept(omoi_domain::candidates::Kept),
}

/// A successful run's commit onto the ticket's branch: where and with what
/// message.
pub(super) struct BranchCommit<'a> {
    pub(super) checkout: &'a Checkout,
    pub(super) message: String,
    /// Who runs git in the workspace: the agent's user, in its sandbox.
    pub(super) user: WorkspaceUser,
    /// The ticket's check command, run once the work is committed.
    check: Option<String>,
    /// A candidate attempt at that task, numbered: kept, not pushed.
    pub(super) candidate: Option<(Uuid, i32)>,
}

/// Who runs git in a workspace after its agent: the agent's user, with its
/// home, in the agent's sandbox.
fn workspace_user(ctx: &RunContext) -> WorkspaceUser {
    WorkspaceUser {
        identity: ctx.identity(),
        home: ctx.user.as_ref().and_then(|u| u.home.clone()),
        fence: ctx.fence.clone(),
    }
}

/// A git failure as a report classifies it.
pub(super) fn git_failure(e: GitError) -> (String, Option<ErrorClass>) {
    match e {
        GitError::Refused(m) => (m, Some(ErrorClass::Permanent)),
        GitError::Transient(m) => (m, Some(ErrorClass::Retryable)),
    }
}

/// What a commit and push did, for the run's output.
pub(super) fn pushed_line(g: &GitChange) -> String {
    if g.committed() {
        format!(
            "committed {} to {} ({} files, +{} -{})",
            g.commit, g.branch, g.files_changed, g.insertions, g.deletions
        )
    } else {
        format!("nothing to commit; {} stays at {}", g.branch, g.commit)
    }
}

/// How long a commit and push (commit, bundle, push with rebases) holds
/// its attempt.
const PUSH_LEASE_SECONDS: i32 = 600;

/// How long a run's end waits for its events to reach JetStream before it
/// reports anyway (they follow when NATS is back).
const FLUSH_WITHIN: Duration = Duration::from_secs(10);

/// How a run that did not succeed ended.
pub(super) struct End {
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
    pub(super) fn failed(state: ExecutionState, message: String, class: Option<ErrorClass>) -> Self {
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
