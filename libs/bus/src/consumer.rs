//! Durable consumers of the events stream: each service that reacts to
//! another's events reads them through a named JetStream consumer, acking
//! each event only after its effect committed. Handlers must be idempotent
//! (redeliveries happen) and must not depend on order across entities.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::{FutureExt, StreamExt};
use omoi_proto::events::Event;
use omoi_runtime::background::{pause, policy};
use prost::Message;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::{Topology, ensure_stream};

/// An event as a handler receives it: its id and the domain's envelope.
pub type Received = (uuid::Uuid, omoi_domain::Envelope);

/// An event as a batch handler receives it.
#[derive(Debug, Clone)]
pub struct Consumed {
    pub id: uuid::Uuid,
    pub envelope: omoi_domain::Envelope,
    /// Its place in the stream: the order events were published in.
    pub sequence: u64,
    /// When the change it tells of was committed.
    pub occurred_at: Option<chrono::DateTime<chrono::Utc>>,
    /// The event as published.
    pub event: Event,
}

/// Reads `filter` (a subject under the events prefix) through the durable
/// consumer `durable` until `shutdown`, calling `handle` for each event, in
/// stream order, read as the domain's and handled in a span that continues
/// the trace its publisher recorded. An `Err` from the handler redelivers
/// the event after a pause; events this version cannot read are skipped.
pub async fn consume<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    shutdown: CancellationToken,
    handle: F,
) where
    F: FnMut(uuid::Uuid, omoi_domain::Envelope) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    consume_since(client, topology, durable, filter, None, shutdown, handle).await
}

/// Like [`consume`]; a consumer it creates (the first time this durable is
/// read) starts at the events published since `since`, not at the
/// stream's first: for a consumer new to a deployment whose stream already
/// holds what it should not act on again.
pub async fn consume_since<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    since: Option<time::OffsetDateTime>,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(uuid::Uuid, omoi_domain::Envelope) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let name = durable.clone();
    let from = starting(since);
    batches(
        client,
        topology,
        durable,
        filter,
        from,
        shutdown,
        Duration::ZERO,
        |events| {
            // Made now, run one after the other: effects in stream order.
            let effects: Vec<_> = events
                .into_iter()
                .map(|(event, traceparent, _)| {
                    let (span, read) = read(&name, &event, traceparent.as_deref());
                    match read {
                        Some((id, envelope)) => handle(id, envelope).instrument(span).boxed(),
                        None => futures::future::ready(Ok(())).boxed(),
                    }
                })
                .collect();
            async move {
                let mut results = Vec::with_capacity(effects.len());
                for effect in effects {
                    results.push(effect.await);
                }
                results
            }
        },
    )
    .await
}

/// Like [`consume`], but hands `handle` the events delivered within a
/// moment of each other (up to a fetch's worth) at once, so that their
/// effects can be written in one statement: `handle` applies them all or
/// none, so its one answer is every event's (acknowledged, or redelivered
/// after a pause). Each event's span is open while its batch is applied.
pub async fn consume_batches<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Received>) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    consume_batches_since(client, topology, durable, filter, None, shutdown, move |batch| {
        handle(batch.into_iter().map(|c| (c.id, c.envelope)).collect())
    })
    .await
}

/// Like [`consume_batches`], each event with its place in the stream and
/// as published; a consumer it creates starts at `since` (as
/// [`consume_since`]).
pub async fn consume_batches_since<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    since: Option<time::OffsetDateTime>,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Vec<Consumed>) -> Fut,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let name = durable.clone();
    let from = starting(since);
    batches(
        client,
        topology,
        durable,
        filter,
        from,
        shutdown,
        GATHER,
        move |events| {
            let n = events.len();
            let mut spans = Vec::with_capacity(n);
            let mut batch = Vec::with_capacity(n);
            for (event, traceparent, sequence) in events {
                let (span, read) = read(&name, &event, traceparent.as_deref());
                if let Some((id, envelope)) = read {
                    let occurred_at = event.occurred_at.as_ref().and_then(omoi_proto::convert::from_timestamp);
                    batch.push(Consumed {
                        id,
                        envelope,
                        sequence,
                        occurred_at,
                        event,
                    });
                }
                spans.push(span);
            }
            let applied = (!batch.is_empty()).then(|| handle(batch));
            async move {
                let outcome = match applied {
                    Some(applied) => applied.await,
                    None => Ok(()),
                };
                drop(spans);
                vec![outcome; n]
            }
        },
    )
    .await
}

/// Where a consumer created now starts: at `since`, else the stream's
/// first event.
fn starting(since: Option<time::OffsetDateTime>) -> consumer::DeliverPolicy {
    since.map_or(consumer::DeliverPolicy::All, |start_time| {
        consumer::DeliverPolicy::ByStartTime { start_time }
    })
}

/// A consumed event's span and the event read as the domain's; None, with
/// a warning in its span, when this version cannot read it.
fn read(consumer: &str, event: &Event, traceparent: Option<&str>) -> (tracing::Span, Option<Received>) {
    let span = omoi_runtime::trace::consumed(consumer, &event.event_type, traceparent);
    let read = event
        .id
        .parse::<uuid::Uuid>()
        .map_err(|e| e.to_string())
        .and_then(|id| Ok((id, omoi_domain::Envelope::try_from(event).map_err(|e| e.to_string())?)));
    match read {
        Ok(read) => (span, Some(read)),
        Err(error) => {
            span.in_scope(|| tracing::warn!(%error, event_id = %event.id, "skipping an unreadable event"));
            (span, None)
        }
    }
}

/// The consumer loop: after the first event of a batch, what else arrives
/// within `gather` (nothing more than what already arrived, for zero) joins it.
#[allow(clippy::too_many_arguments)]
async fn batches<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    from: consumer::DeliverPolicy,
    shutdown: CancellationToken,
    gather: Duration,
    mut handle: F,
) where
    F: FnMut(Vec<(Event, Option<String>, u64)>) -> Fut,
    Fut: Future<Output = Vec<Result<(), String>>>,
{
    let js = jetstream::new(client);
    let mut failures = 0u32;
    let mut backoff = policy::NATS.start();
    while !shutdown.is_cancelled() {
        let result = async {
            let stream = ensure_stream(&js, &topology).await.map_err(|e| e.to_string())?;
            let consumer = stream
                .get_or_create_consumer(
                    &durable,
                    consumer::pull::Config {
                        durable_name: Some(durable.clone()),
                        filter_subject: filter.clone(),
                        ack_policy: consumer::AckPolicy::Explicit,
                        ack_wait: Duration::from_secs(30),
                        deliver_policy: from,
                        max_ack_pending: 1000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let mut fetched = pull(&consumer, FETCH, Duration::from_secs(1)).await?;
                while let Some(first) = fetched.next().await {
                    // The first, then whatever else arrives while gathering.
                    let mut messages = vec![first.map_err(|e| e.to_string())?];
                    let until = tokio::time::Instant::now() + gather;
                    while messages.len() < FETCH {
                        if gather.is_zero() {
                            match fetched.next().now_or_never().flatten() {
                                Some(more) => messages.push(more.map_err(|e| e.to_string())?),
                                None => break,
                            }
                            continue;
                        }
                        match tokio::time::timeout_at(until, fetched.next()).await {
                            Ok(Some(more)) => messages.push(more.map_err(|e| e.to_string())?),
                            // The first pull ends with what was pending
                            // when it came: under a steady trickle, a few
                            // events. The gather goes on with one pull that
                            // waits out the time it has left.
                            Ok(None) => {
                                let left = until.saturating_duration_since(tokio::time::Instant::now());
                                if left < SHORTEST_PULL {
                                    break;
                                }
                                fetched = consumer
                                    .batch()
                                    .max_messages(FETCH - messages.len())
                                    .expires(left)
                                    .messages()
                                    .await
                                    .map_err(|e| e.to_string())?;
                            }
                            Err(_) => break,
                        }
                    }
                    failures = 0;
                    backoff.reset();
                    let mut readable = Vec::with_capacity(messages.len());
                    let mut events = Vec::with_capacity(messages.len());
                    for msg in messages {
                        match Event::decode(msg.payload.as_ref()) {
                            Ok(event) => {
                                // The publisher's trace context, for the handler's span.
                                let traceparent = msg
                                    .headers
                                    .as_ref()
                                    .and_then(|h| h.get("traceparent"))
                                    .map(|v| v.as_str().to_owned());
                                let sequence = msg.info().map_or(0, |i| i.stream_sequence);
                                events.push((event, traceparent, sequence));
                                readable.push(msg);
                            }
                            Err(e) => {
                                tracing::warn!(subject = %msg.subject, error = %e, "undecodable event skipped");
                                let _ = msg.ack().await;
                            }
                        }
                    }
                    if events.is_empty() {
                        continue;
                    }
                    let results = handle(events).await;
                    debug_assert_eq!(results.len(), readable.len());
                    for (i, msg) in readable.into_iter().enumerate() {
                        match results.get(i) {
                            Some(Ok(())) => {
                                let _ = msg.ack().await;
                            }
                            Some(Err(e)) => {
                                tracing::warn!(consumer = %durable, error = %e, "event not applied; redelivering");
                                let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
                            }
                            // No answer: redelivered once its ack wait ends.
                            None => {}
                        }
                    }
                }
                if shutdown.is_cancelled() {
                    return Ok::<(), String>(());
                }
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = result => {
                if let Err(e) = r {
                    failures += 1;
                    tracing::warn!(consumer = %durable, error = %e, failures, "consumer interrupted");
                }
            }
        }
        if !pause(&shutdown, backoff.next_delay()).await {
            return;
        }
    }
}

/// Asks for up to `most` events: the pull waits up to `wait` for the first
/// and ends with what is pending then.
async fn pull(consumer: &consumer::PullConsumer, most: usize, wait: Duration) -> Result<consumer::pull::Batch, String> {
    consumer
        .fetch()
        .max_messages(most)
        .expires(wait)
        .messages()
        .await
        .map_err(|e| e.to_string())
}

/// Most events asked for at once (and so handed to a batch handler).
const FETCH: usize = 100;

/// A gather with less time than this left ends rather than pull again.
const SHORTEST_PULL: Duration = Duration::from_millis(5);

/// How long a batch handler's batch gathers after its first event: events
/// come in bursts, and one statement for many is what batching is for.
/// Batch handlers keep counts (the health service's outcomes), which may
/// lag by this much; at 1,000 completions/s a 10 ms gather still wrote a
/// statement per six events.
const GATHER: Duration = Duration::from_millis(50);
