//! WatchQueueStats: the statistics, then again when they changed. What can
//! change them is any event of the mesh (a task's state, a pause, a limit,
//! an agent), so each watcher listens to the events' subjects on core NATS
//! (nothing to acknowledge or keep: it only needs a nudge), gathers a
//! second's worth (or twenty times what the last read took, on a deep
//! queue), and reads the statistics again; without events (NATS away, or
//! an idle queue whose oldest ready task ages), it reads them every 15
//! seconds.

use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::future::FutureExt;
use omoi_domain::TaskStatus;
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue as pb;
use omoi_runtime::status::{ApiResult, status};
use omoi_store::Store;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::dispatcher::Dispatcher;
use crate::service::{limit_message, pause_message};

const GATHER: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(15);

pub type Sink = mpsc::Sender<Result<pb::WatchQueueStatsResponse, Status>>;

/// How long a reader of the statistics waits before reading them again:
/// at least `at_least`, and twenty times what the last read took.
/// Counting is a scan of the tasks table (half a second at a million rows):
/// with a deep queue it is done less often, so that no reader keeps the
/// database counting more than a twentieth of the time.
pub fn next_read_after(at_least: Duration, last_read: Duration) -> Duration {
    at_least.max(last_read * 20)
}

/// What the statistics are read from.
#[derive(Clone)]
pub struct Source {
    pub store: Store,
    pub dispatcher: Arc<Dispatcher>,
}

/// Streams the statistics into `sink`, and again after each change, until
/// the watcher goes away or `shutdown`.
pub async fn follow(
    source: Source,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    sink: Sink,
    shutdown: CancellationToken,
) {
    let mut events = match nats.subscribe(topology.events_wildcard()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "stats watcher without events; reading every {REFRESH:?}");
            None
        }
    };
    let mut sent: Option<pb::GetQueueStatsResponse> = None;
    loop {
        let reading = tokio::time::Instant::now();
        let read = source.read().await;
        let gather = next_read_after(GATHER, reading.elapsed());
        match read {
            Ok(now) if sent.as_ref() != Some(&now) => {
                let message = pb::WatchQueueStatsResponse {
                    stats: Some(now.clone()),
                };
                if sink.send(Ok(message)).await.is_err() {
                    return;
                }
                sent = Some(now);
            }
            Ok(_) => {}
            Err(e) => {
                let _ = sink.send(Err(status(e))).await;
                return;
            }
        }
        // Wait for an event or the refresh, then let a second's events
        // gather and drop them: one read answers them all.
        let nudged = async {
            match events.as_mut() {
                Some(s) => s.next().await.is_some(),
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = sink.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                return;
            }
            _ = sink.closed() => return,
            open = nudged => if !open { events = None },
            _ = tokio::time::sleep(REFRESH) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = sink.closed() => return,
            _ = tokio::time::sleep(gather) => {}
        }
        if let Some(s) = events.as_mut() {
            while let Some(Some(_)) = s.next().now_or_never() {}
        }
    }
}

impl Source {
    /// The queue's statistics now.
    pub async fn read(&self) -> ApiResult<pb::GetQueueStatsResponse> {
        let stats = self.store.stats().await?;
        let mut resp = pb::GetQueueStatsResponse {
            ready: stats.ready,
            oldest_ready_age_seconds: stats.oldest_ready_age.as_secs_f64(),
            connected_agents: i32::try_from(self.dispatcher.connected_agents()).unwrap_or(i32::MAX),
            pauses: self.store.pauses().await?.iter().map(pause_message).collect(),
            limits: self.store.limits().await?.iter().map(limit_message).collect(),
            ..Default::default()
        };
        for (st, phase, count) in stats.counts {
            resp.counts.push(pb::StatusPhaseCount {
                status: st.wire(),
                phase: phase.wire(),
                count,
            });
            let total = match st {
                TaskStatus::Pending => &mut resp.pending,
                TaskStatus::Assigned => &mut resp.assigned,
                TaskStatus::Running => &mut resp.running,
                TaskStatus::Completed => &mut resp.completed,
                TaskStatus::Failed => &mut resp.failed,
                TaskStatus::Cancelled => &mut resp.cancelled,
                TaskStatus::TimedOut => &mut resp.timed_out,
            };
            *total += count;
        }
        Ok(resp)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slow_read_puts_the_next_off_by_twenty_times_its_length() {
        let second = Duration::from_secs(1);
        assert_eq!(next_read_after(second, Duration::from_millis(2)), second);
        assert_eq!(
            next_read_after(second, Duration::from_millis(500)),
            Duration::from_secs(10)
        );
        assert_eq!(
            next_read_after(Duration::from_secs(5), Duration::from_millis(300)),
            Duration::from_secs(6)
        );
    }
}
