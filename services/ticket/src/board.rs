//! WatchTickets: the newest tickets with their tasks, then each ticket again
//! whenever it or one of its tasks changes.
//!
//! One hub per replica follows two sources and tells every watcher which
//! tickets changed: the tickets table's commit-time announcements (status,
//! usage, branch, pull request: whatever any replica wrote) and the task
//! events on JetStream (a task's status, which the ticket row does not hold).
//! When either source was out of reach, watchers are told to send a fresh
//! snapshot instead, since changes may have gone by unseen.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use omoi_base::changes::{self, Notice};
use omoi_base::status;
use omoi_bus::Topology;
use omoi_domain::{Entity, Ticket};
use omoi_proto::ticket as pb;
use omoi_runtime::background::{pause, policy};
use omoi_store::Store;
use omoi_store::tickets::{self, TicketTask};
use tokio::sync::{broadcast, mpsc};
use tokio_util::sync::CancellationToken;
use tonic::Status;
use uuid::Uuid;

use crate::tasks::TicketTasks;

/// Changes arriving within this long of the first are sent together, each
/// ticket once: a ticket's task completing moves the ticket too.
const GATHER: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    Ticket(Uuid),
    /// Changes may have been missed: start again from a snapshot.
    Resync,
}

pub struct Hub {
    changes: broadcast::Sender<Change>,
}

impl Hub {
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            changes: broadcast::channel(4096).0,
        })
    }

    fn tell(&self, change: Change) {
        // No watcher: nobody to tell.
        let _ = self.changes.send(change);
    }

    /// Relays the tickets table's announcements until `shutdown`.
    pub async fn follow_database(self: Arc<Self>, store: Store, shutdown: CancellationToken) {
        changes::follow(store, tickets::CHANGED_CHANNEL, shutdown, |notice| match notice {
            Notice::Changed(id) => {
                if let Ok(id) = id.parse() {
                    self.tell(Change::Ticket(id));
                }
            }
            Notice::Missed => self.tell(Change::Resync),
        })
        .await;
    }

    /// Relays which tickets' tasks changed, from the task events, until
    /// `shutdown`.
    pub async fn follow_events(
        self: Arc<Self>,
        nats: async_nats::Client,
        topology: Topology,
        shutdown: CancellationToken,
    ) {
        let js = jetstream::new(nats);
        let mut backoff = policy::NATS.start();
        let mut first = true;
        while !shutdown.is_cancelled() {
            let filter = topology.entity_filter(Entity::Task);
            let mut messages = match omoi_bus::read_events(&js, &topology, filter, DeliverPolicy::New).await {
                Ok(m) => m,
                Err(error) => {
                    tracing::debug!(%error, "following task events");
                    if !pause(&shutdown, backoff.next_delay()).await {
                        return;
                    }
                    continue;
                }
            };
            backoff.reset();
            if !std::mem::take(&mut first) {
                self.tell(Change::Resync);
            }
            loop {
                let next = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    m = messages.next() => m,
                };
                match next {
                    // The subject ends with the event's ticket id, or "none".
                    Some(Ok(m)) => {
                        if let Some(id) = m.subject.rsplit('.').next().and_then(|t| t.parse().ok()) {
                            self.tell(Change::Ticket(id));
                        }
                    }
                    // The ordered consumer recreates itself after a hiccup,
                    // from where it was.
                    Some(Err(e)) => tracing::debug!(error = %e, "task events hiccup"),
                    None => break,
                }
            }
        }
    }
}

pub type Sink = mpsc::Sender<Result<pb::WatchTicketsResponse, Status>>;

/// The ticket and its tasks for a board (their patches left out).
async fn state(tasks: &TicketTasks, ticket: &Ticket, plan: &[TicketTask]) -> Result<pb::WatchTicketsResponse, Status> {
    let mut tasks = tasks.of(ticket, plan).await?;
    for task in &mut tasks {
        if let Some(git) = task.git.as_mut() {
            git.patch.clear();
            if let Some(d) = git.branch_diff.as_mut() {
                d.patch.clear();
            }
        }
    }
    Ok(pb::WatchTicketsResponse {
        ticket: Some(pb::Ticket::from(ticket)),
        tasks,
        snapshot_done: false,
    })
}

async fn snapshot(tasks: &TicketTasks, page_size: i64, sink: &Sink) -> Result<(), Status> {
    let (tickets, _) = tasks.store.list_tickets(None, page_size, None).await.map_err(status)?;
    for ticket in &tickets {
        // A list holds no plans: read one only where it is the tasks.
        let plan = if ticket.tasks_enqueued {
            Vec::new()
        } else {
            tasks.store.get_ticket(ticket.id).await.map_err(status)?.1
        };
        send(sink, state(tasks, ticket, &plan).await?).await?;
    }
    send(
        sink,
        pb::WatchTicketsResponse {
            snapshot_done: true,
            ..Default::default()
        },
    )
    .await
}

async fn changed(tasks: &TicketTasks, ids: &HashSet<Uuid>, sink: &Sink) -> Result<(), Status> {
    for &id in ids {
        match tasks.store.get_ticket(id).await {
            Ok((ticket, plan)) => send(sink, state(tasks, &ticket, &plan).await?).await?,
            // Announced by an event whose ticket this database does not
            // hold (another deployment's on a shared stream).
            Err(omoi_store::StoreError::NotFound { .. }) => {}
            Err(e) => return Err(status(e)),
        }
    }
    Ok(())
}

/// The watcher went away: stop.
struct Gone;

impl From<Gone> for Status {
    fn from(_: Gone) -> Self {
        Status::cancelled("watcher gone")
    }
}

async fn send(sink: &Sink, message: pb::WatchTicketsResponse) -> Result<(), Status> {
    sink.send(Ok(message)).await.map_err(|_| Status::from(Gone))
}

/// Streams a snapshot of the newest `page_size` tickets into `sink`, then
/// the tickets that change, until the watcher goes away or `shutdown`.
pub async fn follow(hub: Arc<Hub>, tasks: Arc<TicketTasks>, page_size: i64, sink: Sink, shutdown: CancellationToken) {
    // Subscribed before the snapshot is read: a change made meanwhile is
    // sent again after it rather than lost.
    let mut changes = hub.changes.subscribe();
    let mut resync = true;
    let mut dirty = HashSet::new();
    loop {
        let outcome = if std::mem::take(&mut resync) {
            dirty.clear();
            snapshot(&tasks, page_size, &sink).await
        } else {
            changed(&tasks, &std::mem::take(&mut dirty), &sink).await
        };
        if let Err(status) = outcome {
            if status.code() != tonic::Code::Cancelled {
                let _ = sink.send(Err(status)).await;
            }
            return;
        }
        // Wait for a change, then gather those arriving with it.
        let mut deadline = None;
        loop {
            let wait = async {
                match deadline {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let change = tokio::select! {
                _ = shutdown.cancelled() => {
                    let _ = sink.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                    return;
                }
                _ = sink.closed() => return,
                _ = wait => break,
                c = changes.recv() => c,
            };
            match change {
                Ok(Change::Ticket(id)) => {
                    dirty.insert(id);
                }
                Ok(Change::Resync) | Err(broadcast::error::RecvError::Lagged(_)) => resync = true,
                Err(broadcast::error::RecvError::Closed) => {
                    let _ = sink
                        .send(Err(Status::unavailable("server shutting down; watch again")))
                        .await;
                    return;
                }
            }
            deadline.get_or_insert_with(|| tokio::time::Instant::now() + GATHER);
        }
    }
}
