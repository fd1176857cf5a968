//! The operator's commands beyond tickets: tasks, agents, queue statistics,
//! an agent's live events, pausing and resuming dispatch, concurrency
//! limits. Each read command
//! prints text or, with `-o json`, the API's own messages in the proto3
//! JSON mapping.

use std::sync::LazyLock;

use futures::StreamExt;
use omoi_proto::common::{AgentEventKind, AgentStatus, Phase, TaskStatus};
use omoi_proto::health::{self as hp, agent_health_service_client::AgentHealthServiceClient};
use omoi_proto::taskqueue::{self as tq, task_queue_service_client::TaskQueueServiceClient};
use omoi_runtime::grpc::Connector;
use prost_reflect::{DescriptorPool, DynamicMessage};

use crate::{short_name, task_status_name};

/// How read commands print.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Output {
    #[default]
    Text,
    /// The API's messages as JSON (proto3 mapping), one document.
    Json,
}

pub(crate) static POOL: LazyLock<DescriptorPool> =
    LazyLock::new(|| DescriptorPool::decode(omoi_proto::FILE_DESCRIPTOR_SET).expect("the embedded descriptors decode"));

/// A message of the API as JSON, named by its full proto name.
pub fn json<M: prost::Message>(message: &M, name: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string_pretty(&dynamic(message, name)?)?)
}

/// The same on one line (a stream's messages, one per line).
pub fn json_line<M: prost::Message>(message: &M, name: &str) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&dynamic(message, name)?)?)
}

fn dynamic<M: prost::Message>(message: &M, name: &str) -> anyhow::Result<DynamicMessage> {
    let descriptor = POOL
        .get_message_by_name(name)
        .ok_or_else(|| anyhow::anyhow!("no message {name} in the API"))?;
    Ok(DynamicMessage::decode(descriptor, message.encode_to_vec().as_slice())?)
}

pub type Queue = TaskQueueServiceClient<omoi_runtime::grpc::Client>;
pub type Health = AgentHealthServiceClient<omoi_runtime::grpc::Client>;

pub fn queue(url: &str, connector: &Connector) -> anyhow::Result<Queue> {
    Ok(TaskQueueServiceClient::new(
        connector.client(url, "OMOI_TASK_QUEUE_URL")?,
    ))
}

pub fn health(url: &str, connector: &Connector) -> anyhow::Result<Health> {
    Ok(AgentHealthServiceClient::new(connector.client(url, "OMOI_HEALTH_URL")?))
}

/// An enum value given by its short name (`running`, `RUNNING`) or full one.
fn named<E>(what: &str, prefix: &str, value: &str, parse: impl Fn(&str) -> Option<E>) -> anyhow::Result<E> {
    let upper = value.to_ascii_uppercase();
    let full = format!("{prefix}{}", upper.trim_start_matches(prefix));
    parse(&full).ok_or_else(|| anyhow::anyhow!("{what} {value:?} is not one omoi knows"))
}

pub fn phase(value: &str) -> anyhow::Result<i32> {
    Ok(named("phase", "PHASE_", value, Phase::from_str_name)?.into())
}

pub fn task_status(value: &str) -> anyhow::Result<i32> {
    Ok(named("status", "TASK_STATUS_", value, TaskStatus::from_str_name)?.into())
}

pub fn agent_status(value: &str) -> anyhow::Result<i32> {
    Ok(named("status", "AGENT_STATUS_", value, AgentStatus::from_str_name)?.into())
}

pub fn phase_name(p: i32) -> &'static str {
    short_name(Phase::try_from(p).unwrap_or(Phase::Unspecified).as_str_name(), "PHASE_")
}

/// Tasks, oldest first, every page up to `limit`.
pub async fn tasks(q: &mut Queue, filter: tq::ListTasksRequest, limit: usize, out: Output) -> anyhow::Result<()> {
    let mut all = Vec::new();
    let mut request = filter;
    loop {
        let page = q.list_tasks(request.clone()).await?.into_inner();
        all.extend(page.tasks);
        if page.next_page_token.is_empty() || all.len() >= limit {
            break;
        }
        request.page_token = page.next_page_token;
    }
    all.truncate(limit);
    if out == Output::Json {
        let list = tq::ListTasksResponse {
            tasks: all,
            next_page_token: String::new(),
        };
        println!("{}", json(&list, "omoi.taskqueue.v1.ListTasksResponse")?);
        return Ok(());
    }
    let unsatisfied = unsatisfied(q, &all).await?;
    for t in &all {
        println!("{}{}", task_line(t), waiting_note(t, &unsatisfied));
    }
    Ok(())
}

/// The requirements no registered agent can meet, by phase, when any of
/// `tasks` is pending with a requirement (else no question is asked).
async fn unsatisfied(q: &mut Queue, tasks: &[tq::Task]) -> anyhow::Result<Vec<tq::UnsatisfiedRequirement>> {
    let pending = tasks
        .iter()
        .any(|t| t.status == TaskStatus::Pending as i32 && !t.requires.is_empty());
    if !pending {
        return Ok(Vec::new());
    }
    let stats = q
        .get_queue_stats(tq::GetQueueStatsRequest::default())
        .await?
        .into_inner();
    Ok(stats.unsatisfied)
}

/// `  (no agent has runner=codex)` for a pending task whose requirement no
/// registered agent meets.
fn waiting_note(t: &tq::Task, unsatisfied: &[tq::UnsatisfiedRequirement]) -> String {
    let stuck = t.status == TaskStatus::Pending as i32
        && unsatisfied
            .iter()
            .any(|u| u.phase == t.phase && u.requires == t.requires);
    if stuck {
        format!("  (no agent has {})", labels_text(&t.requires))
    } else {
        String::new()
    }
}

/// `gpu=true, runner=codex`: labels (an agent's or a requirement), sorted.
pub fn labels_text(labels: &std::collections::HashMap<String, String>) -> String {
    omoi_domain::routing::describe(&labels.clone().into_iter().collect())
}

fn task_line(t: &tq::Task) -> String {
    let cost = t
        .usage
        .as_ref()
        .map(|u| format!("  ${:.4}", u.cost_usd))
        .unwrap_or_default();
    let needs = if t.requires.is_empty() {
        String::new()
    } else {
        format!("  needs {}", labels_text(&t.requires))
    };
    format!(
        "{}  {:<11} {:<14} attempt {}  {}{cost}{needs}",
        t.id,
        task_status_name(t.status),
        phase_name(t.phase),
        t.attempt,
        t.title
    )
}

pub async fn task(q: &mut Queue, task_id: String, out: Output) -> anyhow::Result<()> {
    let r = q.get_task(tq::GetTaskRequest { task_id }).await?.into_inner();
    if out == Output::Json {
        println!("{}", json(&r, "omoi.taskqueue.v1.GetTaskResponse")?);
        return Ok(());
    }
    let t = r.task.unwrap_or_default();
    let unsatisfied = unsatisfied(q, std::slice::from_ref(&t)).await?;
    println!("{}{}", task_line(&t), waiting_note(&t, &unsatisfied));
    if !t.ticket_id.is_empty() {
        println!("  ticket {}", t.ticket_id);
    }
    if !t.depends_on.is_empty() {
        println!("  after {}", t.depends_on.join(", "));
    }
    if !t.assigned_agent_id.is_empty() {
        println!("  agent {}", t.assigned_agent_id);
    }
    if !t.error_message.is_empty() {
        println!("  error: {}", t.error_message);
    }
    if let Some(g) = &t.git {
        println!(
            "  commit {} on {} (+{} -{})",
            g.commit, g.branch, g.insertions, g.deletions
        );
    }
    if let Some(u) = &t.usage {
        println!("  {}", crate::usage_line(u));
    }
    if let Some(line) = check_line(&t) {
        println!("  {line}");
    }
    if t.lands_candidate {
        let landed = t.depends_on.first().map_or("", String::as_str);
        println!("  lands candidate task {landed} in place of the one chosen");
    }
    if !t.candidate_of.is_empty() {
        println!("  candidate {} of task {}", t.candidate, t.candidate_of);
    }
    for c in &t.candidates {
        println!("  {}", candidate_line(c));
    }
    if let Some(s) = &t.session {
        println!("  {}", session_line(s));
    }
    Ok(())
}

/// `candidate 2  codex gpt-5-codex  completed  check passed  +12 -3 in 2 files  $0.0123  chosen: …`
fn candidate_line(c: &tq::Candidate) -> String {
    let check = if c.check_passed { "check passed" } else { "check failed" };
    let cost = c
        .usage
        .as_ref()
        .map(|u| format!("  ${:.4}", u.cost_usd))
        .unwrap_or_default();
    let mark = if c.chosen { "*" } else { " " };
    format!(
        "{mark}candidate {}  {} {}  {}  {check}  +{} -{} in {} files{cost}  {}  task {}",
        c.index,
        c.runner,
        c.model,
        task_status_name(c.status),
        c.insertions,
        c.deletions,
        c.files_changed,
        c.reason,
        c.task_id
    )
}

/// `check passed: cargo test (exit 0, 12.3 s)` and the output's last
/// lines, from a completed task's result, when its ticket has a check.
fn check_line(t: &tq::Task) -> Option<String> {
    let result = omoi_proto::convert::struct_to_json(t.result.as_ref()?);
    let check = omoi_domain::check::Check::of(Some(&result))?;
    let mut line = check.line();
    if !check.passed {
        for l in &check.output_tail[check.output_tail.len().saturating_sub(5)..] {
            line.push_str(&format!("\n    {l}"));
        }
    }
    Some(line)
}

/// A task's agent session: runner and id, its latest checkpoint, where it
/// was resumed from.
fn session_line(s: &omoi_proto::common::AgentSession) -> String {
    let id = if s.session_id.is_empty() {
        "(no id)"
    } else {
        s.session_id.as_str()
    };
    let mut line = format!("session {} {id}", s.runner);
    if !s.checkpoint.is_empty() {
        let at = s
            .checkpoint_at
            .as_ref()
            .and_then(omoi_proto::convert::from_timestamp)
            .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
            .unwrap_or_else(|| "-".into());
        line.push_str(&format!(
            "; checkpoint {} of attempt {} ({} so far, {} bytes, at {at})",
            s.checkpoint, s.attempt, s.checkpoints, s.checkpoint_bytes
        ));
    }
    if s.resumed_from_attempt > 0 {
        line.push_str(&format!("; resumed from attempt {}", s.resumed_from_attempt));
        if !s.resumed_from_task_id.is_empty() {
            line.push_str(&format!(" of task {}", s.resumed_from_task_id));
        }
    }
    line
}

pub async fn agents(h: &mut Health, status: i32, out: Output) -> anyhow::Result<()> {
    let r = h.list_agents(hp::ListAgentsRequest { status }).await?.into_inner();
    if out == Output::Json {
        println!("{}", json(&r, "omoi.health.v1.ListAgentsResponse")?);
        return Ok(());
    }
    for a in &r.agents {
        println!("{}", agent_line(a));
    }
    Ok(())
}

pub async fn agent(h: &mut Health, agent_id: String, out: Output) -> anyhow::Result<()> {
    let r = h.get_agent(hp::GetAgentRequest { agent_id }).await?.into_inner();
    if out == Output::Json {
        println!("{}", json(&r, "omoi.health.v1.GetAgentResponse")?);
        return Ok(());
    }
    let a = r.agent.unwrap_or_default();
    println!("{}", agent_line(&a));
    for task in &a.running_task_ids {
        println!("  running {task}");
    }
    Ok(())
}

fn agent_line(a: &hp::Agent) -> String {
    let status = short_name(
        AgentStatus::try_from(a.status)
            .unwrap_or(AgentStatus::Unspecified)
            .as_str_name(),
        "AGENT_STATUS_",
    );
    let seen = a
        .last_heartbeat_at
        .as_ref()
        .and_then(omoi_proto::convert::from_timestamp)
        .map(|t| t.format("%H:%M:%S").to_string())
        .unwrap_or_default();
    format!(
        "{}  {:<12} {:<9} capacity {}  running {}  last heard {seen}  {}",
        a.id,
        a.agent_type,
        status,
        a.capacity,
        a.running_task_ids.len(),
        labels_text(&a.labels)
    )
}

pub async fn stats(q: &mut Queue, out: Output) -> anyhow::Result<()> {
    let s = q
        .get_queue_stats(tq::GetQueueStatsRequest::default())
        .await?
        .into_inner();
    if out == Output::Json {
        println!("{}", json(&s, "omoi.taskqueue.v1.GetQueueStatsResponse")?);
        return Ok(());
    }
    println!(
        "pending {} (ready {}, oldest {:.1} s)  assigned {}  running {}",
        s.pending, s.ready, s.oldest_ready_age_seconds, s.assigned, s.running
    );
    println!(
        "completed {}  failed {}  timed out {}  cancelled {}",
        s.completed, s.failed, s.timed_out, s.cancelled
    );
    for p in &s.pauses {
        let scope = match (p.phase, p.ticket_id.as_str()) {
            (0, "") => "everything".to_owned(),
            (0, t) => format!("ticket {t}"),
            (ph, "") => format!("phase {}", phase_name(ph)),
            (ph, t) => format!("phase {} of ticket {t}", phase_name(ph)),
        };
        println!("paused: {scope}  {}", p.reason);
    }
    for l in &s.limits {
        println!("limit: {} of {:?} out (cap {})", l.held, l.key, l.max_running);
    }
    for u in &s.unsatisfied {
        println!(
            "unsatisfiable: {} {} task(s) need {}, which no healthy agent taking that phase has",
            u.tasks,
            phase_name(u.phase),
            labels_text(&u.requires)
        );
    }
    Ok(())
}

/// The agent's events of a task, readable; with `follow`, live until the
/// task ends.
pub async fn logs(q: &mut Queue, task_id: String, follow: bool, out: Output) -> anyhow::Result<()> {
    let mut events = q
        .stream_task_output(tq::StreamTaskOutputRequest { task_id, follow })
        .await?
        .into_inner();
    while let Some(msg) = events.next().await {
        let Some(e) = msg?.event else { continue };
        if out == Output::Json {
            println!("{}", json_line(&e, "omoi.common.v1.AgentEvent")?);
            continue;
        }
        let kind = short_name(e.kind().as_str_name(), "AGENT_EVENT_KIND_");
        let what = match e.kind() {
            AgentEventKind::Output => short_name(e.stream().as_str_name(), "OUTPUT_STREAM_").to_owned(),
            AgentEventKind::ToolCall | AgentEventKind::ToolResult => e.tool.clone(),
            AgentEventKind::FileChange => e.path.clone(),
            AgentEventKind::Command => e.exit_code.map(|c| format!("exit {c}")).unwrap_or_default(),
            _ => String::new(),
        };
        let at =
            e.at.as_ref()
                .and_then(omoi_proto::convert::from_timestamp)
                .map(|t| t.format("%H:%M:%S%.3f").to_string())
                .unwrap_or_default();
        let text = e.text.lines().next().unwrap_or_default();
        println!("{at}  #{:<4} {:<11} {what:<12} {text}", e.seq, kind);
    }
    Ok(())
}

pub async fn pause(q: &mut Queue, phase: i32, ticket_id: String, reason: String) -> anyhow::Result<()> {
    q.pause_dispatch(tq::PauseDispatchRequest {
        phase,
        ticket_id,
        reason,
    })
    .await?;
    stats(q, Output::Text).await
}

pub async fn limit(q: &mut Queue, key: String, max_running: i32, clear: bool) -> anyhow::Result<()> {
    q.set_concurrency_limit(tq::SetConcurrencyLimitRequest {
        key,
        max_running,
        clear,
    })
    .await?;
    stats(q, Output::Text).await
}

pub async fn resume(q: &mut Queue, phase: i32, ticket_id: String) -> anyhow::Result<()> {
    q.resume_dispatch(tq::ResumeDispatchRequest { phase, ticket_id })
        .await?;
    stats(q, Output::Text).await
}
