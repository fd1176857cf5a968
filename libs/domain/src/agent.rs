//! Agents and their health.

use chrono::{DateTime, Utc};
use serde_json::Value;
use uuid::Uuid;

use crate::Phase;
use crate::event::AgentChanged;
pub use crate::status::AgentStatus;

/// A registered agent as the health service knows it.
#[derive(Debug, Clone, PartialEq)]
pub struct Agent {
    pub id: Uuid,
    pub agent_type: String,
    /// Empty = all phases.
    pub phases: Vec<Phase>,
    pub capacity: i32,
    /// String labels as a JSON object.
    pub labels: Value,
    pub status: AgentStatus,
    pub registered_at: DateTime<Utc>,
    pub last_heartbeat_at: DateTime<Utc>,
    pub running_task_ids: Vec<Uuid>,
    pub status_changed_at: DateTime<Utc>,
    pub completed_tasks: i64,
    pub failed_tasks: i64,
}

impl Agent {
    /// What every agent event says about the agent.
    pub fn change(&self) -> AgentChanged {
        AgentChanged {
            agent_type: self.agent_type.clone(),
            status: self.status,
            last_heartbeat_at: self.last_heartbeat_at,
        }
    }
}

/// Default heartbeat period told to agents, in seconds.
pub const DEFAULT_HEARTBEAT_INTERVAL_SECONDS: u64 = 30;
/// Silence after which an agent is stale, in seconds.
pub const DEFAULT_STALE_AFTER_SECONDS: u64 = 90;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in AgentStatus::ALL {
            assert_eq!(AgentStatus::parse(s.as_str()), Some(s));
        }
        assert_eq!(AgentStatus::parse("dead"), None);
    }
}
