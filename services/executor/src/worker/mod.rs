//! The executor's life as an agent: register with the health service and
//! heartbeat, and deregister after draining (`lifecycle`); take
//! assignments from the task queue (`stream`); work each in its own
//! workspace through the runner and report the outcome (`run`).

mod candidates;
mod guardian;
mod lifecycle;
mod prompt;
mod run;
mod session;
mod stream;

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64};

use anyhow::Context;
use omoi_domain::{ErrorClass, Phase, classify};
use omoi_proto::domain::WireEnum;
use omoi_proto::health::agent_health_service_client::AgentHealthServiceClient;
use omoi_proto::taskqueue::{self as tq, task_queue_service_client::TaskQueueServiceClient};
use omoi_proto::ticket::ticket_service_client::TicketServiceClient;
use omoi_runtime::background::{Retried, policy, retry};
use omoi_runtime::config::secret;
use omoi_runtime::status::transient;
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::agent_user::AgentUser;
use crate::check::CheckSettings;
use crate::config::Config;
use crate::executions::Executions;
use crate::git::GitSettings;
use crate::git_cache::GitCache;
use crate::reuse::Parked;
use crate::runners::{self, Runner};
use crate::sandbox::Sandbox;
use crate::sessions::Sessions;

type Ch = omoi_runtime::grpc::Client;

pub struct Worker {
    pub agent_id: Uuid,
    pub config: Config,
    pub executions: Arc<Executions>,
    runner: Box<dyn Runner>,
    phases: Vec<Phase>,
    labels: HashMap<String, String>,
    queue: TaskQueueServiceClient<Ch>,
    health: AgentHealthServiceClient<Ch>,
    tickets: TicketServiceClient<Ch>,
    /// Whether the health service knows this agent: the assignment stream
    /// waits for it, and a refusal anywhere registers again at once.
    pub registered: tokio::sync::watch::Sender<bool>,
    pub accepting: AtomicBool,
    interval_secs: AtomicU64,
    /// Who agents run as (`OMOI_AGENT_USER`).
    agent_user: Option<Arc<AgentUser>>,
    git: GitSettings,
    /// How tickets' check commands run.
    check: CheckSettings,
    /// Where checkpoints of agent sessions are kept.
    sessions: Sessions,
    /// What agents run in, when the machine can sandbox them.
    pub(crate) sandbox: Option<Arc<Sandbox>>,
    /// Tickets' work trees kept for their next attempts.
    parked: Parked,
    /// When the guardian steps into a run.
    guardian: omoi_domain::guardian::Thresholds,
}

/// Phases from `INITIAL,IMPLEMENTATION` (with or without the PHASE_ prefix).
pub fn parse_phases(list: &str) -> anyhow::Result<Vec<Phase>> {
    let mut out = Vec::new();
    for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let name = item.to_ascii_uppercase();
        let name = name.strip_prefix("PHASE_").unwrap_or(&name).to_owned();
        let phase = Phase::ALL
            .into_iter()
            .find(|p| p.as_str().trim_start_matches("PHASE_") == name)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "OMOI_AGENT_PHASES: {item:?} is not INITIAL, IMPLEMENTATION, INTEGRATION or REFACTORING"
                )
            })?;
        if !out.contains(&phase) {
            out.push(phase);
        }
    }
    Ok(out)
}

/// Labels from `key=value,key=value`.
/// What the executor registers as its labels: `runner=<runner>`,
/// `model=<model>` when one is set, and OMOI_AGENT_LABELS; tasks requiring
/// labels are routed by them.
fn agent_labels(config: &Config) -> anyhow::Result<HashMap<String, String>> {
    let extra = parse_labels(&config.labels)?.into_iter().collect();
    let labels = omoi_domain::routing::agent_labels(config.runner.as_str(), config.agent_model.as_deref(), extra)
        .map_err(|e| anyhow::anyhow!("OMOI_AGENT_LABELS: {e}"))?;
    Ok(labels.into_iter().collect())
}

pub fn parse_labels(list: &str) -> anyhow::Result<HashMap<String, String>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|kv| {
            kv.split_once('=')
                .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
                .ok_or_else(|| anyhow::anyhow!("OMOI_AGENT_LABELS: {kv:?} is not key=value"))
        })
        .collect()
}

/// Sends a report until a service answers it (restarts are ridden out,
/// by [`policy::REPORT`]); false when it was refused, i.e. the attempt is
/// no longer ours, or could not be delivered.
async fn report<F, Fut, T>(what: &str, send: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    // A report is sent whatever the executor's state: a drain waits for it.
    let never = CancellationToken::new();
    match retry(what, policy::REPORT, &never, |s: &Status| transient(s.code()), send).await {
        Retried::Done(_) => true,
        Retried::Refused(s) => {
            tracing::info!(what, code = ?s.code(), error = %s.message(), "report refused");
            false
        }
        Retried::GaveUp(_) | Retried::Stopped => {
            tracing::warn!(
                what,
                "report undelivered; the task queue's timeouts and stale detection take over"
            );
            false
        }
    }
}

impl Worker {
    pub fn new(
        config: Config,
        executions: Arc<Executions>,
        agent_id: Uuid,
        nats: async_nats::Client,
    ) -> anyhow::Result<Self> {
        let agent_user = config
            .agent_user
            .as_deref()
            .filter(|u| !u.trim().is_empty())
            .map(|u| AgentUser::resolve(u, &config.state_dir()).map(Arc::new))
            .transpose()?;
        let model = runners::ModelApi::of(&config)
            .map(runners::ModelApi::route)
            .transpose()?;
        let sandbox = Sandbox::from_config(&config, agent_user.as_deref(), model)?.map(Arc::new);
        // Sandboxed, an agent never gets the executor's own home.
        let agent_user = match (agent_user, &sandbox) {
            (None, Some(_)) => Some(Arc::new(AgentUser::own(&config.state_dir())?)),
            (user, _) => user,
        };
        let runner = runners::from_config(&config, agent_user.as_deref(), sandbox.as_deref())?;
        anyhow::ensure!(
            (1..=1000).contains(&config.capacity),
            "OMOI_EXECUTOR_CAPACITY must be 1 to 1000, got {}",
            config.capacity
        );
        let connector = config.host.connector()?;
        let git = GitSettings {
            author_name: config.git_author_name.clone(),
            author_email: config.git_author_email.clone(),
            token: secret(&config.git_token, &config.git_token_file),
            username: config.git_username.clone(),
            ssh_key: config.git_ssh_key_file.clone(),
            cache: Some(Arc::new(
                GitCache::new(&config.git_cache_dir(), config.git_cache_max_bytes)
                    .with_context(|| format!("the git cache {}", config.git_cache_dir().display()))?,
            )),
            // An agent in a pod of its own cannot reach the cache.
            borrow: !sandbox.as_ref().is_some_and(|s| s.per_attempt_pod()),
        };
        Ok(Self {
            agent_id,
            phases: parse_phases(&config.phases)?,
            labels: agent_labels(&config)?,
            queue: TaskQueueServiceClient::new(connector.client(&config.task_queue_url, "OMOI_TASK_QUEUE_URL")?),
            health: AgentHealthServiceClient::new(connector.client(&config.health_url, "OMOI_HEALTH_URL")?),
            tickets: TicketServiceClient::new(connector.client(&config.ticket_url, "OMOI_TICKET_URL")?),
            runner,
            executions,
            registered: tokio::sync::watch::Sender::new(false),
            accepting: AtomicBool::new(true),
            interval_secs: AtomicU64::new(30),
            agent_user,
            git,
            check: CheckSettings {
                timeout: std::time::Duration::from_secs(config.check_timeout_seconds.max(1)),
                kill_grace: std::time::Duration::from_secs_f64(config.kill_grace_seconds.max(0.0)),
                env_allow: config.env_allow.clone(),
            },
            sessions: Sessions::new(nats, &config),
            sandbox,
            parked: Parked::new(&config.workspace_root, config.workspace_reuse_slots),
            guardian: config.guardian()?,
            config,
        })
    }

    async fn fail(&self, task_id: Uuid, attempt: i32, message: &str, class: Option<ErrorClass>) {
        self.report_failure(task_id, attempt, message, class, tq::FailTaskRequest::default())
            .await;
    }

    /// FailTask, delivered; `more` says what else the report tells
    /// (`timed_out`, `usage`, `retry_after`).
    async fn report_failure(
        &self,
        task_id: Uuid,
        attempt: i32,
        message: &str,
        class: Option<ErrorClass>,
        more: tq::FailTaskRequest,
    ) {
        let message: String = message.chars().take(8000).collect();
        let class = class.unwrap_or_else(|| classify::classify(&message, None));
        let request = tq::FailTaskRequest {
            task_id: task_id.to_string(),
            attempt,
            error_message: message,
            error_class: class.wire(),
            ..more
        };
        report("FailTask", || {
            let mut q = self.queue.clone();
            let request = request.clone();
            async move { q.fail_task(request).await }
        })
        .await;
    }
}

/// The answer of an agent asked for one (the judge, the reviewer): its
/// run's summary, or — a runner that tells no verdict, exiting 0 — what
/// `said_last` gives; why not (naming `who`) when it failed or did not
/// finish.
fn answer_of(
    who: &str,
    outcome: runners::RunOutcome,
    said_last: impl FnOnce() -> Option<String>,
) -> Result<String, String> {
    match (&outcome.stopped, outcome.verdict) {
        (None, Some(runners::Verdict::Succeeded { summary })) => Ok(summary),
        (None, None) if outcome.exit_code == Some(0) => said_last().ok_or_else(|| format!("the {who} said nothing")),
        (None, Some(runners::Verdict::Failed { message, .. })) => Err(format!("the {who} failed: {message}")),
        _ => Err(format!("the {who} did not finish")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn phases_and_labels_parse() {
        assert_eq!(
            parse_phases("initial, PHASE_REFACTORING,initial").unwrap(),
            vec![Phase::Initial, Phase::Refactoring]
        );
        assert!(parse_phases("").unwrap().is_empty());
        assert!(parse_phases("testing").is_err());
        let labels = parse_labels("zone=a, tier = gpu").unwrap();
        assert_eq!(labels.get("tier").map(String::as_str), Some("gpu"));
        assert!(parse_labels("novalue").is_err());
    }
}
