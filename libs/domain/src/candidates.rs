//! Best-of-N: a plan step run as several candidate attempts in parallel,
//! each from the same base in its own workspace (possibly on different
//! runners), and one chosen by evidence to land.
//!
//! A step with candidates becomes, on the queue, its candidate tasks (each
//! requiring its own labels) and the step's own task, which depends on
//! them and chooses: a candidate's end, whatever it is, releases it, so the
//! choice always sees every candidate ended.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::routing::{self, Labels};

/// Most candidates a step may run.
pub const MAX_CANDIDATES: i32 = 8;

/// A step's candidates as the request carries them.
#[derive(Debug, Clone, Default)]
pub struct RawCandidates<'a> {
    pub count: i32,
    /// One label set per candidate, or one for all, or none.
    pub requires: Vec<&'a HashMap<String, String>>,
    /// The judge's labels; none: no judge.
    pub judge: Option<&'a HashMap<String, String>>,
}

/// A step's candidates, validated: the labels each one requires.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidates {
    pub requires: Vec<Labels>,
    /// The labels of the agent that judges; empty: no judge.
    pub judge: Labels,
}

impl Candidates {
    pub fn count(&self) -> usize {
        self.requires.len()
    }
}

/// Validates `field` (e.g. `plan[2].candidates`): a count of 1 to 8, and
/// as many label sets, one for all, or none (then every candidate requires
/// what the step requires).
pub fn candidates(field: &str, raw: &RawCandidates<'_>, step_requires: &Labels) -> Result<Candidates, DomainError> {
    if !(1..=MAX_CANDIDATES).contains(&raw.count) {
        return Err(DomainError::invalid(
            format!("{field}.count"),
            format!("must be 1 to {MAX_CANDIDATES}, got {}", raw.count),
        ));
    }
    let count = raw.count as usize;
    let sets = raw
        .requires
        .iter()
        .enumerate()
        .map(|(i, r)| routing::requires(&format!("{field}.requires[{i}]"), r))
        .collect::<Result<Vec<_>, _>>()?;
    let requires = match sets.len() {
        0 => vec![step_requires.clone(); count],
        1 => vec![sets[0].clone(); count],
        n if n == count => sets,
        n => {
            return Err(DomainError::invalid(
                format!("{field}.requires"),
                format!("has {n} label sets; give one per candidate ({count}), one for all, or none"),
            ));
        }
    };
    let judge = match raw.judge {
        Some(j) => routing::requires(&format!("{field}.judge"), j)?,
        None => Labels::new(),
    };
    Ok(Candidates { requires, judge })
}

/// What a deployment's recently finished tickets spent, and on how many
/// agent runs (each candidate, each judge, every other task that ran).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Spent {
    pub cost_usd: f64,
    pub runs: i64,
    pub tickets: i64,
}

impl Spent {
    /// The mean cost of an agent run; None without history.
    pub fn per_run(&self) -> Option<f64> {
        (self.runs > 0 && self.cost_usd > 0.0).then(|| self.cost_usd / self.runs as f64)
    }
}

/// The agent runs a plan (with its candidates expanded) takes: one per task,
/// except that a step's choosing task runs one only as a judge; and how
/// many of them are candidates and judges.
pub fn agent_runs(plan: &[crate::ticket::PlannedTask]) -> (usize, usize, usize) {
    let chooses: std::collections::HashSet<usize> = plan.iter().filter_map(|t| t.candidate.map(|(of, _)| of)).collect();
    let candidates = plan.iter().filter(|t| t.candidate.is_some()).count();
    let judges = chooses
        .iter()
        .filter(|i| plan.get(**i).is_some_and(|t| !t.requires.is_empty()))
        .count();
    let others = plan.len() - candidates - chooses.len();
    (candidates + judges + others, candidates, judges)
}

/// Refuses (naming `field`) a budget that cannot cover a plan with
/// candidates at what an agent run has cost here: its agent runs times the
/// mean cost of a run over recent tickets. No candidates, no budget or no
/// history: nothing to refuse.
pub fn cover(
    field: &str,
    budget: Option<f64>,
    plan: &[crate::ticket::PlannedTask],
    spent: &Spent,
) -> Result<(), DomainError> {
    let (Some(budget), Some(per_run)) = (budget, spent.per_run()) else {
        return Ok(());
    };
    let (runs, candidates, judges) = agent_runs(plan);
    if candidates == 0 {
        return Ok(());
    }
    let estimate = per_run * runs as f64;
    if estimate <= budget {
        return Ok(());
    }
    let mut parts = vec![format!("{candidates} candidates")];
    match judges {
        0 => {}
        1 => parts.push("a judge".to_owned()),
        n => parts.push(format!("{n} judges")),
    }
    match runs - candidates - judges {
        0 => {}
        1 => parts.push("1 other task".to_owned()),
        n => parts.push(format!("{n} other tasks")),
    }
    let last = parts.pop().unwrap_or_default();
    let runs_are = if parts.is_empty() {
        last
    } else {
        format!("{} and {last}", parts.join(", "))
    };
    Err(DomainError::invalid(
        field,
        format!(
            "${budget:.4} cannot cover this plan: its {runs} agent runs ({runs_are}) come to about \
             ${estimate:.4} at ${per_run:.4} a run, what a run cost on average over the last {} finished tickets",
            spent.tickets
        ),
    ))
}

/// A candidate's kept work, as its result records it (`result.candidate`):
/// written by its executor, read by the choice and the events.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Kept {
    /// The task choosing among the candidates, and this one's number.
    pub of: String,
    pub index: i32,
    /// Its commit (kept as a bundle, not pushed); empty when it changed
    /// nothing.
    pub commit: String,
    pub base_commit: String,
    pub files_changed: i32,
    pub insertions: i64,
    pub deletions: i64,
    pub patch: String,
    pub patch_truncated: bool,
    /// The labels of the agent that did the work.
    pub runner: String,
    pub model: String,
}

impl Kept {
    /// What a candidate's result records of its work (default when it has
    /// no result: it did not complete).
    pub fn of(result: Option<&serde_json::Value>) -> Kept {
        result
            .and_then(|r| r.get("candidate"))
            .and_then(|c| serde_json::from_value(c.clone()).ok())
            .unwrap_or_default()
    }
}

/// What a candidate's task says of it once it ended, for the choice.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Outcome {
    pub index: i32,
    pub task_id: Uuid,
    /// Whether it completed.
    pub completed: bool,
    /// Its commit, when it completed having changed something.
    pub commit: Option<String>,
    /// The ticket's check on its work: None when the ticket has none.
    pub check_passed: Option<bool>,
    /// Lines added and removed.
    pub changed_lines: i64,
    pub cost_usd: f64,
    /// How it ended, for the reasons (e.g. its error).
    pub ended: String,
}

/// The choice among a step's candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Choice {
    /// The chosen candidate's number; None when none may land.
    pub chosen: Option<i32>,
    /// Why, for each candidate (by number, in order).
    pub reasons: Vec<(i32, String)>,
}

impl Choice {
    /// The reason given for candidate `index`.
    pub fn reason(&self, index: i32) -> &str {
        self.reasons
            .iter()
            .find(|(i, _)| *i == index)
            .map_or("", |(_, r)| r.as_str())
    }
}

/// Chooses without a judge: among the candidates that completed with a
/// change and passed the check (every one that completed with a change,
/// when the ticket has no check), the smallest change; ties go to the
/// cheaper, then to the lower number.
pub fn choose(outcomes: &[Outcome]) -> Choice {
    let eligible = eligible(outcomes);
    let winner = outcomes.iter().filter(|o| eligible.contains(&o.index)).min_by(|a, b| {
        a.changed_lines
            .cmp(&b.changed_lines)
            .then(a.cost_usd.total_cmp(&b.cost_usd))
            .then(a.index.cmp(&b.index))
    });
    let reasons = outcomes
        .iter()
        .map(|o| {
            let why = if !o.completed {
                format!("did not complete: {}", o.ended)
            } else if o.commit.is_none() {
                "changed nothing".to_owned()
            } else if o.check_passed == Some(false) {
                "its check failed".to_owned()
            } else {
                let passed = if o.check_passed == Some(true) {
                    "passed the check with "
                } else {
                    ""
                };
                let what = format!("{passed}{} changed lines, ${:.4}", o.changed_lines, o.cost_usd);
                match winner {
                    Some(w) if w.index == o.index => format!("chosen: the smallest change ({what})"),
                    Some(w) => {
                        let beaten = if w.changed_lines < o.changed_lines {
                            "changed fewer lines"
                        } else if w.cost_usd < o.cost_usd {
                            "cost less"
                        } else {
                            "tied and comes first"
                        };
                        format!("not chosen: {what}; candidate {} {beaten}", w.index)
                    }
                    None => what,
                }
            };
            (o.index, why)
        })
        .collect();
    Choice {
        chosen: winner.map(|w| w.index),
        reasons,
    }
}

/// Why nothing may land, from a choice without a winner.
pub fn none_chosen(choice: &Choice) -> String {
    let each: Vec<String> = choice
        .reasons
        .iter()
        .map(|(i, r)| format!("candidate {i} {r}"))
        .collect();
    format!("no candidate may land: {}", each.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_person_may_land_a_completed_kept_candidate_not_on_the_branch_once_the_step_chose() {
        use crate::TaskStatus::*;
        let chooser = Uuid::nil();
        let step = StepNow {
            chooser,
            chooser_status: Completed,
            under_way: None,
            candidates: vec![(1, Completed, true), (2, Completed, true), (3, Failed, false)],
            landed: Some(2),
        };
        assert_eq!(may_land(&step, 1), Ok(()));
        let refused = |s: &StepNow, i: i32| may_land(s, i).unwrap_err();
        assert!(refused(&step, 2).ends_with("is the one on the branch"));
        assert!(refused(&step, 3).contains("nothing of it to land"));
        assert!(refused(&step, 4).starts_with("candidate: task"));
        assert!(
            refused(
                &StepNow {
                    chooser_status: Running,
                    ..step.clone()
                },
                1
            )
            .contains("has not chosen yet (running)")
        );
        let busy = StepNow {
            under_way: Some(chooser),
            ..step.clone()
        };
        assert!(refused(&busy, 1).contains("under way"));
        // A step no candidate could land can still get one a person picks.
        assert_eq!(
            may_land(
                &StepNow {
                    chooser_status: Failed,
                    landed: None,
                    ..step
                },
                2
            ),
            Ok(())
        );
    }

    fn labels(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn a_budget_that_cannot_cover_the_candidates_is_refused_with_the_estimate() {
        use crate::ticket::PlannedTask;
        let task = |candidate: Option<(usize, i32)>, judge: bool| PlannedTask {
            title: "t".into(),
            description: String::new(),
            phase: crate::Phase::Implementation,
            priority: 2,
            depends_on: vec![],
            max_retries: 0,
            timeout_seconds: 0,
            concurrency_key: None,
            requires: if judge {
                [("runner".to_owned(), "claude-code".to_owned())].into()
            } else {
                Labels::new()
            },
            candidate,
            lands_candidate: false,
        };
        // Plan, three candidates of step 4 (judged), the step, integrate.
        let plan = vec![
            task(None, false),
            task(Some((4, 1)), false),
            task(Some((4, 2)), false),
            task(Some((4, 3)), false),
            task(None, true),
            task(None, false),
        ];
        assert_eq!(agent_runs(&plan), (6, 3, 1));
        let mut unjudged = plan.clone();
        unjudged[4].requires = Labels::new();
        assert_eq!(
            agent_runs(&unjudged),
            (5, 3, 0),
            "a choice without a judge runs no agent"
        );
        let spent = Spent {
            cost_usd: 0.5,
            runs: 100,
            tickets: 20,
        };
        // 6 runs at $0.005: $0.03.
        assert_eq!(cover("max_cost_usd", Some(0.03), &plan, &spent), Ok(()));
        match cover("max_cost_usd", Some(0.02), &plan, &spent) {
            Err(DomainError::InvalidArgument(e)) => {
                assert_eq!(e.field, "max_cost_usd");
                assert_eq!(
                    e.reason,
                    "$0.0200 cannot cover this plan: its 6 agent runs (3 candidates, a judge and 2 other tasks) \
                     come to about $0.0300 at $0.0050 a run, what a run cost on average over the last 20 finished tickets"
                );
            }
            other => panic!("{other:?}"),
        }
        // No candidates, no budget, no history: nothing to refuse.
        assert_eq!(cover("b", Some(0.001), &plan[..1], &spent), Ok(()));
        assert_eq!(cover("b", None, &plan, &spent), Ok(()));
        assert_eq!(cover("b", Some(0.001), &plan, &Spent::default()), Ok(()));
    }

    #[test]
    fn counts_and_label_sets_are_validated_naming_the_field() {
        let step: Labels = [("zone".to_string(), "eu".to_string())].into();
        let none = candidates(
            "plan[1].candidates",
            &RawCandidates {
                count: 3,
                judge: None,
                requires: vec![],
            },
            &step,
        )
        .unwrap();
        assert_eq!(none.requires, vec![step.clone(); 3]);
        let codex = labels(&[("runner", "codex")]);
        let one = candidates(
            "c",
            &RawCandidates {
                count: 2,
                judge: None,
                requires: vec![&codex],
            },
            &step,
        )
        .unwrap();
        assert_eq!(one.count(), 2);
        assert_eq!(one.requires[1].get("runner").map(String::as_str), Some("codex"));
        let claude = labels(&[("runner", "claude-code")]);
        let each = candidates(
            "c",
            &RawCandidates {
                count: 3,
                requires: vec![&claude, &codex, &claude],
                judge: None,
            },
            &step,
        )
        .unwrap();
        assert_eq!(each.requires[1].get("runner").map(String::as_str), Some("codex"));
        for count in [0, 9, -1] {
            let e = candidates(
                "plan[1].candidates",
                &RawCandidates {
                    count,
                    judge: None,
                    requires: vec![],
                },
                &step,
            )
            .unwrap_err();
            assert!(e.to_string().contains("plan[1].candidates.count"), "{e}");
        }
        let e = candidates(
            "plan[1].candidates",
            &RawCandidates {
                count: 3,
                requires: vec![&claude, &codex],
                judge: None,
            },
            &step,
        )
        .unwrap_err();
        assert!(e.to_string().contains("plan[1].candidates.requires"), "{e}");
        let bad = labels(&[("runner", "")]);
        let e = candidates(
            "c",
            &RawCandidates {
                count: 2,
                judge: None,
                requires: vec![&bad],
            },
            &step,
        )
        .unwrap_err();
        assert!(e.to_string().contains("c.requires[0][runner]"), "{e}");
        let judge = labels(&[("runner", "claude-code")]);
        let judged = candidates(
            "c",
            &RawCandidates {
                count: 2,
                requires: vec![],
                judge: Some(&judge),
            },
            &step,
        )
        .unwrap();
        assert_eq!(judged.judge.get("runner").map(String::as_str), Some("claude-code"));
        let nobody = labels(&[("runner", " ")]);
        let e = candidates(
            "c",
            &RawCandidates {
                count: 2,
                requires: vec![],
                judge: Some(&nobody),
            },
            &step,
        )
        .unwrap_err();
        assert!(e.to_string().contains("c.judge[runner]"), "{e}");
    }

    #[test]
    fn the_judge_is_shown_the_evidence_and_its_pick_must_be_one_shown() {
        let shown = [
            ForJudge {
                index: 1,
                runner: "claude-code".into(),
                patch: "diff --git a/x b/x\n+one\n".into(),
                check_tail: vec!["ok 3 tests".into()],
                ..Default::default()
            },
            ForJudge {
                index: 3,
                runner: "codex".into(),
                model: "gpt-5-codex".into(),
                patch: "x".repeat(60 * 1024),
                ..Default::default()
            },
        ];
        let p = judge_prompt("Add login", "OAuth please", "cargo test", &shown);
        assert!(p.contains("passed the project's check (`cargo test`)"), "{p}");
        assert!(
            p.contains("## Candidate 1\n\nRunner claude-code; cost $0.0000; +0 -0 in 0 files."),
            "{p}"
        );
        assert!(p.contains("## Candidate 3\n\nRunner codex, model gpt-5-codex"), "{p}");
        assert!(p.contains("```\nok 3 tests\n```"), "{p}");
        assert!(p.contains("[… the rest of the diff is left out]"));
        assert!(p.len() < 60 * 1024, "a long diff is cut");
        assert!(p.ends_with("{\"pick\": <the candidate's number>, \"reasons\": \"<why, in a sentence or two>\"}\n"));

        let v = verdict("After review:\n```json\n{\"pick\": 3, \"reasons\": \"simpler\"}\n```").unwrap();
        assert_eq!((v.pick, v.reasons.as_str()), (3, "simpler"));
        assert!(verdict("I like candidate 3").unwrap_err().contains("not {\"pick\""));
        let rule = choose(&[
            outcome(1, Some(true), 1, 0.0),
            outcome(2, Some(false), 1, 0.0),
            outcome(3, Some(true), 9, 0.0),
        ]);
        assert_eq!(rule.chosen, Some(1));
        let c = judged(&rule, &[1, 3], &v).unwrap();
        assert_eq!(c.chosen, Some(3));
        assert_eq!(c.reason(3), "chosen by the judge: simpler");
        assert_eq!(c.reason(1), "not chosen by the judge (it chose candidate 3)");
        assert_eq!(c.reason(2), "its check failed");
        let off = Verdict {
            pick: 2,
            reasons: "x".into(),
        };
        assert!(
            judged(&rule, &[1, 3], &off)
                .unwrap_err()
                .contains("not one of those it was shown")
        );
    }

    fn outcome(index: i32, check: Option<bool>, lines: i64, cost: f64) -> Outcome {
        Outcome {
            index,
            task_id: Uuid::from_u128(index as u128),
            completed: true,
            commit: Some(format!("c{index}")),
            check_passed: check,
            changed_lines: lines,
            cost_usd: cost,
            ended: "completed".into(),
        }
    }

    #[test]
    fn the_smallest_passing_change_wins_ties_to_the_cheaper() {
        let failed = Outcome {
            completed: false,
            commit: None,
            ended: "agent exited with code 1".into(),
            ..outcome(4, None, 0, 0.0)
        };
        let all = [
            outcome(1, Some(false), 1, 0.01),
            outcome(2, Some(true), 30, 0.02),
            outcome(3, Some(true), 12, 0.05),
            failed,
            outcome(5, Some(true), 12, 0.04),
        ];
        let c = choose(&all);
        assert_eq!(c.chosen, Some(5));
        assert_eq!(c.reason(1), "its check failed");
        assert!(
            c.reason(5).starts_with("chosen: the smallest change"),
            "{}",
            c.reason(5)
        );
        assert!(c.reason(3).ends_with("; candidate 5 cost less"), "{}", c.reason(3));
        assert!(
            c.reason(2).ends_with("; candidate 5 changed fewer lines"),
            "{}",
            c.reason(2)
        );
        assert_eq!(c.reason(4), "did not complete: agent exited with code 1");
        // Without a check, whatever completed with a change is eligible.
        assert_eq!(
            choose(&[outcome(1, None, 9, 0.0), outcome(2, None, 3, 0.0)]).chosen,
            Some(2)
        );
        // A candidate that changed nothing never wins.
        let idle = Outcome {
            commit: None,
            ..outcome(1, Some(true), 0, 0.0)
        };
        assert_eq!(choose(&[idle.clone(), outcome(2, Some(true), 5, 0.0)]).chosen, Some(2));
        let none = choose(&[idle, outcome(2, Some(false), 5, 0.0)]);
        assert_eq!(none.chosen, None);
        assert_eq!(
            none_chosen(&none),
            "no candidate may land: candidate 1 changed nothing; candidate 2 its check failed"
        );
    }
}

/// One candidate as the choice recorded it (`result.selection.candidates`
/// of the choosing task).
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Seen {
    pub index: i32,
    pub task_id: String,
    pub status: String,
    pub runner: String,
    pub model: String,
    pub check_passed: bool,
    pub usage: Option<crate::usage::Usage>,
    pub commit: String,
    pub files_changed: i32,
    pub insertions: i32,
    pub deletions: i32,
    pub chosen: bool,
    pub reason: String,
}

/// A best-of-N step as a person's choice of one of its candidates finds
/// it.
#[derive(Debug, Clone, PartialEq)]
pub struct StepNow {
    pub chooser: Uuid,
    /// How the choosing task ended, if it did.
    pub chooser_status: crate::TaskStatus,
    /// Another choice of the step still being landed.
    pub under_way: Option<Uuid>,
    /// Each candidate: its index, how it ended, whether it kept a commit.
    pub candidates: Vec<(i32, crate::TaskStatus, bool)>,
    /// The candidate whose work is on the branch.
    pub landed: Option<i32>,
}

/// Whether a person may land candidate `index` of the step in place of the
/// one on the branch; why not (a failed precondition, its field named)
/// when they may not: the step chose (completed or failed: a step where no
/// candidate could land can still get one a person picks), no other choice
/// of it is under way, the candidate completed with a kept commit, and it
/// is not the one on the branch.
pub fn may_land(step: &StepNow, index: i32) -> Result<(), String> {
    use crate::TaskStatus::{Completed, Failed};
    if !matches!(step.chooser_status, Completed | Failed) {
        return Err(format!(
            "task_id: task {} has not chosen yet ({}); its choice comes first",
            step.chooser,
            step.chooser_status.as_str()
        ));
    }
    if let Some(busy) = step.under_way {
        return Err(format!(
            "task_id: another choice of this step is under way (task {busy})"
        ));
    }
    let Some((_, status, kept)) = step.candidates.iter().find(|(i, _, _)| *i == index) else {
        return Err(format!(
            "candidate: task {} has candidates 1 to {}",
            step.chooser,
            step.candidates.len()
        ));
    };
    if *status != Completed || !kept {
        return Err(format!(
            "candidate: candidate {index} did not complete with a change: there is nothing of it to land"
        ));
    }
    if step.landed == Some(index) {
        return Err(format!("candidate: candidate {index} is the one on the branch"));
    }
    Ok(())
}

/// The title of the task that lands a person's choice of candidate
/// `index` for the step titled `step`.
pub fn choice_title(index: i32, step: &str) -> String {
    crate::ticket::truncate_title(&format!("Choose candidate {index}: {step}"))
}

/// The description of the task that lands a person's choice (read back as
/// the choice's reason): which candidate, in place of which, by whom, why.
pub fn choice_description(replaced: Option<i32>, by: &str, comment: &str) -> String {
    let instead = match replaced {
        Some(n) => format!(" in place of candidate {n}"),
        None => String::new(),
    };
    let why = if comment.is_empty() {
        String::new()
    } else {
        format!(": {comment}")
    };
    format!("chosen by {by}{instead}{why}")
}

/// What a choosing task's result says of its candidates.
pub fn seen(result: Option<&serde_json::Value>) -> Vec<Seen> {
    result
        .and_then(|r| r.pointer("/selection/candidates"))
        .and_then(|c| serde_json::from_value(c.clone()).ok())
        .unwrap_or_default()
}

/// A batch's candidates each name a task of the same batch that depends on
/// them (the one choosing among them): only that task is released by a
/// candidate's end whatever it is, and no other waits on one.
pub fn check_batch(field: &str, tasks: &[crate::validate::NewTask]) -> Result<(), DomainError> {
    for (i, t) in tasks.iter().enumerate() {
        let Some((of, _)) = t.candidate else { continue };
        let chooser = tasks.iter().find(|c| c.id == of);
        if !chooser.is_some_and(|c| c.depends_on.contains(&t.id)) {
            return Err(DomainError::invalid(
                format!("{field}[{i}].candidate_of"),
                "must name a task of the same request that depends on this one",
            ));
        }
        if let Some((j, _)) = tasks
            .iter()
            .enumerate()
            .find(|(_, other)| other.id != of && other.depends_on.contains(&t.id))
        {
            return Err(DomainError::invalid(
                format!("{field}[{j}].depends_on"),
                format!(
                    "only the task choosing among candidates may depend on candidate {}",
                    t.id
                ),
            ));
        }
    }
    Ok(())
}

/// The events a task's first outcome says about candidates: a candidate's
/// TASK_CANDIDATE_FINISHED (`candidate`: the choosing task and its
/// number), a choosing task's TASK_CANDIDATE_CHOSEN (its result holds the
/// choice; `landed`: where the chosen commit landed).
pub fn events(
    task_id: Uuid,
    ticket_id: Uuid,
    outcome: crate::ticket::TaskOutcome,
    usage: Option<&crate::usage::Usage>,
    result: Option<&serde_json::Value>,
    landed: Option<&str>,
    candidate: Option<(Uuid, i32)>,
) -> Vec<crate::Envelope> {
    use crate::event::{CandidateChosen, CandidateFinished, Event};
    let field = |path: &str| result.and_then(|r| r.pointer(path));
    let text = |path: &str| field(path).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let mut out = Vec::new();
    if let Some((of, index)) = candidate {
        let kept = Kept::of(result);
        let finished = CandidateFinished {
            candidate_of: of,
            candidate: index,
            outcome: outcome.as_str().to_owned(),
            check_passed: crate::check::Check::of(result).map(|c| c.passed),
            runner: kept.runner,
            model: kept.model,
            commit: kept.commit,
            insertions: kept.insertions,
            deletions: kept.deletions,
            usage: usage.cloned(),
        };
        out.push(crate::Envelope::new(
            task_id,
            Some(ticket_id),
            Event::TaskCandidateFinished(finished),
        ));
    }
    if outcome == crate::ticket::TaskOutcome::Completed && field("/selection").is_some() {
        let chosen = CandidateChosen {
            chosen: field("/selection/chosen").and_then(|v| v.as_i64()).unwrap_or(0) as i32,
            candidate_task_id: text("/selection/candidate_task_id"),
            commit: landed.unwrap_or_default().to_owned(),
            reason: text("/selection/reason"),
            candidates: seen(result),
        };
        out.push(crate::Envelope::new(
            task_id,
            Some(ticket_id),
            Event::TaskCandidateChosen(chosen),
        ));
    }
    out
}

/// What the judge is shown of one eligible candidate.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct ForJudge {
    pub index: i32,
    pub runner: String,
    pub model: String,
    pub cost_usd: f64,
    pub insertions: i64,
    pub deletions: i64,
    pub files_changed: i64,
    /// The check's last lines, when the ticket has one.
    pub check_tail: Vec<String>,
    pub patch: String,
}

/// Most of a candidate's patch the judge is shown.
const JUDGE_PATCH_BYTES: usize = 48 * 1024;

/// The judge's prompt: the task, then each eligible candidate's evidence
/// (runner, cost, size, check output, diff), then the answer's schema.
pub fn judge_prompt(title: &str, description: &str, check: &str, shown: &[ForJudge]) -> String {
    let mut p = format!(
        "# Judge the candidates for: {title}\n\n{description}\n\n\
         Several agents each attempted this task from the same starting point, in workspaces of their own. \
         Each candidate below completed with a change{}. Pick the one whose change should land: the one \
         that does what the task asks, correctly and simply. Do not change any file.\n",
        if check.is_empty() {
            String::new()
        } else {
            format!(" and passed the project's check (`{check}`)")
        }
    );
    for c in shown {
        let model = if c.model.is_empty() {
            String::new()
        } else {
            format!(", model {}", c.model)
        };
        p.push_str(&format!(
            "\n## Candidate {}\n\nRunner {}{model}; cost ${:.4}; +{} -{} in {} files.\n",
            c.index, c.runner, c.cost_usd, c.insertions, c.deletions, c.files_changed
        ));
        if !c.check_tail.is_empty() {
            p.push_str(&format!(
                "\nThe check's output ended:\n\n```\n{}\n```\n",
                c.check_tail.join("\n")
            ));
        }
        let mut patch = c.patch.clone();
        if patch.len() > JUDGE_PATCH_BYTES {
            patch.truncate(patch.floor_char_boundary(JUDGE_PATCH_BYTES));
            patch.push_str("\n[… the rest of the diff is left out]");
        }
        p.push_str(&format!("\n```diff\n{patch}\n```\n"));
    }
    p.push_str(
        "\n## Your answer\n\nAnswer with one JSON object and nothing else: \
         {\"pick\": <the candidate's number>, \"reasons\": \"<why, in a sentence or two>\"}\n",
    );
    p
}

/// The judge's answer: its pick and reasons, read from the first JSON
/// object in its final message.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Verdict {
    pub pick: i32,
    pub reasons: String,
}

/// Reads the judge's final message; why not, when it is not the schema.
pub fn verdict(answer: &str) -> Result<Verdict, String> {
    let excerpt: String = answer.chars().take(200).collect();
    json_answer(answer)
        .ok_or_else(|| format!("the judge's answer is not {{\"pick\": n, \"reasons\": \"…\"}}: {excerpt:?}"))
}

/// The JSON object an agent was asked to answer with: from its answer's
/// first `{` to its last `}` (models wrap it in prose or a code fence).
pub(crate) fn json_answer<T: serde::de::DeserializeOwned>(answer: &str) -> Option<T> {
    match (answer.find('{'), answer.rfind('}')) {
        (Some(s), Some(e)) if s < e => serde_json::from_str(&answer[s..=e]).ok(),
        _ => None,
    }
}

/// The choice with the judge's pick in place of the smallest change: it
/// must be one of the eligible candidates (those the judge was shown).
pub fn judged(rule: &Choice, eligible: &[i32], v: &Verdict) -> Result<Choice, String> {
    if !eligible.contains(&v.pick) {
        return Err(format!(
            "the judge picked candidate {}, which is not one of those it was shown ({eligible:?})",
            v.pick
        ));
    }
    let reasons = rule
        .reasons
        .iter()
        .map(|(i, r)| {
            let why = if *i == v.pick {
                format!("chosen by the judge: {}", v.reasons)
            } else if eligible.contains(i) {
                format!("not chosen by the judge (it chose candidate {})", v.pick)
            } else {
                r.clone()
            };
            (*i, why)
        })
        .collect();
    Ok(Choice {
        chosen: Some(v.pick),
        reasons,
    })
}

/// The candidates the choice may land: completed with a change, check not
/// failed.
pub fn eligible(outcomes: &[Outcome]) -> Vec<i32> {
    outcomes
        .iter()
        .filter(|o| o.completed && o.commit.is_some() && o.check_passed != Some(false))
        .map(|o| o.index)
        .collect()
}
