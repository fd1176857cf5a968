//! Taking work back: the timeout monitor times out running tasks past their
//! deadline, puts back assignments not started within the start lease and
//! takes back running tasks nobody holds (the running lease), and the
//! stale-agent consumer takes back the tasks of agents the health
//! service declared stale. Their agents are told to stop, and the tasks are
//! retried, failed or requeued.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use omoi_domain::{Event, EventType};
use omoi_runtime::background::{every, pause};
use omoi_store::Store;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;

const BATCH: i64 = 100;

/// After its start, a heartbeat that does not list a task only counts once
/// this many seconds passed (one built before the run was registered may
/// arrive just after the start); less for a short lease.
fn listing_slack(lease_seconds: f64) -> f64 {
    (lease_seconds / 4.0).min(10.0)
}

/// How long assignments and running attempts are held (None: forever).
#[derive(Debug, Clone, Copy)]
pub struct Leases {
    pub start: Option<f64>,
    pub running: Option<f64>,
}

/// Every `period` until `shutdown`: assignments and running attempts whose
/// lease lapsed go back to the queue, running tasks past their deadline
/// time out. Each step logs its own failure; the next pass tries again.
pub async fn run(
    store: Store,
    dispatcher: Arc<Dispatcher>,
    period: Duration,
    leases: Leases,
    shutdown: CancellationToken,
) {
    let (store, dispatcher) = (&store, &dispatcher);
    every("the lease and timeout check", period, &shutdown, move || async move {
        if let Some(seconds) = leases.start {
            put_back_unstarted(store, dispatcher, seconds).await;
        }
        if let Some(seconds) = leases.running {
            take_back_unheld(store, dispatcher, seconds).await;
        }
        time_out_expired(store, dispatcher).await;
        Ok::<_, Infallible>(())
    })
    .await
}

/// Running tasks past their deadline are timed out, a batch at a time.
async fn time_out_expired(store: &Store, dispatcher: &Dispatcher) {
    loop {
        match store.time_out_expired(BATCH).await {
            Ok(outcomes) => {
                omoi_runtime::metrics::TASK_TIMEOUTS.inc_by(outcomes.len() as u64);
                took_back(dispatcher, &outcomes, "task timed out");
                if (outcomes.len() as i64) < BATCH {
                    return;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "timeout check failed");
                return;
            }
        }
    }
}

/// Counts and logs what taking work back did, tells the holders to stop,
/// and wakes dispatch for the tasks back in the queue.
fn took_back(dispatcher: &Dispatcher, outcomes: &[omoi_store::tasks::Outcome], what: &str) {
    for outcome in outcomes {
        count(outcome);
        tracing::info!(task_id = %outcome.task.id, status = %outcome.task.status, "{what}");
        if let Some(revoked) = &outcome.revoked {
            dispatcher.revoke(revoked);
        }
    }
    if !outcomes.is_empty() {
        dispatcher.wake();
    }
}

/// Assignments whose start lease lapsed go back to the queue; their holders
/// are told to drop them.
async fn put_back_unstarted(store: &Store, dispatcher: &Dispatcher, seconds: f64) {
    match store.requeue_unstarted(seconds).await {
        Ok(revoked) if !revoked.is_empty() => {
            omoi_runtime::metrics::TASK_OUTCOMES
                .with_label_values(&["requeued"])
                .inc_by(revoked.len() as u64);
            tracing::info!(count = revoked.len(), "requeued assignments not started in time");
            for r in &revoked {
                dispatcher.revoke(r);
            }
            dispatcher.wake();
        }
        Ok(_) => {}
        Err(e) => tracing::warn!(error = %e, "start lease check failed"),
    }
}

/// Running tasks nobody holds go back to the queue (or fail when out of
/// retries); their holders, if any, are told to stop.
async fn take_back_unheld(store: &Store, dispatcher: &Dispatcher, seconds: f64) {
    match store.reclaim_unheld(seconds, listing_slack(seconds), BATCH).await {
        Ok(outcomes) => took_back(dispatcher, &outcomes, "running lease lapsed"),
        Err(e) => tracing::warn!(error = %e, "running lease check failed"),
    }
}

/// Follows AGENT_STALE events (durable consumer) and takes back each stale
/// agent's assigned and running tasks, counted as a retry.
pub async fn reclaim_from_stale_agents(
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    store: Store,
    dispatcher: Arc<Dispatcher>,
    shutdown: CancellationToken,
) {
    let filter = topology.event_filter(EventType::AgentStale);
    omoi_bus::consumer::consume(
        nats,
        topology,
        "omoi-task-queue-stale-agents".to_owned(),
        filter,
        shutdown,
        move |_, envelope| {
            let (store, dispatcher) = (store.clone(), Arc::clone(&dispatcher));
            async move {
                let Event::AgentStale(stale) = envelope.event else {
                    return Ok(());
                };
                let (agent_id, stale_at) = (envelope.entity_id, stale.stale_at);
                let outcomes = store
                    .reclaim_agent(agent_id, stale_at)
                    .await
                    .map_err(|e| e.to_string())?;
                dispatcher.evict(agent_id).await;
                took_back(&dispatcher, &outcomes, "took back a task of a stale agent");
                Ok(())
            }
        },
    )
    .await;
}

/// Records what a failure, timeout, reclaim or cancellation did.
pub fn count(outcome: &omoi_store::tasks::Outcome) {
    use omoi_domain::TaskStatus;
    use omoi_runtime::metrics::{TASK_OUTCOMES, TASK_RETRIES};
    match outcome.task.status {
        TaskStatus::Pending => TASK_RETRIES.inc(),
        TaskStatus::Failed => TASK_OUTCOMES.with_label_values(&["failed"]).inc(),
        TaskStatus::Cancelled => TASK_OUTCOMES.with_label_values(&["cancelled"]).inc(),
        _ => {}
    }
    if !outcome.cancelled_dependents.is_empty() {
        TASK_OUTCOMES
            .with_label_values(&["cancelled"])
            .inc_by(outcome.cancelled_dependents.len() as u64);
    }
}

/// Keeps the queue-depth gauges current.
pub async fn sample(store: Store, every: Duration, shutdown: CancellationToken) {
    use omoi_runtime::metrics::{TASKS, TASKS_READY};
    loop {
        let started = tokio::time::Instant::now();
        if let Ok(stats) = store.stats().await {
            TASKS.reset();
            for (status, phase, n) in stats.counts {
                TASKS.with_label_values(&[status.as_str(), phase.as_str()]).set(n);
            }
            TASKS_READY.set(stats.ready);
        }
        if !pause(&shutdown, crate::stats::next_read_after(every, started.elapsed())).await {
            return;
        }
    }
}
