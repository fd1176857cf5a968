//! Best-of-N on the executor: a candidate attempt keeps its work (its
//! commit as a bundle in the sessions' object store, never pushed), and the
//! task choosing among the candidates, once all of them ended, picks one by
//! the evidence and lands its commit on the ticket's branch.

use omoi_domain::candidates::{self, ForJudge, Kept, Outcome, Seen};
use omoi_domain::check::Check;
use omoi_domain::{ErrorClass, Usage};
use omoi_proto::candidates::Step;
use omoi_proto::common::{OutputStream, TaskStatus, Usage as UsagePb};
use omoi_proto::domain::WireEnum;
use omoi_proto::executor::ExecutionState;
use omoi_proto::taskqueue as tq;
use serde_json::json;
use uuid::Uuid;

use super::Worker;
use super::prompt::phase_name;
use super::run::{BranchCommit, End, Prepared, pushed_line};
use crate::events::EventSink;
use crate::executions::Execution;
use crate::git::{self, GitError};
use crate::runners::RunContext;

/// Where a candidate's kept commit is stored: beside its task's
/// checkpoints in the sessions' bucket.
fn bundle_name(ticket_id: &str, task_id: Uuid) -> String {
    format!("{ticket_id}/{task_id}/candidate.bundle")
}

impl Worker {
    /// Commits a candidate's work without pushing it and keeps its bundle;
    /// what the choice will need of it (`result.candidate`).
    pub(super) async fn keep_candidate(&self, run: &Execution, c: &BranchCommit<'_>) -> Result<Kept, GitError> {
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
        let label = |key: &str| self.labels.get(key).cloned().unwrap_or_default();
        Ok(Kept {
            of: of.to_string(),
            index,
            commit,
            base_commit: g.base_commit,
            files_changed: g.files_changed,
            insertions: g.insertions,
            deletions: g.deletions,
            patch: g.patch,
            patch_truncated: g.patch_truncated,
            runner: label(omoi_domain::routing::RUNNER_LABEL),
            model: label(omoi_domain::routing::MODEL_LABEL),
        })
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
        self.landed(run, prepared, &winner, seen, &g, usage).await
    }

    /// A person's choice (a task that lands the candidate it depends on in
    /// place of the step's landed one): the step's change on the branch
    /// taken back and the candidate's put there, as one commit; true when
    /// it completed.
    pub(super) async fn land_choice(&self, run: &Execution, task: &tq::Task, prepared: &Prepared) -> bool {
        run.set_state(ExecutionState::Running);
        let Some(candidate) = prepared.candidates.first() else {
            let message = "a choice lands the candidate it depends on, and it depends on none".to_owned();
            return self.give_up(run, message, ErrorClass::Permanent, None).await;
        };
        let Some(checkout) = &prepared.checkout else {
            let message = "candidates need the ticket's repository".to_owned();
            return self.give_up(run, message, ErrorClass::Permanent, None).await;
        };
        let tasks = match self.ticket_tasks(&task.ticket_id).await {
            Ok(t) => t,
            Err(s) => {
                let message = format!("cannot read the ticket's tasks: {}", s.message());
                return self.give_up(run, message, ErrorClass::Retryable, None).await;
            }
        };
        let Some(step) = Step::of(&tasks, &candidate.candidate_of) else {
            let message = format!("task {} is no candidate of a step of this ticket", candidate.id);
            return self.give_up(run, message, ErrorClass::Permanent, None).await;
        };
        let index = candidate.candidate;
        let replaced = step.landed();
        // The step's reasons as its last landing recorded them.
        let before = replaced.map_or(step.chooser, |(t, _)| t);
        let earlier = candidates::seen(before.result.as_ref().map(omoi_proto::convert::struct_to_json).as_ref());
        let reason = task.description.clone();
        let choice = candidates::Choice {
            chosen: Some(index),
            reasons: step
                .candidates
                .iter()
                .map(|c| {
                    let why = match replaced {
                        _ if c.candidate == index => reason.clone(),
                        Some((_, n)) if n == c.candidate => format!("replaced by candidate {index}"),
                        _ => earlier
                            .iter()
                            .find(|s| s.index == c.candidate)
                            .map(|s| s.reason.clone())
                            .unwrap_or_default(),
                    };
                    (c.candidate, why)
                })
                .collect(),
        };
        let seen: Vec<Seen> = step.candidates.iter().map(|t| seen(t, &choice)).collect();
        let winner = seen.iter().find(|s| s.index == index).cloned().unwrap_or_default();
        if !self.hold_for_push(run.task_id, run.attempt).await {
            let message = "the attempt was taken back before the chosen work could land".to_owned();
            run.line(OutputStream::System, message.clone());
            run.finish(ExecutionState::Cancelled, 0, String::new(), message, vec![]);
            return false;
        }
        // The candidate on the branch now is taken back by its own change:
        // whatever landings came before, the step's effect is that one.
        let on_branch = replaced.and_then(|(_, n)| step.candidate(n));
        let back_commit = on_branch.map(|t| evidence(t).0.commit).filter(|c| !c.is_empty());
        let mut bundles = Vec::new();
        for t in std::iter::once(candidate).chain(on_branch.filter(|_| back_commit.is_some())) {
            match self
                .sessions
                .get(&bundle_name(&run.ticket_id, t.id.parse().unwrap_or_default()))
                .await
            {
                Ok(b) => bundles.push(b),
                Err(e) => {
                    let message = format!("candidate {}'s commit cannot be read: {e}", t.candidate);
                    return self.give_up(run, message, ErrorClass::Retryable, None).await;
                }
            }
        }
        let land = git::Kept {
            bundle: &bundles[0],
            commit: &winner.commit,
        };
        let take_back = back_commit.as_deref().map(|commit| git::Kept {
            bundle: &bundles[1],
            commit,
        });
        match replaced {
            Some((_, n)) => run.line(
                OutputStream::System,
                format!("taking candidate {n}'s change back and landing candidate {index}'s in its place"),
            ),
            None => run.line(OutputStream::System, format!("landing candidate {index}")),
        }
        let message = git::commit_message(&phase_name(task.phase), &task.title, &task.id, run.attempt);
        let g = match self.git.land_instead(checkout, land, take_back, &message).await {
            Ok(g) => g,
            Err(e) => {
                let (message, class) = super::run::git_failure(e);
                let message = format!("candidate {index} did not land on {}: {message}", checkout.branch);
                return self
                    .give_up(run, message, class.unwrap_or(ErrorClass::Retryable), None)
                    .await;
            }
        };
        self.landed(run, prepared, &winner, seen, &g, None).await
    }

    /// Ends a choice whose candidate (`winner`) landed as `g`: its session
    /// taken up, the selection in the result, the task completed.
    async fn landed(
        &self,
        run: &Execution,
        prepared: &Prepared,
        winner: &Seen,
        seen: Vec<Seen>,
        g: &omoi_domain::git::GitChange,
        usage: Option<UsagePb>,
    ) -> bool {
        run.line(OutputStream::System, pushed_line(g));
        self.take_up_session(run, prepared, winner.task_id.parse().unwrap_or_default())
            .await;
        let runner = if winner.runner.is_empty() {
            String::new()
        } else {
            format!(" ({})", winner.runner)
        };
        let summary = format!("chose candidate {}{runner}: {}", winner.index, winner.reason);
        run.finish(ExecutionState::Succeeded, 0, summary.clone(), String::new(), vec![]);
        let result = json!({
            "exit_code": 0,
            "summary": summary,
            "selection": {
                "chosen": winner.index,
                "candidate_task_id": winner.task_id,
                "reason": winner.reason,
                "candidates": seen,
            },
            "agent_id": self.agent_id.to_string(),
        });
        let git = omoi_proto::common::GitChange::from(g);
        self.complete(run, result, usage, Some(git)).await
    }

    /// Every task of the ticket, as the ticket service has them.
    async fn ticket_tasks(&self, ticket_id: &str) -> Result<Vec<tq::Task>, tonic::Status> {
        let read = self
            .tickets
            .clone()
            .get_ticket(omoi_proto::ticket::GetTicketRequest {
                ticket_id: ticket_id.to_owned(),
                view: omoi_proto::ticket::TicketView::Full.into(),
            })
            .await?;
        Ok(read.into_inner().tasks)
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
        let said_last = || Some(run.tail(OutputStream::Stdout, 1).pop().unwrap_or_default());
        let answer = super::answer_of("judge", outcome, said_last).map_err(|e| (e, usage.clone()))?;
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
        let end = End::failed(ExecutionState::Failed, message, Some(class));
        self.end_failed(run, end, -1, vec![], usage).await;
        false
    }
}

/// What a candidate's task recorded of its work and its check.
fn evidence(t: &tq::Task) -> (Kept, Option<Check>) {
    let result = t.result.as_ref().map(omoi_proto::convert::struct_to_json);
    (Kept::of(result.as_ref()), Check::of(result.as_ref()))
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
    let (kept, check) = evidence(t);
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
        commit: Some(kept.commit).filter(|c| !c.is_empty()),
        check_passed: check.map(|c| c.passed),
        changed_lines: kept.insertions + kept.deletions,
        cost_usd: t.usage.as_ref().map_or(0.0, |u| u.cost_usd),
        ended,
    }
}

/// What the judge is shown of an eligible candidate.
fn for_judge(t: &tq::Task) -> ForJudge {
    let (kept, check) = evidence(t);
    ForJudge {
        index: t.candidate,
        runner: kept.runner,
        model: kept.model,
        cost_usd: t.usage.as_ref().map_or(0.0, |u| u.cost_usd),
        insertions: kept.insertions,
        deletions: kept.deletions,
        files_changed: i64::from(kept.files_changed),
        check_tail: check.map(|c| c.output_tail).unwrap_or_default(),
        patch: kept.patch,
    }
}

/// A candidate as the choice records it.
fn seen(t: &tq::Task, choice: &candidates::Choice) -> Seen {
    let (kept, check) = evidence(t);
    Seen {
        index: t.candidate,
        task_id: t.id.clone(),
        status: status_of(t),
        runner: kept.runner,
        model: kept.model,
        check_passed: check.map_or(t.status == TaskStatus::Completed as i32, |c| c.passed),
        usage: t.usage.clone().map(Usage::from),
        commit: kept.commit,
        files_changed: kept.files_changed,
        insertions: kept.insertions as i32,
        deletions: kept.deletions as i32,
        chosen: choice.chosen == Some(t.candidate),
        reason: choice.reason(t.candidate).to_owned(),
    }
}
