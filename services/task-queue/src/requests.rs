//! Every request of TaskQueueService read into what the domain and the
//! store take, in one place. Each request is destructured whole, so a field
//! added to the proto fails the build here until it is read; anything bad
//! is refused with INVALID_ARGUMENT naming the field, before anything is
//! done.

use omoi_base::{ApiError, ApiResult};
use omoi_domain::rules::{self, Failure, Scope};
use omoi_domain::validate::{self, MAX_BATCH, MAX_ERROR_MESSAGE_BYTES, MAX_REASON_BYTES, NewTask, RawNewTask};
use omoi_domain::{AgentSession, ErrorClass, GitChange, Phase, TaskStatus, Usage};
use omoi_proto::convert::struct_to_json;
use omoi_proto::domain::{WireEnum, agent_session};
use omoi_proto::taskqueue as pb;
use omoi_store::tasks::{ListFilter, Report};
use prost::Message;
use uuid::Uuid;

/// Largest encoded `result` of a completion.
pub const MAX_RESULT_BYTES: usize = 256 * 1024;
/// Most tasks an agent holds at once.
pub const MAX_CAPACITY: i32 = 1000;
pub const DEFAULT_PAGE_SIZE: i32 = 100;
pub const MAX_PAGE_SIZE: i32 = 1000;
/// Most ids one BatchGetTasks names.
pub const MAX_BATCH_GET: usize = 1000;
/// Largest concurrency limit a key may have.
const MAX_CONCURRENCY_LIMIT: i32 = 1_000_000;

/// EnqueueTasks: the tasks, a task without a deadline given
/// `default_timeout_seconds`.
pub fn enqueue(req: pb::EnqueueTasksRequest, default_timeout_seconds: i32) -> ApiResult<Vec<NewTask>> {
    let pb::EnqueueTasksRequest { tasks } = req;
    if tasks.is_empty() {
        return Err(ApiError::invalid("tasks", "at least one task is required"));
    }
    if tasks.len() > MAX_BATCH {
        let reason = format!("{} tasks in one request; at most {MAX_BATCH} allowed", tasks.len());
        return Err(ApiError::invalid("tasks", reason));
    }
    let mut tasks = tasks
        .iter()
        .enumerate()
        .map(|(i, t)| new_task(&format!("tasks[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    for t in tasks.iter_mut().filter(|t| t.timeout_seconds == 0) {
        t.timeout_seconds = default_timeout_seconds;
    }
    omoi_domain::candidates::check_batch("tasks", &tasks)?;
    Ok(tasks)
}

fn new_task(field: &str, t: &pb::NewTask) -> Result<NewTask, omoi_domain::DomainError> {
    let pb::NewTask {
        id,
        ticket_id,
        title,
        description,
        phase,
        priority,
        depends_on,
        max_retries,
        timeout_seconds,
        concurrency_key,
        session,
        requires,
        candidate_of,
        candidate,
        lands_candidate,
    } = t;
    let session = session
        .clone()
        .map(|s| agent_session(&format!("{field}.session"), s))
        .transpose()?;
    let raw = RawNewTask {
        id,
        ticket_id,
        title,
        description,
        phase: Phase::given(*phase),
        priority: *priority,
        depends_on,
        max_retries: *max_retries,
        timeout_seconds: *timeout_seconds,
        concurrency_key,
        session,
        requires: Some(requires),
        candidate_of,
        candidate: *candidate,
        lands_candidate: *lands_candidate,
    };
    validate::new_task(field, &raw)
}

/// GetTask: the task's id.
pub fn get(req: pb::GetTaskRequest) -> ApiResult<Uuid> {
    let pb::GetTaskRequest { task_id } = req;
    Ok(validate::uuid("task_id", &task_id)?)
}

/// BatchGetTasks: the ids, in the order asked.
pub fn batch_get(req: pb::BatchGetTasksRequest) -> ApiResult<Vec<Uuid>> {
    let pb::BatchGetTasksRequest { task_ids } = req;
    if task_ids.is_empty() || task_ids.len() > MAX_BATCH_GET {
        let reason = format!("1 to {MAX_BATCH_GET} ids, got {}", task_ids.len());
        return Err(ApiError::invalid("task_ids", reason));
    }
    Ok(task_ids
        .iter()
        .enumerate()
        .map(|(i, id)| validate::uuid(&format!("task_ids[{i}]"), id))
        .collect::<Result<Vec<_>, _>>()?)
}

/// ListTasks: a page of the tasks a filter keeps.
pub struct Page {
    pub filter: ListFilter,
    pub size: i64,
    /// The position to continue after (0: the start).
    pub after: i64,
}

pub fn list(req: pb::ListTasksRequest) -> ApiResult<Page> {
    let pb::ListTasksRequest {
        ticket_id,
        status,
        phase,
        page_size,
        page_token,
    } = req;
    let filter = ListFilter {
        ticket_id: validate::optional_uuid("ticket_id", &ticket_id)?,
        status: validate::optional("status", TaskStatus::given(status), "task status")?,
        phase: validate::optional("phase", Phase::given(phase), "phase")?,
    };
    let size = match page_size {
        0 => DEFAULT_PAGE_SIZE,
        n => validate::range("page_size", n, 1, MAX_PAGE_SIZE)?,
    };
    let after = if page_token.is_empty() {
        0
    } else {
        let token = page_token.parse::<i64>().ok().filter(|n| *n >= 0);
        token.ok_or_else(|| ApiError::invalid("page_token", "not a token from a previous response"))?
    };
    Ok(Page {
        filter,
        size: i64::from(size),
        after,
    })
}

/// CancelTask: the task and why.
pub fn cancel(req: pb::CancelTaskRequest) -> ApiResult<(Uuid, String)> {
    let pb::CancelTaskRequest { task_id, reason } = req;
    task_and_reason(&task_id, &reason)
}

/// RetryTask: the task and why.
/// RetryTask: the task, why, and whether its next attempt starts a new
/// agent session.
pub fn retry(req: pb::RetryTaskRequest) -> ApiResult<(Uuid, String, bool)> {
    let pb::RetryTaskRequest { task_id, reason, fresh } = req;
    let (id, reason) = task_and_reason(&task_id, &reason)?;
    Ok((id, reason, fresh))
}

/// RecordSession: the attempt and its session.
pub fn record_session(req: pb::RecordSessionRequest) -> ApiResult<(Uuid, i32, AgentSession)> {
    let pb::RecordSessionRequest {
        task_id,
        attempt,
        session,
    } = req;
    let session = session.ok_or_else(|| ApiError::invalid("session", "is required"))?;
    Ok((
        validate::uuid("task_id", &task_id)?,
        validate::attempt("attempt", attempt)?,
        agent_session("session", session)?,
    ))
}

/// RecordIntervention: the task and what its guardian did.
pub fn record_intervention(
    req: pb::RecordInterventionRequest,
) -> ApiResult<(Uuid, omoi_domain::event::GuardianIntervened)> {
    let pb::RecordInterventionRequest {
        task_id,
        attempt,
        signal,
        action,
        reason,
        evidence,
        seq,
    } = req;
    let known = |field: &str, value: &str, allowed: &[&str]| {
        if allowed.contains(&value) {
            Ok(value.to_owned())
        } else {
            Err(ApiError::invalid(
                field,
                format!("must be one of {allowed:?}, got {value:?}"),
            ))
        }
    };
    let signals = [
        "repeated_call",
        "repeated_error",
        "stall",
        "spend_rate",
        "turns",
        "budget_share",
        "review",
    ];
    let attempt = validate::attempt("attempt", attempt)?;
    if evidence.len() > MAX_EVIDENCE {
        return Err(ApiError::invalid(
            "evidence",
            format!("has {} events; at most {MAX_EVIDENCE}", evidence.len()),
        ));
    }
    let evidence = evidence
        .into_iter()
        .enumerate()
        .map(|(i, e)| {
            if !(0..=attempt).contains(&e.attempt) {
                return Err(ApiError::invalid(
                    format!("evidence[{i}].attempt"),
                    format!("must be 1 to the attempt ({attempt}), or 0 for it, got {}", e.attempt),
                ));
            }
            Ok(omoi_domain::guardian::Evidence {
                attempt: if e.attempt == 0 { attempt } else { e.attempt },
                seq: e.seq,
                text: validate::text(&format!("evidence[{i}].text"), &e.text, MAX_REASON_BYTES)?,
            })
        })
        .collect::<ApiResult<Vec<_>>>()?;
    if seq < 0 {
        return Err(ApiError::invalid("seq", format!("must be 0 or more, got {seq}")));
    }
    Ok((
        validate::uuid("task_id", &task_id)?,
        omoi_domain::event::GuardianIntervened {
            attempt,
            agent_id: None,
            signal: known("signal", &signal, &signals)?,
            action: known("action", &action, &["nudge", "stop", "pause"])?,
            reason: validate::text("reason", &reason, MAX_REASON_BYTES)?,
            evidence,
            seq,
        },
    ))
}

/// Most events an intervention names.
const MAX_EVIDENCE: usize = 100;

fn task_and_reason(task_id: &str, reason: &str) -> ApiResult<(Uuid, String)> {
    Ok((
        validate::uuid("task_id", task_id)?,
        validate::text("reason", reason, MAX_REASON_BYTES)?,
    ))
}

/// WatchAssignments: who is watching, for which phases, with room for how
/// many tasks.
pub struct Watch {
    pub agent_id: Uuid,
    /// None: every phase.
    pub phases: Option<Vec<Phase>>,
    pub capacity: i64,
}

pub fn watch(req: pb::WatchAssignmentsRequest) -> ApiResult<Watch> {
    let pb::WatchAssignmentsRequest {
        agent_id,
        phases,
        capacity,
    } = req;
    let agent_id = validate::uuid("agent_id", &agent_id)?;
    let capacity = i64::from(validate::range("capacity", capacity, 1, MAX_CAPACITY)?);
    let phases = validate::phase_set("phases", phases.iter().map(|p| Phase::given(*p)))?;
    let some = !phases.is_empty() && phases.len() < Phase::ALL.len();
    Ok(Watch {
        agent_id,
        phases: some.then(|| phases.into_iter().collect()),
        capacity,
    })
}

/// StartTask: the attempt's report (in the request's trace).
pub fn start(req: pb::StartTaskRequest) -> ApiResult<Report> {
    let pb::StartTaskRequest { task_id, attempt } = req;
    report(&task_id, attempt)
}

/// ExtendLease: the attempt and how long more it is held.
pub struct Extension {
    pub task_id: Uuid,
    pub attempt: i32,
    pub seconds: i32,
}

pub fn extend_lease(req: pb::ExtendLeaseRequest) -> ApiResult<Extension> {
    let pb::ExtendLeaseRequest {
        task_id,
        attempt,
        seconds,
    } = req;
    Ok(Extension {
        task_id: validate::uuid("task_id", &task_id)?,
        attempt: validate::attempt("attempt", attempt)?,
        seconds: validate::range("seconds", seconds, 1, rules::MAX_LEASE_SECONDS)?,
    })
}

/// CompleteTask: the attempt's report with its result, usage and commit.
pub fn complete(req: pb::CompleteTaskRequest) -> ApiResult<Report> {
    let pb::CompleteTaskRequest {
        task_id,
        attempt,
        result,
        usage: spent,
        git,
    } = req;
    let mut report = report(&task_id, attempt)?;
    if let Some(result) = &result {
        let size = result.encoded_len();
        if size > MAX_RESULT_BYTES {
            let reason = format!("{size} bytes encoded; at most {MAX_RESULT_BYTES} allowed");
            return Err(ApiError::invalid("result", reason));
        }
        report.result = Some(struct_to_json(result));
    }
    report.usage = usage(spent)?;
    report.git = git.map(|g| GitChange::from(g).validated("git")).transpose()?;
    Ok(report)
}

/// FailTask: a timeout the agent noticed first, or a failure.
pub enum Failed {
    TimedOut {
        task_id: Uuid,
        attempt: i32,
        usage: Option<Usage>,
    },
    Failed {
        task_id: Uuid,
        failure: Failure,
    },
}

pub fn fail(req: pb::FailTaskRequest) -> ApiResult<Failed> {
    let pb::FailTaskRequest {
        task_id,
        attempt,
        error_message,
        error_class,
        timed_out,
        usage: spent,
        retry_after,
    } = req;
    let task_id = validate::uuid("task_id", &task_id)?;
    let attempt = validate::attempt("attempt", attempt)?;
    let message = validate::text("error_message", &error_message, MAX_ERROR_MESSAGE_BYTES)?;
    let class = validate::optional("error_class", ErrorClass::given(error_class), "error class")?;
    let usage = usage(spent)?;
    if timed_out {
        return Ok(Failed::TimedOut {
            task_id,
            attempt,
            usage,
        });
    }
    let retry_after = retry_after
        .map(|d| validate::duration("retry_after", d.seconds, d.nanos))
        .transpose()?;
    Ok(Failed::Failed {
        task_id,
        failure: Failure {
            attempt,
            message,
            class,
            usage,
            retry_after,
        },
    })
}

/// StreamTaskOutput: the task, and whether to follow it live.
pub fn output(req: pb::StreamTaskOutputRequest) -> ApiResult<(Uuid, bool)> {
    let pb::StreamTaskOutputRequest { task_id, follow } = req;
    Ok((validate::uuid("task_id", &task_id)?, follow))
}

/// PauseDispatch: the scope and why.
pub fn pause(req: pb::PauseDispatchRequest) -> ApiResult<(Scope, String)> {
    let pb::PauseDispatchRequest {
        phase,
        ticket_id,
        reason,
    } = req;
    Ok((
        scope(phase, &ticket_id)?,
        validate::text("reason", &reason, MAX_REASON_BYTES)?,
    ))
}

/// ResumeDispatch: the scope.
pub fn resume(req: pb::ResumeDispatchRequest) -> ApiResult<Scope> {
    let pb::ResumeDispatchRequest { phase, ticket_id } = req;
    scope(phase, &ticket_id)
}

/// SetConcurrencyLimit: a key's new cap, or its cap removed.
pub enum LimitChange {
    Set { key: String, max_running: i32 },
    Clear { key: String },
}

pub fn set_limit(req: pb::SetConcurrencyLimitRequest) -> ApiResult<LimitChange> {
    let pb::SetConcurrencyLimitRequest {
        key,
        max_running,
        clear,
    } = req;
    let key = validate::concurrency_key("key", &key)?;
    if clear {
        return Ok(LimitChange::Clear { key });
    }
    let max_running = validate::range("max_running", max_running, 0, MAX_CONCURRENCY_LIMIT)?;
    Ok(LimitChange::Set { key, max_running })
}

/// GetQueueStats and WatchQueueStats take nothing (yet).
pub fn stats(req: pb::GetQueueStatsRequest) {
    let pb::GetQueueStatsRequest {} = req;
}

pub fn watch_stats(req: pb::WatchQueueStatsRequest) {
    let pb::WatchQueueStatsRequest {} = req;
}

/// A report of an attempt, in the request's trace (read here, in the
/// RPC's span: the batch runs in a task of its own).
fn report(task_id: &str, attempt: i32) -> ApiResult<Report> {
    Ok(Report {
        task_id: validate::uuid("task_id", task_id)?,
        attempt: validate::attempt("attempt", attempt)?,
        result: None,
        usage: None,
        git: None,
        trace: omoi_runtime::trace::current(),
    })
}

/// A pause's scope as a request gives it: an optional phase and ticket.
fn scope(phase: i32, ticket_id: &str) -> ApiResult<Scope> {
    Ok(Scope {
        phase: validate::optional("phase", Phase::given(phase), "phase")?,
        ticket_id: validate::optional_uuid("ticket_id", ticket_id)?,
    })
}

/// A reported usage, checked.
fn usage(given: Option<omoi_proto::common::Usage>) -> ApiResult<Option<Usage>> {
    Ok(given.map(|u| Usage::from(u).validated("usage")).transpose()?)
}
