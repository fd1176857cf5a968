//! Agents and their health.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AgentStatus {
    Healthy,
    Stale,
    Deregistered,
}

impl AgentStatus {
    pub const ALL: [AgentStatus; 3] = [AgentStatus::Healthy, AgentStatus::Stale, AgentStatus::Deregistered];

    pub fn as_str(self) -> &'static str {
        match self {
            AgentStatus::Healthy => "healthy",
            AgentStatus::Stale => "stale",
            AgentStatus::Deregistered => "deregistered",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == s)
    }

    pub fn to_proto(self) -> i32 {
        match self {
            AgentStatus::Healthy => 1,
            AgentStatus::Stale => 2,
            AgentStatus::Deregistered => 3,
        }
    }

    pub fn from_proto(v: i32) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.to_proto() == v)
    }
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
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
            assert_eq!(AgentStatus::from_proto(s.to_proto()), Some(s));
        }
        assert_eq!(AgentStatus::from_proto(0), None);
        assert_eq!(AgentStatus::parse("dead"), None);
    }
}
