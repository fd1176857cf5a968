//! The queue's decisions, as pure functions of a task: what each report,
//! timeout, cancellation or lost agent does to it, and which events say so.
//! The store persists the `Transition` these return and decides nothing.

use std::collections::HashSet;
use std::time::Duration;

use rand::Rng;
use serde_json::Value;
use uuid::Uuid;

use crate::error::DomainError;
use crate::event::{
    ConcurrencyLimitSet, Envelope, Event, QueuePaused, QueueResumed, TaskAssigned, TaskCancelled, TaskCompleted,
    TaskCreated, TaskFailed, TaskRequeued, TaskResumed, TaskRetried, TaskStarted, TaskTimedOut,
};
use crate::git::GitChange;
use crate::session::AgentSession;
use crate::task::{Action, ErrorClass, Phase, Task, TaskStatus};
use crate::usage::Usage;
use crate::validate::NewTask;
use crate::{backoff, classify};

/// An attempt that its agent must stop working on.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Revoked {
    pub agent_id: Uuid,
    pub task_id: Uuid,
    pub attempt: i32,
    pub reason: String,
}

/// Where an ended attempt leaves its task.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Back to pending after `delay`, one retry spent.
    Retry {
        delay: Duration,
        error: String,
        class: ErrorClass,
    },
    /// Failed for good.
    Fail { error: String, class: ErrorClass },
    /// Cancelled; the reason is kept as the task's error message.
    Cancel { reason: String },
    /// Back to pending by an operator, with a fresh retry budget.
    Reset,
}

impl Change {
    pub fn status(&self) -> TaskStatus {
        match self {
            Change::Retry { .. } => TaskStatus::Pending,
            Change::Fail { .. } => TaskStatus::Failed,
            Change::Cancel { .. } => TaskStatus::Cancelled,
            Change::Reset => TaskStatus::Pending,
        }
    }
}

/// What a task's change does to its pending dependents.
#[derive(Debug, Clone, PartialEq)]
pub enum Dependents {
    /// Nothing: the task is not over (or completed, which releases them
    /// its own way).
    Untouched,
    /// Cancelled (transitively) with this reason; their events come from
    /// `dependent_cancelled`.
    Cancelled(String),
    /// Released as if it had completed: a candidate's end, whatever it is,
    /// is met for the task choosing among the candidates.
    Released,
}

impl Dependents {
    /// What a task ending without completing does to its dependents:
    /// cancels them saying `reason`, or releases its chooser when it is a
    /// candidate.
    fn of_end(task: &Task, reason: String) -> Self {
        if task.candidate.is_some() {
            Dependents::Released
        } else {
            Dependents::Cancelled(reason)
        }
    }

    /// The reason they are cancelled with, when they are.
    pub fn cancelled(&self) -> Option<&str> {
        match self {
            Dependents::Cancelled(reason) => Some(reason),
            _ => None,
        }
    }
}

/// What a failure, timeout, cancellation or reclaim does to one task.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition {
    pub task_id: Uuid,
    pub change: Change,
    /// Recorded with the change, in order.
    pub events: Vec<Envelope>,
    /// The agent holding the attempt, to be told to stop.
    pub revoke: Option<Revoked>,
    /// What becomes of the task's pending dependents.
    pub dependents: Dependents,
    /// What the ended attempt spent, added to the task's usage.
    pub usage: Option<Usage>,
}

impl Transition {
    /// A retry waits at least `wait`, its event saying so; nothing for a
    /// change that is not a retry.
    fn wait_at_least(&mut self, wait: Duration) {
        if let Change::Retry { delay, .. } = &mut self.change
            && *delay < wait
        {
            // Whole milliseconds, as the event tells.
            *delay = Duration::from_millis(wait.as_millis() as u64);
            for e in &mut self.events {
                if let Event::TaskRetried(r) = &mut e.event {
                    r.delay_ms = delay.as_millis() as i64;
                }
            }
        }
    }

    /// Records what the ended attempt spent: added to the task, and told by
    /// the first event that ends the attempt (only one, so that summing
    /// events sums attempts).
    fn spent(mut self, usage: Option<Usage>) -> Self {
        let usage = usage.filter(|u| !u.is_empty());
        if let Some(slot) = self.events.iter_mut().find_map(|e| e.event.usage_slot()) {
            slot.clone_from(&usage);
        }
        self.usage = usage;
        self
    }
}

/// A failure report of the current attempt. The class is the reporter's when
/// given, else read from the message; the reporter is the holder, so nobody
/// needs telling.
pub fn on_failure(task: &Task, report: &Failure, rng: &mut impl Rng) -> Result<Transition, DomainError> {
    task.check_attempt(report.attempt)?;
    let class = classify::classify(&report.message, report.class);
    task.status.apply(Action::Fail {
        retry: retries(task, class),
    })?;
    let mut transition = end_attempt(task, &report.message, class, Vec::new(), rng);
    transition.revoke = None;
    if let Some(wait) = report.retry_after {
        transition.wait_at_least(wait.min(MAX_RETRY_AFTER));
    }
    Ok(transition.spent(report.usage.clone()))
}

/// An agent's report that an attempt failed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Failure {
    pub attempt: i32,
    pub message: String,
    /// The reporter's class; `None` lets the message decide.
    pub class: Option<ErrorClass>,
    pub usage: Option<Usage>,
    /// When the agent knows a retry cannot help sooner (a rate limit's
    /// reset): a retry waits at least this long.
    pub retry_after: Option<Duration>,
}

/// The longest a reported `retry_after` holds a retry back.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3600);

/// A running attempt past its deadline: retried like a retryable failure, or
/// failed when out of retries.
pub fn on_timeout(task: &Task, rng: &mut impl Rng) -> Result<Transition, DomainError> {
    task.status.apply(Action::TimeOut {
        retry: task.retries_left(),
    })?;
    let timed_out = task_event(
        task,
        Event::TaskTimedOut(TaskTimedOut {
            attempt: task.attempt,
            agent_id: task.assigned_agent_id,
            timeout_seconds: task.timeout_seconds,
            usage: None,
        }),
    );
    let reason = format!("timed out after {} s", task.timeout_seconds);
    Ok(end_attempt(task, &reason, ErrorClass::Retryable, vec![timed_out], rng))
}

/// An agent's report that its own timer for the task's deadline ran out
/// first: the same as the monitor noticing it, except that the agent has
/// already stopped (nobody to tell).
pub fn on_reported_timeout(
    task: &Task,
    attempt: i32,
    usage: Option<Usage>,
    rng: &mut impl Rng,
) -> Result<Transition, DomainError> {
    task.check_attempt(attempt)?;
    let mut transition = on_timeout(task, rng)?;
    transition.revoke = None;
    Ok(transition.spent(usage))
}

/// The work of an agent that stopped heartbeating: the lost attempt counts
/// as a retry.
pub fn on_stale_agent(task: &Task, agent_id: Uuid, rng: &mut impl Rng) -> Result<Transition, DomainError> {
    task.status.apply(Action::Reclaim)?;
    let reason = format!("agent {agent_id} stopped heartbeating");
    Ok(end_attempt(task, &reason, ErrorClass::Retryable, Vec::new(), rng))
}

/// Why nobody holds a running task any more (see `on_lease_lapsed`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unheld {
    /// Its agent never registered with the health service.
    UnknownAgent,
    /// Its agent deregistered.
    Deregistered,
    /// Its agent went stale.
    Stale,
    /// Its agent's heartbeats go on without it.
    NotListed,
}

impl Unheld {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "unknown" => Unheld::UnknownAgent,
            "deregistered" => Unheld::Deregistered,
            "stale" => Unheld::Stale,
            "unlisted" => Unheld::NotListed,
            _ => return None,
        })
    }
}

/// A running task whose lease lapsed with nobody holding it: retried (the
/// lost attempt counts) or failed when out of retries.
pub fn on_lease_lapsed(task: &Task, why: Unheld, rng: &mut impl Rng) -> Result<Transition, DomainError> {
    task.status.apply(Action::Reclaim)?;
    let agent = task.assigned_agent_id.map(|a| a.to_string()).unwrap_or_default();
    let reason = match why {
        Unheld::UnknownAgent => format!("lease lapsed: agent {agent} is not registered"),
        Unheld::Deregistered => format!("lease lapsed: agent {agent} deregistered"),
        Unheld::Stale => format!("lease lapsed: agent {agent} stopped heartbeating"),
        Unheld::NotListed => format!("lease lapsed: agent {agent} no longer lists the task as running"),
    };
    Ok(end_attempt(task, &reason, ErrorClass::Retryable, Vec::new(), rng))
}

/// Longest ExtendLease.
pub const MAX_LEASE_SECONDS: i32 = 86_400;

/// Whether `attempt` of `task` may have its lease extended.
pub fn extendable(task: &Task, attempt: i32) -> Result<(), DomainError> {
    task.check_attempt(attempt)?;
    task.status.apply(Action::ExtendLease).map(|_| ())
}

/// A running attempt's record of its agent session (RecordSession): only
/// the attempt running may record one, and only its own (`session.attempt`
/// is the attempt). The first record of an attempt that resumed a
/// checkpoint is TASK_RESUMED; the others change the record only.
pub fn on_session(task: &Task, attempt: i32, session: &AgentSession) -> Result<Option<Envelope>, DomainError> {
    extendable(task, attempt)?;
    if session.attempt != attempt {
        return Err(DomainError::invalid(
            "session.attempt",
            format!("is {}, not the attempt reporting ({attempt})", session.attempt),
        ));
    }
    let recorded_before = task
        .session
        .as_ref()
        .is_some_and(|s| s.attempt == attempt && s.resumed());
    if !session.resumed() || recorded_before {
        return Ok(None);
    }
    Ok(Some(task_event(
        task,
        Event::TaskResumed(TaskResumed {
            attempt,
            agent_id: task.assigned_agent_id,
            runner: session.runner.clone(),
            session_id: session.session_id.clone(),
            resumed_from_attempt: session.resumed_from_attempt,
            resumed_from_task_id: session.resumed_from_task_id,
            checkpoint: session.checkpoint.clone(),
        }),
    )))
}

/// The guardian's intervention in a running attempt (RecordIntervention):
/// only the attempt running may report one; TASK_GUARDIAN_INTERVENED.
pub fn on_intervention(task: &Task, mut i: crate::event::GuardianIntervened) -> Result<Envelope, DomainError> {
    extendable(task, i.attempt)?;
    i.agent_id = task.assigned_agent_id;
    Ok(task_event(task, Event::TaskGuardianIntervened(i)))
}

/// A cancellation of a pending, assigned or running task; its pending
/// dependents are cancelled with it.
pub fn on_cancel(task: &Task, reason: &str) -> Result<Transition, DomainError> {
    task.status.apply(Action::Cancel)?;
    let reason = if reason.is_empty() { "cancelled" } else { reason };
    Ok(Transition {
        task_id: task.id,
        change: Change::Cancel {
            reason: reason.to_owned(),
        },
        events: vec![task_event(
            task,
            Event::TaskCancelled(TaskCancelled {
                reason: reason.to_owned(),
                previous_status: task.status,
                attempt: Some(task.attempt),
                agent_id: task.assigned_agent_id,
                cause_task_id: None,
            }),
        )],
        revoke: holder(task, reason),
        dependents: Dependents::of_end(task, format!("dependency {} was cancelled: {reason}", task.id)),
        usage: None,
    })
}

/// An operator's retry of a failed, timed-out or cancelled task: back to
/// pending with a fresh retry budget (TASK_RETRIED with `manual`). Refused
/// while a dependency has failed or was cancelled (`ended_dependency`):
/// that one is to be retried first.
pub fn on_manual_retry(
    task: &Task,
    reason: &str,
    ended_dependency: Option<(Uuid, TaskStatus)>,
) -> Result<Transition, DomainError> {
    task.status.apply(Action::Retry)?;
    if let Some((id, status)) = ended_dependency {
        return Err(DomainError::DependencyEnded {
            field: "task_id".into(),
            id,
            status,
        });
    }
    let reason = if reason.is_empty() {
        "retried by an operator"
    } else {
        reason
    };
    Ok(Transition {
        task_id: task.id,
        change: Change::Reset,
        events: vec![task_event(
            task,
            Event::TaskRetried(TaskRetried {
                attempt: task.attempt,
                agent_id: None,
                error: reason.to_owned(),
                error_class: ErrorClass::Retryable,
                retry_count: 0,
                max_retries: task.max_retries,
                delay_ms: 0,
                usage: None,
                manual: true,
            }),
        )],
        revoke: None,
        dependents: Dependents::Untouched,
        usage: None,
    })
}

/// Which of the tasks cancelled because `root` failed or was cancelled come
/// back with it: each, given with its dependencies' ids and statuses, unless
/// one of those has ended (failed, timed out or cancelled) and does not come
/// back itself; decided until nothing changes, so that no task comes back
/// to wait for one that never will.
pub fn restorable(root: Uuid, candidates: &[(Uuid, Vec<(Uuid, TaskStatus)>)]) -> Vec<Uuid> {
    let mut back: HashSet<Uuid> = candidates.iter().map(|(id, _)| *id).collect();
    loop {
        let blocked: Vec<Uuid> = candidates
            .iter()
            .filter(|(id, _)| back.contains(id))
            .filter(|(_, deps)| {
                deps.iter()
                    .any(|(dep, status)| *dep != root && !back.contains(dep) && status.ended_unsuccessfully())
            })
            .map(|(id, _)| *id)
            .collect();
        if blocked.is_empty() {
            break;
        }
        for id in blocked {
            back.remove(&id);
        }
    }
    candidates
        .iter()
        .map(|(id, _)| *id)
        .filter(|id| back.contains(id))
        .collect()
}

/// The event of a pending task cancelled because `cause` will never complete.
pub fn dependent_cancelled(task_id: Uuid, ticket_id: Option<Uuid>, cause: Uuid, reason: &str) -> Envelope {
    Envelope::new(
        task_id,
        ticket_id,
        Event::TaskCancelled(TaskCancelled {
            reason: reason.to_owned(),
            previous_status: TaskStatus::Pending,
            attempt: None,
            agent_id: None,
            cause_task_id: Some(cause),
        }),
    )
}

/// The event of a task just stored; `unmet` of its dependencies are not
/// completed yet.
pub fn created(task: &Task) -> Envelope {
    task_event(
        task,
        creation_event(
            &task.title,
            task.phase,
            task.priority,
            task.depends_on.clone(),
            task.unmet_deps,
        ),
    )
}

/// The event of a task about to be stored, from what its request says (as
/// `start_event`): an enqueue makes it before the statement that stores
/// the task and its event together. `depends_on` in the order a read of
/// the task gives them (sorted).
pub fn creation_event(title: &str, phase: Phase, priority: i32, depends_on: Vec<Uuid>, unmet: i32) -> Event {
    Event::TaskCreated(TaskCreated {
        title: title.to_owned(),
        phase,
        priority,
        depends_on,
        unmet_dependencies: unmet,
    })
}

/// The event of a task handed to an agent (`attempt` already bumped).
pub fn assigned(task: &Task) -> Envelope {
    task_event(
        task,
        Event::TaskAssigned(TaskAssigned {
            attempt: task.attempt,
            agent_id: task.assigned_agent_id,
            priority: task.priority,
        }),
    )
}

pub fn started(task: &Task) -> Envelope {
    task_event(task, start_event(task.attempt, task.assigned_agent_id))
}

/// The event of a started attempt, from what its report knows: a batch
/// write makes it before the statement that applies the report, with no
/// agent, and fills in the task's stored agent (`agent_id`) in the
/// statement itself.
pub fn start_event(attempt: i32, agent_id: Option<Uuid>) -> Event {
    Event::TaskStarted(TaskStarted { attempt, agent_id })
}

/// The event of a completed attempt and what it spent.
pub fn completed(task: &Task, usage: Option<Usage>) -> Envelope {
    task_event(
        task,
        completion_event(
            task.attempt,
            task.assigned_agent_id,
            task.result.clone(),
            usage,
            task.git.as_ref(),
        ),
    )
}

/// The event of a completed attempt from its report (as `start_event`):
/// its result, what it spent, and its git change without the patch (which
/// only the task keeps).
pub fn completion_event(
    attempt: i32,
    agent_id: Option<Uuid>,
    result: Option<Value>,
    usage: Option<Usage>,
    git: Option<&GitChange>,
) -> Event {
    Event::TaskCompleted(TaskCompleted {
        attempt,
        agent_id,
        result,
        usage: usage.filter(|u| !u.is_empty()),
        git: git.map(GitChange::without_patches),
    })
}

/// The event of an assigned task put back unstarted (its stream closed);
/// the attempt stays spent.
pub fn requeued(task_id: Uuid, ticket_id: Option<Uuid>, attempt: i32, reason: &str) -> Envelope {
    Envelope::new(
        task_id,
        ticket_id,
        Event::TaskRequeued(TaskRequeued {
            attempt,
            reason: reason.to_owned(),
        }),
    )
}

/// What a dispatch pause holds back: every task (both unset), a phase, a
/// ticket, or a phase of a ticket.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Scope {
    pub phase: Option<Phase>,
    pub ticket_id: Option<Uuid>,
}

/// A scope on hold.
#[derive(Debug, Clone, PartialEq)]
pub struct Pause {
    pub scope: Scope,
    pub reason: String,
    pub paused_at: chrono::DateTime<chrono::Utc>,
}

/// A key's cap and how many of its tasks are out now.
#[derive(Debug, Clone, PartialEq)]
pub struct Limit {
    pub key: String,
    pub max_running: i32,
    pub held: i64,
    pub updated_at: chrono::DateTime<chrono::Utc>,
}

impl Scope {
    /// The event of a scope: about its ticket when it has one (so that the
    /// ticket's watchers see it), else about the queue as a whole.
    fn envelope(self, event: Event) -> Envelope {
        Envelope::new(self.ticket_id.unwrap_or(Uuid::nil()), self.ticket_id, event)
    }

    pub fn is_everything(self) -> bool {
        self.phase.is_none() && self.ticket_id.is_none()
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.phase, self.ticket_id) {
            (None, None) => f.write_str("all dispatch"),
            (Some(p), None) => write!(f, "dispatch of {}", p.as_str()),
            (None, Some(t)) => write!(f, "dispatch of ticket {t}"),
            (Some(p), Some(t)) => write!(f, "dispatch of {} of ticket {t}", p.as_str()),
        }
    }
}

pub fn paused(scope: Scope, reason: &str) -> Envelope {
    scope.envelope(Event::QueuePaused(QueuePaused {
        phase: scope.phase,
        ticket_id: scope.ticket_id,
        reason: reason.to_owned(),
    }))
}

pub fn resumed(scope: Scope) -> Envelope {
    scope.envelope(Event::QueueResumed(QueueResumed {
        phase: scope.phase,
        ticket_id: scope.ticket_id,
    }))
}

/// A concurrency key's limit set (`Some`) or removed (`None`).
pub fn limit_set(key: &str, max_running: Option<i32>) -> Envelope {
    Envelope::new(
        Uuid::nil(),
        None,
        Event::ConcurrencyLimitSet(ConcurrencyLimitSet {
            key: key.to_owned(),
            max_running,
        }),
    )
}

/// Why an assignment not started within the start lease went back to the
/// queue.
pub fn start_lapsed(seconds: f64) -> String {
    format!("not started within {seconds} s of its assignment")
}

/// The status a report leaves its task in, for recognising a retried report
/// whose first answer was lost.
pub fn reported_status(action: Action) -> Option<TaskStatus> {
    match action {
        Action::Start => Some(TaskStatus::Running),
        Action::Complete => Some(TaskStatus::Completed),
        _ => None,
    }
}

/// Why a start or completion report of `attempt` does not apply to `task`
/// as it is now; `Ok(())` for a retried report that already took effect.
pub fn explain_report(task: &Task, attempt: i32, action: Action) -> Result<(), DomainError> {
    if task.attempt == attempt && Some(task.status) == reported_status(action) {
        return Ok(());
    }
    task.check_attempt(attempt)?;
    task.status.apply(action)?;
    // The report was legal but the row changed between the batch and now.
    Err(DomainError::Concurrent {
        task_id: task.id,
        status: task.status,
    })
}

fn retries(task: &Task, class: ErrorClass) -> bool {
    class == ErrorClass::Retryable && task.retries_left()
}

/// Ends the current attempt: back to pending with a backoff drawn from
/// `rng` while retryable and retries remain, else failed with its
/// dependents cancelled.
fn end_attempt(
    task: &Task,
    message: &str,
    class: ErrorClass,
    mut events: Vec<Envelope>,
    rng: &mut impl Rng,
) -> Transition {
    let revoke = holder(task, message);
    if retries(task, class) {
        let delay = backoff::delay(task.retry_count as u32, rng);
        events.push(task_event(
            task,
            Event::TaskRetried(TaskRetried {
                attempt: task.attempt,
                agent_id: task.assigned_agent_id,
                error: message.to_owned(),
                error_class: class,
                retry_count: task.retry_count + 1,
                max_retries: task.max_retries,
                delay_ms: delay.as_millis() as i64,
                usage: None,
                manual: false,
            }),
        ));
        return Transition {
            task_id: task.id,
            change: Change::Retry {
                // Whole milliseconds, as the event tells.
                delay: Duration::from_millis(delay.as_millis() as u64),
                error: message.to_owned(),
                class,
            },
            events,
            revoke,
            dependents: Dependents::Untouched,
            usage: None,
        };
    }
    events.push(task_event(
        task,
        Event::TaskFailed(TaskFailed {
            attempt: task.attempt,
            agent_id: task.assigned_agent_id,
            error: message.to_owned(),
            error_class: class,
            retry_count: task.retry_count,
            usage: None,
        }),
    ));
    Transition {
        task_id: task.id,
        change: Change::Fail {
            error: message.to_owned(),
            class,
        },
        events,
        revoke,
        dependents: Dependents::of_end(task, format!("dependency {} failed: {message}", task.id)),
        usage: None,
    }
}

/// The agent holding the task's current attempt, if any.
fn holder(task: &Task, reason: &str) -> Option<Revoked> {
    match (task.status, task.assigned_agent_id) {
        (TaskStatus::Assigned | TaskStatus::Running, Some(agent_id)) => Some(Revoked {
            agent_id,
            task_id: task.id,
            attempt: task.attempt,
            reason: reason.to_owned(),
        }),
        _ => None,
    }
}

fn task_event(task: &Task, event: Event) -> Envelope {
    Envelope::new(task.id, task.ticket_id, event)
}

/// The dependencies of a new batch that are already met. A completed
/// dependency is met; one that ended any other way (failed, cancelled,
/// timed out) never will be, so the batch is refused, naming the field that
/// points at it. `existing` holds the stored dependencies and their status.
pub fn met_dependencies(tasks: &[NewTask], existing: &[(Uuid, TaskStatus)]) -> Result<HashSet<Uuid>, DomainError> {
    let mut met = HashSet::new();
    for (id, status) in existing {
        if *status == TaskStatus::Completed {
            met.insert(*id);
        } else if status.is_terminal() {
            return Err(DomainError::DependencyEnded {
                field: dependency_field(tasks, *id),
                id: *id,
                status: *status,
            });
        }
    }
    Ok(met)
}

fn dependency_field(tasks: &[NewTask], dep: Uuid) -> String {
    for (i, t) in tasks.iter().enumerate() {
        if let Some(j) = t.depends_on.iter().position(|d| *d == dep) {
            return format!("tasks[{i}].depends_on[{j}]");
        }
    }
    "tasks".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;
    use crate::task::Phase;
    use chrono::Utc;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn task(status: TaskStatus, retry_count: i32, max_retries: i32) -> Task {
        let now = Utc::now();
        Task {
            id: Uuid::now_v7(),
            seq: 1,
            ticket_id: Some(Uuid::now_v7()),
            title: "t".into(),
            description: String::new(),
            phase: Phase::Implementation,
            priority: 2,
            status,
            unmet_deps: 0,
            retry_count,
            max_retries,
            timeout_seconds: 30,
            attempt: 2,
            assigned_agent_id: matches!(status, TaskStatus::Assigned | TaskStatus::Running).then(Uuid::now_v7),
            error_message: None,
            error_class: None,
            result: None,
            usage: None,
            git: None,
            created_at: now,
            updated_at: now,
            started_at: None,
            completed_at: None,
            next_attempt_at: now,
            trace_context: None,
            depends_on: Vec::new(),
            concurrency_key: None,
            session: None,
            requires: Default::default(),
            candidate: None,
            lands_candidate: false,
        }
    }

    #[test]
    fn a_resumed_session_is_said_once_per_attempt_and_only_by_it() {
        let resumed = AgentSession {
            runner: "claude-code".into(),
            session_id: "s".into(),
            attempt: 2,
            resumed_from_attempt: 1,
            ..Default::default()
        };
        let mut t = task(TaskStatus::Running, 1, 3);
        let said = on_session(&t, 2, &resumed).unwrap().expect("TASK_RESUMED");
        let Event::TaskResumed(e) = &said.event else {
            panic!("{said:?}")
        };
        assert_eq!((e.attempt, e.resumed_from_attempt, e.session_id.as_str()), (2, 1, "s"));
        // Recorded: the next checkpoints of the attempt say nothing.
        t.session = Some(resumed.clone());
        assert_eq!(on_session(&t, 2, &resumed).unwrap(), None);
        // A session that started afresh says nothing either.
        let fresh = AgentSession {
            resumed_from_attempt: 0,
            ..resumed.clone()
        };
        assert_eq!(on_session(&task(TaskStatus::Running, 1, 3), 2, &fresh).unwrap(), None);
        // Only the attempt running records, and only its own session.
        assert!(on_session(&t, 1, &resumed).is_err());
        let other = AgentSession {
            attempt: 1,
            ..resumed.clone()
        };
        assert!(
            on_session(&t, 2, &other)
                .unwrap_err()
                .to_string()
                .contains("session.attempt")
        );
        assert!(on_session(&task(TaskStatus::Completed, 1, 3), 2, &resumed).is_err());
    }

    fn types(t: &Transition) -> Vec<EventType> {
        t.events.iter().map(|e| e.event.event_type()).collect()
    }

    fn rng() -> StdRng {
        StdRng::seed_from_u64(7)
    }

    /// (status, retries spent, max, message, explicit class) → (resulting
    /// status, events, dependents cancelled).
    type FailureCase<'a> = (
        TaskStatus,
        i32,
        i32,
        &'a str,
        Option<ErrorClass>,
        TaskStatus,
        &'a [EventType],
        bool,
    );

    #[test]
    fn failure_reports() {
        use ErrorClass::*;
        use EventType::*;
        use TaskStatus::*;
        let cases: [FailureCase; 6] = [
            (Running, 0, 3, "connection reset", None, Pending, &[TaskRetried], false),
            (Assigned, 0, 3, "connection reset", None, Pending, &[TaskRetried], false),
            (Running, 3, 3, "connection reset", None, Failed, &[TaskFailed], true),
            (
                Running,
                0,
                3,
                "syntax error in main.rs",
                None,
                Failed,
                &[TaskFailed],
                true,
            ),
            (
                Running,
                0,
                3,
                "syntax error",
                Some(Retryable),
                Pending,
                &[TaskRetried],
                false,
            ),
            (Running, 0, 3, "timeout", Some(Permanent), Failed, &[TaskFailed], true),
        ];
        for (status, spent, max, message, class, want, events, cascades) in cases {
            let t = task(status, spent, max);
            let tr = on_failure(&t, &failure(t.attempt, message, class), &mut rng()).unwrap();
            assert_eq!(tr.change.status(), want, "{message} {class:?}");
            assert_eq!(types(&tr), events);
            assert_eq!(tr.dependents.cancelled().is_some(), cascades);
            assert_eq!(tr.revoke, None, "the reporter knows its attempt ended");
        }
        // A candidate failing for good, or cancelled, releases the task
        // choosing among the candidates instead.
        let candidate = Task {
            candidate: Some((Uuid::now_v7(), 2)),
            ..task(Running, 3, 3)
        };
        let failed = on_failure(
            &candidate,
            &failure(candidate.attempt, "oops", Some(Permanent)),
            &mut rng(),
        )
        .unwrap();
        assert_eq!(
            (failed.change.status(), failed.dependents),
            (Failed, Dependents::Released)
        );
        assert_eq!(
            on_cancel(&candidate, "enough").unwrap().dependents,
            Dependents::Released
        );
    }

    fn failure(attempt: i32, message: &str, class: Option<ErrorClass>) -> Failure {
        Failure {
            attempt,
            message: message.to_owned(),
            class,
            usage: None,
            retry_after: None,
        }
    }

    #[test]
    fn a_retry_waits_until_the_agent_says_it_can_help() {
        let t = task(TaskStatus::Running, 0, 3);
        let report = |secs: u64| Failure {
            retry_after: Some(Duration::from_secs(secs)),
            ..failure(t.attempt, "rate limited", Some(ErrorClass::Retryable))
        };
        let tr = on_failure(&t, &report(90), &mut rng()).unwrap();
        let Change::Retry { delay, .. } = tr.change else {
            panic!()
        };
        assert_eq!(delay, Duration::from_secs(90));
        let Event::TaskRetried(e) = &tr.events[0].event else {
            panic!()
        };
        assert_eq!(e.delay_ms, 90_000);
        // Shorter than the backoff: the backoff stands; longer than a day: a day.
        let tr = on_failure(&t, &report(0), &mut rng()).unwrap();
        let Change::Retry { delay, .. } = tr.change else {
            panic!()
        };
        assert!(delay >= Duration::from_millis(700), "{delay:?}");
        let tr = on_failure(&t, &report(7 * 86_400), &mut rng()).unwrap();
        let Change::Retry { delay, .. } = tr.change else {
            panic!()
        };
        assert_eq!(delay, MAX_RETRY_AFTER);
    }

    #[test]
    fn an_attempts_usage_is_told_once_and_added_to_the_task() {
        let spent = Usage {
            input_tokens: 100,
            output_tokens: 20,
            cost_usd: 0.01,
            ..Default::default()
        };
        let t = task(TaskStatus::Running, 0, 1);
        let report = Failure {
            usage: Some(spent.clone()),
            ..failure(t.attempt, "connection reset", None)
        };
        let tr = on_failure(&t, &report, &mut rng()).unwrap();
        assert_eq!(tr.usage.as_ref(), Some(&spent));
        assert_eq!(tr.events[0].event.attempt_usage(), Some(&spent));
        // A reported timeout: on TASK_TIMED_OUT, not again on TASK_RETRIED.
        let tr = on_reported_timeout(&t, t.attempt, Some(spent.clone()), &mut rng()).unwrap();
        let reported: Vec<Option<&Usage>> = tr.events.iter().map(|e| e.event.attempt_usage()).collect();
        assert_eq!(reported, [Some(&spent), None]);
        // Nothing spent is nothing recorded.
        let tr = on_reported_timeout(&t, t.attempt, Some(Usage::default()), &mut rng()).unwrap();
        assert_eq!(tr.usage, None);
        assert_eq!(completed(&t, Some(Usage::default())).event.attempt_usage(), None);
    }

    #[test]
    fn an_operator_retries_finished_unsuccessful_tasks_only() {
        for status in [TaskStatus::Failed, TaskStatus::Cancelled, TaskStatus::TimedOut] {
            let t = task(status, 3, 3);
            let tr = on_manual_retry(&t, "fixed the flaky test", None).unwrap();
            assert_eq!(tr.change, Change::Reset);
            let Event::TaskRetried(e) = &tr.events[0].event else {
                panic!("{tr:?}")
            };
            assert!(e.manual);
            assert_eq!(
                (e.error.as_str(), e.retry_count, e.delay_ms),
                ("fixed the flaky test", 0, 0)
            );
        }
        for status in [TaskStatus::Pending, TaskStatus::Running, TaskStatus::Completed] {
            assert!(matches!(
                on_manual_retry(&task(status, 0, 3), "", None),
                Err(DomainError::IllegalTransition { .. })
            ));
        }
        let dep = Uuid::now_v7();
        assert!(matches!(
            on_manual_retry(&task(TaskStatus::Cancelled, 0, 3), "", Some((dep, TaskStatus::Failed))),
            Err(DomainError::DependencyEnded { id, .. }) if id == dep
        ));
    }

    #[test]
    fn dependents_come_back_unless_something_else_they_wait_for_ended() {
        let (root, a, b, c, x) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
            Uuid::from_u128(5),
        );
        use TaskStatus::*;
        // root -> a -> b; c waits for root and for x, which failed on its own.
        let candidates = vec![
            (a, vec![(root, Failed)]),
            (b, vec![(a, Cancelled)]),
            (c, vec![(root, Failed), (x, Failed)]),
        ];
        assert_eq!(restorable(root, &candidates), [a, b]);
        // With a blocked, b (waiting for a) stays too.
        let candidates = vec![(a, vec![(root, Failed), (x, Cancelled)]), (b, vec![(a, Cancelled)])];
        assert!(restorable(root, &candidates).is_empty());
    }

    #[test]
    fn a_retry_waits_the_backoff_its_event_tells() {
        let t = task(TaskStatus::Running, 2, 5);
        let tr = on_failure(&t, &failure(2, "connection reset", None), &mut rng()).unwrap();
        let Change::Retry { delay, class, .. } = &tr.change else {
            panic!("{tr:?}")
        };
        let (low, high) = backoff::bounds(2);
        assert!(*delay >= low.saturating_sub(Duration::from_millis(1)) && *delay <= high);
        assert_eq!(*class, ErrorClass::Retryable);
        let Event::TaskRetried(e) = &tr.events[0].event else {
            panic!()
        };
        assert_eq!(e.delay_ms as u128, delay.as_millis());
        assert_eq!((e.retry_count, e.max_retries), (3, 5));
    }

    #[test]
    fn reports_of_other_attempts_and_finished_tasks_are_refused() {
        let t = task(TaskStatus::Running, 0, 3);
        assert!(matches!(
            on_failure(&t, &failure(1, "x", None), &mut rng()),
            Err(DomainError::StaleAttempt {
                reported: 1,
                current: 2,
                ..
            })
        ));
        let done = task(TaskStatus::Completed, 0, 3);
        assert!(matches!(
            on_failure(&done, &failure(2, "x", None), &mut rng()),
            Err(DomainError::IllegalTransition { .. })
        ));
    }

    #[test]
    fn timeouts_record_the_timeout_then_retry_or_fail() {
        let t = task(TaskStatus::Running, 0, 1);
        let tr = on_timeout(&t, &mut rng()).unwrap();
        assert_eq!(types(&tr), [EventType::TaskTimedOut, EventType::TaskRetried]);
        assert_eq!(tr.change.status(), TaskStatus::Pending);
        assert_eq!(
            tr.revoke.as_ref().map(|r| r.attempt),
            Some(2),
            "the holder is told to stop"
        );
        let out = task(TaskStatus::Running, 1, 1);
        let tr = on_timeout(&out, &mut rng()).unwrap();
        assert_eq!(types(&tr), [EventType::TaskTimedOut, EventType::TaskFailed]);
        assert_eq!(
            tr.change,
            Change::Fail {
                error: "timed out after 30 s".into(),
                class: ErrorClass::Retryable
            }
        );
        assert!(on_timeout(&task(TaskStatus::Assigned, 0, 1), &mut rng()).is_err());
    }

    #[test]
    fn a_timeout_the_agent_reports_is_a_timeout_with_nobody_to_stop() {
        let t = task(TaskStatus::Running, 0, 1);
        let tr = on_reported_timeout(&t, t.attempt, None, &mut rng()).unwrap();
        assert_eq!(types(&tr), [EventType::TaskTimedOut, EventType::TaskRetried]);
        assert_eq!(tr.revoke, None);
        assert!(matches!(
            on_reported_timeout(&t, t.attempt - 1, None, &mut rng()),
            Err(DomainError::StaleAttempt { .. })
        ));
        let out = task(TaskStatus::Running, 1, 1);
        let tr = on_reported_timeout(&out, out.attempt, None, &mut rng()).unwrap();
        assert_eq!(types(&tr), [EventType::TaskTimedOut, EventType::TaskFailed]);
    }

    #[test]
    fn cancellation_tells_the_holder_and_cascades() {
        for status in [TaskStatus::Pending, TaskStatus::Assigned, TaskStatus::Running] {
            let t = task(status, 0, 3);
            let tr = on_cancel(&t, "").unwrap();
            assert_eq!(
                tr.change,
                Change::Cancel {
                    reason: "cancelled".into()
                }
            );
            assert_eq!(tr.revoke.is_some(), status != TaskStatus::Pending);
            assert_eq!(
                tr.dependents.cancelled(),
                Some(format!("dependency {} was cancelled: cancelled", t.id).as_str())
            );
            let Event::TaskCancelled(e) = &tr.events[0].event else {
                panic!()
            };
            assert_eq!(e.previous_status, status);
        }
        assert!(on_cancel(&task(TaskStatus::Failed, 0, 3), "x").is_err());
    }

    #[test]
    fn a_stale_agents_work_is_retried_or_failed() {
        let agent = Uuid::now_v7();
        let tr = on_stale_agent(&task(TaskStatus::Assigned, 0, 3), agent, &mut rng()).unwrap();
        assert_eq!(tr.change.status(), TaskStatus::Pending);
        assert!(tr.revoke.is_some());
        let tr = on_stale_agent(&task(TaskStatus::Running, 3, 3), agent, &mut rng()).unwrap();
        assert_eq!(tr.change.status(), TaskStatus::Failed);
        assert!(on_stale_agent(&task(TaskStatus::Pending, 0, 3), agent, &mut rng()).is_err());
    }

    #[test]
    fn unapplied_reports_are_explained() {
        let running = task(TaskStatus::Running, 0, 3);
        // A retried StartTask that already took effect succeeds again.
        assert_eq!(explain_report(&running, 2, Action::Start), Ok(()));
        assert!(matches!(
            explain_report(&running, 1, Action::Start),
            Err(DomainError::StaleAttempt { .. })
        ));
        assert!(matches!(
            explain_report(&task(TaskStatus::Pending, 0, 3), 2, Action::Complete),
            Err(DomainError::IllegalTransition { .. })
        ));
        assert!(matches!(
            explain_report(&task(TaskStatus::Assigned, 0, 3), 2, Action::Start),
            Err(DomainError::Concurrent { .. })
        ));
    }

    #[test]
    fn only_completed_dependencies_are_met_and_ended_ones_refuse_the_batch() {
        let (done, open, failed) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let task = |deps: Vec<Uuid>| NewTask {
            id: Uuid::now_v7(),
            ticket_id: None,
            title: "t".into(),
            description: String::new(),
            phase: crate::Phase::Initial,
            priority: 0,
            depends_on: deps,
            max_retries: 3,
            timeout_seconds: 0,
            concurrency_key: None,
            session: None,
            requires: Default::default(),
            candidate: None,
            lands_candidate: false,
        };
        let batch = [task(vec![done]), task(vec![open, failed])];
        let met = met_dependencies(&batch[..1], &[(done, TaskStatus::Completed)]).unwrap();
        assert_eq!(met, HashSet::from([done]));
        let running = met_dependencies(&batch, &[(done, TaskStatus::Completed), (open, TaskStatus::Running)]);
        assert_eq!(running.unwrap(), HashSet::from([done]));
        for ended in [TaskStatus::Failed, TaskStatus::Cancelled, TaskStatus::TimedOut] {
            let err = met_dependencies(&batch, &[(failed, ended)]).unwrap_err();
            assert_eq!(
                err.to_string(),
                format!("tasks[1].depends_on[1]: dependency {failed} is {ended} and will never complete")
            );
        }
    }
}
