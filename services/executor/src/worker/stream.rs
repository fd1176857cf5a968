//! The assignment stream: assignments start runs, cancellations stop them.

use std::sync::Arc;

use omoi_proto::domain::WireEnum;
use omoi_proto::taskqueue::{self as tq, watch_assignments_response::Event as StreamEvent};
use omoi_runtime::background::{pause, policy};
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use super::Worker;
use super::run::run_span;
use crate::executions::StopRequest;

impl Worker {
    /// Takes assignments until `stop` (reconnecting with backoff whenever the
    /// task queue goes away).
    pub async fn assignment_loop(self: Arc<Self>, stop: CancellationToken) {
        let mut backoff = policy::RECONNECT.start();
        let mut registered = self.registered.subscribe();
        while !stop.is_cancelled() {
            // The task queue takes only agents the health service knows.
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = registered.wait_for(|known| *known) => {}
            }
            let opened = self
                .queue
                .clone()
                .watch_assignments(tq::WatchAssignmentsRequest {
                    agent_id: self.agent_id.to_string(),
                    phases: self.phases.iter().map(|p| p.wire()).collect(),
                    capacity: self.config.capacity,
                })
                .await;
            match opened {
                Ok(stream) => {
                    tracing::info!("assignment stream open");
                    backoff.reset();
                    let mut stream = stream.into_inner();
                    loop {
                        let msg = tokio::select! {
                            _ = stop.cancelled() => return,
                            m = stream.message() => m,
                        };
                        match msg {
                            Ok(Some(m)) => match m.event {
                                Some(StreamEvent::Assignment(a)) => {
                                    let span = run_span(&a);
                                    tokio::spawn(Arc::clone(&self).execute(a).instrument(span));
                                }
                                Some(StreamEvent::Cancellation(c)) => {
                                    if let Ok(id) = c.task_id.parse() {
                                        let request = StopRequest {
                                            reason: c.reason,
                                            report: false,
                                        };
                                        if self.executions.stop(id, Some(c.attempt), request) {
                                            tracing::info!(task_id = %id, "run stopped by the task queue");
                                        }
                                    }
                                }
                                None => {}
                            },
                            Ok(None) => break,
                            Err(s) => {
                                tracing::warn!(error = %s.message(), "assignment stream broke");
                                break;
                            }
                        }
                    }
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    tracing::warn!(error = %s.message(), "the task queue does not know this agent; registering again");
                    self.registered.send_replace(false);
                }
                Err(s) => tracing::warn!(error = %s.message(), "cannot open the assignment stream"),
            }
            if !pause(&stop, backoff.next_delay()).await {
                return;
            }
        }
    }
}
