//! The timeout monitor: running tasks past their deadline are timed out,
//! their agents told to stop, and the tasks retried or failed.

use std::sync::Arc;
use std::time::Duration;

use omoi_store::Store;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::dispatcher::Dispatcher;

const BATCH: i64 = 100;

pub async fn run(
    store: Store,
    dispatcher: Arc<Dispatcher>,
    relay_wake: Arc<Notify>,
    every: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        loop {
            match store.time_out_expired(BATCH).await {
                Ok(outcomes) => {
                    for outcome in &outcomes {
                        tracing::info!(task_id = %outcome.task.id, status = %outcome.task.status, "task timed out");
                        if let Some(revoked) = &outcome.revoked {
                            dispatcher.revoke(revoked);
                        }
                    }
                    if !outcomes.is_empty() {
                        relay_wake.notify_one();
                        dispatcher.wake();
                    }
                    if (outcomes.len() as i64) < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "timeout check failed");
                    break;
                }
            }
        }
    }
}
