//! What the agent is told: its task, its ticket, where it stands on the
//! ticket's branch, and what the work it builds on did.

use omoi_domain::{GitChange, Phase};
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue as tq;
use omoi_proto::ticket as tk;

use crate::git::Checkout;

/// Longest dependency summary a prompt quotes.
const MAX_SUMMARY_CHARS: usize = 4000;

/// What an attempt needs of its ticket.
#[derive(Debug, Clone, Default)]
pub struct TicketContext {
    pub title: String,
    pub description: String,
    pub repository: String,
    pub base_ref: String,
    pub branch: String,
    /// What it may still spend, when it has a budget.
    pub budget_left_usd: Option<f64>,
    /// The phases a person approved before they started.
    pub approvals: Vec<Approval>,
    /// The project's check, run after the agent's work; empty: none.
    pub check_command: String,
    /// The guardian's thresholds for the ticket, where they differ.
    pub guardian: omoi_domain::guardian::Overrides,
}

/// A person's approval of a phase: who, what they said, and the changes
/// they asked for before.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Approval {
    pub phase: Option<Phase>,
    pub by: String,
    pub comment: String,
    pub changes_requested: Vec<String>,
}

impl From<tk::Ticket> for TicketContext {
    fn from(t: tk::Ticket) -> Self {
        let spent = t.usage.as_ref().map_or(0.0, |u| u.cost_usd);
        let approved = tk::GateState::Approved as i32;
        let approvals = t
            .gates
            .iter()
            .filter(|g| g.state == approved)
            .map(|g| Approval {
                phase: Phase::given(g.phase).known(),
                by: g.decided_by.clone(),
                comment: g.comment.clone(),
                changes_requested: g.change_requests.iter().map(|r| r.comment.clone()).collect(),
            })
            .collect();
        // Checked when the ticket was made.
        let guardian = omoi_proto::domain::guardian_overrides("guardian", t.guardian.as_ref()).unwrap_or_default();
        TicketContext {
            guardian,
            approvals,
            budget_left_usd: t.max_cost_usd.map(|max| max - spent),
            title: t.title,
            description: t.description,
            repository: t.repository,
            base_ref: t.base_ref,
            branch: t.branch,
            check_command: t.check_command,
        }
    }
}

/// A completed dependency, as the prompt and the base commit need it.
#[derive(Debug, Clone)]
pub struct Dependency {
    pub title: String,
    pub phase: String,
    pub summary: String,
    pub changed_files: Vec<String>,
    pub git: Option<GitChange>,
}

impl From<tq::Task> for Dependency {
    fn from(dep: tq::Task) -> Self {
        let result = dep.result.as_ref().map(omoi_proto::convert::struct_to_json);
        let field = |name: &str| result.as_ref().and_then(|r| r.get(name)).cloned();
        Dependency {
            phase: phase_name(dep.phase),
            summary: field("summary")
                .and_then(|v| v.as_str().map(|s| s.chars().take(MAX_SUMMARY_CHARS).collect()))
                .unwrap_or_default(),
            changed_files: field("changed_files")
                .and_then(|v| serde_json::from_value(v).ok())
                .unwrap_or_default(),
            git: dep.git.map(GitChange::from),
            title: dep.title,
        }
    }
}

/// The prompt of `task` (in `phase`) of `ticket`, checked out at
/// `checkout` (when the ticket names a repository), after `dependencies`.
pub fn prompt(
    task: &tq::Task,
    phase: Phase,
    ticket: &TicketContext,
    dependencies: &[Dependency],
    checkout: Option<&Checkout>,
) -> String {
    let mut p = format!(
        "# {}\n\nPhase: {}\nTask: {}\nTicket: {}\n\n{}\n",
        task.title,
        phase.as_str(),
        task.id,
        task.ticket_id,
        task.description
    );
    if !ticket.title.is_empty() && !task.description.contains(&ticket.title) {
        p.push_str(&format!(
            "\n## The ticket: {}\n\n{}\n",
            ticket.title, ticket.description
        ));
    }
    if let Some(c) = checkout {
        p.push_str(&format!(
            "\n## Repository\n\nThis directory is the ticket's repository, on branch `{}` at commit {}. \
             Everything you change here is committed to that branch for you when you finish.\n",
            c.branch, c.base_commit
        ));
    }
    if !ticket.check_command.is_empty() {
        p.push_str(&format!(
            "\n## The project's check\n\nOnce your work is committed, this is run in this directory and \
             its result is recorded with your work; make it pass:\n\n```sh\n{}\n```\n",
            ticket.check_command
        ));
    }
    if let Some(a) = ticket.approvals.iter().find(|a| a.phase == Some(phase)) {
        p.push_str(&format!(
            "\n## Approved by {}\n\nA person looked at the work this phase builds on and approved it",
            a.by
        ));
        if a.comment.is_empty() {
            p.push_str(".\n");
        } else {
            p.push_str(&format!(", saying:\n\n{}\n", a.comment));
        }
        if !a.changes_requested.is_empty() {
            p.push_str("\nBefore approving, they asked for these changes (made since, on the branch):\n");
            for c in &a.changes_requested {
                p.push_str(&format!("- {}\n", c.replace('\n', "\n  ")));
            }
        }
    }
    if !dependencies.is_empty() {
        p.push_str("\n## Work this task builds on\n");
        for dep in dependencies {
            p.push_str(&format!("\n### {} ({})\n\n", dep.title, dep.phase));
            if let Some(g) = &dep.git {
                let what = if g.commit != g.base_commit {
                    "Commit"
                } else {
                    "No change; at commit"
                };
                p.push_str(&format!("{what}: {}\n", g.commit));
            }
            if !dep.changed_files.is_empty() {
                p.push_str(&format!("Changed files: {}\n", dep.changed_files.join(", ")));
            }
            if !dep.summary.is_empty() {
                p.push_str(&format!("Summary:\n{}\n", dep.summary));
            }
        }
    }
    p
}

/// What a resumed session is told when an earlier attempt of its task
/// stopped before the end: it knows the task already.
pub fn continuation(task: &tq::Task, checkout: Option<&Checkout>) -> String {
    let why = if task.error_message.is_empty() {
        "it was interrupted".to_owned()
    } else {
        format!(
            "it ended with: {}",
            task.error_message.chars().take(2000).collect::<String>()
        )
    };
    let mut p = format!(
        "Your previous run on this task stopped before it finished ({why}). \
         Your work so far is in this directory. Continue the task \"{}\" from where you left off, and finish it.\n",
        task.title
    );
    if let Some(c) = checkout {
        p.push_str(&format!(
            "\nThe directory is on branch `{}`, based on commit {}; what you change is committed for you when you finish.\n",
            c.branch, c.base_commit
        ));
        if !c.pushed_since.is_empty() {
            p.push_str(
                "\nSince your earlier work, these commits were pushed to the branch (they are in this directory; \
                 keep them):\n",
            );
            for line in &c.pushed_since {
                p.push_str(&format!("- {line}\n"));
            }
        }
    }
    p
}

/// What a new session is told of an earlier attempt of its task that it
/// cannot take up: how it ended and what it had changed (its work is not
/// in the directory).
pub fn earlier_attempt(task: &tq::Task, changed: &[String], diff: &str) -> String {
    let mut p = String::from("\n## An earlier attempt\n\nAn earlier attempt at this task stopped before it finished");
    if !task.error_message.is_empty() {
        let error: String = task.error_message.chars().take(2000).collect();
        p.push_str(&format!(" ({error})"));
    }
    p.push_str(". This directory is a fresh start; none of its work is here.\n");
    if !changed.is_empty() {
        p.push_str(&format!("It had changed: {}\n", changed.join(", ")));
    }
    if !diff.is_empty() {
        p.push_str(&format!(
            "\nIts changes, against this directory:\n\n```diff\n{diff}```\n"
        ));
    }
    p
}

/// What a resumed session is told by a follow-up: the message, on the
/// work it did before (committed to the branch it is on).
pub fn follow_up(task: &tq::Task, checkout: Option<&Checkout>) -> String {
    let mut p = String::from("A follow-up on the work you did in this session:\n\n");
    p.push_str(&task.description);
    p.push('\n');
    if let Some(c) = checkout {
        p.push_str(&format!(
            "\nThis directory is the ticket's repository on branch `{}` at commit {}, with your earlier work \
             committed. What you change now is committed to that branch for you when you finish.\n",
            c.branch, c.base_commit
        ));
    }
    p
}

/// `implementation` for PHASE_IMPLEMENTATION.
pub fn phase_name(wire: i32) -> String {
    Phase::given(wire)
        .known()
        .map(|p| p.as_str().trim_start_matches("PHASE_").to_ascii_lowercase())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_approved_phase_is_told_what_the_person_said() {
        let ticket = tk::Ticket {
            title: "Add login".into(),
            gates: vec![tk::ApprovalGate {
                phase: Phase::Implementation.wire(),
                state: tk::GateState::Approved.into(),
                decided_by: "ada".into(),
                comment: "Keep the session table.".into(),
                change_requests: vec![tk::ChangeRequest {
                    comment: "Use argon2,\nnot bcrypt.".into(),
                    ..Default::default()
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        let ctx = TicketContext::from(ticket);
        let task = tq::Task {
            title: "Implement".into(),
            ..Default::default()
        };
        let p = prompt(&task, Phase::Implementation, &ctx, &[], None);
        assert!(
            p.contains("## Approved by ada\n\nA person looked at the work this phase builds on and approved it, saying:\n\nKeep the session table.\n"),
            "{p}"
        );
        assert!(p.contains("- Use argon2,\n  not bcrypt.\n"), "{p}");
        // Another phase is not told.
        let other = prompt(&task, Phase::Integration, &ctx, &[], None);
        assert!(!other.contains("Approved by"), "{other}");
        assert!(!other.contains("check"), "{other}");
    }

    #[test]
    fn the_agent_is_told_the_projects_check() {
        let ctx = TicketContext::from(tk::Ticket {
            repository: "https://example.com/acme/app".into(),
            check_command: "cargo test --workspace".into(),
            ..Default::default()
        });
        let task = tq::Task {
            title: "Implement".into(),
            ..Default::default()
        };
        let p = prompt(&task, Phase::Implementation, &ctx, &[], None);
        assert!(p.contains("## The project's check\n"), "{p}");
        assert!(p.contains("```sh\ncargo test --workspace\n```\n"), "{p}");
    }
}
