//! WatchTicket: a ticket's events from JetStream, the history first, then
//! live, ending after the ticket's final event (the last one: a ticket
//! opened again by a retry or a follow-up goes on).

use async_nats::jetstream::{self, consumer::DeliverPolicy};
use futures::StreamExt;
use omoi_bus::Topology;
use omoi_domain::EventType;
use omoi_proto::events::Event;
use prost::Message;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tonic::Status;

pub type Sink = mpsc::Sender<Result<Event, Status>>;

/// Whether this event ends a ticket's stream.
fn is_final(event: &Event) -> bool {
    EventType::parse(&event.event_type).is_some_and(EventType::ends_ticket)
}

/// Streams the events about `ticket_id` into `sink` until the ticket's final
/// event, the client going away, or `shutdown`.
pub async fn follow(
    nats: async_nats::Client,
    topology: Topology,
    ticket_id: String,
    sink: Sink,
    shutdown: CancellationToken,
) {
    let js = jetstream::new(nats);
    let filter = topology.ticket_filter(&ticket_id);
    let mut messages = match omoi_bus::read_events(&js, &topology, filter, DeliverPolicy::All).await {
        Ok(m) => m,
        Err(e) => {
            let _ = sink
                .send(Err(Status::unavailable(format!("event stream unavailable: {e}"))))
                .await;
            return;
        }
    };
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = sink.send(Err(Status::unavailable("server shutting down; watch again"))).await;
                return;
            }
            _ = sink.closed() => return,
            m = messages.next() => m,
        };
        let msg = match next {
            Some(Ok(m)) => m,
            Some(Err(e)) => {
                tracing::debug!(error = %e, "watch consumer hiccup");
                continue;
            }
            None => {
                let _ = sink
                    .send(Err(Status::unavailable("event stream ended; watch again")))
                    .await;
                return;
            }
        };
        let Ok(event) = Event::decode(msg.payload.as_ref()) else {
            continue;
        };
        // A final event with more of the ticket's events after it was not
        // the end: the ticket was opened again (a retry, a follow-up).
        let more = msg.info().map_or(0, |i| i.pending);
        let done = is_final(&event) && more == 0;
        if sink.send(Ok(event)).await.is_err() || done {
            return;
        }
    }
}
