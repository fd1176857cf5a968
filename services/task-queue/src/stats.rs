//! WatchQueueStats: the statistics, then again when they changed. What can
//! change them is any event of the mesh (a task's state, a pause, a limit,
//! an agent), so a reader listens to the events' subjects on core NATS
//! (nothing to acknowledge or keep: it only needs a nudge), gathers a
//! second's worth (or twenty times what the last read took, on a deep
//! queue), and reads the statistics again; without events (NATS away, or
//! an idle queue whose oldest ready task ages), it reads them every 15
//! seconds.
//!
//! One reader serves every watcher of the process (`Hub`): counting is a
//! scan of the tasks table, and each reader receives every event of the
//! mesh, so ten consoles open on a busy or deep queue must not cost ten
//! times that. The reader starts with the first watcher and ends with the
//! last.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use futures::future::FutureExt;
use omoi_base::{ApiResult, status};
use omoi_domain::TaskStatus;
use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue as pb;
use omoi_store::Store;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::Status;

use crate::dispatcher::Dispatcher;

const GATHER: Duration = Duration::from_secs(1);
const REFRESH: Duration = Duration::from_secs(15);

pub type StatsStream = ReceiverStream<Result<pb::WatchQueueStatsResponse, Status>>;
type Sink = mpsc::Sender<Result<pb::WatchQueueStatsResponse, Status>>;

/// What the reader last read: nothing yet, the statistics, or why it could
/// not read them (it then ends, and so do its watchers).
type Reading = Option<Result<pb::GetQueueStatsResponse, Status>>;

/// The reader's channel while it runs.
type Slot = Arc<Mutex<Option<watch::Sender<Reading>>>>;

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

/// The WatchQueueStats streams of this process and their one reader.
pub struct Hub {
    source: Source,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    /// Ends the reader and the watchers when the server stops.
    shutdown: CancellationToken,
    reader: Slot,
}

impl Hub {
    pub fn new(
        source: Source,
        nats: async_nats::Client,
        topology: omoi_bus::Topology,
        shutdown: CancellationToken,
    ) -> Self {
        Self {
            source,
            nats,
            topology,
            shutdown,
            reader: Slot::default(),
        }
    }

    /// Where the statistics are read.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// A new watcher: the statistics now, then again after each change,
    /// until it goes away or the server stops.
    pub fn watch(&self) -> StatsStream {
        let (tx, rx) = mpsc::channel(4);
        tokio::spawn(forward(
            self.source.clone(),
            self.subscribe(),
            tx,
            self.shutdown.clone(),
        ));
        ReceiverStream::new(rx)
    }

    /// The running reader's readings, starting it if none runs.
    fn subscribe(&self) -> watch::Receiver<Reading> {
        let mut slot = self.reader.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(readings) = slot.as_ref() {
            return readings.subscribe();
        }
        let (readings, rx) = watch::channel(None);
        *slot = Some(readings.clone());
        tokio::spawn(read(
            self.source.clone(),
            self.nats.clone(),
            self.topology.clone(),
            readings,
            Arc::clone(&self.reader),
            self.shutdown.clone(),
        ));
        rx
    }
}

/// Takes the reader out of the hub, unless a watcher has just subscribed
/// (both happen under the hub's lock, so none subscribes to a reader that
/// is gone). `force`: the reader ends whoever watches.
fn retire(slot: &Slot, readings: &watch::Sender<Reading>, force: bool) -> bool {
    let mut slot = slot.lock().unwrap_or_else(|e| e.into_inner());
    if !force && readings.receiver_count() > 0 {
        return false;
    }
    *slot = None;
    true
}

/// The reader: reads the statistics, publishes them when they changed, and
/// waits for events, until no watcher is left, a read fails, or the server
/// stops.
async fn read(
    source: Source,
    nats: async_nats::Client,
    topology: omoi_bus::Topology,
    readings: watch::Sender<Reading>,
    slot: Slot,
    shutdown: CancellationToken,
) {
    let mut events = match nats.subscribe(topology.events_wildcard()).await {
        Ok(s) => Some(s),
        Err(e) => {
            tracing::debug!(error = %e, "stats reader without events; reading every {REFRESH:?}");
            None
        }
    };
    loop {
        let reading = tokio::time::Instant::now();
        let read = source.read().await;
        let gather = next_read_after(GATHER, reading.elapsed());
        match read {
            Ok(now) => {
                readings.send_if_modified(|last| {
                    let changed = !matches!(last, Some(Ok(before)) if *before == now);
                    if changed {
                        *last = Some(Ok(now));
                    }
                    changed
                });
            }
            Err(e) => {
                retire(&slot, &readings, true);
                readings.send_replace(Some(Err(status(e))));
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
                retire(&slot, &readings, true);
                return;
            }
            _ = readings.closed() => if retire(&slot, &readings, false) {
                return;
            },
            open = nudged => if !open { events = None },
            _ = tokio::time::sleep(REFRESH) => {}
        }
        tokio::select! {
            _ = shutdown.cancelled() => {
                retire(&slot, &readings, true);
                return;
            }
            _ = tokio::time::sleep(gather) => {}
        }
        if let Some(s) = events.as_mut() {
            while let Some(Some(_)) = s.next().now_or_never() {}
        }
    }
}

/// One watcher: the statistics read for it, then each new reading into
/// `sink`, until the watcher goes away, the reader fails, or the server
/// stops. Its first read is its own: the reader's last one may be up to a
/// gather old, and a watcher starts from the queue as it is.
async fn forward(source: Source, mut readings: watch::Receiver<Reading>, sink: Sink, shutdown: CancellationToken) {
    readings.borrow_and_update();
    let mut reading = Some(source.read().await.map_err(status));
    let mut sent = None;
    loop {
        match reading {
            Some(Ok(stats)) if sent.as_ref() != Some(&stats) => {
                let message = pb::WatchQueueStatsResponse {
                    stats: Some(stats.clone()),
                };
                if sink.send(Ok(message)).await.is_err() {
                    return;
                }
                sent = Some(stats);
            }
            Some(Err(e)) => {
                let _ = sink.send(Err(e)).await;
                return;
            }
            _ => {}
        }
        let stopping = tokio::select! {
            _ = shutdown.cancelled() => true,
            _ = sink.closed() => return,
            // The reader ended without a word: the server is stopping.
            changed = readings.changed() => changed.is_err(),
        };
        if stopping {
            let _ = sink
                .send(Err(Status::unavailable("server shutting down; watch again")))
                .await;
            return;
        }
        reading = readings.borrow_and_update().clone();
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
            pauses: self.store.pauses().await?.iter().map(pb::Pause::from).collect(),
            limits: self
                .store
                .limits()
                .await?
                .iter()
                .map(pb::ConcurrencyLimit::from)
                .collect(),
            unsatisfied: self
                .store
                .unsatisfied()
                .await?
                .into_iter()
                .map(|u| pb::UnsatisfiedRequirement {
                    requires: u.requires.into_iter().collect(),
                    phase: u.phase.wire(),
                    tasks: u.tasks,
                })
                .collect(),
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
