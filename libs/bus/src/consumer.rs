//! Durable consumers of the events stream: each service that reacts to
//! another's events reads them through a named JetStream consumer, acking
//! each event only after its effect committed. Handlers must be idempotent
//! (redeliveries happen) and must not depend on order across entities.

use std::future::Future;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer};
use futures::StreamExt;
use omoi_proto::events::Event;
use prost::Message;
use tokio_util::sync::CancellationToken;

use crate::{Topology, ensure_stream};

/// Reads `filter` (a subject under the events prefix) through the durable
/// consumer `durable` until `shutdown`, calling `handle` for each event. An
/// `Err` from the handler redelivers the event after a pause.
pub async fn consume<F, Fut>(
    client: async_nats::Client,
    topology: Topology,
    durable: String,
    filter: String,
    shutdown: CancellationToken,
    mut handle: F,
) where
    F: FnMut(Event, Option<String>) -> Fut,
    Fut: Future<Output = Result<(), String>>,
{
    let js = jetstream::new(client);
    let mut failures = 0u32;
    let mut backoff = crate::retry_backoff();
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
                        deliver_policy: consumer::DeliverPolicy::All,
                        max_ack_pending: 1000,
                        ..Default::default()
                    },
                )
                .await
                .map_err(|e| e.to_string())?;
            loop {
                let mut batch = consumer
                    .fetch()
                    .max_messages(100)
                    .expires(Duration::from_secs(1))
                    .messages()
                    .await
                    .map_err(|e| e.to_string())?;
                while let Some(msg) = batch.next().await {
                    let msg = msg.map_err(|e| e.to_string())?;
                    failures = 0;
                    backoff.reset();
                    let event = match Event::decode(msg.payload.as_ref()) {
                        Ok(e) => e,
                        Err(e) => {
                            tracing::warn!(subject = %msg.subject, error = %e, "undecodable event skipped");
                            let _ = msg.ack().await;
                            continue;
                        }
                    };
                    // The publisher's trace context, for the handler's span.
                    let traceparent = msg
                        .headers
                        .as_ref()
                        .and_then(|h| h.get("traceparent"))
                        .map(|v| v.as_str().to_owned());
                    match handle(event, traceparent).await {
                        Ok(()) => {
                            let _ = msg.ack().await;
                        }
                        Err(e) => {
                            tracing::warn!(consumer = %durable, error = %e, "event not applied; redelivering");
                            let _ = msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1)))).await;
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
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(backoff.next_delay()) => {}
        }
    }
}
