//! Tickets: splitting into phase tasks, and deriving a ticket's status from
//! its tasks.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::DomainError;
use crate::event::{EventType, TicketChanged};
use crate::graph;
pub use crate::status::TicketStatus;
use crate::task::Phase;
use crate::validate;

/// A ticket: a piece of work split into phase tasks.
#[derive(Debug, Clone, PartialEq)]
pub struct Ticket {
    pub id: Uuid,
    /// Creation order, for stable paging.
    pub seq: i64,
    pub title: String,
    pub description: String,
    /// 1 (LOW) .. 4 (CRITICAL).
    pub priority: i32,
    pub status: TicketStatus,
    pub repository: String,
    /// Where its branch starts (empty: the remote's HEAD).
    pub base_ref: String,
    /// The branch its work lands on (`git::branch_name`); empty without a
    /// repository.
    pub branch: String,
    /// The last commit one of its tasks reported on the branch.
    pub head_commit: String,
    /// Whether the branch ends in a pull request.
    pub pull_request: bool,
    pub pull_request_url: String,
    /// Why the pull request could not be opened (empty once it is).
    pub pull_request_error: String,
    /// Most its agents may spend (USD); `None` = no limit.
    pub max_cost_usd: Option<f64>,
    /// Why it is PAUSED.
    pub paused_reason: String,
    /// Most follow-ups the forge may start on it, and how many it started.
    pub max_reactions: i32,
    pub reactions: i32,
    /// The reaction its cap turned away (`kind: url`); while the cap is
    /// not raised past `reactions`, the ticket stays PAUSED for a person.
    pub reaction_refused: String,
    /// Where it came from when not from CreateTicket (`github_issue`, and
    /// the issue's address); empty otherwise.
    pub source_kind: String,
    pub source_url: String,
    /// Phases that wait for a person's approval, and where each stands
    /// (read with the ticket when it has any).
    pub approvals: Vec<Phase>,
    pub gates: Vec<crate::gate::Gate>,
    /// The project's own check, run after each agent's work; empty: none.
    pub check_command: String,
    /// The guardian's thresholds for its attempts, where they differ.
    pub guardian: crate::guardian::Overrides,
    /// Why the guardian paused it (an attempt's spending), until a person
    /// sends it on; empty: it did not.
    pub guardian_paused: String,
    /// String labels as a JSON object.
    pub labels: Value,
    pub request_id: Option<String>,
    pub tasks_enqueued: bool,
    /// What its tasks' attempts spent, summed; `None` until one reported.
    pub usage: Option<crate::usage::Usage>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

impl Ticket {
    /// The change to its current status, for its event; `cause` adds why.
    pub fn change(&self, cause: impl FnOnce(&mut TicketChanged)) -> TicketChanged {
        let mut change = TicketChanged {
            status: self.status,
            title: self.title.clone(),
            previous_status: None,
            task_id: None,
            reason: None,
            discarded: false,
        };
        cause(&mut change);
        change
    }
}

/// What the ticket knows of one of its tasks, from task events. Both parts
/// only ever move forward, so events may be applied in any order and more
/// than once.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TaskProgress {
    pub started: bool,
    pub outcome: Option<TaskOutcome>,
    /// Added after the plan by a follow-up.
    pub follow_up: bool,
    /// A candidate attempt at another task: its start counts, its outcome
    /// does not (the task choosing among the candidates decides).
    pub candidate: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskOutcome {
    Completed,
    Failed,
    Cancelled,
}

impl TaskOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskOutcome::Completed => "completed",
            TaskOutcome::Failed => "failed",
            TaskOutcome::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "completed" => Some(TaskOutcome::Completed),
            "failed" => Some(TaskOutcome::Failed),
            "cancelled" => Some(TaskOutcome::Cancelled),
            _ => None,
        }
    }

    /// The outcome a task event settles, if any.
    pub fn of_event(event_type: EventType) -> Option<Self> {
        match event_type {
            EventType::TaskCompleted => Some(TaskOutcome::Completed),
            EventType::TaskFailed => Some(TaskOutcome::Failed),
            EventType::TaskCancelled => Some(TaskOutcome::Cancelled),
            _ => None,
        }
    }
}

/// Whether a task event shows the task has started work.
pub fn event_starts(event_type: EventType) -> bool {
    matches!(event_type, EventType::TaskStarted | EventType::TaskCompleted)
}

/// The ticket's status given its tasks: failed as soon as one task failed
/// for good; completed when all completed; cancelled when all ended and some
/// were cancelled; in progress once one started; open before.
pub fn derive_status(tasks: &[TaskProgress]) -> TicketStatus {
    let (follow_ups, plan): (Vec<TaskProgress>, Vec<TaskProgress>) = tasks.iter().partition(|t| t.follow_up);
    // A reopened ticket is judged by its follow-ups: open while one is;
    // then the last one decides, a completed one over any earlier failure
    // once the plan ended too. A cancelled one leaves it to the plan.
    if follow_ups.iter().any(|t| t.outcome.is_none()) {
        return TicketStatus::InProgress;
    }
    match follow_ups.last().and_then(|t| t.outcome) {
        Some(TaskOutcome::Failed) => TicketStatus::Failed,
        Some(TaskOutcome::Completed) if plan.iter().any(|t| t.outcome.is_none()) => TicketStatus::InProgress,
        Some(TaskOutcome::Completed) => TicketStatus::Completed,
        _ => derive_plan_status(&plan),
    }
}

/// The status a ticket's plan gives it.
fn derive_plan_status(all: &[TaskProgress]) -> TicketStatus {
    let started = all.iter().any(|t| t.started || t.outcome.is_some());
    let tasks: Vec<TaskProgress> = all.iter().filter(|t| !t.candidate).copied().collect();
    if tasks.iter().any(|t| t.outcome == Some(TaskOutcome::Failed)) {
        return TicketStatus::Failed;
    }
    if !tasks.is_empty() && tasks.iter().all(|t| t.outcome == Some(TaskOutcome::Completed)) {
        return TicketStatus::Completed;
    }
    if !tasks.is_empty() && tasks.iter().all(|t| t.outcome.is_some()) {
        return TicketStatus::Cancelled;
    }
    if started {
        return TicketStatus::InProgress;
    }
    TicketStatus::Open
}

impl Ticket {
    /// What it spent, in USD.
    pub fn spent_usd(&self) -> f64 {
        self.usage.as_ref().map_or(0.0, |u| u.cost_usd)
    }

    /// Why its budget stops it, if it does.
    pub fn over_budget(&self) -> Option<String> {
        let max = self.max_cost_usd?;
        let spent = self.spent_usd();
        (spent >= max).then(|| format!("budget of ${max:.2} reached: ${spent:.4} spent"))
    }

    /// Why its reactions stop it, if they do: one was turned away by its
    /// cap (until the cap is raised).
    pub fn out_of_reactions(&self) -> Option<String> {
        (!self.reaction_refused.is_empty() && self.reactions >= self.max_reactions).then(|| {
            format!(
                "its {} reactions are used up: {} was not answered",
                self.max_reactions, self.reaction_refused
            )
        })
    }

    /// What its status should be: as its tasks say, but PAUSED while its
    /// budget is spent and it is not over yet, while the guardian's pause
    /// of it waits for a person, or while a reaction its cap turned away
    /// waits for a person (the pull request's work is not over
    /// even when its tasks are).
    pub fn budgeted(&self, derived: TicketStatus) -> TicketStatus {
        if self.pause_reason(derived).is_some() {
            TicketStatus::Paused
        } else {
            derived
        }
    }

    /// Why it is held PAUSED when its tasks say `derived`.
    pub fn pause_reason(&self, derived: TicketStatus) -> Option<String> {
        if derived == TicketStatus::Cancelled {
            return None;
        }
        let budget = if derived.is_final() { None } else { self.over_budget() };
        let guardian = (!derived.is_final() && !self.guardian_paused.is_empty())
            .then(|| format!("the guardian paused it: {}", self.guardian_paused));
        budget.or(guardian).or_else(|| self.out_of_reactions())
    }
}

/// Ticket priority (1..=4) as task priority: LOW 1 .. CRITICAL 4.
pub fn task_priority(ticket_priority: i32) -> i32 {
    ticket_priority.clamp(1, 4)
}

/// A task of a ticket's plan; dependencies are indexes into the plan.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTask {
    pub title: String,
    pub description: String,
    pub phase: Phase,
    pub priority: i32,
    pub depends_on: Vec<usize>,
    pub max_retries: i32,
    pub timeout_seconds: i32,
    /// None: the ticket's repository, if it names one.
    pub concurrency_key: Option<String>,
    /// Labels an agent must carry to be handed it; empty: any.
    pub requires: crate::routing::Labels,
    /// A candidate attempt at another step of the plan (by index), and its
    /// number (from 1).
    pub candidate: Option<(usize, i32)>,
    /// Lands the candidate it follows in place of the one its step chose
    /// (a person's choice).
    pub lands_candidate: bool,
}

impl PlannedTask {
    /// The task to enqueue for this entry of `ticket_id`'s plan, as task
    /// `id`; `ids` are the plan's task ids in plan order (a dependency by
    /// index becomes one by id).
    pub fn new_task(&self, id: Uuid, ticket_id: Uuid, ids: &[Uuid]) -> validate::NewTask {
        validate::NewTask {
            id,
            ticket_id: Some(ticket_id),
            title: self.title.clone(),
            description: self.description.clone(),
            phase: self.phase,
            priority: self.priority,
            depends_on: self.depends_on.iter().filter_map(|i| ids.get(*i).copied()).collect(),
            max_retries: self.max_retries,
            timeout_seconds: self.timeout_seconds,
            concurrency_key: self.concurrency_key.clone(),
            session: None,
            requires: self.requires.clone(),
            candidate: self.candidate.and_then(|(of, n)| ids.get(of).map(|id| (*id, n))),
            lands_candidate: self.lands_candidate,
        }
    }
}

/// A plan entry as the request carries it.
#[derive(Debug, Clone, Default)]
pub struct RawTaskSpec<'a> {
    pub title: &'a str,
    pub description: &'a str,
    pub phase: validate::Given<Phase>,
    pub priority: Option<i32>,
    pub depends_on: &'a [i32],
    pub max_retries: Option<i32>,
    pub timeout_seconds: i32,
    pub concurrency_key: &'a str,
    pub requires: Option<&'a std::collections::HashMap<String, String>>,
    pub candidates: Option<crate::candidates::RawCandidates<'a>>,
}

/// Most tasks in one plan.
pub const MAX_PLAN: usize = 100;

/// What each phase's task of the default plan is told to do (its
/// description, before the ticket). A deployment may override any of them
/// (the ticket service's `OMOI_PHASE_INSTRUCTIONS_FILE`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PhaseInstructions {
    pub initial: String,
    pub implementation: String,
    pub integration: String,
    pub refactoring: String,
}

impl Default for PhaseInstructions {
    fn default() -> Self {
        Self {
            initial: "Prepare the ground for the ticket: study the repository, scaffold what is missing, \
                      and write down the plan."
                .into(),
            implementation: "Implement what the ticket asks for, following the plan from the initial phase.".into(),
            integration: "Integrate the change with the rest of the system: wire it up, write and run the tests, \
                          and fix what they find."
                .into(),
            refactoring: "Clean up the change: simplify, remove duplication, and make sure it reads well.".into(),
        }
    }
}

/// The four chained phase tasks of a ticket without an explicit plan.
pub fn default_plan(title: &str, description: &str, priority: i32, told: &PhaseInstructions) -> Vec<PlannedTask> {
    let steps: [(Phase, &str, &str); 4] = [
        (Phase::Initial, "Set up", &told.initial),
        (Phase::Implementation, "Implement", &told.implementation),
        (Phase::Integration, "Integrate", &told.integration),
        (Phase::Refactoring, "Refactor", &told.refactoring),
    ];
    steps
        .iter()
        .enumerate()
        .map(|(i, (phase, verb, what))| PlannedTask {
            title: truncate_title(&format!("{verb}: {title}")),
            description: format!("{}\n\nTicket: {title}\n\n{description}", what.trim())
                .trim_end()
                .to_owned(),
            phase: *phase,
            priority: task_priority(priority),
            depends_on: if i == 0 { vec![] } else { vec![i - 1] },
            max_retries: crate::backoff::DEFAULT_MAX_RETRIES,
            timeout_seconds: 0,
            concurrency_key: None,
            requires: crate::routing::Labels::new(),
            candidate: None,
            lands_candidate: false,
        })
        .collect()
}

/// Validates an explicit plan: fields, index dependencies, and no cycle.
pub fn explicit_plan(specs: &[RawTaskSpec<'_>], ticket_priority: i32) -> Result<Vec<PlannedTask>, DomainError> {
    if specs.len() > MAX_PLAN {
        return Err(DomainError::invalid(
            "plan",
            format!("has {} tasks; at most {MAX_PLAN} allowed", specs.len()),
        ));
    }
    let mut plan = Vec::with_capacity(specs.len());
    let mut candidates = Vec::with_capacity(specs.len());
    for (i, s) in specs.iter().enumerate() {
        let f = |name: &str| format!("plan[{i}].{name}");
        let mut deps = Vec::with_capacity(s.depends_on.len());
        for (j, d) in s.depends_on.iter().enumerate() {
            let at = format!("plan[{i}].depends_on[{j}]");
            let idx = usize::try_from(*d)
                .ok()
                .filter(|d| *d < specs.len())
                .ok_or_else(|| DomainError::invalid(&at, format!("{d} is not an index into the plan")))?;
            if idx == i {
                return Err(DomainError::invalid(at, "a task cannot depend on itself"));
            }
            if deps.contains(&idx) {
                return Err(DomainError::invalid(at, format!("duplicate dependency {idx}")));
            }
            deps.push(idx);
        }
        plan.push(PlannedTask {
            title: validate::title(&f("title"), s.title)?,
            description: validate::text(&f("description"), s.description, validate::MAX_DESCRIPTION_BYTES)?,
            phase: validate::phase(&f("phase"), s.phase)?,
            priority: validate::range(
                &f("priority"),
                s.priority.unwrap_or(task_priority(ticket_priority)),
                0,
                i32::MAX,
            )?,
            depends_on: deps,
            max_retries: validate::range(
                &f("max_retries"),
                s.max_retries.unwrap_or(crate::backoff::DEFAULT_MAX_RETRIES),
                0,
                validate::MAX_RETRIES_LIMIT,
            )?,
            timeout_seconds: validate::range(
                &f("timeout_seconds"),
                s.timeout_seconds,
                0,
                validate::MAX_TIMEOUT_SECONDS,
            )?,
            concurrency_key: validate::optional_concurrency_key(&f("concurrency_key"), s.concurrency_key)?,
            requires: match s.requires {
                Some(r) => crate::routing::requires(&f("requires"), r)?,
                None => crate::routing::Labels::new(),
            },
            candidate: None,
            lands_candidate: false,
        });
        let step = plan.last().expect("just pushed");
        candidates.push(
            s.candidates
                .as_ref()
                .map(|c| crate::candidates::candidates(&f("candidates"), c, &step.requires))
                .transpose()?,
        );
    }
    let graph: Vec<Vec<usize>> = plan.iter().map(|t| t.depends_on.clone()).collect();
    if let Some(cycle) = graph::find_cycle(&graph) {
        let names: Vec<String> = cycle.iter().map(|i| format!("plan[{i}]")).collect();
        return Err(DomainError::invalid(
            format!("plan[{}].depends_on", cycle[0]),
            format!("dependency cycle {} -> {}", names.join(" -> "), names[0]),
        ));
    }
    let expanded = with_candidates(plan, candidates);
    if expanded.len() > MAX_PLAN {
        return Err(DomainError::invalid(
            "plan",
            format!(
                "has {} tasks with its candidates; at most {MAX_PLAN} allowed",
                expanded.len()
            ),
        ));
    }
    Ok(expanded)
}

/// The plan with each step that runs candidates preceded by them: each
/// candidate takes the step's place in the graph (its dependencies, its
/// own labels, numbered in its title), and the step, now choosing among
/// them, depends on them alone. Dependencies are renumbered to match.
fn with_candidates(plan: Vec<PlannedTask>, candidates: Vec<Option<crate::candidates::Candidates>>) -> Vec<PlannedTask> {
    if candidates.iter().all(Option::is_none) {
        return plan;
    }
    // Where each step lands: after the candidates of every step up to it.
    let mut at = Vec::with_capacity(plan.len());
    let mut next = 0;
    for c in &candidates {
        next += c.as_ref().map_or(0, |c| c.count());
        at.push(next);
        next += 1;
    }
    let mut out = Vec::with_capacity(next);
    for (i, (mut step, c)) in plan.into_iter().zip(candidates).enumerate() {
        step.depends_on = step.depends_on.iter().map(|d| at[*d]).collect();
        if let Some(c) = c {
            let n = c.count();
            let first = at[i] - n;
            for (k, requires) in c.requires.into_iter().enumerate() {
                out.push(PlannedTask {
                    title: truncate_title(&format!("{} (candidate {} of {n})", step.title, k + 1)),
                    requires,
                    candidate: Some((at[i], k as i32 + 1)),
                    ..step.clone()
                });
            }
            step.depends_on = (first..at[i]).collect();
            // The step's task runs the judge, when there is one.
            step.requires = c.judge;
        }
        out.push(step);
    }
    out
}

pub(crate) fn truncate_title(s: &str) -> String {
    s.chars().take(validate::MAX_TITLE_CHARS).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use TaskOutcome::*;

    fn p(started: bool, outcome: Option<TaskOutcome>) -> TaskProgress {
        TaskProgress {
            started,
            outcome,
            follow_up: false,
            candidate: false,
        }
    }

    fn f(outcome: Option<TaskOutcome>) -> TaskProgress {
        TaskProgress {
            follow_up: true,
            ..p(true, outcome)
        }
    }

    #[test]
    fn a_reopened_ticket_is_judged_by_its_follow_ups() {
        let done = p(true, Some(Completed));
        let failed = p(true, Some(Failed));
        let table: Vec<(Vec<TaskProgress>, TicketStatus)> = vec![
            (vec![done, f(None)], TicketStatus::InProgress),
            (vec![done, f(Some(Completed))], TicketStatus::Completed),
            (vec![failed, f(Some(Completed))], TicketStatus::Completed),
            (vec![done, f(Some(Completed)), f(Some(Failed))], TicketStatus::Failed),
            (vec![failed, f(Some(Cancelled))], TicketStatus::Failed),
            (vec![done, f(Some(Cancelled))], TicketStatus::Completed),
            (vec![done, p(true, None), f(Some(Completed))], TicketStatus::InProgress),
        ];
        for (tasks, want) in table {
            assert_eq!(derive_status(&tasks), want, "{tasks:?}");
        }
    }

    #[test]
    fn status_follows_tasks() {
        let open = p(false, None);
        let started = p(true, None);
        let table: Vec<(Vec<TaskProgress>, TicketStatus)> = vec![
            (vec![], TicketStatus::Open),
            (vec![open, open], TicketStatus::Open),
            (vec![started, open], TicketStatus::InProgress),
            (vec![p(true, Some(Completed)), open], TicketStatus::InProgress),
            (
                vec![p(true, Some(Completed)), p(true, Some(Completed))],
                TicketStatus::Completed,
            ),
            (
                vec![p(true, Some(Failed)), p(false, Some(Cancelled))],
                TicketStatus::Failed,
            ),
            (vec![p(true, Some(Failed)), started], TicketStatus::Failed),
            (
                vec![p(true, Some(Completed)), p(false, Some(Cancelled))],
                TicketStatus::Cancelled,
            ),
            (vec![p(false, Some(Cancelled)), open], TicketStatus::InProgress),
        ];
        for (tasks, want) in table {
            assert_eq!(derive_status(&tasks), want, "{tasks:?}");
        }
    }

    #[test]
    fn default_plan_chains_the_four_phases() {
        let plan = default_plan("Add OAuth login", "to billing", 3, &PhaseInstructions::default());
        let phases: Vec<Phase> = plan.iter().map(|t| t.phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Initial,
                Phase::Implementation,
                Phase::Integration,
                Phase::Refactoring
            ]
        );
        let deps: Vec<Vec<usize>> = plan.iter().map(|t| t.depends_on.clone()).collect();
        assert_eq!(deps, [vec![], vec![0], vec![1], vec![2]]);
        assert!(
            plan.iter()
                .all(|t| t.priority == 3 && t.description.contains("to billing"))
        );
        assert_eq!(plan[1].title, "Implement: Add OAuth login");
        let long = "x".repeat(200);
        assert!(
            default_plan(&long, "", 1, &PhaseInstructions::default())
                .iter()
                .all(|t| t.title.chars().count() <= 200)
        );
    }

    #[test]
    fn a_spent_budget_pauses_an_open_ticket_but_never_a_finished_one() {
        let now = chrono::Utc::now();
        let mut t = Ticket {
            id: Uuid::nil(),
            seq: 1,
            title: "t".into(),
            description: String::new(),
            priority: 2,
            status: TicketStatus::InProgress,
            repository: String::new(),
            base_ref: String::new(),
            branch: String::new(),
            head_commit: String::new(),
            pull_request: false,
            pull_request_url: String::new(),
            pull_request_error: String::new(),
            max_cost_usd: Some(1.0),
            paused_reason: String::new(),
            max_reactions: 5,
            reactions: 0,
            reaction_refused: String::new(),
            source_kind: String::new(),
            source_url: String::new(),
            approvals: Vec::new(),
            check_command: String::new(),
            guardian: Default::default(),
            guardian_paused: String::new(),
            gates: Vec::new(),
            labels: serde_json::json!({}),
            request_id: None,
            tasks_enqueued: true,
            usage: None,
            created_at: now,
            updated_at: now,
        };
        assert_eq!(t.budgeted(TicketStatus::InProgress), TicketStatus::InProgress);
        t.usage = Some(crate::usage::Usage {
            cost_usd: 1.25,
            ..Default::default()
        });
        assert_eq!(t.budgeted(TicketStatus::InProgress), TicketStatus::Paused);
        assert_eq!(t.budgeted(TicketStatus::Open), TicketStatus::Paused);
        assert_eq!(t.budgeted(TicketStatus::Completed), TicketStatus::Completed);
        assert_eq!(t.over_budget().unwrap(), "budget of $1.00 reached: $1.2500 spent");
        t.max_cost_usd = None;
        assert_eq!(t.budgeted(TicketStatus::InProgress), TicketStatus::InProgress);

        // A reaction its cap turned away holds even a completed ticket,
        // until the cap is raised past what it used; never a cancelled one.
        t.reactions = 5;
        t.reaction_refused = "ci_failure: https://github.com/o/r/pull/1/checks".into();
        assert_eq!(t.budgeted(TicketStatus::Completed), TicketStatus::Paused);
        assert_eq!(t.budgeted(TicketStatus::Cancelled), TicketStatus::Cancelled);
        assert_eq!(
            t.pause_reason(TicketStatus::Completed).unwrap(),
            "its 5 reactions are used up: ci_failure: https://github.com/o/r/pull/1/checks was not answered"
        );
        t.max_reactions = 6;
        assert_eq!(t.budgeted(TicketStatus::Completed), TicketStatus::Completed);
    }

    #[test]
    fn phase_instructions_may_be_overridden_one_by_one() {
        let told: PhaseInstructions = serde_json::from_str(r#"{"implementation": "Write it in Rust."}"#).unwrap();
        assert_eq!(told.initial, PhaseInstructions::default().initial);
        let plan = default_plan("Add OAuth login", "to billing", 3, &told);
        assert!(
            plan[1]
                .description
                .starts_with("Write it in Rust.\n\nTicket: Add OAuth login")
        );
        assert!(serde_json::from_str::<PhaseInstructions>(r#"{"implement": "typo"}"#).is_err());
    }

    #[test]
    fn explicit_plans_are_validated() {
        let spec = |deps: &'static [i32]| RawTaskSpec {
            title: "t",
            phase: validate::Given::Known(Phase::Implementation),
            depends_on: deps,
            ..Default::default()
        };
        let ok = explicit_plan(&[spec(&[]), spec(&[0]), spec(&[0, 1])], 4).unwrap();
        assert_eq!(ok[2].depends_on, vec![0, 1]);
        assert_eq!(ok[0].priority, 4);
        let err = |specs: &[RawTaskSpec<'_>]| match explicit_plan(specs, 2).unwrap_err() {
            DomainError::InvalidArgument(e) => format!("{}: {}", e.field, e.reason),
            other => panic!("{other:?}"),
        };
        assert!(err(&[spec(&[1])]).starts_with("plan[0].depends_on[0]"));
        assert!(err(&[spec(&[-1])]).starts_with("plan[0].depends_on[0]"));
        assert!(err(&[spec(&[0])]).contains("itself"));
        assert!(err(&[spec(&[]), spec(&[0, 0])]).starts_with("plan[1].depends_on[1]"));
        let cycle = err(&[spec(&[2]), spec(&[0]), spec(&[1])]);
        assert!(
            cycle.contains("cycle plan[0] -> plan[2] -> plan[1] -> plan[0]"),
            "{cycle}"
        );
        let bad_phase = RawTaskSpec {
            phase: validate::Given::Missing,
            ..spec(&[])
        };
        assert!(err(&[bad_phase]).starts_with("plan[0].phase"));
    }

    #[test]
    fn a_step_with_candidates_is_preceded_by_them_and_chooses_among_them() {
        let codex: std::collections::HashMap<String, String> = [("runner".to_string(), "codex".to_string())].into();
        let claude: std::collections::HashMap<String, String> =
            [("runner".to_string(), "claude-code".to_string())].into();
        let spec = |title: &'static str, deps: &'static [i32]| RawTaskSpec {
            title,
            phase: validate::Given::Known(Phase::Implementation),
            depends_on: deps,
            ..Default::default()
        };
        let best = RawTaskSpec {
            candidates: Some(crate::candidates::RawCandidates {
                count: 2,
                requires: vec![&claude, &codex],
                judge: None,
            }),
            ..spec("Build", &[0])
        };
        let plan = explicit_plan(&[spec("Plan", &[]), best, spec("Ship", &[1])], 2).unwrap();
        let titles: Vec<&str> = plan.iter().map(|t| t.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "Plan",
                "Build (candidate 1 of 2)",
                "Build (candidate 2 of 2)",
                "Build",
                "Ship"
            ]
        );
        // Each candidate in the step's place, with its own labels.
        assert_eq!((plan[1].depends_on.clone(), plan[1].candidate), (vec![0], Some((3, 1))));
        assert_eq!((plan[2].depends_on.clone(), plan[2].candidate), (vec![0], Some((3, 2))));
        assert_eq!(plan[2].requires.get("runner").map(String::as_str), Some("codex"));
        // The step waits for them, and what came after the step waits for it.
        assert_eq!((plan[3].depends_on.clone(), plan[3].candidate), (vec![1, 2], None));
        assert!(plan[3].requires.is_empty());
        assert_eq!(plan[4].depends_on, vec![3]);
        let ids: Vec<Uuid> = (0..5).map(|i| Uuid::from_u128(i + 1)).collect();
        let task = plan[2].new_task(ids[2], Uuid::from_u128(99), &ids);
        assert_eq!(task.candidate, Some((ids[3], 2)));
        let count = |n: i32| RawTaskSpec {
            candidates: Some(crate::candidates::RawCandidates {
                count: n,
                judge: None,
                requires: vec![],
            }),
            ..spec("x", &[])
        };
        match explicit_plan(&[count(9)], 2).unwrap_err() {
            DomainError::InvalidArgument(e) => assert_eq!(e.field, "plan[0].candidates.count"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn events_map_to_progress() {
        assert!(event_starts(EventType::TaskStarted));
        assert!(!event_starts(EventType::TaskAssigned));
        assert_eq!(TaskOutcome::of_event(EventType::TaskFailed), Some(Failed));
        assert_eq!(TaskOutcome::of_event(EventType::TaskRetried), None);
        for s in TicketStatus::ALL {
            assert_eq!(TicketStatus::parse(s.as_str()), Some(s));
        }
    }
}
