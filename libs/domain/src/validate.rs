//! Validation of request fields into domain values. Every refusal names the
//! field, so a client can tell exactly what to fix.

use uuid::Uuid;

use crate::backoff::DEFAULT_MAX_RETRIES;
use crate::error::DomainError;
use crate::task::{Phase, Task, TaskStatus};

pub const MAX_TITLE_CHARS: usize = 200;
pub const MAX_DESCRIPTION_BYTES: usize = 64 * 1024;
pub const MAX_RETRIES_LIMIT: i32 = 100;
pub const MAX_TIMEOUT_SECONDS: i32 = 7 * 24 * 3600;
pub const MAX_DEPENDENCIES: usize = 1000;
pub const MAX_BATCH: usize = 1000;
pub const MAX_REASON_BYTES: usize = 4096;
pub const MAX_ERROR_MESSAGE_BYTES: usize = 16 * 1024;

/// A validated task to enqueue.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub id: Uuid,
    pub ticket_id: Option<Uuid>,
    pub title: String,
    pub description: String,
    pub phase: Phase,
    pub priority: i32,
    pub depends_on: Vec<Uuid>,
    pub max_retries: i32,
    pub timeout_seconds: i32,
    /// Tasks sharing a key run no more at once than the key's limit.
    pub concurrency_key: Option<String>,
    /// A session to continue (a follow-up's).
    pub session: Option<crate::session::AgentSession>,
    /// Labels an agent must carry to be handed it; empty: any.
    pub requires: crate::routing::Labels,
    /// A candidate attempt at this task (which depends on it), and its
    /// number (from 1).
    pub candidate: Option<(Uuid, i32)>,
    /// Lands the candidate it depends on in place of the one chosen.
    pub lands_candidate: bool,
}

impl NewTask {
    /// A task as it stands once enqueued, before anything happened to it
    /// (what a ticket shows of tasks not yet on the queue).
    pub fn pending(self, at: chrono::DateTime<chrono::Utc>) -> Task {
        let new = self;
        Task {
            id: new.id,
            seq: 0,
            ticket_id: new.ticket_id,
            title: new.title,
            description: new.description,
            phase: new.phase,
            priority: new.priority,
            status: TaskStatus::Pending,
            unmet_deps: new.depends_on.len() as i32,
            retry_count: 0,
            max_retries: new.max_retries,
            timeout_seconds: new.timeout_seconds,
            attempt: 0,
            assigned_agent_id: None,
            error_message: None,
            error_class: None,
            result: None,
            usage: None,
            git: None,
            created_at: at,
            updated_at: at,
            started_at: None,
            completed_at: None,
            next_attempt_at: at,
            trace_context: None,
            depends_on: new.depends_on,
            concurrency_key: new.concurrency_key,
            session: new.session,
            requires: new.requires,
            candidate: new.candidate,
            lands_candidate: new.lands_candidate,
        }
    }
}

/// A task as a request carries it, before validation.
#[derive(Debug, Clone, Default)]
pub struct RawNewTask<'a> {
    pub id: &'a str,
    pub ticket_id: &'a str,
    pub title: &'a str,
    pub description: &'a str,
    pub phase: Given<Phase>,
    pub priority: i32,
    pub depends_on: &'a [String],
    pub max_retries: Option<i32>,
    pub timeout_seconds: i32,
    pub concurrency_key: &'a str,
    pub session: Option<crate::session::AgentSession>,
    pub requires: Option<&'a std::collections::HashMap<String, String>>,
    pub candidate_of: &'a str,
    pub candidate: i32,
    pub lands_candidate: bool,
}

/// A required UUID.
pub fn uuid(field: &str, value: &str) -> Result<Uuid, DomainError> {
    if value.is_empty() {
        return Err(DomainError::invalid(field, "is required"));
    }
    Uuid::parse_str(value).map_err(|_| DomainError::invalid(field, format!("{:?} is not a UUID", truncate(value, 64))))
}

/// An optional UUID: empty means none.
pub fn optional_uuid(field: &str, value: &str) -> Result<Option<Uuid>, DomainError> {
    if value.is_empty() {
        Ok(None)
    } else {
        uuid(field, value).map(Some)
    }
}

pub fn title(field: &str, value: &str) -> Result<String, DomainError> {
    let trimmed = value.trim();
    if trimmed.is_empty() {
        return Err(DomainError::invalid(field, "must not be empty"));
    }
    let chars = trimmed.chars().count();
    if chars > MAX_TITLE_CHARS {
        return Err(DomainError::invalid(
            field,
            format!("is {chars} characters; at most {MAX_TITLE_CHARS} allowed"),
        ));
    }
    no_control_chars(field, trimmed)?;
    Ok(trimmed.to_owned())
}

/// A non-negative duration as the wire gives it (seconds and nanoseconds).
pub fn duration(field: &str, seconds: i64, nanos: i32) -> Result<std::time::Duration, DomainError> {
    if seconds < 0 || !(0..1_000_000_000).contains(&nanos) {
        return Err(DomainError::invalid(
            field,
            format!("must be a non-negative duration, got {seconds} s {nanos} ns"),
        ));
    }
    Ok(std::time::Duration::new(seconds as u64, nanos as u32))
}

/// Free text with a size limit (descriptions, reasons, error messages).
pub fn text(field: &str, value: &str, max_bytes: usize) -> Result<String, DomainError> {
    if value.len() > max_bytes {
        return Err(DomainError::invalid(
            field,
            format!("is {} bytes; at most {max_bytes} allowed", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(DomainError::invalid(field, "must not contain NUL characters"));
    }
    Ok(value.to_owned())
}

/// An enumerated field as a request carries it: absent (the wire's
/// UNSPECIFIED), a value this version knows, or a number it does not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Given<T> {
    #[default]
    Missing,
    Known(T),
    Unknown(i32),
}

impl<T> Given<T> {
    /// The value when this version knows it.
    pub fn known(self) -> Option<T> {
        match self {
            Given::Known(v) => Some(v),
            Given::Missing | Given::Unknown(_) => None,
        }
    }
}

/// A required enumerated field; `what` names its kind in the refusal.
pub fn required<T>(field: &str, value: Given<T>, what: &str) -> Result<T, DomainError> {
    match value {
        Given::Known(v) => Ok(v),
        Given::Missing => Err(DomainError::invalid(field, "is required")),
        Given::Unknown(n) => Err(DomainError::invalid(field, format!("{n} is not a known {what}"))),
    }
}

/// An optional enumerated field (a filter, a hint): absent means none.
pub fn optional<T>(field: &str, value: Given<T>, what: &str) -> Result<Option<T>, DomainError> {
    match value {
        Given::Missing => Ok(None),
        other => required(field, other, what).map(Some),
    }
}

pub fn phase(field: &str, value: Given<Phase>) -> Result<Phase, DomainError> {
    required(field, value, "phase")
}

/// A list of phases (an agent's affinity), each named `field[i]` when
/// refused; in phase order, each once.
pub fn phase_set(
    field: &str,
    values: impl IntoIterator<Item = Given<Phase>>,
) -> Result<std::collections::BTreeSet<Phase>, DomainError> {
    values
        .into_iter()
        .enumerate()
        .map(|(i, p)| phase(&format!("{field}[{i}]"), p))
        .collect()
}

/// A positive attempt number from a report.
pub fn attempt(field: &str, value: i32) -> Result<i32, DomainError> {
    if value < 1 {
        return Err(DomainError::invalid(field, format!("must be 1 or more, got {value}")));
    }
    Ok(value)
}

pub fn range(field: &str, value: i32, min: i32, max: i32) -> Result<i32, DomainError> {
    if value < min || value > max {
        return Err(DomainError::invalid(
            field,
            format!("must be between {min} and {max}, got {value}"),
        ));
    }
    Ok(value)
}

pub fn new_task(field: &str, raw: &RawNewTask<'_>) -> Result<NewTask, DomainError> {
    let id = if raw.id.is_empty() {
        Uuid::now_v7()
    } else {
        uuid(&format!("{field}.id"), raw.id)?
    };
    if raw.depends_on.len() > MAX_DEPENDENCIES {
        return Err(DomainError::invalid(
            format!("{field}.depends_on"),
            format!(
                "has {} entries; at most {MAX_DEPENDENCIES} allowed",
                raw.depends_on.len()
            ),
        ));
    }
    let depends_on = raw
        .depends_on
        .iter()
        .enumerate()
        .map(|(j, d)| uuid(&format!("{field}.depends_on[{j}]"), d))
        .collect::<Result<Vec<_>, _>>()?;
    if raw.lands_candidate && (depends_on.len() != 1 || !raw.candidate_of.is_empty()) {
        return Err(DomainError::invalid(
            format!("{field}.lands_candidate"),
            "needs exactly one dependency, the candidate it lands, and is no candidate itself",
        ));
    }
    Ok(NewTask {
        id,
        ticket_id: optional_uuid(&format!("{field}.ticket_id"), raw.ticket_id)?,
        title: title(&format!("{field}.title"), raw.title)?,
        description: text(&format!("{field}.description"), raw.description, MAX_DESCRIPTION_BYTES)?,
        phase: phase(&format!("{field}.phase"), raw.phase)?,
        priority: range(&format!("{field}.priority"), raw.priority, 0, i32::MAX)?,
        depends_on,
        max_retries: range(
            &format!("{field}.max_retries"),
            raw.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            0,
            MAX_RETRIES_LIMIT,
        )?,
        timeout_seconds: range(
            &format!("{field}.timeout_seconds"),
            raw.timeout_seconds,
            0,
            MAX_TIMEOUT_SECONDS,
        )?,
        concurrency_key: optional_concurrency_key(&format!("{field}.concurrency_key"), raw.concurrency_key)?,
        session: raw
            .session
            .clone()
            .map(|s| s.validated(&format!("{field}.session")))
            .transpose()?,
        requires: match raw.requires {
            Some(r) => crate::routing::requires(&format!("{field}.requires"), r)?,
            None => crate::routing::Labels::new(),
        },
        candidate: match optional_uuid(&format!("{field}.candidate_of"), raw.candidate_of)? {
            None => None,
            Some(of) => Some((
                of,
                range(
                    &format!("{field}.candidate"),
                    raw.candidate,
                    1,
                    crate::candidates::MAX_CANDIDATES,
                )?,
            )),
        },
        lands_candidate: raw.lands_candidate,
    })
}

/// Longest concurrency key: room for any repository, a ticket's default.
pub const MAX_CONCURRENCY_KEY_BYTES: usize = MAX_REPOSITORY_BYTES;

/// A concurrency key: 1 to 2,048 bytes, no control characters, not blank.
pub fn concurrency_key(field: &str, value: &str) -> Result<String, DomainError> {
    if value.trim().is_empty() {
        return Err(DomainError::invalid(field, "is required"));
    }
    if value.len() > MAX_CONCURRENCY_KEY_BYTES {
        return Err(DomainError::invalid(
            field,
            format!("is {} bytes; at most {MAX_CONCURRENCY_KEY_BYTES} allowed", value.len()),
        ));
    }
    no_control_chars(field, value)?;
    Ok(value.to_owned())
}

/// An optional concurrency key: empty means none.
pub fn optional_concurrency_key(field: &str, value: &str) -> Result<Option<String>, DomainError> {
    if value.is_empty() {
        Ok(None)
    } else {
        concurrency_key(field, value).map(Some)
    }
}

pub const MAX_LABELS: usize = 64;
pub const MAX_LABEL_KEY: usize = 63;
pub const MAX_LABEL_VALUE: usize = 256;

/// Labels: at most 64; keys of letters, digits and `- _ . /`; short values.
pub fn labels<'a>(
    field: &str,
    labels: impl ExactSizeIterator<Item = (&'a String, &'a String)>,
) -> Result<(), DomainError> {
    if labels.len() > MAX_LABELS {
        return Err(DomainError::invalid(
            field,
            format!("{} labels; at most {MAX_LABELS} allowed", labels.len()),
        ));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= MAX_LABEL_KEY
            && k.chars().all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c));
        if !key_ok {
            return Err(DomainError::invalid(
                field,
                format!(
                    "key {:?} must be 1 to {MAX_LABEL_KEY} characters of letters, digits, - _ . /",
                    truncate(k, 80)
                ),
            ));
        }
        if v.len() > MAX_LABEL_VALUE || v.chars().any(char::is_control) {
            return Err(DomainError::invalid(
                format!("{field}[{k}]"),
                format!("value must be at most {MAX_LABEL_VALUE} bytes without control characters"),
            ));
        }
    }
    Ok(())
}

/// Longest check command.
pub const MAX_CHECK_COMMAND_BYTES: usize = 4096;

/// A ticket's check command: empty (none), or up to 4,096 bytes without
/// control characters but newlines and tabs, on a ticket with a
/// repository (it checks the repository's work).
pub fn check_command(field: &str, value: &str, repository: &str) -> Result<String, DomainError> {
    let command = value.trim();
    if command.is_empty() {
        return Ok(String::new());
    }
    if repository.is_empty() {
        return Err(DomainError::invalid(
            field,
            "needs a repository: it checks the repository's work",
        ));
    }
    if command.len() > MAX_CHECK_COMMAND_BYTES {
        return Err(DomainError::invalid(
            field,
            format!("is {} bytes; at most {MAX_CHECK_COMMAND_BYTES} allowed", command.len()),
        ));
    }
    if command.chars().any(|c| c.is_control() && c != '\n' && c != '\t') {
        return Err(DomainError::invalid(
            field,
            "must not contain control characters but newlines and tabs",
        ));
    }
    Ok(command.to_owned())
}

/// A short identifier-like string (agent types, request ids).
pub fn token(field: &str, value: &str, max: usize, extra: &str) -> Result<String, DomainError> {
    let v = value.trim();
    if v.is_empty() || v.len() > max || !v.chars().all(|c| c.is_ascii_alphanumeric() || extra.contains(c)) {
        return Err(DomainError::invalid(
            field,
            format!("must be 1 to {max} characters of letters, digits and {extra:?}"),
        ));
    }
    Ok(v.to_owned())
}

pub const MAX_REPOSITORY_BYTES: usize = 2048;

/// What a ticket's repository names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Repository {
    /// An absolute local path to a git repository.
    Local(std::path::PathBuf),
    /// A URL git understands (https, http, ssh, git, file).
    Url(String),
}

/// A repository: empty (none), a git URL, or an absolute local path without
/// `..`. Anything that could read as a command-line option, climb out of a
/// directory or smuggle control characters is refused.
pub fn repository(field: &str, value: &str) -> Result<Option<Repository>, DomainError> {
    let v = value.trim();
    if v.is_empty() {
        return Ok(None);
    }
    if v.len() > MAX_REPOSITORY_BYTES {
        return Err(DomainError::invalid(
            field,
            format!("at most {MAX_REPOSITORY_BYTES} bytes"),
        ));
    }
    if v.starts_with('-') || v.chars().any(char::is_control) {
        return Err(DomainError::invalid(
            field,
            "must be a path or a git URL, not starting with '-' and without control characters",
        ));
    }
    for scheme in ["https://", "http://", "ssh://", "git://", "file://"] {
        if let Some(rest) = v.strip_prefix(scheme) {
            // A password in the URL would end up in logs, events and the
            // workspace; credentials belong to the executor's secret.
            let authority = rest.split('/').next().unwrap_or_default();
            if authority.rsplit_once('@').is_some_and(|(user, _)| user.contains(':')) {
                return Err(DomainError::invalid(
                    field,
                    "must not carry a password; give the executor OMOI_GIT_TOKEN instead",
                ));
            }
            return Ok(Some(Repository::Url(v.to_owned())));
        }
    }
    let p = std::path::Path::new(v);
    if !p.is_absolute() {
        return Err(DomainError::invalid(
            field,
            format!("{:?}: a local repository must be an absolute path", truncate(v, 80)),
        ));
    }
    if p.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(DomainError::invalid(
            field,
            format!("{:?}: '..' is not allowed", truncate(v, 80)),
        ));
    }
    Ok(Some(Repository::Local(p.to_path_buf())))
}

fn no_control_chars(field: &str, value: &str) -> Result<(), DomainError> {
    if value.chars().any(char::is_control) {
        return Err(DomainError::invalid(field, "must not contain control characters"));
    }
    Ok(())
}

fn truncate(s: &str, max_chars: usize) -> String {
    s.chars().take(max_chars).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field_of(err: DomainError) -> String {
        match err {
            DomainError::InvalidArgument(e) => e.field,
            other => panic!("unexpected {other:?}"),
        }
    }

    fn good() -> RawNewTask<'static> {
        RawNewTask {
            title: "Set up the project",
            phase: Given::Known(Phase::Initial),
            priority: 2,
            ..Default::default()
        }
    }

    #[test]
    fn a_good_task_gets_defaults() {
        let t = new_task("tasks[0]", &good()).unwrap();
        assert_eq!(t.title, "Set up the project");
        assert_eq!(t.phase, Phase::Initial);
        assert_eq!(t.max_retries, DEFAULT_MAX_RETRIES);
        assert_eq!(t.timeout_seconds, 0);
        assert_eq!(t.ticket_id, None);
        assert!(t.depends_on.is_empty());
    }

    #[test]
    fn bad_fields_are_named() {
        let deps = vec!["not-a-uuid".to_string()];
        let long = "x".repeat(201);
        let desc = "d".repeat(MAX_DESCRIPTION_BYTES + 1);
        let cases: Vec<(RawNewTask<'_>, &str)> = vec![
            (RawNewTask { id: "42", ..good() }, "tasks[3].id"),
            (
                RawNewTask {
                    ticket_id: "zz",
                    ..good()
                },
                "tasks[3].ticket_id",
            ),
            (RawNewTask { title: "", ..good() }, "tasks[3].title"),
            (RawNewTask { title: "   ", ..good() }, "tasks[3].title"),
            (RawNewTask { title: &long, ..good() }, "tasks[3].title"),
            (
                RawNewTask {
                    title: "a\u{7}b",
                    ..good()
                },
                "tasks[3].title",
            ),
            (
                RawNewTask {
                    description: &desc,
                    ..good()
                },
                "tasks[3].description",
            ),
            (
                RawNewTask {
                    phase: Given::Missing,
                    ..good()
                },
                "tasks[3].phase",
            ),
            (
                RawNewTask {
                    phase: Given::Unknown(9),
                    ..good()
                },
                "tasks[3].phase",
            ),
            (RawNewTask { priority: -1, ..good() }, "tasks[3].priority"),
            (
                RawNewTask {
                    max_retries: Some(-1),
                    ..good()
                },
                "tasks[3].max_retries",
            ),
            (
                RawNewTask {
                    max_retries: Some(101),
                    ..good()
                },
                "tasks[3].max_retries",
            ),
            (
                RawNewTask {
                    timeout_seconds: -5,
                    ..good()
                },
                "tasks[3].timeout_seconds",
            ),
            (
                RawNewTask {
                    timeout_seconds: MAX_TIMEOUT_SECONDS + 1,
                    ..good()
                },
                "tasks[3].timeout_seconds",
            ),
            (
                RawNewTask {
                    depends_on: &deps,
                    ..good()
                },
                "tasks[3].depends_on[0]",
            ),
        ];
        for (raw, want) in cases {
            assert_eq!(field_of(new_task("tasks[3]", &raw).unwrap_err()), want, "{raw:?}");
        }
    }

    #[test]
    fn title_counts_characters_not_bytes() {
        let title_200 = "é".repeat(200);
        assert!(title("t", &title_200).is_ok());
        assert!(title("t", &"é".repeat(201)).is_err());
    }

    #[test]
    fn repositories_are_urls_or_absolute_paths() {
        assert_eq!(
            repository("r", "https://example.com/r.git"),
            Ok(Some(Repository::Url("https://example.com/r.git".into())))
        );
        assert_eq!(
            repository("r", "/srv/repo"),
            Ok(Some(Repository::Local("/srv/repo".into())))
        );
        assert_eq!(repository("r", "  "), Ok(None));
        assert_eq!(
            repository("r", "ssh://git@example.com/r.git"),
            Ok(Some(Repository::Url("ssh://git@example.com/r.git".into())))
        );
        assert_eq!(
            field_of(repository("repository", "https://x:secret@example.com/r.git").unwrap_err()),
            "repository"
        );
        for bad in ["../secret", "relative/path", "/srv/../etc", "--upload-pack=x", "/a\nb"] {
            assert_eq!(
                field_of(repository("repository", bad).unwrap_err()),
                "repository",
                "{bad}"
            );
        }
    }

    #[test]
    fn labels_and_tokens() {
        use std::collections::HashMap;
        let ok: HashMap<String, String> = [("team".to_string(), "billing".to_string())].into();
        assert!(labels("labels", ok.iter()).is_ok());
        let bad_key: HashMap<String, String> = [("bad key".to_string(), "v".to_string())].into();
        assert_eq!(field_of(labels("labels", bad_key.iter()).unwrap_err()), "labels");
        let bad_value: HashMap<String, String> = [("k".to_string(), "a\nb".to_string())].into();
        assert_eq!(field_of(labels("labels", bad_value.iter()).unwrap_err()), "labels[k]");
        let many: HashMap<String, String> = (0..65).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(labels("labels", many.iter()).is_err());
        assert_eq!(token("agent_type", " executor ", 64, "-_."), Ok("executor".to_string()));
        assert!(token("agent_type", "", 64, "-_.").is_err());
        assert!(token("agent_type", "a b", 64, "-_.").is_err());
    }

    #[test]
    fn filters_and_attempts() {
        assert_eq!(optional::<Phase>("s", Given::Missing, "phase"), Ok(None));
        assert_eq!(
            optional("s", Given::Known(Phase::Integration), "phase"),
            Ok(Some(Phase::Integration))
        );
        let unknown = optional::<Phase>("status", Given::Unknown(42), "task status").unwrap_err();
        assert_eq!(
            unknown.to_string(),
            "invalid argument status: 42 is not a known task status"
        );
        assert_eq!(
            required::<Phase>("phase", Given::Missing, "phase")
                .unwrap_err()
                .to_string(),
            "invalid argument phase: is required"
        );
        let set = phase_set(
            "phases",
            [Phase::Refactoring, Phase::Initial, Phase::Refactoring].map(Given::Known),
        );
        assert_eq!(
            set.unwrap().into_iter().collect::<Vec<_>>(),
            [Phase::Initial, Phase::Refactoring]
        );
        let bad = phase_set("phases", [Given::Known(Phase::Initial), Given::Unknown(9)]).unwrap_err();
        assert_eq!(field_of(bad), "phases[1]");
        assert_eq!(field_of(attempt("attempt", 0).unwrap_err()), "attempt");
        assert_eq!(attempt("attempt", 3), Ok(3));
        assert_eq!(field_of(uuid("task_id", "").unwrap_err()), "task_id");
        assert_eq!(optional_uuid("x", ""), Ok(None));
    }
}
