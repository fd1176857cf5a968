//! Classification of failure messages into retryable and permanent errors.

use crate::task::ErrorClass;

/// Case-insensitive substrings that make an error permanent; these win over
/// the retryable ones.
pub const PERMANENT_PATTERNS: &[&str] = &[
    "permission denied",
    "access denied",
    "authentication failed",
    "authorization failed",
    "syntax error",
    "invalid argument",
    "not found",
    "does not exist",
    "already exists",
    "duplicate key",
    "constraint violation",
    "immutable",
    "read-only",
    "quota exceeded",
];

/// Substrings that make an error retryable. Anything unmatched is retryable too;
/// the list documents intent and keeps "rate limit" out of the permanent side.
pub const RETRYABLE_PATTERNS: &[&str] = &[
    "connection",
    "timeout",
    "timed out",
    "network",
    "temporary",
    "unavailable",
    "retryable",
    "transient",
    "intermittent",
    "rate limit",
];

/// The class of a failure: the reporter's explicit class if it gave one,
/// otherwise by the message.
pub fn classify(message: &str, explicit: Option<ErrorClass>) -> ErrorClass {
    if let Some(class) = explicit {
        return class;
    }
    let lower = message.to_lowercase();
    if PERMANENT_PATTERNS.iter().any(|p| lower.contains(p)) {
        ErrorClass::Permanent
    } else {
        ErrorClass::Retryable
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ErrorClass::{Permanent, Retryable};

    #[test]
    fn table() {
        let table: &[(&str, ErrorClass)] = &[
            ("Permission denied (publickey)", Permanent),
            ("ACCESS DENIED to bucket", Permanent),
            ("authentication failed for user bob", Permanent),
            ("Authorization failed: missing scope", Permanent),
            ("SyntaxError: syntax error near line 3", Permanent),
            ("invalid argument: --frobnicate", Permanent),
            ("file not found: src/main.rs", Permanent),
            ("relation \"tasks\" does not exist", Permanent),
            ("branch already exists", Permanent),
            ("duplicate key value violates unique constraint", Permanent),
            ("check constraint violation", Permanent),
            ("field is immutable", Permanent),
            ("read-only file system", Permanent),
            ("Quota exceeded for project", Permanent),
            ("connection reset by peer", Retryable),
            ("request timeout", Retryable),
            ("operation timed out", Retryable),
            ("network is unreachable", Retryable),
            ("temporary failure in name resolution", Retryable),
            ("service unavailable", Retryable),
            ("retryable: upstream busy", Retryable),
            ("transient error", Retryable),
            ("intermittent failure", Retryable),
            ("rate limit exceeded", Retryable),
            ("Rate Limit Exceeded", Retryable),
            ("something odd happened", Retryable),
            ("", Retryable),
            // Permanent patterns win when both match.
            ("connection refused: permission denied", Permanent),
            ("timed out: resource not found", Permanent),
        ];
        for (message, want) in table {
            assert_eq!(classify(message, None), *want, "{message:?}");
        }
    }

    #[test]
    fn explicit_class_overrides_the_message() {
        assert_eq!(classify("permission denied", Some(Retryable)), Retryable);
        assert_eq!(classify("connection reset", Some(Permanent)), Permanent);
        assert_eq!(classify("", Some(Permanent)), Permanent);
    }

    #[test]
    fn every_pattern_alone_classifies_as_listed() {
        for p in PERMANENT_PATTERNS {
            assert_eq!(classify(p, None), Permanent, "{p}");
            assert_eq!(classify(&p.to_uppercase(), None), Permanent, "{p}");
        }
        for p in RETRYABLE_PATTERNS {
            assert_eq!(classify(p, None), Retryable, "{p}");
        }
    }
}
