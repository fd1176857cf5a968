//! Approval gates: phases of a ticket's plan that wait for a person before
//! they start. A gate asks for approval once the work its phase builds on
//! (its groundwork) is done; a person approves it (the phase's tasks are
//! dispatched) or asks for changes (the groundwork's agent makes them in a
//! follow-up, then the gate asks again).

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;
use crate::ticket::{PlannedTask, TaskOutcome, TaskProgress};
use crate::validate::{self, Given};
use crate::{Phase, TicketStatus};

/// Where a gate stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GateState {
    /// Its groundwork is not done yet.
    Waiting,
    /// A person is asked to decide.
    AwaitingApproval,
    /// A person asked for changes; a follow-up is making them.
    ChangesRequested,
    /// Its phase's tasks are dispatched.
    Approved,
}

impl GateState {
    pub const ALL: [GateState; 4] = [
        GateState::Waiting,
        GateState::AwaitingApproval,
        GateState::ChangesRequested,
        GateState::Approved,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GateState::Waiting => "waiting",
            GateState::AwaitingApproval => "awaiting_approval",
            GateState::ChangesRequested => "changes_requested",
            GateState::Approved => "approved",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|g| g.as_str() == s)
    }
}

/// A person's request for changes, and the follow-up making them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChangeRequest {
    pub comment: String,
    pub requested_by: String,
    pub requested_at: DateTime<Utc>,
    pub task_id: Uuid,
}

/// One gate of a ticket.
#[derive(Debug, Clone, PartialEq)]
pub struct Gate {
    pub phase: Phase,
    pub state: GateState,
    /// How many times approval was asked, and when last.
    pub rounds: i32,
    pub requested_at: Option<DateTime<Utc>>,
    /// What it asked a person to approve (see [`Gate::review_tasks`]).
    pub review_task_ids: Vec<Uuid>,
    /// The last decision: who, when, what they said.
    pub decided_by: String,
    pub decided_at: Option<DateTime<Utc>>,
    pub comment: String,
    pub change_requests: Vec<ChangeRequest>,
    /// The queue no longer holds the phase's dispatch.
    pub released: bool,
}

impl Gate {
    pub fn new(phase: Phase) -> Self {
        Self {
            phase,
            state: GateState::Waiting,
            rounds: 0,
            requested_at: None,
            review_task_ids: Vec::new(),
            decided_by: String::new(),
            decided_at: None,
            comment: String::new(),
            change_requests: Vec::new(),
            released: false,
        }
    }

    /// Whether it asks for approval now, given the ticket's tasks (plan
    /// and follow-ups, in position order, each with its id): waiting, once
    /// every task of the plan its phase's tasks depend on (outside the
    /// phase) completed; with changes requested, once the follow-up making
    /// them completed.
    pub fn due(&self, tasks: &[(Uuid, &PlannedTask, TaskProgress)]) -> bool {
        let completed = |p: &TaskProgress| p.outcome == Some(TaskOutcome::Completed);
        match self.state {
            GateState::Waiting => groundwork(self.phase, tasks).iter().all(|i| completed(&tasks[*i].2)),
            GateState::ChangesRequested => self.change_requests.last().is_some_and(|r| {
                tasks
                    .iter()
                    .any(|(id, _, progress)| *id == r.task_id && completed(progress))
            }),
            GateState::AwaitingApproval | GateState::Approved => false,
        }
    }

    /// The tasks whose work a person is asked to approve: the groundwork,
    /// then the follow-ups that made the changes asked for.
    pub fn review_tasks(&self, tasks: &[(Uuid, &PlannedTask, TaskProgress)]) -> Vec<Uuid> {
        let mut ids: Vec<Uuid> = groundwork(self.phase, tasks).into_iter().map(|i| tasks[i].0).collect();
        ids.extend(self.change_requests.iter().map(|r| r.task_id));
        ids
    }

    /// Whether a person may decide on it now.
    pub fn awaiting(&self) -> bool {
        self.state == GateState::AwaitingApproval
    }
}

/// The gates a person's decision is about: those awaiting one, of
/// `phase` when it is named.
pub fn deciding(gates: &[Gate], phase: Option<Phase>) -> Vec<&Gate> {
    gates
        .iter()
        .filter(|g| g.awaiting() && phase.is_none_or(|p| p == g.phase))
        .collect()
}

/// The plan's tasks (indexes into `tasks`) that the tasks of `phase`
/// depend on, outside the phase: what a gate on it waits for.
pub fn groundwork(phase: Phase, tasks: &[(Uuid, &PlannedTask, TaskProgress)]) -> Vec<usize> {
    let plan: Vec<usize> = (0..tasks.len()).filter(|i| !tasks[*i].2.follow_up).collect();
    let mut out: Vec<usize> = Vec::new();
    for i in &plan {
        let (_, task, _) = tasks[*i];
        if task.phase != phase {
            continue;
        }
        for d in &task.depends_on {
            // Dependencies are indexes into the plan.
            if let Some(&j) = plan.get(*d)
                && tasks[j].1.phase != phase
                && !out.contains(&j)
            {
                out.push(j);
            }
        }
    }
    out.sort_unstable();
    out
}

/// The status a ticket with `gates` has when its tasks and budget say
/// `status`: AWAITING_APPROVAL while a gate awaits a person and the ticket
/// is neither over nor paused.
pub fn gated_status(status: TicketStatus, gates: &[Gate]) -> TicketStatus {
    let open = matches!(status, TicketStatus::Open | TicketStatus::InProgress);
    if open && gates.iter().any(Gate::awaiting) {
        TicketStatus::AwaitingApproval
    } else {
        status
    }
}

/// The gates a request asks for: each a phase of `plan`, each once, in
/// phase order.
pub fn approvals(
    field: &str,
    values: impl IntoIterator<Item = Given<Phase>>,
    plan: &[PlannedTask],
) -> Result<Vec<Phase>, DomainError> {
    let mut out: Vec<Phase> = Vec::new();
    for (i, value) in values.into_iter().enumerate() {
        let at = format!("{field}[{i}]");
        let phase = validate::phase(&at, value)?;
        if out.contains(&phase) {
            return Err(DomainError::invalid(at, format!("{} is named twice", phase.name())));
        }
        if !plan.iter().any(|t| t.phase == phase) {
            return Err(DomainError::invalid(
                at,
                format!("no task of the plan is in the {} phase", phase.name()),
            ));
        }
        out.push(phase);
    }
    out.sort();
    Ok(out)
}

/// Most bytes of an approval's or a change request's comment.
pub const MAX_COMMENT_BYTES: usize = 64 * 1024;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ticket::{PhaseInstructions, default_plan};

    fn progress(outcome: Option<TaskOutcome>, follow_up: bool) -> TaskProgress {
        TaskProgress {
            started: outcome.is_some(),
            outcome,
            follow_up,
            candidate: false,
        }
    }

    #[test]
    fn a_gate_asks_once_its_groundwork_is_done_and_again_after_changes() {
        let plan = default_plan("t", "", 2, &PhaseInstructions::default());
        let ids: Vec<Uuid> = (0..5).map(|_| Uuid::now_v7()).collect();
        let mut outcomes = [None, None, None, None];
        let tasks = |outcomes: &[Option<TaskOutcome>; 4]| -> Vec<(Uuid, &PlannedTask, TaskProgress)> {
            plan.iter()
                .enumerate()
                .map(|(i, t)| (ids[i], t, progress(outcomes[i], false)))
                .collect()
        };
        let mut gate = Gate::new(Phase::Implementation);
        assert!(!gate.due(&tasks(&outcomes)));
        assert_eq!(groundwork(Phase::Implementation, &tasks(&outcomes)), vec![0]);
        outcomes[0] = Some(TaskOutcome::Failed);
        assert!(!gate.due(&tasks(&outcomes)));
        outcomes[0] = Some(TaskOutcome::Completed);
        assert!(gate.due(&tasks(&outcomes)));
        assert_eq!(gate.review_tasks(&tasks(&outcomes)), vec![ids[0]]);

        // Changes asked for: due again once their follow-up completed.
        gate.state = GateState::ChangesRequested;
        gate.change_requests.push(ChangeRequest {
            comment: "smaller steps".into(),
            requested_by: "operator".into(),
            requested_at: Utc::now(),
            task_id: ids[4],
        });
        let follow_up = plan[0].clone();
        let mut all = tasks(&outcomes);
        all.push((ids[4], &follow_up, progress(None, true)));
        assert!(!gate.due(&all));
        all[4].2 = progress(Some(TaskOutcome::Completed), true);
        assert!(gate.due(&all));
        assert_eq!(gate.review_tasks(&all), vec![ids[0], ids[4]]);

        // A gate on the first phase has no groundwork: it asks at once.
        assert!(Gate::new(Phase::Initial).due(&tasks(&[None; 4])));
        gate.state = GateState::Approved;
        assert!(!gate.due(&all));
    }

    #[test]
    fn an_awaiting_gate_holds_an_open_ticket_but_not_a_paused_or_finished_one() {
        let mut gate = Gate::new(Phase::Implementation);
        assert_eq!(
            gated_status(TicketStatus::InProgress, std::slice::from_ref(&gate)),
            TicketStatus::InProgress
        );
        gate.state = GateState::AwaitingApproval;
        let gates = [gate];
        assert_eq!(
            gated_status(TicketStatus::InProgress, &gates),
            TicketStatus::AwaitingApproval
        );
        assert_eq!(gated_status(TicketStatus::Open, &gates), TicketStatus::AwaitingApproval);
        assert_eq!(gated_status(TicketStatus::Paused, &gates), TicketStatus::Paused);
        assert_eq!(gated_status(TicketStatus::Failed, &gates), TicketStatus::Failed);
        assert_eq!(gated_status(TicketStatus::Cancelled, &gates), TicketStatus::Cancelled);
    }

    #[test]
    fn approvals_name_phases_of_the_plan_once() {
        let plan = default_plan("t", "", 2, &PhaseInstructions::default());
        let got = approvals(
            "approvals",
            [Given::Known(Phase::Integration), Given::Known(Phase::Implementation)],
            &plan,
        )
        .unwrap();
        assert_eq!(got, vec![Phase::Implementation, Phase::Integration]);
        let err = |values: Vec<Given<Phase>>, plan: &[PlannedTask]| match approvals("approvals", values, plan) {
            Err(DomainError::InvalidArgument(e)) => format!("{}: {}", e.field, e.reason),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            err(vec![Given::Known(Phase::Initial), Given::Known(Phase::Initial)], &plan),
            "approvals[1]: initial is named twice"
        );
        assert!(err(vec![Given::Unknown(9)], &plan).starts_with("approvals[0]"));
        assert!(err(vec![Given::Missing], &plan).starts_with("approvals[0]"));
        assert_eq!(
            err(vec![Given::Known(Phase::Refactoring)], &plan[..2]),
            "approvals[0]: no task of the plan is in the refactoring phase"
        );
    }

    #[test]
    fn states_round_trip() {
        for s in GateState::ALL {
            assert_eq!(GateState::parse(s.as_str()), Some(s));
        }
    }
}
