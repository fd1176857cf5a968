//! Registration, heartbeats, and the drain that ends in deregistration.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use omoi_proto::domain::WireEnum;
use omoi_proto::health as hp;
use omoi_runtime::background::{pause, policy};
use tokio_util::sync::CancellationToken;
use tonic::{Code, Status};

use super::Worker;
use crate::executions::StopRequest;

impl Worker {
    async fn register(&self) -> Result<(), Status> {
        let r = self
            .health
            .clone()
            .register_agent(hp::RegisterAgentRequest {
                agent_id: self.agent_id.to_string(),
                agent_type: self.config.agent_type.clone(),
                phase: omoi_proto::common::Phase::Unspecified.into(),
                phases: self.phases.iter().map(|p| p.wire()).collect(),
                capacity: self.config.capacity,
                labels: self.labels.clone(),
            })
            .await?
            .into_inner();
        self.interval_secs
            .store(r.heartbeat_interval_seconds.max(1) as u64, Ordering::Relaxed);
        self.registered.send_replace(true);
        tracing::info!(agent_id = %self.agent_id, interval = r.heartbeat_interval_seconds, "registered");
        Ok(())
    }

    /// Registers (again whenever the registry lost us) and heartbeats at the
    /// interval the health service tells, until `stop`.
    pub async fn heartbeat_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = policy::RECONNECT.start();
        while !stop.is_cancelled() {
            if !*self.registered.borrow() {
                if let Err(e) = self.register().await {
                    tracing::warn!(error = %e.message(), "registration failed; retrying");
                    if !pause(&stop, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
                backoff.reset();
            }
            let wait = Duration::from_secs(self.interval_secs.load(Ordering::Relaxed));
            let mut registered = self.registered.subscribe();
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                // The task queue did not know us: register now.
                _ = registered.wait_for(|known| !*known) => continue,
            }
            let beat = self
                .health
                .clone()
                .heartbeat(hp::HeartbeatRequest {
                    agent_id: self.agent_id.to_string(),
                    running_task_ids: self.executions.running_ids(),
                })
                .await;
            match beat {
                Ok(r) => {
                    let i = r.into_inner().interval_seconds.max(1) as u64;
                    self.interval_secs.store(i, Ordering::Relaxed);
                }
                Err(s) if matches!(s.code(), Code::NotFound | Code::FailedPrecondition) => {
                    tracing::warn!(error = %s.message(), "registration lost; registering again");
                    self.registered.send_replace(false);
                }
                Err(s) => tracing::warn!(error = %s.message(), "heartbeat failed"),
            }
        }
    }

    /// Stops taking work, lets runs finish within `grace`, stops and reports
    /// what is left as retryable (so another agent takes it), deregisters.
    pub async fn drain(&self, grace: Duration) {
        self.accepting.store(false, Ordering::Relaxed);
        let deadline = tokio::time::Instant::now() + grace;
        while !self.executions.active().is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let left = self.executions.active();
        for run in &left {
            run.stop_with(StopRequest {
                reason: "executor shutting down".into(),
                report: true,
            });
        }
        let settle = Duration::from_secs_f64(self.config.kill_grace_seconds.max(0.0)) + Duration::from_secs(5);
        let deadline = tokio::time::Instant::now() + settle;
        while left.iter().any(|r| !r.is_finished()) && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // Let the last reports go out.
        tokio::time::sleep(Duration::from_millis(200)).await;
        let _ = self
            .health
            .clone()
            .deregister_agent(hp::DeregisterAgentRequest {
                agent_id: self.agent_id.to_string(),
            })
            .await;
        tracing::info!(stopped = left.len(), "drained and deregistered");
    }
}
