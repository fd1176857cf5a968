//! Ordered, acknowledged publishing of a run's events on JetStream. One
//! event is in flight at a time and the next goes only once the stream
//! acknowledged it, so the stream holds them in order; a failed publish is
//! sent again with the same message id (the stream drops a duplicate) until
//! the stream has it. Nothing is lost while NATS is away, only delayed.

use std::time::Duration;

use async_nats::jetstream::{self, context::PublishErrorKind, message::PublishMessage};
use bytes::Bytes;
use omoi_domain::backoff::Backoff;
use omoi_proto::common::AgentEvent;
use prost::Message;
use tokio::sync::{mpsc, watch};

pub struct Publisher {
    queue: mpsc::UnboundedSender<AgentEvent>,
    /// Events the stream acknowledged (or that could never be published).
    done: watch::Receiver<i64>,
}

impl Publisher {
    /// Publishes on `subject`; message ids are `<id_prefix>:<seq>`.
    pub fn start(js: jetstream::Context, subject: String, id_prefix: String) -> Self {
        let (queue, rx) = mpsc::unbounded_channel();
        let (done_tx, done) = watch::channel(0);
        tokio::spawn(pump(js, subject, id_prefix, rx, done_tx));
        Self { queue, done }
    }

    pub fn send(&self, event: AgentEvent) {
        // The pump lives as long as this sender.
        let _ = self.queue.send(event);
    }

    /// Waits until the first `count` events are on the stream; false when
    /// that took longer than `within` (they keep going in the background).
    pub async fn flush(&self, count: i64, within: Duration) -> bool {
        let mut done = self.done.clone();
        tokio::time::timeout(within, done.wait_for(|n| *n >= count))
            .await
            .is_ok_and(|r| r.is_ok())
    }
}

async fn pump(
    js: jetstream::Context,
    subject: String,
    id_prefix: String,
    mut events: mpsc::UnboundedReceiver<AgentEvent>,
    done: watch::Sender<i64>,
) {
    while let Some(event) = events.recv().await {
        let payload = Bytes::from(event.encode_to_vec());
        let id = format!("{id_prefix}:{}", event.seq);
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_secs(2));
        loop {
            let message = PublishMessage::build().payload(payload.clone()).message_id(&id);
            let acked = match js.send_publish(subject.clone(), message).await {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match acked {
                Ok(_) => break,
                Err(e) if e.kind() == PublishErrorKind::MaxPayloadExceeded => {
                    tracing::warn!(seq = event.seq, error = %e, "agent event too large to publish; dropped");
                    break;
                }
                Err(e) => {
                    tracing::debug!(seq = event.seq, error = %e, "agent event not acknowledged; sending again");
                    tokio::time::sleep(backoff.next_delay()).await;
                }
            }
        }
        done.send_modify(|n| *n += 1);
    }
}
