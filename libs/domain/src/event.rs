//! Every event omoi records: its type, the entity it is about, and its
//! payload as a typed struct. This is the one place where event-type names
//! and payload shapes are written down; the outbox stores what `payload()`
//! serializes and consumers read it back with `Event::parse`.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use uuid::Uuid;

use crate::status::{AgentStatus, TicketStatus};
use crate::task::{ErrorClass, Phase, TaskStatus};
use crate::usage::Usage;

/// What an event is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Entity {
    Ticket,
    Task,
    Agent,
    /// The queue's dispatch as a whole (pauses).
    Queue,
}

impl Entity {
    pub fn as_str(self) -> &'static str {
        match self {
            Entity::Ticket => "ticket",
            Entity::Task => "task",
            Entity::Agent => "agent",
            Entity::Queue => "queue",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Entity::Ticket, Entity::Task, Entity::Agent, Entity::Queue]
            .into_iter()
            .find(|e| e.as_str() == s)
    }
}

/// Declares the event types, their names and entities, and the `Event` enum
/// with one payload struct per type, so that the three cannot drift apart.
macro_rules! events {
    ($($variant:ident($payload:ident) = $name:literal, $entity:ident;)*) => {
        /// The type of an event, as `event_type` carries it on the wire.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum EventType {
            $($variant,)*
        }

        impl EventType {
            pub const ALL: &[EventType] = &[$(EventType::$variant,)*];

            pub fn as_str(self) -> &'static str {
                match self {
                    $(EventType::$variant => $name,)*
                }
            }

            pub fn entity(self) -> Entity {
                match self {
                    $(EventType::$variant => Entity::$entity,)*
                }
            }

            /// `None` for a type this version does not know.
            pub fn parse(s: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|t| t.as_str() == s)
            }
        }

        /// An event with its payload.
        #[derive(Debug, Clone, PartialEq)]
        pub enum Event {
            $($variant($payload),)*
        }

        impl Event {
            pub fn event_type(&self) -> EventType {
                match self {
                    $(Event::$variant(_) => EventType::$variant,)*
                }
            }

            /// The payload as stored in the outbox and published.
            pub fn payload(&self) -> Value {
                let value = match self {
                    $(Event::$variant(p) => serde_json::to_value(p),)*
                };
                // Payloads are plain structs of strings, numbers and ids.
                value.expect("event payloads always serialize")
            }

            /// An event read back from its type and payload.
            pub fn parse(event_type: EventType, payload: Value) -> Result<Self, serde_json::Error> {
                Ok(match event_type {
                    $(EventType::$variant => Event::$variant(serde_json::from_value(payload)?),)*
                })
            }
        }
    };
}

events! {
    TaskCreated(TaskCreated) = "TASK_CREATED", Task;
    TaskAssigned(TaskAssigned) = "TASK_ASSIGNED", Task;
    TaskStarted(TaskStarted) = "TASK_STARTED", Task;
    TaskCompleted(TaskCompleted) = "TASK_COMPLETED", Task;
    TaskFailed(TaskFailed) = "TASK_FAILED", Task;
    TaskRetried(TaskRetried) = "TASK_RETRIED", Task;
    TaskTimedOut(TaskTimedOut) = "TASK_TIMED_OUT", Task;
    TaskCancelled(TaskCancelled) = "TASK_CANCELLED", Task;
    TaskRequeued(TaskRequeued) = "TASK_REQUEUED", Task;
    TaskResumed(TaskResumed) = "TASK_RESUMED", Task;
    TaskCandidateFinished(CandidateFinished) = "TASK_CANDIDATE_FINISHED", Task;
    TaskCandidateChosen(CandidateChosen) = "TASK_CANDIDATE_CHOSEN", Task;
    TaskGuardianIntervened(GuardianIntervened) = "TASK_GUARDIAN_INTERVENED", Task;
    TicketCreated(TicketCreated) = "TICKET_CREATED", Ticket;
    TicketStarted(TicketChanged) = "TICKET_STARTED", Ticket;
    TicketCompleted(TicketChanged) = "TICKET_COMPLETED", Ticket;
    TicketFailed(TicketChanged) = "TICKET_FAILED", Ticket;
    TicketCancelled(TicketChanged) = "TICKET_CANCELLED", Ticket;
    TicketPaused(TicketChanged) = "TICKET_PAUSED", Ticket;
    TicketReopened(TicketChanged) = "TICKET_REOPENED", Ticket;
    TicketPullRequestOpened(PullRequestOpened) = "TICKET_PULL_REQUEST_OPENED", Ticket;
    TicketReaction(TicketReaction) = "TICKET_REACTION", Ticket;
    TicketApprovalRequested(ApprovalRequested) = "TICKET_APPROVAL_REQUESTED", Ticket;
    TicketApproved(GateDecided) = "TICKET_APPROVED", Ticket;
    TicketChangesRequested(GateDecided) = "TICKET_CHANGES_REQUESTED", Ticket;
    AgentRegistered(AgentRegistered) = "AGENT_REGISTERED", Agent;
    AgentDeregistered(AgentChanged) = "AGENT_DEREGISTERED", Agent;
    AgentStale(AgentStale) = "AGENT_STALE", Agent;
    AgentRecovered(AgentChanged) = "AGENT_RECOVERED", Agent;
    QueuePaused(QueuePaused) = "QUEUE_PAUSED", Queue;
    QueueResumed(QueueResumed) = "QUEUE_RESUMED", Queue;
    ConcurrencyLimitSet(ConcurrencyLimitSet) = "QUEUE_LIMIT_SET", Queue;
}

impl std::fmt::Display for EventType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl EventType {
    /// A ticket event after which the ticket changes no more.
    pub fn ends_ticket(self) -> bool {
        matches!(
            self,
            EventType::TicketCompleted | EventType::TicketFailed | EventType::TicketCancelled
        )
    }
}

impl Event {
    pub fn entity(&self) -> Entity {
        self.event_type().entity()
    }

    /// The agent that held the attempt a task event is about, if any.
    pub fn agent_id(&self) -> Option<Uuid> {
        match self {
            Event::TaskAssigned(e) => e.agent_id,
            Event::TaskStarted(e) => e.agent_id,
            Event::TaskCompleted(e) => e.agent_id,
            Event::TaskFailed(e) => e.agent_id,
            Event::TaskRetried(e) => e.agent_id,
            Event::TaskTimedOut(e) => e.agent_id,
            Event::TaskCancelled(e) => e.agent_id,
            Event::TaskResumed(e) => e.agent_id,
            Event::TaskGuardianIntervened(e) => e.agent_id,
            _ => None,
        }
    }

    /// What the attempt this event ended spent, as its agent reported it.
    /// Each attempt's usage is on exactly one event, so that summing the
    /// events sums the attempts.
    pub fn attempt_usage(&self) -> Option<&Usage> {
        self.usage_slot_ref().and_then(Option::as_ref)
    }

    /// Where an attempt-ending event keeps its usage.
    pub fn usage_slot(&mut self) -> Option<&mut Option<Usage>> {
        match self {
            Event::TaskCompleted(e) => Some(&mut e.usage),
            Event::TaskFailed(e) => Some(&mut e.usage),
            Event::TaskRetried(e) => Some(&mut e.usage),
            Event::TaskTimedOut(e) => Some(&mut e.usage),
            _ => None,
        }
    }

    fn usage_slot_ref(&self) -> Option<&Option<Usage>> {
        match self {
            Event::TaskCompleted(e) => Some(&e.usage),
            Event::TaskFailed(e) => Some(&e.usage),
            Event::TaskRetried(e) => Some(&e.usage),
            Event::TaskTimedOut(e) => Some(&e.usage),
            _ => None,
        }
    }

    /// The event a ticket records when it enters `status`.
    pub fn ticket(status: TicketStatus, change: TicketChanged) -> Event {
        match status {
            TicketStatus::Open | TicketStatus::InProgress => Event::TicketStarted(change),
            TicketStatus::Completed => Event::TicketCompleted(change),
            TicketStatus::Failed => Event::TicketFailed(change),
            TicketStatus::Cancelled => Event::TicketCancelled(change),
            TicketStatus::Paused => Event::TicketPaused(change),
            // Entering it is announced with what is to be approved
            // (TICKET_APPROVAL_REQUESTED, see `gate`), where the gate is
            // known; a bare change says the ticket goes on.
            TicketStatus::AwaitingApproval => Event::TicketStarted(change),
        }
    }
}

/// An event about one entity, ready for the outbox.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub entity_id: Uuid,
    /// The ticket the entity belongs to (a ticket's own id for its events).
    pub ticket_id: Option<Uuid>,
    pub event: Event,
}

impl Envelope {
    pub fn new(entity_id: Uuid, ticket_id: Option<Uuid>, event: Event) -> Self {
        Self {
            entity_id,
            ticket_id,
            event,
        }
    }

    pub fn entity(&self) -> Entity {
        self.event.entity()
    }
}

/// Stored enums appear in payloads by their stored (or proto) names.
macro_rules! named {
    ($($ty:ty => $parse:expr;)*) => {$(
        impl Serialize for $ty {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                let s = String::deserialize(d)?;
                let parse: fn(&str) -> Option<$ty> = $parse;
                parse(&s).ok_or_else(|| serde::de::Error::custom(format!("unknown value {s:?}")))
            }
        }
    )*};
}

named! {
    TaskStatus => |s| s.parse().ok();
    Phase => Phase::parse;
    ErrorClass => ErrorClass::parse;
    TicketStatus => TicketStatus::parse;
    AgentStatus => AgentStatus::parse;
}

/// Dispatch stopped for a scope: every task (both unset), a phase, a
/// ticket, or a phase of a ticket.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueuePaused {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<Uuid>,
    pub reason: String,
}

/// Dispatch goes on for a scope that was paused.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueueResumed {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<Phase>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ticket_id: Option<Uuid>,
}

/// A concurrency key's limit changed: at most `max_running` of its tasks
/// ASSIGNED or RUNNING at once; none when the limit was removed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConcurrencyLimitSet {
    pub key: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_running: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCreated {
    pub title: String,
    pub phase: Phase,
    pub priority: i32,
    pub depends_on: Vec<Uuid>,
    pub unmet_dependencies: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskAssigned {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub priority: i32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskStarted {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCompleted {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub result: Option<Value>,
    /// What the attempt spent, when its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// What it left on the ticket's branch (without the patch, which the
    /// task keeps).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub git: Option<crate::git::GitChange>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskFailed {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub error: String,
    pub error_class: ErrorClass,
    pub retry_count: i32,
    /// What the attempt spent, when its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRetried {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub error: String,
    pub error_class: ErrorClass,
    /// Retries spent, this one included.
    pub retry_count: i32,
    pub max_retries: i32,
    pub delay_ms: i64,
    /// What the attempt spent, when its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Sent round again by an operator (RetryTask): `error` holds the
    /// reason, the retry budget starts afresh.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub manual: bool,
}

/// An attempt took up the agent session an earlier attempt (or, for a
/// follow-up, another task) left at its checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResumed {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub runner: String,
    pub session_id: String,
    pub resumed_from_attempt: i32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_task_id: Option<Uuid>,
    /// The checkpoint it was restored from.
    pub checkpoint: String,
}

/// The guardian stepped into a running attempt: what tripped, what it did,
/// and the agent events (of that attempt, by seq) that show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuardianIntervened {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub signal: String,
    pub action: String,
    pub reason: String,
    pub evidence: Vec<crate::guardian::Evidence>,
    /// The event it tripped at.
    pub seq: i64,
}

/// A candidate attempt at a task ended (the event is about the candidate's
/// task): how, and the evidence the choice will weigh.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateFinished {
    /// The task choosing among the candidates, and this one's number.
    pub candidate_of: Uuid,
    pub candidate: i32,
    /// `completed`, `failed` or `cancelled`.
    pub outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub check_passed: Option<bool>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runner: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub model: String,
    /// Its kept commit; empty when it changed nothing or did not complete.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit: String,
    #[serde(default)]
    pub insertions: i64,
    #[serde(default)]
    pub deletions: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// The choice among a task's candidates was made and the chosen commit
/// landed (the event is about the choosing task).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateChosen {
    pub chosen: i32,
    pub candidate_task_id: String,
    /// Where it landed on the ticket's branch.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub commit: String,
    pub reason: String,
    /// Every candidate as the choice saw it: outcome, check, size, cost,
    /// and why it was or was not chosen.
    pub candidates: Vec<crate::candidates::Seen>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskTimedOut {
    pub attempt: i32,
    pub agent_id: Option<Uuid>,
    pub timeout_seconds: i32,
    /// What the attempt spent, when its agent reported it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
}

/// A cancellation: asked for (with the attempt it ended), or caused by a
/// dependency that failed or was cancelled (`cause_task_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskCancelled {
    pub reason: String,
    pub previous_status: TaskStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cause_task_id: Option<Uuid>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskRequeued {
    pub attempt: i32,
    pub reason: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketCreated {
    pub status: TicketStatus,
    pub title: String,
    pub priority: i32,
    pub repository: String,
    /// The branch its work lands on, when it names a repository.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    pub task_ids: Vec<Uuid>,
}

/// The pull request a completed ticket's branch ended in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PullRequestOpened {
    pub url: String,
    pub number: i64,
    /// The ticket's branch (the pull request's head).
    pub branch: String,
    /// The branch it asks to be merged into.
    pub base: String,
}

/// A follow-up the forge started on a ticket's pull request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketReaction {
    /// `ci_failure`, `review` or `mention`.
    pub kind: String,
    /// What caused it: the comment, the failing commit's checks.
    pub url: String,
    /// The follow-up task.
    pub task_id: Uuid,
    /// How many of its `max_reactions` the ticket has used, this one included.
    pub reactions: i32,
    pub max_reactions: i32,
}

/// A phase of a ticket awaits a person's approval; the ticket's status
/// (AWAITING_APPROVAL unless it is paused) with what is to be approved.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ApprovalRequested {
    #[serde(flatten)]
    pub change: TicketChanged,
    pub phase: Phase,
    /// The how-manieth time approval of the phase is asked (1 the first).
    pub round: i32,
    /// What is to be approved: the tasks whose work the phase builds on.
    pub tasks: Vec<ReviewedTask>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub branch: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub head_commit: String,
}

/// A task whose work a person is asked to approve.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReviewedTask {
    pub task_id: Uuid,
    pub title: String,
    pub phase: Phase,
    /// What its agent said it did.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub summary: String,
}

/// A person's decision on a phase awaiting approval: approved, or changes
/// asked for (`change.task_id` the follow-up making them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateDecided {
    #[serde(flatten)]
    pub change: TicketChanged,
    pub phase: Phase,
    pub by: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub comment: String,
}

/// A ticket's status change, with what caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TicketChanged {
    pub status: TicketStatus,
    pub title: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous_status: Option<TicketStatus>,
    /// The task whose event moved the ticket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<Uuid>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The ticket was removed because the queue refused its tasks.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub discarded: bool,
}

/// An agent as its events show it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentChanged {
    pub agent_type: String,
    pub status: AgentStatus,
    pub last_heartbeat_at: DateTime<Utc>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentRegistered {
    #[serde(flatten)]
    pub agent: AgentChanged,
    pub capacity: i32,
    pub phases: Vec<Phase>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AgentStale {
    #[serde(flatten)]
    pub agent: AgentChanged,
    pub stale_at: DateTime<Utc>,
    pub stale_after_seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn names_are_unique_and_parse_back() {
        let mut seen = std::collections::HashSet::new();
        for t in EventType::ALL {
            assert!(seen.insert(t.as_str()), "{t} twice");
            assert_eq!(EventType::parse(t.as_str()), Some(*t));
            assert!(t.as_str().starts_with(&t.entity().as_str().to_ascii_uppercase()), "{t}");
        }
        assert_eq!(EventType::parse("TASK_EXPLODED"), None);
    }

    #[test]
    fn payloads_round_trip_through_json() {
        let agent = AgentChanged {
            agent_type: "executor".into(),
            status: AgentStatus::Stale,
            last_heartbeat_at: DateTime::from_timestamp(1_700_000_000, 5).unwrap(),
        };
        let events = [
            Event::TaskCreated(TaskCreated {
                title: "t".into(),
                phase: Phase::Integration,
                priority: 3,
                depends_on: vec![Uuid::nil()],
                unmet_dependencies: 1,
            }),
            Event::TaskCompleted(TaskCompleted {
                attempt: 2,
                agent_id: Some(Uuid::now_v7()),
                result: Some(json!({"summary": "ok"})),
                usage: Some(Usage {
                    input_tokens: 120,
                    cost_usd: 0.5,
                    model: "m".into(),
                    ..Default::default()
                }),
                git: Some(crate::git::GitChange {
                    branch: "omoi/0192a3b4-x".into(),
                    base_commit: "a".repeat(40),
                    commit: "b".repeat(40),
                    files_changed: 2,
                    insertions: 10,
                    deletions: 1,
                    ..Default::default()
                }),
            }),
            Event::TaskRetried(TaskRetried {
                attempt: 1,
                agent_id: None,
                error: "timeout".into(),
                error_class: ErrorClass::Retryable,
                retry_count: 1,
                max_retries: 3,
                delay_ms: 1100,
                usage: None,
                manual: false,
            }),
            Event::TaskCancelled(TaskCancelled {
                reason: "dependency failed".into(),
                previous_status: TaskStatus::Pending,
                attempt: None,
                agent_id: None,
                cause_task_id: Some(Uuid::now_v7()),
            }),
            Event::TicketFailed(TicketChanged {
                status: TicketStatus::Failed,
                title: "x".into(),
                previous_status: None,
                task_id: None,
                reason: Some("refused".into()),
                discarded: true,
            }),
            Event::AgentRegistered(AgentRegistered {
                agent: agent.clone(),
                capacity: 2,
                phases: vec![Phase::Initial],
            }),
            Event::AgentStale(AgentStale {
                agent,
                stale_at: DateTime::from_timestamp(1_700_000_090, 0).unwrap(),
                stale_after_seconds: 90.0,
            }),
        ];
        for e in events {
            let back = Event::parse(e.event_type(), e.payload()).unwrap();
            assert_eq!(back, e);
        }
    }

    #[test]
    fn payloads_keep_their_wire_shape() {
        let e = Event::TaskCreated(TaskCreated {
            title: "t".into(),
            phase: Phase::Initial,
            priority: 2,
            depends_on: vec![],
            unmet_dependencies: 0,
        });
        assert_eq!(
            e.payload(),
            json!({"title": "t", "phase": "PHASE_INITIAL", "priority": 2, "depends_on": [], "unmet_dependencies": 0})
        );
        let stale = Event::AgentStale(AgentStale {
            agent: AgentChanged {
                agent_type: "x".into(),
                status: AgentStatus::Stale,
                last_heartbeat_at: DateTime::from_timestamp(0, 0).unwrap(),
            },
            stale_at: DateTime::from_timestamp(90, 0).unwrap(),
            stale_after_seconds: 90.0,
        });
        assert_eq!(
            stale.payload(),
            json!({"agent_type": "x", "status": "stale", "last_heartbeat_at": "1970-01-01T00:00:00Z",
                   "stale_at": "1970-01-01T00:01:30Z", "stale_after_seconds": 90.0})
        );
        // Optional causes are left out, not null.
        let cancelled = Event::TaskCancelled(TaskCancelled {
            reason: "r".into(),
            previous_status: TaskStatus::Running,
            attempt: Some(1),
            agent_id: None,
            cause_task_id: None,
        });
        assert_eq!(
            cancelled.payload(),
            json!({"reason": "r", "previous_status": "running", "attempt": 1})
        );
    }

    #[test]
    fn a_payload_of_the_wrong_shape_is_refused() {
        assert!(Event::parse(EventType::TaskStarted, json!({"attempt": "one"})).is_err());
        assert!(Event::parse(EventType::AgentStale, json!({"stale_at": "yesterday"})).is_err());
    }

    #[test]
    fn ticket_events_follow_the_status() {
        let change = |status| TicketChanged {
            status,
            title: "t".into(),
            previous_status: None,
            task_id: None,
            reason: None,
            discarded: false,
        };
        for (status, ty) in [
            (TicketStatus::InProgress, EventType::TicketStarted),
            (TicketStatus::Completed, EventType::TicketCompleted),
            (TicketStatus::Failed, EventType::TicketFailed),
            (TicketStatus::Cancelled, EventType::TicketCancelled),
        ] {
            let e = Event::ticket(status, change(status));
            assert_eq!(e.event_type(), ty);
            assert_eq!(ty.ends_ticket(), status.is_final());
        }
    }
}
