//! StreamTaskOutput: a task's agent events from JetStream, what is kept so
//! far and then, when following, live events until the task ends.

use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt;
use omoi_bus::Topology;
use omoi_proto::common::AgentEvent;
use omoi_proto::taskqueue as pb;
use omoi_store::Store;
use prost::Message;
use tokio::sync::mpsc;
use tonic::Status;
use uuid::Uuid;

type Sink = mpsc::Sender<Result<pb::StreamTaskOutputResponse, Status>>;

pub async fn follow(nats: async_nats::Client, topology: Topology, store: Store, task_id: Uuid, live: bool, sink: Sink) {
    let js = jetstream::new(nats);
    let opened = async {
        let stream = omoi_bus::ensure_output_stream(&js, &topology)
            .await
            .map_err(|e| e.to_string())?;
        let mut consumer = stream
            .create_consumer(consumer::pull::OrderedConfig {
                filter_subject: topology.output_subject(&task_id.to_string()),
                deliver_policy: consumer::DeliverPolicy::All,
                ..Default::default()
            })
            .await
            .map_err(|e| e.to_string())?;
        let pending = consumer.info().await.map_err(|e| e.to_string())?.num_pending;
        let messages = consumer.messages().await.map_err(|e| e.to_string())?;
        Ok::<_, String>((pending, messages))
    };
    let (mut pending, mut messages) = match tokio::time::timeout(Duration::from_secs(10), opened).await {
        Ok(Ok(x)) => x,
        Ok(Err(e)) => {
            let _ = sink
                .send(Err(Status::unavailable(format!("output stream unavailable: {e}"))))
                .await;
            return;
        }
        Err(_) => {
            let _ = sink.send(Err(Status::unavailable("output stream unavailable"))).await;
            return;
        }
    };
    loop {
        if !live && pending == 0 {
            return;
        }
        let next = tokio::select! {
            _ = sink.closed() => return,
            m = tokio::time::timeout(Duration::from_secs(1), messages.next()) => m,
        };
        match next {
            Ok(Some(Ok(msg))) => {
                pending = pending.saturating_sub(1);
                let Ok(event) = AgentEvent::decode(msg.payload.as_ref()) else {
                    continue;
                };
                if sink
                    .send(Ok(pb::StreamTaskOutputResponse { event: Some(event) }))
                    .await
                    .is_err()
                {
                    return;
                }
            }
            Ok(Some(Err(e))) => tracing::debug!(error = %e, "output consumer hiccup"),
            Ok(None) => return,
            // Quiet for a second: when following, stop once the task ended.
            Err(_) => {
                if !live {
                    return;
                }
                match store.get(task_id).await {
                    Ok(t) if t.status.is_terminal() => return,
                    Ok(_) => {}
                    Err(e) => {
                        let _ = sink.send(Err(omoi_base::status(e))).await;
                        return;
                    }
                }
            }
        }
    }
}
