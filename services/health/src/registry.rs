//! Heartbeats in memory, written in batches; agent statuses cached so that
//! a heartbeat is answered without touching the database.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use chrono::Utc;
use omoi_domain::EventType;
use omoi_domain::agent::AgentStatus;
use omoi_runtime::background::every;
use omoi_store::agents::Beat;
use omoi_store::{Store, StoreError};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

/// Buffered heartbeats beyond which a flush starts at once.
const FLUSH_AT: usize = 5000;

pub struct Registry {
    store: Store,
    statuses: Mutex<HashMap<Uuid, AgentStatus>>,
    pending: Mutex<HashMap<Uuid, Beat>>,
    flush_now: Notify,
    /// Held while a flush writes, so that a flush asked for by a read
    /// (GetAgent) waits for one already under way instead of finding the
    /// buffer empty and reading before that write committed.
    flushing: tokio::sync::Mutex<()>,
}

impl Registry {
    pub fn new(store: Store) -> Self {
        Self {
            store,
            statuses: Mutex::new(HashMap::new()),
            pending: Mutex::new(HashMap::new()),
            flush_now: Notify::new(),
            flushing: tokio::sync::Mutex::new(()),
        }
    }

    fn statuses(&self) -> MutexGuard<'_, HashMap<Uuid, AgentStatus>> {
        self.statuses.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn pending(&self) -> MutexGuard<'_, HashMap<Uuid, Beat>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn remember(&self, id: Uuid, status: AgentStatus) {
        self.statuses().insert(id, status);
    }

    /// The agent's status as far as this replica knows; read from the
    /// database the first time.
    pub async fn status(&self, id: Uuid) -> Result<Option<AgentStatus>, StoreError> {
        if let Some(s) = self.statuses().get(&id).copied() {
            return Ok(Some(s));
        }
        let status = self.store.agent_status(id).await?;
        if let Some(s) = status {
            self.remember(id, s);
        }
        Ok(status)
    }

    /// Buffers a heartbeat of a known, registered agent. A stale agent is
    /// recovered at once rather than at the next flush.
    pub async fn beat(&self, beat: Beat) -> Result<(), StoreError> {
        let id = beat.agent_id;
        let stale = self.statuses().get(&id) == Some(&AgentStatus::Stale);
        let size = {
            let mut pending = self.pending();
            pending.insert(id, beat);
            pending.len()
        };
        if stale {
            self.flush().await?;
        } else if size >= FLUSH_AT {
            self.flush_now.notify_one();
        }
        Ok(())
    }

    /// Writes the buffered heartbeats; on failure they are kept for the next try.
    pub async fn flush(&self) -> Result<(), StoreError> {
        let _writing = self.flushing.lock().await;
        let beats: Vec<Beat> = self.pending().drain().map(|(_, b)| b).collect();
        if beats.is_empty() {
            return Ok(());
        }
        match self.store.flush_heartbeats(&beats).await {
            Ok(written) => {
                let mut statuses = self.statuses();
                // Agents left out were deregistered (or vanished) meanwhile.
                for b in &beats {
                    statuses.insert(b.agent_id, AgentStatus::Deregistered);
                }
                for (id, status) in written {
                    statuses.insert(id, status);
                }
                drop(statuses);
                Ok(())
            }
            Err(e) => {
                let mut pending = self.pending();
                for b in beats {
                    pending.entry(b.agent_id).or_insert(b);
                }
                Err(e)
            }
        }
    }

    pub async fn flush_loop(self: Arc<Self>, every: Duration, shutdown: CancellationToken) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(every) => {}
                _ = self.flush_now.notified() => {}
            }
            if let Err(e) = self.flush().await {
                tracing::warn!(error = %e, "writing heartbeats failed; keeping them for the next try");
            }
        }
        if let Err(e) = self.flush().await {
            tracing::warn!(error = %e, "heartbeats not written at shutdown");
        }
    }

    /// Marks silent agents stale (the AGENT_STALE events make the task-queue
    /// take their work back).
    pub async fn stale_loop(self: Arc<Self>, stale_after: Duration, period: Duration, shutdown: CancellationToken) {
        let this = &self;
        every("the stale check", period, &shutdown, move || async move {
            // Heartbeats this replica holds must count before judging.
            this.flush().await?;
            if let Ok(counts) = this.store.agent_status_counts().await {
                omoi_runtime::metrics::AGENTS.reset();
                for (status, n) in counts {
                    omoi_runtime::metrics::AGENTS
                        .with_label_values(&[status.as_str()])
                        .set(n);
                }
            }
            let agents = this.store.mark_stale(stale_after).await?;
            omoi_runtime::metrics::STALE_AGENTS.inc_by(agents.len() as u64);
            for a in &agents {
                tracing::info!(agent_id = %a.id, last_heartbeat_at = %a.last_heartbeat_at, "agent stale");
                this.remember(a.id, AgentStatus::Stale);
            }
            Ok::<_, StoreError>(())
        })
        .await
    }

    /// Counts completed and failed tasks per agent from task events.
    pub async fn count_outcomes(
        self: Arc<Self>,
        nats: async_nats::Client,
        topology: omoi_bus::Topology,
        shutdown: CancellationToken,
    ) {
        // A consumer each for the two events counted, rather than one for
        // every task event: three of a task's four events would be
        // delivered, decoded and acknowledged for nothing. Both record
        // what they counted under one name, so that an event counted by
        // the earlier single consumer is not counted again.
        retire_consumer(&nats, &topology, OUTCOMES).await;
        let count = |event: EventType| {
            let store = self.store.clone();
            // A fetch's worth of events counted in one statement.
            omoi_bus::consumer::consume_batches(
                nats.clone(),
                topology.clone(),
                format!("omoi-health-{}", event.as_str().to_ascii_lowercase().replace('_', "-")),
                topology.event_filter(event),
                shutdown.clone(),
                move |events| {
                    let store = store.clone();
                    let outcomes: Vec<(Uuid, Uuid, bool)> = events
                        .iter()
                        .filter_map(|(event_id, envelope)| {
                            let agent = envelope.event.agent_id()?;
                            Some((
                                *event_id,
                                agent,
                                envelope.event.event_type() == EventType::TaskCompleted,
                            ))
                        })
                        .collect();
                    async move {
                        store
                            .count_agent_outcomes(OUTCOMES, &outcomes)
                            .await
                            .map_err(|e| e.to_string())
                    }
                },
            )
        };
        futures::join!(count(EventType::TaskCompleted), count(EventType::TaskFailed));
    }

    pub fn now_beat(agent_id: Uuid, running_task_ids: Vec<Uuid>) -> Beat {
        Beat {
            agent_id,
            at: Utc::now(),
            running_task_ids,
        }
    }
}

/// What counted outcomes are recorded under (and the name of the single
/// consumer that once read every task event for them).
const OUTCOMES: &str = "omoi-health-task-outcomes";

/// Deletes a durable consumer of the events stream that is no longer read
/// (it would hold its place in the stream for ever); gone already is fine.
async fn retire_consumer(nats: &async_nats::Client, topology: &omoi_bus::Topology, name: &str) {
    let js = async_nats::jetstream::new(nats.clone());
    if let Ok(stream) = js.get_stream(&topology.stream).await
        && stream.delete_consumer(name).await.is_ok()
    {
        tracing::info!(consumer = name, "retired a consumer no longer read");
    }
}
