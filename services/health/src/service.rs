//! AgentHealthService: maps gRPC requests to validation, the registry and
//! the store.

use std::collections::HashMap;
use std::sync::Arc;

use chrono::Utc;
use omoi_domain::agent::AgentStatus;
use omoi_domain::{Phase, validate};
use omoi_proto::convert::timestamp;
use omoi_proto::health::{self as pb, agent_health_service_server::AgentHealthService};
use omoi_runtime::status::{from_domain, from_store};
use omoi_store::Store;
use omoi_store::agents::{Agent, Registration};
use serde_json::Value;
use tonic::{Request, Response, Status};
use uuid::Uuid;

use crate::registry::Registry;

pub const MAX_CAPACITY: i32 = 1000;
pub const MAX_RUNNING_IDS: usize = 1000;

pub struct Health {
    store: Store,
    registry: Arc<Registry>,
    interval_seconds: i32,
}

impl Health {
    pub fn new(store: Store, registry: Arc<Registry>, interval_seconds: u32) -> Self {
        Self {
            store,
            registry,
            interval_seconds: i32::try_from(interval_seconds).unwrap_or(i32::MAX),
        }
    }
}

fn agent(a: &Agent) -> pb::Agent {
    pb::Agent {
        id: a.id.to_string(),
        agent_type: a.agent_type.clone(),
        phase: match a.phases.as_slice() {
            [one] => one.to_proto(),
            _ => 0,
        },
        capacity: a.capacity,
        labels: match &a.labels {
            Value::Object(m) => m
                .iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect(),
            _ => HashMap::new(),
        },
        status: a.status.to_proto(),
        last_heartbeat_at: Some(timestamp(a.last_heartbeat_at)),
        registered_at: Some(timestamp(a.registered_at)),
        running_task_ids: a.running_task_ids.iter().map(ToString::to_string).collect(),
        phases: a.phases.iter().map(|p| p.to_proto()).collect(),
    }
}

fn labels(map: &HashMap<String, String>) -> Result<Value, Status> {
    validate::labels("labels", map.iter()).map_err(from_domain)?;
    Ok(serde_json::to_value(map).unwrap_or_default())
}

fn agent_id(value: &str) -> Result<Uuid, Status> {
    validate::uuid("agent_id", value).map_err(from_domain)
}

#[tonic::async_trait]
impl AgentHealthService for Health {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        let req = request.into_inner();
        let agent_type = validate::token("agent_type", &req.agent_type, 64, "-_.").map_err(from_domain)?;
        let capacity = validate::range("capacity", req.capacity, 1, MAX_CAPACITY).map_err(from_domain)?;
        let mut phases: Vec<Phase> = req
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| validate::phase(&format!("phases[{i}]"), *p))
            .collect::<Result<_, _>>()
            .map_err(from_domain)?;
        if let Some(p) = validate::phase_filter("phase", req.phase).map_err(from_domain)? {
            phases.push(p);
        }
        phases.sort_unstable();
        phases.dedup();
        let registration = Registration {
            id: validate::optional_uuid("agent_id", &req.agent_id).map_err(from_domain)?,
            agent_type,
            phases,
            capacity,
            labels: labels(&req.labels)?,
        };
        let a = self.store.register_agent(&registration).await.map_err(from_store)?;
        self.registry.remember(a.id, a.status);
        Ok(Response::new(pb::RegisterAgentResponse {
            agent: Some(agent(&a)),
            heartbeat_interval_seconds: self.interval_seconds,
        }))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = request.into_inner();
        let id = agent_id(&req.agent_id)?;
        if req.running_task_ids.len() > MAX_RUNNING_IDS {
            return Err(Status::invalid_argument(format!(
                "running_task_ids: at most {MAX_RUNNING_IDS} ids allowed"
            )));
        }
        let running = req
            .running_task_ids
            .iter()
            .enumerate()
            .map(|(i, t)| validate::uuid(&format!("running_task_ids[{i}]"), t))
            .collect::<Result<Vec<_>, _>>()
            .map_err(from_domain)?;
        match self.registry.status(id).await.map_err(from_store)? {
            None => return Err(Status::not_found(format!("agent {id} not found; register first"))),
            Some(AgentStatus::Deregistered) => {
                return Err(Status::failed_precondition(format!(
                    "agent {id} is deregistered; register again to heartbeat"
                )));
            }
            Some(_) => {}
        }
        self.registry
            .beat(Registry::now_beat(id, running))
            .await
            .map_err(from_store)?;
        omoi_runtime::metrics::HEARTBEATS.inc();
        Ok(Response::new(pb::HeartbeatResponse {
            interval_seconds: self.interval_seconds,
            status: AgentStatus::Healthy.to_proto(),
        }))
    }

    async fn deregister_agent(
        &self,
        request: Request<pb::DeregisterAgentRequest>,
    ) -> Result<Response<pb::DeregisterAgentResponse>, Status> {
        let id = agent_id(&request.get_ref().agent_id)?;
        let a = self.store.deregister_agent(id).await.map_err(from_store)?;
        self.registry.remember(id, AgentStatus::Deregistered);
        Ok(Response::new(pb::DeregisterAgentResponse { agent: Some(agent(&a)) }))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::GetAgentResponse>, Status> {
        let id = agent_id(&request.get_ref().agent_id)?;
        // Buffered heartbeats first, so the answer is current.
        let _ = self.registry.flush().await;
        let a = self.store.get_agent(id).await.map_err(from_store)?;
        Ok(Response::new(pb::GetAgentResponse { agent: Some(agent(&a)) }))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        let status = match request.get_ref().status {
            0 => None,
            n => Some(
                AgentStatus::from_proto(n)
                    .ok_or_else(|| Status::invalid_argument(format!("status: {n} is not a known agent status")))?,
            ),
        };
        let _ = self.registry.flush().await;
        let agents = self.store.list_agents(status).await.map_err(from_store)?;
        Ok(Response::new(pb::ListAgentsResponse {
            agents: agents.iter().map(agent).collect(),
        }))
    }

    async fn get_health_statistics(
        &self,
        _request: Request<pb::GetHealthStatisticsRequest>,
    ) -> Result<Response<pb::GetHealthStatisticsResponse>, Status> {
        let _ = self.registry.flush().await;
        let stats = self.store.agent_stats().await.map_err(from_store)?;
        let now = Utc::now();
        let age = |a: &Agent| (now - a.last_heartbeat_at).num_milliseconds().max(0) as f64 / 1000.0;
        let healthy: Vec<f64> = stats
            .agents
            .iter()
            .filter(|a| a.status == AgentStatus::Healthy)
            .map(age)
            .collect();
        Ok(Response::new(pb::GetHealthStatisticsResponse {
            total_agents: stats.agents.len() as i64,
            by_status: stats
                .by_status
                .iter()
                .map(|(s, n)| pb::StatusCount {
                    status: s.to_proto(),
                    count: *n,
                })
                .collect(),
            by_type: stats
                .by_type
                .iter()
                .map(|(t, n)| pb::TypeCount {
                    agent_type: t.clone(),
                    count: *n,
                })
                .collect(),
            agents: stats
                .agents
                .iter()
                .map(|a| pb::AgentTaskCounts {
                    agent_id: a.id.to_string(),
                    completed: a.completed_tasks,
                    failed: a.failed_tasks,
                    heartbeat_age_seconds: age(a),
                })
                .collect(),
            average_heartbeat_age_seconds: if healthy.is_empty() {
                0.0
            } else {
                healthy.iter().sum::<f64>() / healthy.len() as f64
            },
            max_heartbeat_age_seconds: healthy.iter().copied().fold(0.0, f64::max),
        }))
    }
}
