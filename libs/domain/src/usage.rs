//! What an agent spent: tokens, money, turns and time. An attempt reports
//! its own; a task keeps the sum over its attempts, a ticket over its tasks'
//! attempts (summed where they are stored, by `usage_add` in the schema).

use serde::{Deserialize, Serialize};

use crate::error::DomainError;

/// Longest model name (or joined list of names) kept.
const MAX_MODEL_BYTES: usize = 200;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cache_read_tokens: i64,
    pub cache_write_tokens: i64,
    pub cost_usd: f64,
    /// The cost (or part of it) came from the price table, not the agent.
    pub cost_estimated: bool,
    pub model: String,
    pub turns: i32,
    pub duration_ms: i64,
}

impl Usage {
    /// A reported usage, checked field by field (`field` names the message
    /// it came in, e.g. `usage`).
    pub fn validated(self, field: &str) -> Result<Usage, DomainError> {
        let counts = [
            ("input_tokens", self.input_tokens),
            ("output_tokens", self.output_tokens),
            ("cache_read_tokens", self.cache_read_tokens),
            ("cache_write_tokens", self.cache_write_tokens),
            ("turns", i64::from(self.turns)),
            ("duration_ms", self.duration_ms),
        ];
        for (name, value) in counts {
            if value < 0 {
                return Err(DomainError::invalid(
                    format!("{field}.{name}"),
                    format!("must not be negative, got {value}"),
                ));
            }
        }
        if !self.cost_usd.is_finite() || self.cost_usd < 0.0 {
            return Err(DomainError::invalid(
                format!("{field}.cost_usd"),
                format!("must be a non-negative number, got {}", self.cost_usd),
            ));
        }
        if self.model.len() > MAX_MODEL_BYTES || self.model.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                format!("{field}.model"),
                format!("must be at most {MAX_MODEL_BYTES} bytes without control characters"),
            ));
        }
        Ok(self)
    }

    /// Everything zero: nothing worth recording.
    pub fn is_empty(&self) -> bool {
        *self == Usage::default()
    }

    pub fn total_tokens(&self) -> i64 {
        self.input_tokens + self.output_tokens + self.cache_read_tokens + self.cache_write_tokens
    }

    /// The sum of two runs' usage within one attempt (an agent's runs, its
    /// reviewer's), as `usage_add` sums attempts: counts and costs add,
    /// estimated if either was, the distinct models joined by `, `.
    pub fn add(&mut self, other: &Usage) {
        self.input_tokens += other.input_tokens;
        self.output_tokens += other.output_tokens;
        self.cache_read_tokens += other.cache_read_tokens;
        self.cache_write_tokens += other.cache_write_tokens;
        self.cost_usd += other.cost_usd;
        self.cost_estimated |= other.cost_estimated;
        self.turns += other.turns;
        self.duration_ms += other.duration_ms;
        for model in other.model.split(", ").filter(|m| !m.is_empty()) {
            if !self.model.split(", ").any(|m| m == model) {
                if !self.model.is_empty() {
                    self.model.push_str(", ");
                }
                self.model.push_str(model);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usages_add_up_with_each_model_once() {
        let mut u = Usage {
            input_tokens: 10,
            cost_usd: 0.5,
            model: "claude-sonnet".into(),
            turns: 2,
            ..Default::default()
        };
        u.add(&Usage {
            input_tokens: 5,
            cost_usd: 0.25,
            cost_estimated: true,
            model: "claude-haiku, claude-sonnet".into(),
            turns: 1,
            ..Default::default()
        });
        assert_eq!(
            (u.input_tokens, u.cost_usd, u.cost_estimated, u.model.as_str(), u.turns),
            (15, 0.75, true, "claude-sonnet, claude-haiku", 3)
        );
    }

    #[test]
    fn a_usage_is_checked_field_by_field() {
        let good = Usage {
            input_tokens: 10,
            output_tokens: 5,
            cost_usd: 0.25,
            model: "claude-sonnet-4-5".into(),
            turns: 2,
            ..Default::default()
        };
        assert_eq!(good.clone().validated("usage").unwrap(), good);
        let cases: [(Usage, &str); 4] = [
            (
                Usage {
                    output_tokens: -1,
                    ..good.clone()
                },
                "usage.output_tokens",
            ),
            (
                Usage {
                    cost_usd: f64::NAN,
                    ..good.clone()
                },
                "usage.cost_usd",
            ),
            (
                Usage {
                    turns: -3,
                    ..good.clone()
                },
                "usage.turns",
            ),
            (
                Usage {
                    model: "a\nb".into(),
                    ..good.clone()
                },
                "usage.model",
            ),
        ];
        for (usage, field) in cases {
            match usage.validated("usage") {
                Err(DomainError::InvalidArgument(e)) => assert_eq!(e.field, field),
                other => panic!("{field}: {other:?}"),
            }
        }
        assert!(Usage::default().is_empty());
        assert_eq!(good.total_tokens(), 15);
    }

    #[test]
    fn missing_fields_read_as_zero() {
        let u: Usage = serde_json::from_str(r#"{"input_tokens": 3}"#).unwrap();
        assert_eq!(u.input_tokens, 3);
        assert_eq!(u.cost_usd, 0.0);
    }
}
