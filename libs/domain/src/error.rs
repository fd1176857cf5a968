use std::fmt;

use uuid::Uuid;

// The domain's one error names the task states a transition was refused
// in, and the state machine in task.rs returns it: the two modules import
// each other by design (the error is the state machine's vocabulary).
use crate::task::{Action, TaskStatus};

/// A refused request field: which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Path of the field in the request, e.g. `tasks[2].title`.
    pub field: String,
    pub reason: String,
}

impl FieldError {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DomainError {
    #[error("invalid argument {0}")]
    InvalidArgument(FieldError),
    #[error("illegal transition: cannot {action} a task that is {from}")]
    IllegalTransition { from: TaskStatus, action: Action },
    #[error("invalid argument {field}: dependency cycle through {}", format_ids(members))]
    Cycle { field: String, members: Vec<Uuid> },
    #[error("attempt {reported} of task {task_id} is not current (current attempt is {current})")]
    StaleAttempt { task_id: Uuid, reported: i32, current: i32 },
    #[error("task {task_id} changed concurrently; it is now {status}")]
    Concurrent { task_id: Uuid, status: TaskStatus },
    #[error("{field}: dependency {id} is {status} and will never complete")]
    DependencyEnded {
        field: String,
        id: Uuid,
        status: TaskStatus,
    },
}

impl DomainError {
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self::InvalidArgument(FieldError::new(field, reason))
    }
}

fn format_ids(ids: &[Uuid]) -> String {
    ids.iter().map(Uuid::to_string).collect::<Vec<_>>().join(" -> ")
}
