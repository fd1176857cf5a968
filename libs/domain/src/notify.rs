//! Notifications: what a subscription may ask for, and how a delivery's
//! tries go (what an answer means, when to try again, when to give up).

use std::time::Duration;

use crate::error::DomainError;
use crate::event::{Entity, EventType};

/// How a delivery's body is shaped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Format {
    Json,
    Slack,
}

impl Format {
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Slack => "slack",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        [Format::Json, Format::Slack].into_iter().find(|f| f.as_str() == s)
    }
}

/// Where a delivery stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryState {
    Pending,
    Delivered,
    Refused,
    Expired,
}

impl DeliveryState {
    pub const ALL: [DeliveryState; 4] = [
        DeliveryState::Pending,
        DeliveryState::Delivered,
        DeliveryState::Refused,
        DeliveryState::Expired,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Refused => "refused",
            DeliveryState::Expired => "expired",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|d| d.as_str() == s)
    }
}

/// Fewest and most bytes of a subscription's secret.
pub const MIN_SECRET_BYTES: usize = 16;
pub const MAX_SECRET_BYTES: usize = 256;
/// Longest subscribed address.
pub const MAX_URL_BYTES: usize = 2048;
/// How long a delivery is tried before it is given up.
pub const GIVE_UP_AFTER: Duration = Duration::from_secs(24 * 3600);

/// The event types a subscription asks for: at least one, each a ticket
/// event this version knows, each once (in the order given).
pub fn event_types(field: &str, values: &[String]) -> Result<Vec<String>, DomainError> {
    if values.is_empty() {
        return Err(DomainError::invalid(field, "name at least one event type"));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for (i, v) in values.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let name = v.trim().to_ascii_uppercase();
        let known = EventType::parse(&name)
            .filter(|t| t.entity() == Entity::Ticket)
            .ok_or_else(|| DomainError::invalid(&at, format!("{v:?} is not a ticket event type (TICKET_*)")))?;
        let name = known.as_str().to_owned();
        if !out.contains(&name) {
            out.push(name);
        }
    }
    Ok(out)
}

/// A subscription's secret: 16 to 256 bytes, not blank.
pub fn secret(field: &str, value: &str) -> Result<(), DomainError> {
    if value.trim().is_empty() {
        return Err(DomainError::invalid(
            field,
            "must not be empty: it signs the deliveries",
        ));
    }
    if value.len() < MIN_SECRET_BYTES || value.len() > MAX_SECRET_BYTES {
        return Err(DomainError::invalid(
            field,
            format!(
                "must be {MIN_SECRET_BYTES} to {MAX_SECRET_BYTES} bytes, got {}",
                value.len()
            ),
        ));
    }
    Ok(())
}

/// What a receiver's answer (its HTTP status; None: no answer — a timeout,
/// a refused connection) makes of a delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// 2xx: delivered.
    Taken,
    /// 5xx, 429, 408 or no answer: tried again.
    Later,
    /// Any other status: the receiver does not want it; not tried again.
    Refused,
}

pub fn answer(status: Option<u16>) -> Answer {
    match status {
        Some(s) if (200..300).contains(&s) => Answer::Taken,
        None | Some(408 | 429) => Answer::Later,
        Some(s) if s >= 500 => Answer::Later,
        Some(_) => Answer::Refused,
    }
}

/// How a delivery's tries are spaced.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// The wait after the first failed try; doubled after each one after.
    pub base: Duration,
    /// The longest wait.
    pub max: Duration,
}

impl Backoff {
    /// The wait before try `tries + 1`, after `tries` failed ones: the
    /// receiver's Retry-After when it gave one (at most an hour), else
    /// `base` doubled per try up to `max`, scaled by `jitter` (0..1) into
    /// its upper half, so that many deliveries failing at once spread out.
    pub fn wait(&self, tries: u32, retry_after: Option<Duration>, jitter: f64) -> Duration {
        if let Some(after) = retry_after {
            return after.min(Duration::from_secs(3600));
        }
        let doubled = self
            .base
            .saturating_mul(1u32.checked_shl(tries.saturating_sub(1).min(30)).unwrap_or(u32::MAX));
        let capped = doubled.min(self.max);
        capped.mul_f64(0.5 + 0.5 * jitter.clamp(0.0, 1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(e: DomainError) -> String {
        match e {
            DomainError::InvalidArgument(f) => format!("{}: {}", f.field, f.reason),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn subscriptions_ask_for_ticket_events_they_name_right() {
        let got = event_types(
            "event_types",
            &[
                "ticket_completed".into(),
                "TICKET_APPROVAL_REQUESTED".into(),
                "TICKET_COMPLETED".into(),
            ],
        )
        .unwrap();
        assert_eq!(got, ["TICKET_COMPLETED", "TICKET_APPROVAL_REQUESTED"]);
        assert_eq!(
            field(event_types("event_types", &[]).unwrap_err()),
            "event_types: name at least one event type"
        );
        assert!(field(event_types("event_types", &["TICKET_DONE".into()]).unwrap_err()).starts_with("event_types[0]"));
        assert!(field(event_types("event_types", &["TASK_FAILED".into()]).unwrap_err()).starts_with("event_types[0]"));
        assert!(field(secret("secret", "").unwrap_err()).starts_with("secret: must not be empty"));
        assert!(field(secret("secret", "short").unwrap_err()).contains("16 to 256"));
        assert!(secret("secret", "a-long-enough-secret").is_ok());
    }

    #[test]
    fn answers_decide_whether_to_try_again() {
        assert_eq!(answer(Some(200)), Answer::Taken);
        assert_eq!(answer(Some(204)), Answer::Taken);
        for later in [None, Some(500), Some(503), Some(429), Some(408)] {
            assert_eq!(answer(later), Answer::Later, "{later:?}");
        }
        for refused in [Some(400), Some(401), Some(404), Some(410), Some(301)] {
            assert_eq!(answer(refused), Answer::Refused, "{refused:?}");
        }
    }

    #[test]
    fn tries_back_off_with_jitter_up_to_a_limit_or_as_the_receiver_asks() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(300),
        };
        assert_eq!(b.wait(1, None, 1.0), Duration::from_secs(1));
        assert_eq!(b.wait(3, None, 1.0), Duration::from_secs(4));
        assert_eq!(b.wait(3, None, 0.0), Duration::from_secs(2));
        assert_eq!(b.wait(40, None, 1.0), Duration::from_secs(300));
        assert_eq!(b.wait(2, Some(Duration::from_secs(7)), 0.3), Duration::from_secs(7));
        assert_eq!(
            b.wait(2, Some(Duration::from_secs(86_400)), 0.3),
            Duration::from_secs(3600)
        );
        for s in DeliveryState::ALL {
            assert_eq!(DeliveryState::parse(s.as_str()), Some(s));
        }
        assert_eq!(Format::parse("slack"), Some(Format::Slack));
    }
}
