//! Every request of AgentHealthService read into what the registry and the
//! store take, in one place. Each request is destructured whole, so a field
//! added to the proto fails the build here until it is read; anything bad
//! is refused with INVALID_ARGUMENT naming the field.

use omoi_base::{ApiError, ApiResult};
use omoi_domain::{AgentStatus, Phase, validate};
use omoi_proto::domain::WireEnum;
use omoi_proto::health as pb;
use omoi_store::agents::Registration;
use uuid::Uuid;

/// Most tasks an agent may hold at once.
pub const MAX_CAPACITY: i32 = 1000;
/// Most running tasks one heartbeat lists.
pub const MAX_RUNNING_IDS: usize = 1000;

/// RegisterAgent: who the agent is and what it takes (`phases` and the
/// older single `phase`, each once).
pub fn register(req: pb::RegisterAgentRequest) -> ApiResult<Registration> {
    let pb::RegisterAgentRequest {
        agent_type,
        phase,
        capacity,
        labels,
        phases,
        agent_id,
    } = req;
    let agent_type = validate::token("agent_type", &agent_type, 64, "-_.")?;
    let capacity = validate::range("capacity", capacity, 1, MAX_CAPACITY)?;
    let mut set = validate::phase_set("phases", phases.iter().map(|p| Phase::given(*p)))?;
    set.extend(validate::optional("phase", Phase::given(phase), "phase")?);
    let id = validate::optional_uuid("agent_id", &agent_id)?;
    validate::labels("labels", labels.iter())?;
    Ok(Registration {
        agent_type,
        capacity,
        phases: set.into_iter().collect(),
        id,
        labels: serde_json::to_value(&labels).unwrap_or_default(),
    })
}

/// Heartbeat: the agent and the tasks it runs.
pub fn heartbeat(req: pb::HeartbeatRequest) -> ApiResult<(Uuid, Vec<Uuid>)> {
    let pb::HeartbeatRequest {
        agent_id,
        running_task_ids,
    } = req;
    let id = validate::uuid("agent_id", &agent_id)?;
    if running_task_ids.len() > MAX_RUNNING_IDS {
        let reason = format!("at most {MAX_RUNNING_IDS} ids allowed");
        return Err(ApiError::invalid("running_task_ids", reason));
    }
    let running = running_task_ids
        .iter()
        .enumerate()
        .map(|(i, t)| validate::uuid(&format!("running_task_ids[{i}]"), t))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((id, running))
}

/// DeregisterAgent: the agent.
pub fn deregister(req: pb::DeregisterAgentRequest) -> ApiResult<Uuid> {
    let pb::DeregisterAgentRequest { agent_id } = req;
    Ok(validate::uuid("agent_id", &agent_id)?)
}

/// GetAgent: the agent.
pub fn get(req: pb::GetAgentRequest) -> ApiResult<Uuid> {
    let pb::GetAgentRequest { agent_id } = req;
    Ok(validate::uuid("agent_id", &agent_id)?)
}

/// ListAgents: the status asked for, if any.
pub fn list(req: pb::ListAgentsRequest) -> ApiResult<Option<AgentStatus>> {
    let pb::ListAgentsRequest { status } = req;
    Ok(validate::optional(
        "status",
        AgentStatus::given(status),
        "agent status",
    )?)
}

/// WatchAgents: the status asked for, if any.
pub fn watch(req: pb::WatchAgentsRequest) -> ApiResult<Option<AgentStatus>> {
    let pb::WatchAgentsRequest { status } = req;
    Ok(validate::optional(
        "status",
        AgentStatus::given(status),
        "agent status",
    )?)
}

/// GetHealthStatistics takes nothing (yet).
pub fn statistics(req: pb::GetHealthStatisticsRequest) {
    let pb::GetHealthStatisticsRequest {} = req;
}
