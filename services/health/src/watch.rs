//! WatchAgents: the agent list, then the list again whenever the agents
//! table's trigger announces a change made by any replica (or listening
//! resumed after an interruption, when changes may have gone unannounced).

use std::time::Duration;

use omoi_base::changes::{self, Notice};
use omoi_base::status;
use omoi_domain::AgentStatus;
use omoi_proto::health as pb;
use omoi_store::{Store, agents};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tonic::Status;

/// At most one list a second: heartbeats flush every half second.
const GATHER: Duration = Duration::from_secs(1);

/// Counts the announcements; each watcher waits for the count to move.
pub struct Hub(watch::Sender<u64>);

impl Hub {
    pub fn new() -> Self {
        Self(watch::channel(0).0)
    }

    /// Relays the agents table's announcements until `shutdown`.
    pub async fn follow_database(&self, store: Store, shutdown: CancellationToken) {
        changes::follow(store, agents::CHANGED_CHANNEL, shutdown, |_: Notice| {
            self.0.send_modify(|n| *n = n.wrapping_add(1));
        })
        .await;
    }

    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.0.subscribe()
    }
}

pub type Sink = mpsc::Sender<Result<pb::WatchAgentsResponse, Status>>;

/// Streams the agents of `status` (None: all) into `sink` now and after each
/// change, until the watcher goes away or `shutdown`.
pub async fn follow(
    mut changed: watch::Receiver<u64>,
    store: Store,
    status_filter: Option<AgentStatus>,
    sink: Sink,
    shutdown: CancellationToken,
) {
    loop {
        changed.mark_unchanged();
        let list = match store.list_agents(status_filter).await {
            Ok(agents) => Ok(pb::WatchAgentsResponse {
                agents: agents.iter().map(pb::Agent::from).collect(),
            }),
            Err(e) => Err(status(e)),
        };
        let failed = list.is_err();
        if sink.send(list).await.is_err() || failed {
            return;
        }
        for wait in [None, Some(GATHER)] {
            tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = sink.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                    return;
                }
                _ = sink.closed() => return,
                moved = changed.changed(), if wait.is_none() => if moved.is_err() { return },
                _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {}
            }
        }
    }
}
