//! Best-of-N on the executor: a candidate attempt keeps its work (its
//! commit as a bundle in the sessions' object store, never pushed), and the
//! task choosing among the candidates, once all of them ended, picks one by
//! the evidence and lands its commit on the ticket's branch.

use omoi_domain::candidates::{self, ForJudge, Outcome, Seen};
use omoi_domain::{ErrorClass, Usage};
use omoi_proto::common::{OutputStream, TaskStatus, Usage as UsagePb};
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::taskqueue as tq;
use serde_json::{Value, json};
use uuid::Uuid;

use super::Worker;
use super::run::{BranchCommit, Prepared, pushed_line};
use crate::events::EventSink;
use crate::executions::Execution;
use crate::git::GitError;
use crate::runners::{RunContext, Verdict as RunVerdict};

/// Where a candidate's kept commit is stored: beside its task's
/// checkpoints in the sessions' bucket.
fn bundle_name(ticket_id: &str, task_id: Uuid) -> String {
    format!("{ticket_id}/{task_id}/candidate.bundle")
}

impl Worker {
    /// Commits a candidate's work without pushing it and keeps its bundle;
    /// what the choice will need of it (`result.candidate`).
    pub(super) async fn keep_candidate(&self, run: &Execution, c: &BranchCommit<'_>) -> Result<Value, GitError> {
        let (g, bundle) = self.git.commit_and_keep(c.checkout, &c.message, &c.user).await?;
        let (of, index) = c.candidate.unwrap_or_default();
        let commit = match bundle {
            Some(bundle) => {
                let name = bundle_name(&run.ticket_id, run.task_id);
                self.sessions
                    .put(&name, bundle)
                    .await
                    .map_err(|e| GitError::Transient(format!("cannot keep the candidate's commit: {e}")))?;
                run.line(
                    OutputStream::System,
                    format!(
                        "candidate {index}: committed {} (+{} -{}), kept for the choice, not pushed",
                        g.commit, g.insertions, g.deletions
                    ),
                );
                g.commit.clone()
            }
            None => {
                run.line(OutputStream::System, format!("candidate {index}: nothing changed"));
                String::new()
            }
        };
        Ok(json!({
            "of": of.to_string(),
            "index": index,
            "commit": commit,
            "base_commit": g.base_commit,
            "files_changed": g.files_changed,
            "insertions": g.insertions,
            "deletions": g.deletions,
            "patch": g.patch,
            "patch_truncated": g.patch_truncated,
            "runner": self.labels.get(omoi_domain::routing::RUNNER_LABEL).cloned().unwrap_or_default(),
            "model": self.labels.get(omoi_domain::routing::MODEL_LABEL).cloned().unwrap_or_default(),
        }))
    }

    /// The task choosing among its candidates (all ended): the choice (the
    /// judge's, with `judge`, when more than one may land), and the chosen
    /// commit landed on the branch; true when it completed.
    pub(super) async fn choose_and_land(
        &self,
        run: &Execution,
        task: &tq::Task,
        prepared: &Prepared,
        judge: Option<&mut RunContext>,
    ) -> bool {
        run.set_state(ExecutionState::Running);
        let outcomes: Vec<Outcome> = prepared.candidates.iter().map(outcome).collect();
        let rule = candidates::choose(&outcomes);
        let eligible = candidates::eligible(&outcomes);
        let (choice, usage) = match judge {
            Some(ctx) if eligible.len() > 1 => match self.judge(run, task, prepared, &rule, &eligible, ctx).await {
                Ok(judged) => judged,
                Err((message, usage)) => return self.give_up(run, message, ErrorClass::Retryable, usage).await,
            },
            _ => (rule, None),
        };
        for (index, reason) in &choice.reasons {
            run.line(OutputStream::System, format!("candidate {index}: {reason}"));
        }
        let seen: Vec<Seen> = prepared.candidates.iter().map(|t| seen(t, &choice)).collect();
        let Some(chosen) = choice.chosen else {
            let message = candidates::none_chosen(&choice);
            return self.give_up(run, message, ErrorClass::Permanent, usage).await;
        };
        let winner = seen.iter().find(|s| s.index == chosen).cloned().unwrap_or_default();
        let Some(checkout) = &prepared.checkout else {
            let message = "candidates need the ticket's repository".to_owned();
            return self.give_up(run, message, ErrorClass::Permanent, usage).await;
        };
        if !self.hold_for_push(run.task_id, run.attempt).await {
            let message = "the attempt was taken back before the chosen work could land".to_owned();
            run.line(OutputStream::System, message.clone());
            run.finish(ExecutionState::Cancelled, 0, String::new(), message, vec![]);
            return false;
        }
        let task_id = winner.task_id.parse().unwrap_or_default();
        let bundle = match self.sessions.get(&bundle_name(&run.ticket_id, task_id)).await {
            Ok(b) => b,
            Err(e) => {
                let message = format!("the chosen candidate {chosen}'s commit cannot be read: {e}");
                return self.give_up(run, message, ErrorClass::Retryable, usage).await;
            }
        };
        let g = match self.git.land(checkout, &bundle, &winner.commit).await {
            Ok(g) => g,
            Err(e) => {
                let (message, class) = super::run::git_failure(e);
                let message = format!(
                    "the chosen candidate {chosen} did not land on {}: {message}",
                    checkout.branch
                );
                return self
                    .give_up(run, message, class.unwrap_or(ErrorClass::Retryable), usage)
                    .await;
            }
        };
        run.line(OutputStream::System, pushed_line(&g));
        self.take_up_session(run, prepared, task_id).await;
        let runner = if winner.runner.is_empty() {
            String::new()
        } else {
            format!(" ({})", winner.runner)
        };
        let summary = format!("chose candidate {chosen}{runner}: {}", winner.reason);
        run.finish(ExecutionState::Succeeded, 0, summary.clone(), String::new(), vec![]);
        let result = json!({
            "exit_code": 0,
            "summary": summary,
            "selection": {
                "chosen": chosen,
                "candidate_task_id": winner.task_id,
                "reason": winner.reason,
                "candidates": seen,
            },
            "agent_id": self.agent_id.to_string(),
        });
        let git = omoi_proto::common::GitChange::from(&g);
        self.complete(run, result, usage, Some(git)).await
    }

    /// Asks the judge (this executor's agent) to pick among the eligible
    /// candidates, shown their evidence; the choice with its pick, and what
    /// the judge spent. Why not, when it did not answer in the schema.
    async fn judge(
        &self,
        run: &Execution,
        task: &tq::Task,
        prepared: &Prepared,
        rule: &candidates::Choice,
        eligible: &[i32],
        ctx: &mut RunContext,
    ) -> Result<(candidates::Choice, Option<UsagePb>), (String, Option<UsagePb>)> {
        let shown: Vec<ForJudge> = prepared
            .candidates
            .iter()
            .filter(|t| eligible.contains(&t.candidate))
            .map(for_judge)
            .collect();
        ctx.prompt = candidates::judge_prompt(&task.title, &task.description, &prepared.ticket.check_command, &shown);
        run.line(
            OutputStream::System,
            format!("asking the judge to choose among candidates {eligible:?}"),
        );
        let outcome = match self.runner.run(ctx, run, &run.stop).await {
            Ok(o) => o,
            Err(e) => return Err((format!("the judge could not run: {e}"), None)),
        };
        let usage = outcome.usage.clone();
        if let Some(u) = &usage {
            crate::events::count_usage(u);
        }
        let answer = match (&outcome.stopped, outcome.verdict) {
            (None, Some(RunVerdict::Succeeded { summary })) => summary,
            (None, None) if outcome.exit_code == Some(0) => run.tail(OutputStream::Stdout, 1).pop().unwrap_or_default(),
            (None, Some(RunVerdict::Failed { message, .. })) => {
                return Err((format!("the judge failed: {message}"), usage));
            }
            _ => return Err(("the judge did not finish".to_owned(), usage)),
        };
        let verdict = candidates::verdict(&answer).map_err(|e| (e, usage.clone()))?;
        let choice = candidates::judged(rule, eligible, &verdict).map_err(|e| (e, usage.clone()))?;
        Ok((choice, usage))
    }

    /// Records the chosen candidate's agent session as the choosing task's:
    /// a follow-up of the step (or changes a person asks for) resumes the
    /// conversation whose work landed.
    async fn take_up_session(&self, run: &Execution, prepared: &Prepared, chosen: Uuid) {
        let Some(session) = prepared
            .candidates
            .iter()
            .find(|t| t.id.parse() == Ok(chosen))
            .and_then(|t| t.session.clone())
        else {
            return;
        };
        match omoi_proto::domain::agent_session("session", session) {
            Ok(mut s) => {
                s.attempt = run.attempt;
                s.resumed_from_attempt = 0;
                s.resumed_from_task_id = None;
                self.record_session(run.task_id, run.attempt, &s).await;
            }
            Err(e) => tracing::warn!(error = %e, "the chosen candidate's session is not recorded"),
        }
    }

    /// Ends the choosing attempt without landing anything.
    async fn give_up(&self, run: &Execution, message: String, class: ErrorClass, usage: Option<UsagePb>) -> bool {
        run.line(OutputStream::System, message.clone());
        run.finish(ExecutionState::Failed, -1, String::new(), message.clone(), vec![]);
        let more = tq::FailTaskRequest {
            usage,
            ..Default::default()
        };
        self.report_failure(run.task_id, run.attempt, &message, Some(class), more)
            .await;
        false
    }
}

/// The fields of a candidate's result (`result.candidate`, `result.check`).
fn result_of(t: &tq::Task) -> Value {
    t.result
        .as_ref()
        .map(omoi_proto::convert::struct_to_json)
        .unwrap_or(Value::Null)
}

/// A task's status as the domain names it (`completed`, `timed_out`).
fn status_of(t: &tq::Task) -> String {
    omoi_domain::TaskStatus::given(t.status)
        .known()
        .map_or("unknown", |s| s.as_str())
        .to_owned()
}

/// What the choice weighs of a candidate's task.
fn outcome(t: &tq::Task) -> Outcome {
    let result = result_of(t);
    let c = &result["candidate"];
    let commit = c["commit"].as_str().filter(|s| !s.is_empty()).map(str::to_owned);
    let completed = t.status == TaskStatus::Completed as i32;
    let ended = if t.error_message.is_empty() {
        status_of(t)
    } else {
        t.error_message.clone()
    };
    Outcome {
        index: t.candidate,
        task_id: t.id.parse().unwrap_or_default(),
        completed,
        commit,
        check_passed: result["check"]["passed"].as_bool(),
        changed_lines: c["insertions"].as_i64().unwrap_or(0) + c["deletions"].as_i64().unwrap_or(0),
        cost_usd: t.usage.as_ref().map_or(0.0, |u| u.cost_usd),
        ended,
    }
}

/// What the judge is shown of an eligible candidate.
fn for_judge(t: &tq::Task) -> ForJudge {
    let result = result_of(t);
    let c = &result["candidate"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    ForJudge {
        index: t.candidate,
        runner: text(&c["runner"]),
        model: text(&c["model"]),
        cost_usd: t.usage.as_ref().map_or(0.0, |u| u.cost_usd),
        insertions: c["insertions"].as_i64().unwrap_or(0),
        deletions: c["deletions"].as_i64().unwrap_or(0),
        files_changed: c["files_changed"].as_i64().unwrap_or(0),
        check_tail: result["check"]["output_tail"]
            .as_array()
            .map(|l| l.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect())
            .unwrap_or_default(),
        patch: text(&c["patch"]),
    }
}

/// A candidate as the choice records it.
fn seen(t: &tq::Task, choice: &candidates::Choice) -> Seen {
    let result = result_of(t);
    let c = &result["candidate"];
    let text = |v: &Value| v.as_str().unwrap_or_default().to_owned();
    let number = |v: &Value| v.as_i64().unwrap_or(0) as i32;
    Seen {
        index: t.candidate,
        task_id: t.id.clone(),
        status: status_of(t),
        runner: text(&c["runner"]),
        model: text(&c["model"]),
        check_passed: result["check"]["passed"]
            .as_bool()
            .unwrap_or(t.status == TaskStatus::Completed as i32),
        usage: t.usage.clone().map(Usage::from),
        commit: text(&c["commit"]),
        files_changed: number(&c["files_changed"]),
        insertions: number(&c["insertions"]),
        deletions: number(&c["deletions"]),
        chosen: choice.chosen == Some(t.candidate),
        reason: choice.reason(t.candidate).to_owned(),
    }
}
