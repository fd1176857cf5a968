//! Reading what reached the events stream.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use omoi_proto::events::Event;
use prost::Message;

/// Every event in `stream`, in stream order, once at least `at_least` are
/// there (or after `within`, whatever arrived).
pub async fn read_all(nats_url: &str, stream: &str, at_least: u64, within: Duration) -> anyhow::Result<Vec<Event>> {
    let client = async_nats::connect(nats_url).await?;
    let js = jetstream::new(client);
    let deadline = tokio::time::Instant::now() + within;
    let mut s = js.get_stream(stream).await?;
    loop {
        let n = s.info().await?.state.messages;
        if n >= at_least || tokio::time::Instant::now() >= deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Let stragglers (duplicates would be among them) arrive.
    tokio::time::sleep(Duration::from_millis(300)).await;
    raw(&js, stream)
        .await?
        .iter()
        .map(|m| Event::decode(m.as_slice()).map_err(anyhow::Error::from))
        .collect()
}

/// Every message in `stream` as it is stored (headers aside), in order.
pub async fn payloads(nats_url: &str, stream: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let js = jetstream::new(async_nats::connect(nats_url).await?);
    raw(&js, stream).await
}

async fn raw(js: &jetstream::Context, stream: &str) -> anyhow::Result<Vec<Vec<u8>>> {
    let mut s = js.get_stream(stream).await?;
    let total = s.info().await?.state.messages;
    let consumer = s
        .create_consumer(consumer::pull::Config {
            deliver_policy: consumer::DeliverPolicy::All,
            ack_policy: consumer::AckPolicy::None,
            inactive_threshold: Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await?;
        let before = out.len();
        while let Some(msg) = batch.next().await {
            let msg = msg.map_err(|e| anyhow::anyhow!("{e}"))?;
            out.push(msg.payload.to_vec());
        }
        if out.len() == before {
            break;
        }
    }
    Ok(out)
}

/// How many events of `event_type` each entity has.
pub fn per_entity(events: &[Event], event_type: &str) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for e in events.iter().filter(|e| e.event_type == event_type) {
        *counts.entry(e.entity_id.clone()).or_insert(0) += 1;
    }
    counts
}

/// The event types of one entity, in stream order.
pub fn history(events: &[Event], entity_id: &str) -> Vec<String> {
    events
        .iter()
        .filter(|e| e.entity_id == entity_id)
        .map(|e| e.event_type.clone())
        .collect()
}
