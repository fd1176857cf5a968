//! AgentHealthService: maps gRPC requests to validation, the registry and
//! the store.

use std::sync::Arc;

use chrono::Utc;
use omoi_base::ApiResult;
use omoi_domain::{Agent, AgentStatus};
use omoi_proto::domain::WireEnum;
use omoi_proto::health::{self as pb, agent_health_service_server::AgentHealthService};
use omoi_store::Store;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Request, Response, Status};

use crate::registry::Registry;
use crate::requests;
use crate::watch;

type AgentStream = ReceiverStream<Result<pb::WatchAgentsResponse, Status>>;

pub struct Health {
    store: Store,
    registry: Arc<Registry>,
    interval_seconds: i32,
    hub: Arc<watch::Hub>,
    watchers: CancellationToken,
}

impl Health {
    pub fn new(
        store: Store,
        registry: Arc<Registry>,
        interval_seconds: u32,
        hub: Arc<watch::Hub>,
        watchers: CancellationToken,
    ) -> Self {
        Self {
            store,
            registry,
            interval_seconds: i32::try_from(interval_seconds).unwrap_or(i32::MAX),
            hub,
            watchers,
        }
    }
}

impl Health {
    async fn register(&self, req: pb::RegisterAgentRequest) -> ApiResult<pb::RegisterAgentResponse> {
        let registration = requests::register(req)?;
        let a = self.store.register_agent(&registration).await?;
        self.registry.remember(a.id, a.status);
        Ok(pb::RegisterAgentResponse {
            agent: Some(pb::Agent::from(&a)),
            heartbeat_interval_seconds: self.interval_seconds,
        })
    }

    async fn beat(&self, req: pb::HeartbeatRequest) -> ApiResult<pb::HeartbeatResponse> {
        let (id, running) = requests::heartbeat(req)?;
        match self.registry.status(id).await? {
            None => return Err(Status::not_found(format!("agent {id} not found; register first")).into()),
            Some(AgentStatus::Deregistered) => {
                let refused = format!("agent {id} is deregistered; register again to heartbeat");
                return Err(Status::failed_precondition(refused).into());
            }
            Some(_) => {}
        }
        self.registry.beat(Registry::now_beat(id, running)).await?;
        omoi_runtime::metrics::HEARTBEATS.inc();
        Ok(pb::HeartbeatResponse {
            interval_seconds: self.interval_seconds,
            status: AgentStatus::Healthy.wire(),
        })
    }

    async fn deregister(&self, req: pb::DeregisterAgentRequest) -> ApiResult<pb::DeregisterAgentResponse> {
        let id = requests::deregister(req)?;
        let a = self.store.deregister_agent(id).await?;
        self.registry.remember(id, AgentStatus::Deregistered);
        Ok(pb::DeregisterAgentResponse {
            agent: Some(pb::Agent::from(&a)),
        })
    }

    async fn get(&self, req: pb::GetAgentRequest) -> ApiResult<pb::GetAgentResponse> {
        let id = requests::get(req)?;
        // Buffered heartbeats first, so the answer is current.
        let _ = self.registry.flush().await;
        let a = self.store.get_agent(id).await?;
        Ok(pb::GetAgentResponse {
            agent: Some(pb::Agent::from(&a)),
        })
    }

    async fn list(&self, req: pb::ListAgentsRequest) -> ApiResult<pb::ListAgentsResponse> {
        let status = requests::list(req)?;
        let _ = self.registry.flush().await;
        let agents = self.store.list_agents(status).await?;
        Ok(pb::ListAgentsResponse {
            agents: agents.iter().map(pb::Agent::from).collect(),
        })
    }

    async fn watch(&self, req: pb::WatchAgentsRequest) -> ApiResult<AgentStream> {
        let status = requests::watch(req)?;
        // Buffered heartbeats first, so the first list is current.
        let _ = self.registry.flush().await;
        let (tx, rx) = mpsc::channel(16);
        tokio::spawn(watch::follow(
            self.hub.subscribe(),
            self.store.clone(),
            status,
            tx,
            self.watchers.clone(),
        ));
        Ok(ReceiverStream::new(rx))
    }

    async fn statistics(&self, req: pb::GetHealthStatisticsRequest) -> ApiResult<pb::GetHealthStatisticsResponse> {
        requests::statistics(req);
        let _ = self.registry.flush().await;
        let stats = self.store.agent_stats().await?;
        let now = Utc::now();
        let age = |a: &Agent| (now - a.last_heartbeat_at).num_milliseconds().max(0) as f64 / 1000.0;
        let healthy: Vec<f64> = stats
            .agents
            .iter()
            .filter(|a| a.status == AgentStatus::Healthy)
            .map(age)
            .collect();
        Ok(pb::GetHealthStatisticsResponse {
            total_agents: stats.agents.len() as i64,
            by_status: stats
                .by_status
                .iter()
                .map(|(s, n)| pb::StatusCount {
                    status: s.wire(),
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
        })
    }
}

#[tonic::async_trait]
impl AgentHealthService for Health {
    async fn register_agent(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        Ok(Response::new(self.register(request.into_inner()).await?))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        Ok(Response::new(self.beat(request.into_inner()).await?))
    }

    async fn deregister_agent(
        &self,
        request: Request<pb::DeregisterAgentRequest>,
    ) -> Result<Response<pb::DeregisterAgentResponse>, Status> {
        Ok(Response::new(self.deregister(request.into_inner()).await?))
    }

    async fn get_agent(&self, request: Request<pb::GetAgentRequest>) -> Result<Response<pb::GetAgentResponse>, Status> {
        Ok(Response::new(self.get(request.into_inner()).await?))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        Ok(Response::new(self.list(request.into_inner()).await?))
    }

    async fn get_health_statistics(
        &self,
        request: Request<pb::GetHealthStatisticsRequest>,
    ) -> Result<Response<pb::GetHealthStatisticsResponse>, Status> {
        Ok(Response::new(self.statistics(request.into_inner()).await?))
    }

    type WatchAgentsStream = AgentStream;

    async fn watch_agents(
        &self,
        request: Request<pb::WatchAgentsRequest>,
    ) -> Result<Response<Self::WatchAgentsStream>, Status> {
        Ok(Response::new(self.watch(request.into_inner()).await?))
    }
}
