//! The statuses of tickets and agents, on their own: the entities hold
//! them and the events carry them, so both modules import them from here
//! (the event catalogue needs no entity, only the values it reports).

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TicketStatus {
    Open,
    InProgress,
    /// Its budget is spent: nothing of it is dispatched until it is raised.
    Paused,
    /// A phase of its plan waits for a person's approval.
    AwaitingApproval,
    Completed,
    Failed,
    Cancelled,
}

impl TicketStatus {
    pub const ALL: [TicketStatus; 7] = [
        TicketStatus::Open,
        TicketStatus::InProgress,
        TicketStatus::Paused,
        TicketStatus::AwaitingApproval,
        TicketStatus::Completed,
        TicketStatus::Failed,
        TicketStatus::Cancelled,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            TicketStatus::Open => "open",
            TicketStatus::InProgress => "in_progress",
            TicketStatus::Paused => "paused",
            TicketStatus::AwaitingApproval => "awaiting_approval",
            TicketStatus::Completed => "completed",
            TicketStatus::Failed => "failed",
            TicketStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == s)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TicketStatus::Completed | TicketStatus::Failed | TicketStatus::Cancelled
        )
    }
}

impl fmt::Display for TicketStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

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
}

impl fmt::Display for AgentStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}
