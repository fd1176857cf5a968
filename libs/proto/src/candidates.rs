//! A best-of-N step as the queue's tasks show it: read the same way by the
//! ticket service (which checks a person's choice) and the executor (which
//! lands it).

use crate::common::TaskStatus;
use crate::taskqueue::Task;

/// A step run as candidates: the task choosing among them, its candidates
/// (by number), and the tasks that landed another of them since (people's
/// choices, oldest first).
#[derive(Debug, Clone)]
pub struct Step<'a> {
    pub chooser: &'a Task,
    pub candidates: Vec<&'a Task>,
    pub choices: Vec<&'a Task>,
}

impl<'a> Step<'a> {
    /// The step whose choosing task is `chooser_id`, among a ticket's
    /// tasks; None when that task chooses among no candidates.
    pub fn of(tasks: &'a [Task], chooser_id: &str) -> Option<Step<'a>> {
        let chooser = tasks.iter().find(|t| t.id == chooser_id)?;
        let mut candidates: Vec<&Task> = tasks.iter().filter(|t| t.candidate_of == chooser.id).collect();
        if candidates.is_empty() {
            return None;
        }
        candidates.sort_by_key(|t| t.candidate);
        let lands_one = |t: &&Task| {
            t.lands_candidate
                && t.depends_on
                    .first()
                    .is_some_and(|d| candidates.iter().any(|c| &c.id == d))
        };
        let choices = tasks.iter().filter(lands_one).collect();
        Some(Step {
            chooser,
            candidates,
            choices,
        })
    }

    /// The candidate numbered `index`.
    pub fn candidate(&self, index: i32) -> Option<&'a Task> {
        self.candidates.iter().copied().find(|t| t.candidate == index)
    }

    /// What is on the ticket's branch of the step: the last of its choosing
    /// task and people's choices that completed landing a candidate, and
    /// that candidate's number; None when none landed one.
    pub fn landed(&self) -> Option<(&'a Task, i32)> {
        std::iter::once(self.chooser)
            .chain(self.choices.iter().copied())
            .filter(|t| t.status == TaskStatus::Completed as i32)
            .filter_map(|t| chosen(t).map(|n| (t, n)))
            .max_by_key(|(t, _)| t.completed_at.as_ref().map(|c| (c.seconds, c.nanos)))
    }

    /// A person's choice of the step that has not ended yet.
    pub fn under_way(&self) -> Option<&'a Task> {
        self.choices.iter().copied().find(|t| {
            matches!(
                TaskStatus::try_from(t.status),
                Ok(TaskStatus::Pending | TaskStatus::Assigned | TaskStatus::Running)
            )
        })
    }
}

/// The candidate a choosing task (or a person's choice) landed, as its
/// result records it.
pub fn chosen(task: &Task) -> Option<i32> {
    let result = task.result.as_ref().map(crate::convert::struct_to_json)?;
    result
        .pointer("/selection/chosen")
        .and_then(serde_json::Value::as_i64)
        .and_then(|n| i32::try_from(n).ok())
}
