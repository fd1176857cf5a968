//! An agent's session as a task carries it: which runner holds the
//! conversation, under which id, and where its latest checkpoint is. The
//! executor stores checkpoints in the Object Store; the queue keeps this
//! record of them on the task, so that any executor's next attempt (or a
//! follow-up task) can find and resume the conversation.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::error::DomainError;

/// The longest session id an agent may report.
pub const MAX_SESSION_ID_BYTES: usize = 256;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AgentSession {
    /// The runner holding it (`claude-code`, `codex`, ...).
    pub runner: String,
    /// The agent's own id of the conversation; empty when it has none.
    #[serde(default)]
    pub session_id: String,
    /// The latest checkpoint's object (see [`checkpoint_name`]); empty
    /// before the first.
    #[serde(default)]
    pub checkpoint: String,
    #[serde(default)]
    pub checkpoint_at: Option<DateTime<Utc>>,
    /// The attempt that stored the latest checkpoint.
    #[serde(default)]
    pub attempt: i32,
    /// Checkpoints that attempt stored so far.
    #[serde(default)]
    pub checkpoints: i32,
    /// The latest checkpoint's size, compressed.
    #[serde(default)]
    pub checkpoint_bytes: i64,
    /// The attempt whose checkpoint this one resumed; 0: started afresh.
    #[serde(default)]
    pub resumed_from_attempt: i32,
    /// The task whose conversation this one continues, when another (a
    /// follow-up's source); every attempt of the follow-up keeps it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from_task_id: Option<Uuid>,
}

impl AgentSession {
    /// Whether this record says its attempt resumed an earlier checkpoint.
    pub fn resumed(&self) -> bool {
        self.resumed_from_attempt > 0
    }

    /// The record's checks: a runner named, sizes bounded, the checkpoint
    /// named as [`checkpoint_name`] names one. `field` prefixes the
    /// fields named in a refusal.
    pub fn validated(self, field: &str) -> Result<Self, DomainError> {
        let named = |f: &str| format!("{field}.{f}");
        if self.runner.is_empty() || self.runner.len() > 32 || !self.runner.bytes().all(runner_byte) {
            return Err(DomainError::invalid(
                named("runner"),
                "must be 1 to 32 lowercase letters, digits or '-'",
            ));
        }
        if self.session_id.len() > MAX_SESSION_ID_BYTES || self.session_id.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                named("session_id"),
                format!("must be at most {MAX_SESSION_ID_BYTES} bytes without control characters"),
            ));
        }
        if !self.checkpoint.is_empty() && parse_checkpoint_name(&self.checkpoint).is_none() {
            return Err(DomainError::invalid(
                named("checkpoint"),
                "must be <ticket_id or '-'>/<task_id>/<attempt>",
            ));
        }
        for (f, v) in [
            ("attempt", i64::from(self.attempt)),
            ("checkpoints", i64::from(self.checkpoints)),
            ("checkpoint_bytes", self.checkpoint_bytes),
            ("resumed_from_attempt", i64::from(self.resumed_from_attempt)),
        ] {
            if v < 0 {
                return Err(DomainError::invalid(named(f), "must not be negative"));
            }
        }
        Ok(self)
    }
}

fn runner_byte(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-'
}

/// The Object Store name of an attempt's checkpoint:
/// `<ticket_id>/<task_id>/<attempt>`, `-` for a task outside any ticket.
pub fn checkpoint_name(ticket_id: Option<Uuid>, task_id: Uuid, attempt: i32) -> String {
    let ticket = ticket_id.map_or_else(|| "-".to_owned(), |t| t.to_string());
    format!("{ticket}/{task_id}/{attempt}")
}

/// The task and attempt a checkpoint's name names.
pub fn parse_checkpoint_name(name: &str) -> Option<(Uuid, i32)> {
    let mut parts = name.split('/');
    let (ticket, task, attempt) = (parts.next()?, parts.next()?, parts.next()?);
    if parts.next().is_some() || (ticket != "-" && Uuid::parse_str(ticket).is_err()) {
        return None;
    }
    let attempt: i32 = attempt.parse().ok().filter(|a| *a > 0)?;
    Some((Uuid::parse_str(task).ok()?, attempt))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_names_round_trip_and_nothing_else_parses() {
        let (ticket, task) = (Uuid::from_u128(7), Uuid::from_u128(9));
        let name = checkpoint_name(Some(ticket), task, 3);
        assert_eq!(parse_checkpoint_name(&name), Some((task, 3)));
        assert_eq!(parse_checkpoint_name(&checkpoint_name(None, task, 1)), Some((task, 1)));
        for bad in [
            "",
            "-/x/1",
            &format!("-/{task}/0"),
            &format!("-/{task}/1/2"),
            &format!("a/{task}/1"),
        ] {
            assert_eq!(parse_checkpoint_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn a_session_record_is_checked_field_by_field() {
        let ok = AgentSession {
            runner: "claude-code".into(),
            session_id: "s-1".into(),
            checkpoint: checkpoint_name(None, Uuid::from_u128(1), 1),
            attempt: 1,
            ..Default::default()
        };
        assert!(ok.clone().validated("session").is_ok());
        let refused = |s: AgentSession| s.validated("session").unwrap_err().to_string();
        assert!(
            refused(AgentSession {
                runner: "".into(),
                ..ok.clone()
            })
            .contains("session.runner")
        );
        assert!(
            refused(AgentSession {
                runner: "Claude Code".into(),
                ..ok.clone()
            })
            .contains("session.runner")
        );
        assert!(
            refused(AgentSession {
                session_id: "x".repeat(300),
                ..ok.clone()
            })
            .contains("session.session_id")
        );
        assert!(
            refused(AgentSession {
                checkpoint: "../etc".into(),
                ..ok.clone()
            })
            .contains("session.checkpoint")
        );
        assert!(refused(AgentSession { checkpoints: -1, ..ok }).contains("session.checkpoints"));
    }
}
