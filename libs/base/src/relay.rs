//! The outbox relay: publishes committed events in order, many in flight at
//! once, and deletes a batch only after JetStream acknowledged all of it.
//! A crash between publish and delete republishes the batch; the stream's
//! duplicate window (keyed by `Nats-Msg-Id` = event id) drops the copies.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use futures::future::join_all;
use omoi_proto::convert;
use omoi_proto::events::Event;
use omoi_store::Store;
use omoi_store::outbox::{OutboxEvent, RelaySession, Taken};
use prost::Message;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use omoi_bus::{BusError, Topology, ensure_stream};
use omoi_runtime::background::policy;

/// Why a relay cycle failed; the events stay in the outbox either way.
#[derive(Debug, thiserror::Error)]
enum RelayError {
    #[error(transparent)]
    Bus(#[from] BusError),
    #[error(transparent)]
    Store(#[from] omoi_store::StoreError),
}

/// How long the relay lets commits gather after the first wakes it: each
/// relay cycle is two statements (take, finish), and at 1,000 tasks/s a
/// 2 ms gather ran one cycle per three commits.
const GATHER: Duration = Duration::from_millis(5);

pub struct Relay {
    store: Store,
    js: jetstream::Context,
    topology: Topology,
    wake: Arc<Notify>,
    batch: i64,
    poll: Duration,
    /// Opened on first use; dropped after any failure, which frees the
    /// relay lock it may hold.
    session: Option<RelaySession>,
}

impl Relay {
    /// A relay woken by every commit through `store` (and its clones).
    pub fn new(store: Store, client: async_nats::Client, topology: Topology) -> Self {
        let wake = store.committed();
        let mut js = jetstream::new(client);
        js.set_timeout(Duration::from_secs(5));
        Self {
            store,
            js,
            topology,
            wake,
            batch: 500,
            poll: Duration::from_millis(250),
            session: None,
        }
    }

    /// Publishes until `shutdown`, then drains what is left (bounded by
    /// `drain_for`) so that a clean stop leaves no event behind.
    pub async fn run(mut self, shutdown: CancellationToken, drain_for: Duration) {
        let mut failures = 0u32;
        let mut backoff = policy::NATS.start();
        let mut stream_ready = false;
        loop {
            if !stream_ready {
                match ensure_stream(&self.js, &self.topology).await {
                    Ok(_) => stream_ready = true,
                    Err(e) => tracing::warn!(error = %e, "events stream not ready"),
                }
            }
            let pause = if stream_ready {
                match self.publish_batch().await {
                    Ok(n) => {
                        failures = 0;
                        backoff.reset();
                        // A full batch: more may wait.
                        if n as i64 >= self.batch {
                            continue;
                        }
                        None
                    }
                    Err(e) => {
                        failures += 1;
                        stream_ready = false;
                        tracing::warn!(error = %e, failures, "outbox relay failed; events stay in the outbox");
                        Some(backoff.next_delay())
                    }
                }
            } else {
                Some(backoff.next_delay())
            };
            tokio::select! {
                _ = shutdown.cancelled() => break,
                // Commits come in bursts (a claim, its starts, their
                // completions): a moment's wait publishes them together.
                _ = self.wake.notified(), if pause.is_none() => tokio::time::sleep(GATHER).await,
                _ = tokio::time::sleep(pause.unwrap_or(self.poll)) => {}
            }
        }
        let drained = tokio::time::timeout(drain_for, async {
            loop {
                match self.publish_batch().await {
                    Ok(0) => return Ok(()),
                    Ok(_) => {}
                    Err(e) => return Err(e),
                }
            }
        })
        .await;
        match drained {
            Ok(Ok(())) => tracing::info!("outbox drained"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "outbox not drained at shutdown; events wait for the next start")
            }
            Err(_) => tracing::warn!("outbox drain timed out; events wait for the next start"),
        }
        if let Some(session) = self.session.take() {
            session.close().await;
        }
    }

    /// Publishes the oldest batches (about `batch` events); returns how many
    /// events it published (0 when the outbox is empty or another relay
    /// holds the lock).
    async fn publish_batch(&mut self) -> Result<usize, RelayError> {
        let session = match &mut self.session {
            Some(session) => session,
            empty => empty.insert(self.store.relay_session().await?),
        };
        let (js, topology, batch) = (&self.js, &self.topology, self.batch);
        let published = async {
            let Some(taken) = session.take(batch).await? else {
                return Ok(0);
            };
            publish(js, topology, &taken).await?;
            session.finish(&taken.seqs).await?;
            Ok(taken.events.len())
        }
        .await;
        if published.is_err() {
            // The session may hold the relay lock: ending it frees the lock
            // for the other relays; the next attempt opens a new one.
            self.session = None;
        }
        published
    }
}

/// Publishes every event taken, many in flight at once, and waits until
/// JetStream acknowledged all of them.
async fn publish(js: &jetstream::Context, topology: &Topology, taken: &Taken) -> Result<(), BusError> {
    let mut pending = Vec::with_capacity(taken.events.len());
    for event in &taken.events {
        let (subject, headers, payload) = message(topology, event);
        let ack = js
            .publish_with_headers(subject, headers, payload.into())
            .await
            .map_err(|e| BusError::Publish(e.to_string()))?;
        pending.push(ack.into_future());
    }
    for ack in join_all(pending).await {
        ack.map_err(|e| BusError::Publish(e.to_string()))?;
    }
    Ok(())
}

fn message(topology: &Topology, event: &OutboxEvent) -> (String, HeaderMap, Vec<u8>) {
    let ticket = event.ticket_id.map(|t| t.to_string());
    let subject = topology.event_subject(&event.entity_type, &event.event_type, ticket.as_deref());
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", event.id.to_string().as_str());
    headers.insert("Omoi-Event-Type", event.event_type.as_str());
    if let Some(tp) = &event.trace_context {
        headers.insert("traceparent", tp.as_str());
    }
    let proto = Event {
        id: event.id.to_string(),
        event_type: event.event_type.clone(),
        entity_type: event.entity_type.clone(),
        entity_id: event.entity_id.to_string(),
        ticket_id: ticket.unwrap_or_default(),
        occurred_at: Some(convert::timestamp(event.occurred_at)),
        payload: Some(convert::json_to_struct(&event.payload)),
    };
    (subject, headers, proto.encode_to_vec())
}
