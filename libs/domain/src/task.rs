//! The task state machine.

use std::fmt;
use std::str::FromStr;

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::error::DomainError;

/// Status of a task; the string forms are the values stored in PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TaskStatus {
    Pending,
    Assigned,
    Running,
    Completed,
    Failed,
    TimedOut,
    Cancelled,
}

impl TaskStatus {
    pub const ALL: [TaskStatus; 7] = [
        TaskStatus::Pending,
        TaskStatus::Assigned,
        TaskStatus::Running,
        TaskStatus::Completed,
        TaskStatus::Failed,
        TaskStatus::TimedOut,
        TaskStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TaskStatus::Pending => "pending",
            TaskStatus::Assigned => "assigned",
            TaskStatus::Running => "running",
            TaskStatus::Completed => "completed",
            TaskStatus::Failed => "failed",
            TaskStatus::TimedOut => "timed_out",
            TaskStatus::Cancelled => "cancelled",
        }
    }

    /// Ended without completing (failed, timed out or cancelled): what an
    /// operator's retry takes back, and what keeps a dependent from ever
    /// being ready.
    pub fn ended_unsuccessfully(self) -> bool {
        matches!(self, TaskStatus::Failed | TaskStatus::TimedOut | TaskStatus::Cancelled)
    }

    /// Final unless the task is retried: by the queue after a retryable
    /// failure, or by an operator (RetryTask).
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            TaskStatus::Completed | TaskStatus::Failed | TaskStatus::TimedOut | TaskStatus::Cancelled
        )
    }
}

impl fmt::Display for TaskStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for TaskStatus {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or_else(|| format!("unknown task status {s:?}"))
    }
}

/// A task as the queue keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct Task {
    pub id: Uuid,
    /// Insertion order; the cursor of listings and the tie-break of claims.
    pub seq: i64,
    pub ticket_id: Option<Uuid>,
    pub title: String,
    pub description: String,
    pub phase: Phase,
    pub priority: i32,
    pub status: TaskStatus,
    /// Dependencies not completed yet; ready at zero.
    pub unmet_deps: i32,
    pub retry_count: i32,
    pub max_retries: i32,
    /// 0 = no timeout.
    pub timeout_seconds: i32,
    /// Bumped by every assignment; reports name the attempt they are about.
    pub attempt: i32,
    pub assigned_agent_id: Option<Uuid>,
    pub error_message: Option<String>,
    pub error_class: Option<ErrorClass>,
    pub result: Option<Value>,
    /// What its attempts spent, summed; `None` until one reported usage.
    pub usage: Option<crate::usage::Usage>,
    /// What its completed attempt left on the ticket's branch.
    pub git: Option<crate::git::GitChange>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub completed_at: Option<DateTime<Utc>>,
    pub next_attempt_at: DateTime<Utc>,
    /// The `traceparent` of the request that enqueued it.
    pub trace_context: Option<String>,
    pub depends_on: Vec<Uuid>,
    /// Tasks sharing a key run no more at once than the key's limit.
    pub concurrency_key: Option<String>,
    /// The agent session its attempts last recorded (or the one a
    /// follow-up continues).
    pub session: Option<crate::session::AgentSession>,
    /// Labels an agent must carry to be handed it; empty: any.
    pub requires: crate::routing::Labels,
    /// A candidate attempt at this task, and its number (from 1).
    pub candidate: Option<(Uuid, i32)>,
    /// Lands the candidate it depends on in place of the one chosen.
    pub lands_candidate: bool,
}

impl Task {
    /// Refuses a report about any attempt but the current one.
    pub fn check_attempt(&self, reported: i32) -> Result<(), DomainError> {
        if self.attempt != reported {
            return Err(DomainError::StaleAttempt {
                task_id: self.id,
                reported,
                current: self.attempt,
            });
        }
        Ok(())
    }

    /// Whether another retry is allowed.
    pub fn retries_left(&self) -> bool {
        self.retry_count < self.max_retries
    }
}

/// What can happen to a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// The dispatcher hands the task to an agent.
    Assign,
    /// The agent starts its attempt.
    Start,
    /// The agent's attempt succeeded.
    Complete,
    /// The attempt failed; with retries left the task goes back to pending.
    Fail {
        retry: bool,
    },
    /// The attempt ran past its deadline; with retries left it goes back to pending.
    TimeOut {
        retry: bool,
    },
    /// An assigned task whose agent went away before starting it.
    Requeue,
    /// A stale agent's task is taken back (counted as a retry).
    Reclaim,
    Cancel,
    /// An operator sends a finished, unsuccessful task round again.
    Retry,
    /// The agent extends a running attempt's lease (the status stays).
    ExtendLease,
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Action::Assign => "assign",
            Action::Start => "start",
            Action::Complete => "complete",
            Action::Fail { .. } => "fail",
            Action::TimeOut { .. } => "time out",
            Action::Requeue => "requeue",
            Action::Reclaim => "reclaim",
            Action::Cancel => "cancel",
            Action::Retry => "retry",
            Action::ExtendLease => "extend the lease of",
        })
    }
}

impl TaskStatus {
    /// The status after `action`, or why it is illegal.
    pub fn apply(self, action: Action) -> Result<TaskStatus, DomainError> {
        use Action as A;
        use TaskStatus as S;
        let next = match (self, action) {
            (S::Pending, A::Assign) => S::Assigned,
            (S::Assigned, A::Start) => S::Running,
            (S::Running, A::Complete) => S::Completed,
            (S::Assigned | S::Running, A::Fail { retry: true }) => S::Pending,
            (S::Assigned | S::Running, A::Fail { retry: false }) => S::Failed,
            (S::Running, A::TimeOut { retry: true }) => S::Pending,
            (S::Running, A::TimeOut { retry: false }) => S::Failed,
            (S::Assigned, A::Requeue) => S::Pending,
            (S::Assigned | S::Running, A::Reclaim) => S::Pending,
            (S::Pending | S::Assigned | S::Running, A::Cancel) => S::Cancelled,
            (from, A::Retry) if from.ended_unsuccessfully() => S::Pending,
            (S::Running, A::ExtendLease) => S::Running,
            (from, action) => return Err(DomainError::IllegalTransition { from, action }),
        };
        Ok(next)
    }
}

/// Development phase of a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Initial,
    Implementation,
    Integration,
    Refactoring,
}

impl Phase {
    pub const ALL: [Phase; 4] = [
        Phase::Initial,
        Phase::Implementation,
        Phase::Integration,
        Phase::Refactoring,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Initial => "PHASE_INITIAL",
            Phase::Implementation => "PHASE_IMPLEMENTATION",
            Phase::Integration => "PHASE_INTEGRATION",
            Phase::Refactoring => "PHASE_REFACTORING",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == s)
    }

    /// Its name in a sentence: `implementation`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Initial => "initial",
            Phase::Implementation => "implementation",
            Phase::Integration => "integration",
            Phase::Refactoring => "refactoring",
        }
    }
}

/// How a failure is treated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ErrorClass {
    Retryable,
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "retryable" => Some(ErrorClass::Retryable),
            "permanent" => Some(ErrorClass::Permanent),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACTIONS: [Action; 12] = [
        Action::Assign,
        Action::Start,
        Action::Complete,
        Action::Fail { retry: true },
        Action::Fail { retry: false },
        Action::TimeOut { retry: true },
        Action::TimeOut { retry: false },
        Action::Requeue,
        Action::Reclaim,
        Action::Cancel,
        Action::Cancel,
        Action::Retry,
    ];

    /// Every legal transition; anything not listed must be refused.
    fn legal() -> Vec<(TaskStatus, Action, TaskStatus)> {
        use Action as A;
        use TaskStatus as S;
        vec![
            (S::Pending, A::Assign, S::Assigned),
            (S::Pending, A::Cancel, S::Cancelled),
            (S::Assigned, A::Start, S::Running),
            (S::Assigned, A::Fail { retry: true }, S::Pending),
            (S::Assigned, A::Fail { retry: false }, S::Failed),
            (S::Assigned, A::Requeue, S::Pending),
            (S::Assigned, A::Reclaim, S::Pending),
            (S::Assigned, A::Cancel, S::Cancelled),
            (S::Running, A::Complete, S::Completed),
            (S::Running, A::Fail { retry: true }, S::Pending),
            (S::Running, A::Fail { retry: false }, S::Failed),
            (S::Running, A::TimeOut { retry: true }, S::Pending),
            (S::Running, A::TimeOut { retry: false }, S::Failed),
            (S::Running, A::Reclaim, S::Pending),
            (S::Running, A::Cancel, S::Cancelled),
            (S::Failed, A::Retry, S::Pending),
            (S::TimedOut, A::Retry, S::Pending),
            (S::Cancelled, A::Retry, S::Pending),
        ]
    }

    #[test]
    fn every_transition_is_legal_or_refused_as_listed() {
        let legal = legal();
        for from in TaskStatus::ALL {
            for action in ACTIONS {
                let expected = legal
                    .iter()
                    .find(|(f, a, _)| *f == from && *a == action)
                    .map(|(_, _, to)| *to);
                match (from.apply(action), expected) {
                    (Ok(to), Some(want)) => assert_eq!(to, want, "{from} --{action}-->"),
                    (Err(DomainError::IllegalTransition { from: f, action: a }), None) => {
                        assert_eq!((f, a), (from, action))
                    }
                    (got, want) => panic!("{from} --{action}--> got {got:?}, want {want:?}"),
                }
            }
        }
    }

    #[test]
    fn terminal_states_accept_nothing_but_an_operators_retry() {
        for from in TaskStatus::ALL.into_iter().filter(|s| s.is_terminal()) {
            for action in ACTIONS.into_iter().filter(|a| *a != Action::Retry) {
                assert!(from.apply(action).is_err(), "{from} accepted {action}");
            }
        }
        assert!(TaskStatus::Completed.apply(Action::Retry).is_err());
    }

    #[test]
    fn status_round_trips_through_strings() {
        for s in TaskStatus::ALL {
            assert_eq!(s.as_str().parse::<TaskStatus>(), Ok(s));
        }
        assert!("done".parse::<TaskStatus>().is_err());
    }

    #[test]
    fn phases_and_error_classes_round_trip() {
        for p in Phase::ALL {
            assert_eq!(Phase::parse(p.as_str()), Some(p));
        }
        for c in [ErrorClass::Retryable, ErrorClass::Permanent] {
            assert_eq!(ErrorClass::parse(c.as_str()), Some(c));
        }
    }
}
