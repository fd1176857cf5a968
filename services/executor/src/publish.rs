//! Ordered, acknowledged publishing of a run's events on JetStream. One
//! event is in flight at a time and the next goes only once the stream
//! acknowledged it, so the stream holds them in order; a failed publish is
//! sent again with the same message id (the stream drops a duplicate) until
//! the stream has it. Nothing is lost while NATS is away, only delayed.

use std::time::Duration;

use async_nats::jetstream::context::{PublishError, PublishErrorKind};
use async_nats::jetstream::{self, message::PublishMessage};
use bytes::Bytes;
use omoi_proto::common::AgentEvent;
use omoi_runtime::background::{Retried, policy, retry};
use prost::Message;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;

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

/// Whether a failed publish is worth sending again: all but one too
/// large for the server.
fn worth_resending(e: &PublishError) -> bool {
    e.kind() != PublishErrorKind::MaxPayloadExceeded
}

async fn pump(
    js: jetstream::Context,
    subject: String,
    id_prefix: String,
    mut events: mpsc::UnboundedReceiver<AgentEvent>,
    done: watch::Sender<i64>,
) {
    // Agent events are sent whatever the executor's state: a run's end waits
    // for them (`flush`), the process's stop bounds that wait.
    let never = CancellationToken::new();
    while let Some(event) = events.recv().await {
        let payload = Bytes::from(event.encode_to_vec());
        let id = format!("{id_prefix}:{}", event.seq);
        // Sent until JetStream has it: nothing but its size can refuse it.
        let (js, subject, id, payload) = (&js, &subject, &id, &payload);
        let published = retry(
            "publishing an agent event",
            policy::OUTPUT,
            &never,
            worth_resending,
            move || async move {
                let message = PublishMessage::build().payload(payload.clone()).message_id(id);
                js.send_publish(subject.clone(), message).await?.await
            },
        )
        .await;
        if let Retried::Refused(e) = published {
            tracing::warn!(seq = event.seq, error = %e, "agent event too large to publish; dropped");
        }
        done.send_modify(|n| *n += 1);
    }
}
