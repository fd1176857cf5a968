//! Every conversion between the API's messages and the domain's types.
//! Enumerations map by name onto the generated enums, so no wire number is
//! written anywhere but the `.proto` files.

use std::collections::HashMap;

use omoi_domain::gate::{Gate, GateState};
use omoi_domain::rules::{Limit, Pause};
use omoi_domain::validate::{Given, NewTask};
use omoi_domain::{
    Agent, AgentSession, AgentStatus, ErrorClass, GitChange, Phase, Task, TaskStatus, Ticket, TicketStatus, Usage,
};
use serde_json::Value;

use crate::common as c;
use crate::convert::{json_to_struct, timestamp};
use crate::{health, taskqueue, ticket};

/// A domain enumeration that travels as a protobuf enum field (an `i32`).
pub trait WireEnum: Sized + Copy {
    /// The field's value.
    fn wire(self) -> i32;
    /// A field's value as the request gave it: UNSPECIFIED is missing, a
    /// number this version does not know stays unknown.
    fn given(value: i32) -> Given<Self>;
}

macro_rules! wire_enums {
    ($($name:ident { $($variant:ident),+ $(,)? })+) => {$(
        impl From<$name> for c::$name {
            fn from(v: $name) -> Self {
                match v {
                    $($name::$variant => c::$name::$variant,)+
                }
            }
        }

        impl WireEnum for $name {
            fn wire(self) -> i32 {
                c::$name::from(self).into()
            }

            fn given(value: i32) -> Given<Self> {
                match c::$name::try_from(value) {
                    Ok(c::$name::Unspecified) => Given::Missing,
                    $(Ok(c::$name::$variant) => Given::Known($name::$variant),)+
                    #[allow(unreachable_patterns)]
                    _ => Given::Unknown(value),
                }
            }
        }
    )+};
}

wire_enums! {
    TaskStatus { Pending, Assigned, Running, Completed, Failed, TimedOut, Cancelled }
    Phase { Initial, Implementation, Integration, Refactoring }
    ErrorClass { Retryable, Permanent }
    TicketStatus { Open, InProgress, Paused, AwaitingApproval, Completed, Failed, Cancelled }
    AgentStatus { Healthy, Stale, Deregistered }
}

/// The API's `map<string, string>` labels from the stored JSON object.
fn labels(value: &Value) -> HashMap<String, String> {
    match value {
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
            .collect(),
        _ => HashMap::new(),
    }
}

fn id_or_empty(id: Option<uuid::Uuid>) -> String {
    id.map(|id| id.to_string()).unwrap_or_default()
}

impl From<&Task> for taskqueue::Task {
    fn from(t: &Task) -> Self {
        taskqueue::Task {
            id: t.id.to_string(),
            ticket_id: id_or_empty(t.ticket_id),
            title: t.title.clone(),
            description: t.description.clone(),
            phase: t.phase.wire(),
            priority: t.priority,
            status: t.status.wire(),
            depends_on: t.depends_on.iter().map(ToString::to_string).collect(),
            retry_count: t.retry_count,
            max_retries: t.max_retries,
            timeout_seconds: t.timeout_seconds,
            attempt: t.attempt,
            assigned_agent_id: id_or_empty(t.assigned_agent_id),
            result: t.result.as_ref().map(json_to_struct),
            error_message: t.error_message.clone().unwrap_or_default(),
            error_class: t.error_class.map_or(c::ErrorClass::Unspecified.into(), WireEnum::wire),
            created_at: Some(timestamp(t.created_at)),
            updated_at: Some(timestamp(t.updated_at)),
            started_at: t.started_at.map(timestamp),
            completed_at: t.completed_at.map(timestamp),
            next_attempt_at: Some(timestamp(t.next_attempt_at)),
            unmet_dependencies: t.unmet_deps,
            usage: t.usage.as_ref().map(c::Usage::from),
            git: t.git.as_ref().map(c::GitChange::from),
            concurrency_key: t.concurrency_key.clone().unwrap_or_default(),
            session: t.session.as_ref().map(c::AgentSession::from),
            requires: t.requires.clone().into_iter().collect(),
            candidate_of: id_or_empty(t.candidate.map(|(of, _)| of)),
            candidate: t.candidate.map_or(0, |(_, n)| n),
            candidates: omoi_domain::candidates::seen(t.result.as_ref())
                .iter()
                .map(taskqueue::Candidate::from)
                .collect(),
            lands_candidate: t.lands_candidate,
        }
    }
}

impl From<&omoi_domain::candidates::Seen> for taskqueue::Candidate {
    fn from(s: &omoi_domain::candidates::Seen) -> Self {
        taskqueue::Candidate {
            index: s.index,
            task_id: s.task_id.clone(),
            status: s
                .status
                .parse::<omoi_domain::TaskStatus>()
                .map_or(c::TaskStatus::Unspecified.into(), WireEnum::wire),
            runner: s.runner.clone(),
            model: s.model.clone(),
            check_passed: s.check_passed,
            usage: s.usage.as_ref().map(c::Usage::from),
            commit: s.commit.clone(),
            files_changed: s.files_changed,
            insertions: s.insertions,
            deletions: s.deletions,
            chosen: s.chosen,
            reason: s.reason.clone(),
        }
    }
}

impl From<&AgentSession> for c::AgentSession {
    fn from(s: &AgentSession) -> Self {
        c::AgentSession {
            runner: s.runner.clone(),
            session_id: s.session_id.clone(),
            checkpoint_at: s.checkpoint_at.map(timestamp),
            resumed_from_attempt: s.resumed_from_attempt,
            checkpoint: s.checkpoint.clone(),
            attempt: s.attempt,
            checkpoints: s.checkpoints,
            checkpoint_bytes: s.checkpoint_bytes,
            resumed_from_task_id: id_or_empty(s.resumed_from_task_id),
        }
    }
}

/// A reported session, before the domain checks it
/// (`AgentSession::validated`); an id that is no UUID is refused by name.
pub fn agent_session(field: &str, s: c::AgentSession) -> Result<AgentSession, omoi_domain::DomainError> {
    let c::AgentSession {
        runner,
        session_id,
        checkpoint_at,
        resumed_from_attempt,
        checkpoint,
        attempt,
        checkpoints,
        checkpoint_bytes,
        resumed_from_task_id,
    } = s;
    AgentSession {
        runner,
        session_id,
        checkpoint,
        checkpoint_at: checkpoint_at.as_ref().and_then(crate::convert::from_timestamp),
        attempt,
        checkpoints,
        checkpoint_bytes,
        resumed_from_attempt,
        resumed_from_task_id: omoi_domain::validate::optional_uuid(
            &format!("{field}.resumed_from_task_id"),
            &resumed_from_task_id,
        )?,
    }
    .validated(field)
}

impl From<&NewTask> for taskqueue::NewTask {
    fn from(t: &NewTask) -> Self {
        taskqueue::NewTask {
            id: t.id.to_string(),
            ticket_id: id_or_empty(t.ticket_id),
            title: t.title.clone(),
            description: t.description.clone(),
            phase: t.phase.wire(),
            priority: t.priority,
            depends_on: t.depends_on.iter().map(ToString::to_string).collect(),
            max_retries: Some(t.max_retries),
            timeout_seconds: t.timeout_seconds,
            concurrency_key: t.concurrency_key.clone().unwrap_or_default(),
            session: t.session.as_ref().map(c::AgentSession::from),
            requires: t.requires.clone().into_iter().collect(),
            candidate_of: id_or_empty(t.candidate.map(|(of, _)| of)),
            candidate: t.candidate.map_or(0, |(_, n)| n),
            lands_candidate: t.lands_candidate,
        }
    }
}

impl From<&Pause> for taskqueue::Pause {
    fn from(p: &Pause) -> Self {
        taskqueue::Pause {
            phase: p.scope.phase.map_or(0, WireEnum::wire),
            ticket_id: id_or_empty(p.scope.ticket_id),
            reason: p.reason.clone(),
            paused_at: Some(timestamp(p.paused_at)),
        }
    }
}

impl From<&Limit> for taskqueue::ConcurrencyLimit {
    fn from(l: &Limit) -> Self {
        taskqueue::ConcurrencyLimit {
            key: l.key.clone(),
            max_running: l.max_running,
            held: l.held,
            updated_at: Some(timestamp(l.updated_at)),
        }
    }
}

impl From<&GitChange> for c::GitChange {
    fn from(g: &GitChange) -> Self {
        c::GitChange {
            branch: g.branch.clone(),
            base_commit: g.base_commit.clone(),
            commit: g.commit.clone(),
            files_changed: g.files_changed,
            insertions: g.insertions,
            deletions: g.deletions,
            patch: g.patch.clone(),
            patch_truncated: g.patch_truncated,
            branch_diff: g.branch_diff.as_ref().map(|d| c::BranchDiff {
                merge_base: d.merge_base.clone(),
                files_changed: d.files_changed,
                insertions: d.insertions,
                deletions: d.deletions,
                patch: d.patch.clone(),
                patch_truncated: d.patch_truncated,
            }),
        }
    }
}

/// A reported change, before the domain checks it (`GitChange::validated`).
impl From<c::GitChange> for GitChange {
    fn from(g: c::GitChange) -> Self {
        GitChange {
            branch: g.branch,
            base_commit: g.base_commit,
            commit: g.commit,
            files_changed: g.files_changed,
            insertions: g.insertions,
            deletions: g.deletions,
            patch: g.patch,
            patch_truncated: g.patch_truncated,
            branch_diff: g.branch_diff.map(|d| omoi_domain::git::BranchDiff {
                merge_base: d.merge_base,
                files_changed: d.files_changed,
                insertions: d.insertions,
                deletions: d.deletions,
                patch: d.patch,
                patch_truncated: d.patch_truncated,
            }),
        }
    }
}

impl From<&Usage> for c::Usage {
    fn from(u: &Usage) -> Self {
        c::Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_tokens,
            cache_write_tokens: u.cache_write_tokens,
            cost_usd: u.cost_usd,
            cost_estimated: u.cost_estimated,
            model: u.model.clone(),
            turns: u.turns,
            duration_ms: u.duration_ms,
        }
    }
}

/// A reported usage, before the domain checks it (`Usage::validated`).
impl From<c::Usage> for Usage {
    fn from(u: c::Usage) -> Self {
        Usage {
            input_tokens: u.input_tokens,
            output_tokens: u.output_tokens,
            cache_read_tokens: u.cache_read_tokens,
            cache_write_tokens: u.cache_write_tokens,
            cost_usd: u.cost_usd,
            cost_estimated: u.cost_estimated,
            model: u.model,
            turns: u.turns,
            duration_ms: u.duration_ms,
        }
    }
}

impl From<&Ticket> for ticket::Ticket {
    fn from(t: &Ticket) -> Self {
        ticket::Ticket {
            id: t.id.to_string(),
            title: t.title.clone(),
            description: t.description.clone(),
            priority: t.priority,
            status: t.status.wire(),
            repository: t.repository.clone(),
            labels: labels(&t.labels),
            created_at: Some(timestamp(t.created_at)),
            updated_at: Some(timestamp(t.updated_at)),
            usage: t.usage.as_ref().map(c::Usage::from),
            base_ref: t.base_ref.clone(),
            branch: t.branch.clone(),
            head_commit: t.head_commit.clone(),
            pull_request: t.pull_request,
            pull_request_url: t.pull_request_url.clone(),
            pull_request_error: t.pull_request_error.clone(),
            max_cost_usd: t.max_cost_usd,
            paused_reason: t.paused_reason.clone(),
            max_reactions: t.max_reactions,
            reactions: t.reactions,
            source: (!t.source_kind.is_empty()).then(|| ticket::TicketSource {
                kind: t.source_kind.clone(),
                url: t.source_url.clone(),
            }),
            gates: t.gates.iter().map(ticket::ApprovalGate::from).collect(),
            check_command: t.check_command.clone(),
            guardian: Some(ticket::GuardianSettings::from(&t.guardian)),
        }
    }
}

impl From<&omoi_domain::guardian::Overrides> for ticket::GuardianSettings {
    fn from(o: &omoi_domain::guardian::Overrides) -> Self {
        let int = |v: Option<u32>| v.map(|v| i32::try_from(v).unwrap_or(i32::MAX));
        ticket::GuardianSettings {
            repeat: int(o.repeat),
            stall_seconds: int(o.stall_seconds),
            spend_per_minute_usd: o.spend_per_minute_usd,
            max_turns: int(o.max_turns),
            budget_share: o.budget_share,
            nudges: int(o.nudges),
            review_seconds: int(o.review_seconds),
        }
    }
}

/// A ticket's guardian settings as a request carries them, checked
/// (`field`: where they are, e.g. `guardian`): each given one in range.
pub fn guardian_overrides(
    field: &str,
    g: Option<&ticket::GuardianSettings>,
) -> Result<omoi_domain::guardian::Overrides, omoi_domain::DomainError> {
    let Some(g) = g else {
        return Ok(Default::default());
    };
    let count = |name: &str, v: Option<i32>| {
        v.map(|v| {
            u32::try_from(v).map_err(|_| {
                omoi_domain::DomainError::invalid(format!("{field}.{name}"), format!("must not be negative, got {v}"))
            })
        })
        .transpose()
    };
    omoi_domain::guardian::Overrides {
        repeat: count("repeat", g.repeat)?,
        stall_seconds: count("stall_seconds", g.stall_seconds)?,
        spend_per_minute_usd: g.spend_per_minute_usd,
        max_turns: count("max_turns", g.max_turns)?,
        budget_share: g.budget_share,
        nudges: count("nudges", g.nudges)?,
        review_seconds: count("review_seconds", g.review_seconds)?,
    }
    .validated(field)
}

impl From<GateState> for ticket::GateState {
    fn from(s: GateState) -> Self {
        match s {
            GateState::Waiting => ticket::GateState::Waiting,
            GateState::AwaitingApproval => ticket::GateState::AwaitingApproval,
            GateState::ChangesRequested => ticket::GateState::ChangesRequested,
            GateState::Approved => ticket::GateState::Approved,
        }
    }
}

impl From<&Gate> for ticket::ApprovalGate {
    fn from(g: &Gate) -> Self {
        ticket::ApprovalGate {
            phase: g.phase.wire(),
            state: ticket::GateState::from(g.state).into(),
            review_task_ids: g.review_task_ids.iter().map(ToString::to_string).collect(),
            rounds: g.rounds,
            requested_at: g.requested_at.map(timestamp),
            decided_by: g.decided_by.clone(),
            decided_at: g.decided_at.map(timestamp),
            comment: g.comment.clone(),
            change_requests: g
                .change_requests
                .iter()
                .map(|r| ticket::ChangeRequest {
                    comment: r.comment.clone(),
                    requested_by: r.requested_by.clone(),
                    requested_at: Some(timestamp(r.requested_at)),
                    task_id: r.task_id.to_string(),
                })
                .collect(),
        }
    }
}

impl From<&Agent> for health::Agent {
    fn from(a: &Agent) -> Self {
        health::Agent {
            id: a.id.to_string(),
            agent_type: a.agent_type.clone(),
            // The single-phase field predates `phases`: set when there is exactly one.
            phase: match a.phases.as_slice() {
                [one] => one.wire(),
                _ => c::Phase::Unspecified.into(),
            },
            capacity: a.capacity,
            labels: labels(&a.labels),
            status: a.status.wire(),
            last_heartbeat_at: Some(timestamp(a.last_heartbeat_at)),
            registered_at: Some(timestamp(a.registered_at)),
            running_task_ids: a.running_task_ids.iter().map(ToString::to_string).collect(),
            phases: a.phases.iter().map(|p| p.wire()).collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T: WireEnum + PartialEq + std::fmt::Debug>(all: &[T]) {
        for v in all {
            assert_eq!(T::given(v.wire()), Given::Known(*v));
            assert_ne!(v.wire(), 0, "a domain value never travels as UNSPECIFIED");
        }
        assert_eq!(T::given(0), Given::Missing);
        assert_eq!(T::given(99), Given::Unknown(99));
    }

    #[test]
    fn enums_round_trip_and_keep_unknown_numbers() {
        round_trips(&TaskStatus::ALL);
        round_trips(&Phase::ALL);
        round_trips(&[ErrorClass::Retryable, ErrorClass::Permanent]);
        round_trips(&TicketStatus::ALL);
        round_trips(&AgentStatus::ALL);
    }

    #[test]
    fn enums_map_by_name() {
        assert_eq!(
            c::TaskStatus::from(TaskStatus::TimedOut).as_str_name(),
            "TASK_STATUS_TIMED_OUT"
        );
        assert_eq!(c::Phase::from(Phase::Initial).as_str_name(), "PHASE_INITIAL");
        assert_eq!(
            c::TicketStatus::from(TicketStatus::InProgress).as_str_name(),
            "TICKET_STATUS_IN_PROGRESS"
        );
        assert_eq!(
            c::AgentStatus::from(AgentStatus::Stale).as_str_name(),
            "AGENT_STATUS_STALE"
        );
        assert_eq!(
            c::ErrorClass::from(ErrorClass::Permanent).as_str_name(),
            "ERROR_CLASS_PERMANENT"
        );
    }
}

/// An agent event as the guardian reads it (`usage`: the event's usage,
/// converted by the caller).
pub fn observed<'a>(
    e: &'a c::AgentEvent,
    usage: Option<&'a omoi_domain::usage::Usage>,
) -> omoi_domain::guardian::Observed<'a> {
    use omoi_domain::guardian::Kind;
    let kind = match e.kind() {
        c::AgentEventKind::Message | c::AgentEventKind::Thinking => Kind::Message,
        c::AgentEventKind::ToolCall => Kind::ToolCall,
        c::AgentEventKind::ToolResult => Kind::ToolResult,
        c::AgentEventKind::Command => Kind::Command,
        c::AgentEventKind::FileChange => Kind::FileChange,
        c::AgentEventKind::Usage => Kind::Usage,
        c::AgentEventKind::Error => Kind::Error,
        _ => Kind::Other,
    };
    omoi_domain::guardian::Observed {
        attempt: e.attempt,
        seq: e.seq,
        at_ms: e
            .at
            .as_ref()
            .map_or(0, |t| t.seconds * 1000 + i64::from(t.nanos) / 1_000_000),
        kind,
        text: &e.text,
        tool: &e.tool,
        exit_code: e.exit_code,
        is_error: e.is_error,
        usage,
    }
}
